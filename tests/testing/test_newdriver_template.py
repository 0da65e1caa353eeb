"""The new-driver template is a real module, rendered by name substitution."""

from __future__ import annotations

import re
import sys
import types

import hmmsim
import pytest
from hmmsim import MAP_ANONYMOUS, MAP_PRIVATE, PROT_READ, PROT_WRITE
from hmmsim.newdriver import class_name, render_module, template_source
from hmmsim.newdriver.template import Skel
from hmmsim.plugins import driver_classes, get_plugin_manager

PAGE = 4096


def test_the_template_is_not_an_installed_driver():
    assert "skel" not in driver_classes(get_plugin_manager(), warn=False)


def test_rendering_substitutes_the_name_and_nothing_else():
    source = render_module("my_gpu")
    assert not re.search(r"skel", source, re.IGNORECASE)
    assert "class MyGpu(Driver):" in source and 'name = "my_gpu"' in source
    assert "class MyGpuMirror(Mirror):" in source and "class MyGpuDevice(Device):" in source
    back = source.replace("MyGpu", "Skel").replace("my_gpu", "skel")
    assert back == template_source()


def _load(name: str) -> types.ModuleType:
    mod = types.ModuleType(f"hmmsim_{name}_tmpl_test")
    sys.modules[mod.__name__] = mod
    exec(compile(render_module(name), mod.__name__, "exec"), mod.__dict__)
    return mod


def _stats_after_read_and_munmap(driver: hmmsim.Driver) -> tuple[int, ...]:
    m = hmmsim.Machine(hmmsim.MachineConfig(ram_bytes=16 << 20))
    dev = driver.probe(m)
    p = m.spawn()
    fd = dev.open(p)
    a = p.mmap(3 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
    p.write(a, b"\x01" * 3 * PAGE)
    assert fd.read(a, 3 * PAGE) == b"\x01" * 3 * PAGE
    s = fd.stats
    after_read = (s.faults, s.fault_rounds, s.pages_mapped, s.pages_unmapped)
    p.munmap(a, 3 * PAGE)
    fd.close()
    return (*after_read, s.pages_unmapped)


@pytest.mark.parametrize("name", ["my_gpu"])
def test_the_template_counts_mirror_stats_as_dmirror_does(name):
    from hmmsim.drivers.dmirror import Dmirror

    mod = _load(name)
    try:
        generated = getattr(mod, class_name(name))()
        # faults and pages_mapped per device PTE written, one fault round,
        # nothing unmapped until the munmap drops all three.
        assert _stats_after_read_and_munmap(generated) == (3, 1, 3, 0, 3)
        assert _stats_after_read_and_munmap(Dmirror()) == (3, 1, 3, 0, 3)
        assert _stats_after_read_and_munmap(Skel()) == (3, 1, 3, 0, 3)
    finally:
        del sys.modules[mod.__name__]
