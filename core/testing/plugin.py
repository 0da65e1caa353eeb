"""The hmmsim pytest plugin (entry point ``pytest11``): drivers under test as fixtures.

``pytest --pyargs hmmsim.testing.suite --hmmsim-driver NAME[:key=value,...]``
runs the conformance suite against any installed driver; without the option
it runs against the drivers the ini option ``hmmsim_drivers`` lists (one spec
a line, how a plugin pins the suite to its own driver), else against every
installed driver with the variants the driver lists. A test that
parametrizes ``hmmsim_driver`` itself keeps its own values.

An unknown driver or parameter is a usage error (pytest exit status 4), found
once before collection, not a failure of every test. This module imports the
rest of hmmsim only when a test asks for a driver: it is loaded in every pytest
run of the environment.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest

_HINT = (
    "a directory named 'hmmsim' in the current directory ({path}) hides the "
    "installed hmmsim package (Python imports the current directory first); "
    "run pytest from inside the clone (cd {path}), or clone it under another name"
)


def shadowing_directory() -> str | None:
    """The directory that shadows the hmmsim package, if ``import hmmsim`` found one.

    Cloning the repository under its default name and running ``python -m
    pytest`` from the folder that holds the clone makes ``hmmsim`` the clone
    directory itself (a namespace package without ``__init__.py``), not the
    installed package.
    """
    mod = sys.modules.get("hmmsim")
    if mod is None or getattr(mod, "__file__", None) is not None:
        return None
    paths = list(getattr(mod, "__path__", []))
    return paths[0] if paths else "?"


def _check_not_shadowed() -> None:
    path = shadowing_directory()
    if path is not None:
        raise pytest.UsageError(_HINT.format(path=path))


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("hmmsim")
    group.addoption(
        "--hmmsim-driver",
        action="append",
        default=[],
        metavar="NAME[:key=value,...]",
        help="driver (with probe parameters) to test; repeatable; default: the ini "
        "option hmmsim_drivers, else every installed driver",
    )
    parser.addini(
        "hmmsim_drivers",
        type="linelist",
        default=[],
        help="driver specs the hmmsim suite tests when --hmmsim-driver is not given",
    )


def _given(config: Any) -> list[str]:
    given = list(config.getoption("--hmmsim-driver", default=[]) or [])
    return given or list(config.getini("hmmsim_drivers") or [])


def installed_specs() -> list[Any]:
    """Every installed driver, in each variant it declares (``Driver.variants``)."""
    from .checks import installed_specs as specs

    return specs()


def selected_specs(config: Any) -> list[Any]:
    """The driver specs under test, without repeats, each validated (cached per session)."""
    cached = getattr(config, "_hmmsim_specs", None)
    if cached is not None:
        return list(cached)
    from ..errors import HmmsimError
    from .checks import DriverSpec, unique_specs, validate_spec

    given = _given(config)
    try:
        specs = unique_specs([DriverSpec.parse(s) for s in given])
        for spec in specs:
            validate_spec(spec)
    except HmmsimError as exc:
        raise pytest.UsageError(f"hmmsim: {exc.message}") from None
    if not given:
        specs = installed_specs()
    config._hmmsim_specs = specs
    return list(specs)


def pytest_configure(config: Any) -> None:
    config.addinivalue_line(
        "markers", "hmmsim_driver: tests parametrized over the hmmsim drivers under test"
    )
    if "hmmsim" in sys.modules:
        _check_not_shadowed()
    if _given(config):
        selected_specs(config)  # a usage error now, before collection


def _parametrized_by_test(metafunc: Any) -> bool:
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0] if mark.args else mark.kwargs.get("argnames", "")
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",")]
        if "hmmsim_driver" in names:
            return True
    return False


def pytest_generate_tests(metafunc: Any) -> None:
    if "hmmsim_driver" not in metafunc.fixturenames or _parametrized_by_test(metafunc):
        return
    _check_not_shadowed()
    specs = selected_specs(metafunc.config)
    metafunc.parametrize("hmmsim_driver", specs, ids=[str(s) for s in specs])


def _as_spec(value: Any) -> Any:
    from .checks import DriverSpec

    return DriverSpec.parse(value) if isinstance(value, str) else value


@pytest.fixture
def hmmsim_env(hmmsim_driver: Any) -> Any:
    """A fresh machine with the driver under test probed, a process and its mirror.

    Yields a ``hmmsim.testing.checks.Env``; at the end the mirror is closed,
    the processes exit and the machine is checked for leaks.
    """
    from .checks import environment

    with environment(_as_spec(hmmsim_driver)) as env:
        yield env


def run_or_skip(check: Any, spec: Any) -> None:
    """Run a check; a missing capability becomes a pytest skip with its reason.

    ``spec`` is a ``DriverSpec`` or its text (``"dmirror:memory=coherent"``).
    """
    from .checks import CHECKS, CheckSkipped, expected_failure

    spec = _as_spec(spec)
    area = next((a for a, checks in CHECKS.items() if check in checks), "")
    reason = expected_failure(spec, area, check) if area else None
    try:
        check(spec)
    except CheckSkipped as exc:
        pytest.skip(str(exc))
    except Exception:
        if reason is None:
            raise
        pytest.xfail(reason)
    if reason is not None:
        pytest.fail(f"declared as an expected failure, but passed: {reason}")
