"""Every conformance check, against the driver(s) under test (``hmmsim_driver``).

Test ids are the checks' names everywhere else: ``area/name``
(``coherence/read_anonymous``), after the driver spec.
"""

from __future__ import annotations

from typing import Any

import pytest
from hmmsim.testing.checks import CHECKS, DriverSpec, check_id
from hmmsim.testing.plugin import run_or_skip

_CASES = [(area, check) for area, checks in CHECKS.items() for check in checks]


@pytest.mark.parametrize(("area", "check"), _CASES, ids=[check_id(a, c) for a, c in _CASES])
def test_conformance(hmmsim_driver: DriverSpec, area: str, check: Any) -> None:
    run_or_skip(check, hmmsim_driver)
