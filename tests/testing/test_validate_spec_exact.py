"""validate_spec on its own (the CLI and the pytest plugin call it without a
plugin manager): a good spec passes, typos fail with the documented errors."""

from __future__ import annotations

import hmmsim
import pytest
from hmmsim.testing.checks import validate_spec
from hmmsim.testing.env import DriverSpec


@pytest.mark.parametrize("spec", ["dmirror", "dmirror:memory=coherent"])
def test_valid_spec_passes_without_a_plugin_manager(spec: str) -> None:
    assert validate_spec(DriverSpec.parse(spec)) is None


def test_unknown_driver_is_noent() -> None:
    with pytest.raises(hmmsim.NoEntry):
        validate_spec(DriverSpec.parse("no-such-driver"))


def test_undeclared_parameter_is_einval() -> None:
    with pytest.raises(hmmsim.InvalidArgument):
        validate_spec(DriverSpec.parse("dmirror:colour=blue"))
