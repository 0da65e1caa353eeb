"""Plugin discovery, the driver registry and Machine.probe."""

from __future__ import annotations

import types

import hmmsim
import pytest
from hmmsim import hookimpl
from hmmsim.driver import Capability, Driver
from hmmsim.drivers.dmirror import Dmirror
from hmmsim.plugins import (
    PluginWarning,
    broken_plugins,
    driver_classes,
    find_driver,
    get_plugin_manager,
    parse_driver_spec,
)


def test_plugin_manager_finds_dmirror_through_its_entry_point():
    pm = get_plugin_manager()
    assert driver_classes(pm)["dmirror"] is Dmirror
    assert get_plugin_manager() is not pm  # a fresh manager each time


def test_block_list_hides_a_plugin():
    pm = get_plugin_manager(block=["dmirror"])
    assert "dmirror" not in driver_classes(pm)
    with pytest.raises(hmmsim.NoEntry):
        find_driver(pm, "dmirror")


def test_two_probes_give_independent_devices(machine):
    a = machine.probe("dmirror")
    b = machine.probe("dmirror", memory="coherent")
    assert a is not b and a.owner_id != b.owner_id
    assert a.chunks[0].pgmap.owner is a and b.chunks[0].pgmap.owner is b
    assert a.chunks[0].pgmap.range.start != b.chunks[0].pgmap.range.start
    assert machine.devices == [a, b]


def test_probe_errors(machine):
    with pytest.raises(hmmsim.NoEntry, match="nosuch"):
        machine.probe("nosuch")
    with pytest.raises(hmmsim.InvalidArgument):
        machine.probe("dmirror", memory="magnetic")
    with pytest.raises(hmmsim.InvalidArgument):
        machine.probe("dmirror", colour="red")


def test_a_plugin_registered_by_hand(machine):
    class Toy(Driver):
        name = "toy"
        capabilities = Capability.READ

        def probe(self, machine, **params):
            raise hmmsim.NotSupported("toy devices cannot be probed")

    plugin = types.SimpleNamespace(hmmsim_register_drivers=hookimpl(lambda: [Toy]))
    pm = get_plugin_manager()
    pm.register(plugin, name="toy-plugin")
    assert driver_classes(pm)["toy"] is Toy
    machine.plugin_manager = pm
    with pytest.raises(hmmsim.NotSupported):
        machine.probe("toy")


def test_non_driver_registrations_set_the_plugin_aside():
    plugin = types.SimpleNamespace(hmmsim_register_drivers=hookimpl(lambda: [object]))
    pm = get_plugin_manager()
    pm.register(plugin, name="bad")
    with pytest.warns(PluginWarning, match="plugin 'bad' cannot be loaded"):
        drivers = driver_classes(pm)
    assert drivers["dmirror"] is Dmirror and "bad" not in drivers and object not in drivers.values()
    assert [b.name for b in broken_plugins(pm)] == ["bad"]
    assert "is not a hmmsim.driver.Driver subclass" in broken_plugins(pm)[0].reason


def test_a_plugin_whose_hook_raises_is_set_aside_and_reported_once():
    def boom():
        raise RuntimeError("no device today")

    pm = get_plugin_manager()
    pm.register(types.SimpleNamespace(hmmsim_register_drivers=hookimpl(boom)), name="boomer")
    with pytest.warns(PluginWarning, match="RuntimeError: no device today"):
        assert "dmirror" in driver_classes(pm)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        driver_classes(pm)  # reported once: no second warning


def test_two_plugins_with_one_driver_name_keep_the_first():
    class Other(Driver):
        name = "dmirror"

        def probe(self, machine, **params):
            raise hmmsim.NotSupported("never")

    pm = get_plugin_manager()
    pm.register(types.SimpleNamespace(hmmsim_register_drivers=hookimpl(lambda: [Other])), "dup")
    with pytest.warns(PluginWarning, match="already provided by plugin 'dmirror'"):
        assert driver_classes(pm)["dmirror"] is Dmirror


def test_parameter_declarations_are_checked():
    Dmirror.check_parameters({"memory": "coherent"})
    with pytest.raises(hmmsim.InvalidArgument, match="not one of private, coherent"):
        Dmirror.check_parameters({"memory": "magnetic"})
    with pytest.raises(hmmsim.InvalidArgument, match="no parameter 'colour'"):
        Dmirror.check_parameters({"colour": "red"})
    p = Dmirror.parameter("memory")
    assert p.choices == ("private", "coherent") and p.default == "private"


def test_driver_specs_parse():
    assert parse_driver_spec("dmirror") == ("dmirror", {})
    assert parse_driver_spec("dmirror:memory=coherent,x=1") == (
        "dmirror",
        {"memory": "coherent", "x": "1"},
    )
    for bad in (":x=1", "dmirror:memory", "dmirror:=x", "dmirror:memory=private,memory=coherent"):
        with pytest.raises(hmmsim.InvalidArgument):
            parse_driver_spec(bad)


def test_capabilities_per_variant():
    d = Dmirror()
    assert Capability.DEVICE_PRIVATE in d.capabilities_for(memory="private")
    coh = d.capabilities_for(memory="coherent")
    assert Capability.DEVICE_COHERENT in coh and Capability.DEVICE_PRIVATE not in coh


def test_optional_operations_raise_not_supported():
    from hmmsim.driver import Mirror

    class Minimal(Mirror):
        def read(self, addr, length):
            return b""

        def write(self, addr, data):
            return None

        def device_ptes(self, addr, npages):
            return []

        def close(self):
            return None

    m = Minimal()
    for call in (
        lambda: m.migrate_to_device(0, 1),
        lambda: m.migrate_to_system(0, 1),
        lambda: m.make_exclusive(0, 1),
    ):
        with pytest.raises(hmmsim.NotSupported):
            call()


def test_the_pytest_plugin_env_fixture(hmmsim_env):
    env = hmmsim_env
    a = env.mmap(2 * 4096)
    env.proc.write(a, b"fixture")
    assert env.mirror.read(a, 7) == b"fixture"
    env.check(a, 2)
