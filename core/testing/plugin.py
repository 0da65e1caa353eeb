"""The hmmsim pytest plugin (entry point ``pytest11``): drivers under test as fixtures.

``pytest --pyargs hmmsim.testing.suite --hmmsim-driver NAME[:key=value,...]``
runs the conformance suite against any installed driver; without the option
it runs against every installed driver with the variants the driver lists.
"""

from __future__ import annotations

from typing import Any

import pytest

from ..plugins import driver_classes, get_plugin_manager
from .checks import CheckSkipped, DriverSpec


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("hmmsim")
    group.addoption(
        "--hmmsim-driver",
        action="append",
        default=[],
        metavar="NAME[:key=value,...]",
        help="driver (with probe parameters) to test; repeatable; default: all installed",
    )


def installed_specs() -> list[DriverSpec]:
    """Every installed driver, in each variant it declares (``Driver.variants``)."""
    specs = []
    for name, cls in sorted(driver_classes(get_plugin_manager()).items()):
        variants = getattr(cls, "variants", None) or [{}]
        for params in variants:
            specs.append(DriverSpec(name, tuple(sorted(params.items()))))
    return specs


def selected_specs(config: Any) -> list[DriverSpec]:
    given = config.getoption("--hmmsim-driver", default=[]) or []
    return [DriverSpec.parse(s) for s in given] if given else installed_specs()


def pytest_generate_tests(metafunc: Any) -> None:
    if "hmmsim_driver" in metafunc.fixturenames:
        specs = selected_specs(metafunc.config)
        metafunc.parametrize("hmmsim_driver", specs, ids=[str(s) for s in specs])


@pytest.fixture
def hmmsim_env(hmmsim_driver: DriverSpec) -> Any:
    """A fresh machine with the driver under test probed, a process and its mirror.

    Yields a ``hmmsim.testing.checks.Env``; at the end the mirror is closed,
    the processes exit and the machine is checked for leaks.
    """
    from .checks import environment

    with environment(hmmsim_driver) as env:
        yield env


def run_or_skip(check: Any, spec: DriverSpec) -> None:
    """Run a check; a missing capability becomes a pytest skip with its reason."""
    try:
        check(spec)
    except CheckSkipped as exc:
        pytest.skip(str(exc))
