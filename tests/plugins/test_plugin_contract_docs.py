"""The plugin contract is written down where plugin authors read it, and it is true.

* Every plugin-facing method of ``Driver``, ``Device`` and ``Mirror`` has a
  Google-style docstring: ``Args:`` naming every parameter, ``Returns:`` when
  it returns something, ``Raises:`` when it (or, for an abstract method, an
  implementation) raises.
* Every ``MirrorStats`` counter and ``DevicePte`` field has a ``#:`` line.
* The hookspecs say when they fire and how often, and they fire as they say.
"""

from __future__ import annotations

import ast
import inspect
import pathlib
import re
import textwrap

import hmmsim.driver as driver_mod
import hmmsim.hookspecs as hookspecs_mod
import pytest
from hmmsim import InvalidArgument, Machine, MachineConfig, hookimpl
from hmmsim.driver import Device, DevicePte, Driver, Mirror, MirrorStats
from hmmsim.plugins import driver_classes, get_plugin_manager

CLASSES = (Driver, Device, Mirror)


def _plugin_facing() -> list[tuple[type, str]]:
    out = []
    for cls in CLASSES:
        for name, member in vars(cls).items():
            if name.startswith("_"):
                continue
            func = member.__func__ if isinstance(member, classmethod) else member
            if inspect.isfunction(func):
                out.append((cls, name))
    return out


METHODS = _plugin_facing()


def _func(cls: type, name: str):  # type: ignore[no-untyped-def]
    member = vars(cls)[name]
    return member.__func__ if isinstance(member, classmethod) else member


def _section(doc: str, title: str) -> str | None:
    """The body of a Google-style section (indented lines after ``Title:``)."""
    m = re.search(rf"^{title}:\n((?:[ \t]+.*\n?|\n)*)", doc, re.M)
    return m.group(1) if m else None


def _raises(func) -> bool:  # type: ignore[no-untyped-def]
    if getattr(func, "__isabstractmethod__", False):
        return True  # an implementation raises; the contract must say what
    tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    return any(isinstance(n, ast.Raise) for n in ast.walk(tree))


def test_the_plugin_facing_methods_are_the_expected_ones():
    names = {f"{c.__name__}.{n}" for c, n in METHODS}
    assert {
        "Mirror.read",
        "Mirror.write",
        "Mirror.device_ptes",
        "Mirror.device_pte_state",
        "Mirror.close",
        "Mirror.migrate_to_device",
        "Mirror.migrate_to_system",
        "Mirror.make_exclusive",
        "Device.open",
        "Device.remove",
        "Driver.probe",
        "Driver.capabilities_for",
        "Driver.expected_failures",
        "Driver.check_parameters",
        "Driver.parameter",
    } <= names


@pytest.mark.parametrize(("cls", "name"), METHODS, ids=[f"{c.__name__}.{n}" for c, n in METHODS])
def test_method_has_args_returns_raises_sections(cls, name):
    func = _func(cls, name)
    doc = inspect.getdoc(func)
    assert doc, f"{cls.__name__}.{name} has no docstring"
    sig = inspect.signature(func)
    params = [p for p in sig.parameters.values() if p.name not in ("self", "cls")]
    args = _section(doc, "Args")
    if params:
        assert args is not None, "no Args: section"
        for p in params:
            label = f"**{p.name}" if p.kind is p.VAR_KEYWORD else p.name
            assert re.search(rf"^\s+{re.escape(label)}:", args, re.M), f"Args: misses {label}"
    if sig.return_annotation not in ("None", None, inspect.Signature.empty):
        assert _section(doc, "Returns") is not None, "no Returns: section"
    if _raises(func):
        raises = _section(doc, "Raises")
        assert raises is not None and raises.strip(), "no Raises: section"


@pytest.mark.parametrize("name", ["read", "write", "migrate_to_device", "migrate_to_system"])
def test_failure_behaviour_is_stated(name):
    doc = inspect.getdoc(getattr(Mirror, name))
    assert doc is not None and "On failure" in doc


@pytest.mark.parametrize("cls", [MirrorStats, DevicePte])
def test_every_field_has_a_doc_comment(cls):
    source = pathlib.Path(driver_mod.__file__).read_text().splitlines()
    tree = ast.parse("\n".join(source))
    [node] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__]
    fields = [n for n in node.body if isinstance(n, ast.AnnAssign)]
    assert {f.target.id for f in fields} == {a.name for a in cls.__attrs_attrs__}  # type: ignore[attr-defined, union-attr]
    for f in fields:
        above = source[f.lineno - 2].strip()
        assert above.startswith("#:"), f"{cls.__name__}.{f.target.id} has no #: line"  # type: ignore[union-attr]


def test_stats_units_are_the_documented_ones():
    src = inspect.getsource(MirrorStats)
    assert "Device fault events as the hardware reports them" in src
    assert "``hmm_range_fault`` calls" in src
    assert "Device page-table entries written, in 4 KiB pages" in src


# ----- hookspecs: documented, and true ---------------------------------------------------


@pytest.mark.parametrize("name", ["hmmsim_register_drivers", "hmmsim_driver_probed"])
def test_hookspec_says_when_and_how_often(name):
    doc = inspect.getdoc(getattr(hookspecs_mod, name))
    assert doc is not None and "When:" in doc
    assert "called once when a plugin manager is built" not in doc.lower()


class Counter:
    """A plugin that counts the hook calls it receives."""

    def __init__(self) -> None:
        self.registered = 0
        self.probed: list[tuple[object, object]] = []

    @hookimpl
    def hmmsim_register_drivers(self):  # type: ignore[no-untyped-def]
        self.registered += 1
        return []

    @hookimpl
    def hmmsim_driver_probed(self, driver, device):  # type: ignore[no-untyped-def]
        self.probed.append((driver, device))


@pytest.fixture
def counted():  # type: ignore[no-untyped-def]
    pm = get_plugin_manager()
    counter = Counter()
    pm.register(counter, name="counter")
    m = Machine(MachineConfig(ram_bytes=32 << 20))
    m.plugin_manager = pm
    return pm, counter, m


def test_register_drivers_fires_on_every_registry_read_not_once_per_manager(counted):
    pm, counter, m = counted
    driver_classes(pm)
    driver_classes(pm)
    assert counter.registered == 2
    m.probe("dmirror")
    m.probe("dmirror")
    assert counter.registered == 4  # each Machine.probe looks the driver up


def test_driver_probed_fires_once_per_successful_probe_before_devices_append(counted):
    _pm, counter, m = counted
    d1 = m.probe("dmirror")
    d2 = m.probe("dmirror", memory="coherent")
    assert [dev for _drv, dev in counter.probed] == [d1, d2]
    assert all(isinstance(drv, Driver) for drv, _dev in counter.probed)
    assert counter.probed[0][0] is not counter.probed[1][0]  # a fresh Driver each probe
    with pytest.raises(InvalidArgument):
        m.probe("dmirror", memory="nonsense")
    assert len(counter.probed) == 2  # no call for a failed probe


def test_an_observer_that_raises_fails_the_probe_and_the_device_is_not_listed(counted):
    pm, _counter, m = counted

    class Bad:
        @hookimpl
        def hmmsim_driver_probed(self, driver, device):  # type: ignore[no-untyped-def]
            assert device not in m.devices  # fired before the device is listed
            raise RuntimeError("observer failed")

    pm.register(Bad(), name="bad")
    with pytest.raises(RuntimeError, match="observer failed"):
        m.probe("dmirror")
    assert m.devices == []
