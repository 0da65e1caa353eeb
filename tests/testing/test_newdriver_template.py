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


def _stats_after_read_munmap_and_close(driver: hmmsim.Driver) -> tuple[int, ...]:
    m = hmmsim.Machine(hmmsim.MachineConfig(ram_bytes=16 << 20))
    dev = driver.probe(m)
    p = m.spawn()
    fd = dev.open(p)
    a = p.mmap(5 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
    p.write(a, b"\x01" * 5 * PAGE)
    assert fd.read(a, 3 * PAGE) == b"\x01" * 3 * PAGE
    s = fd.stats
    after_read = (s.faults, s.fault_rounds, s.pages_mapped, s.pages_unmapped)
    p.munmap(a, 3 * PAGE)
    after_munmap = s.pages_unmapped
    assert fd.read(a + 3 * PAGE, 2 * PAGE) == b"\x01" * 2 * PAGE
    fd.close()
    return (*after_read, after_munmap, s.faults, s.pages_unmapped)


@pytest.mark.parametrize("name", ["my_gpu"])
def test_the_template_counts_mirror_stats_as_dmirror_does(name):
    from hmmsim.drivers.dmirror import Dmirror

    mod = _load(name)
    try:
        generated = getattr(mod, class_name(name))()
        # One device fault event (the access stops once) serviced by one
        # hmm_range_fault call mapping three PTEs; the munmap drops all three,
        # a second access faults once more and close drops its two.
        want = (1, 1, 3, 0, 3, 2, 5)
        assert _stats_after_read_munmap_and_close(generated) == want
        assert _stats_after_read_munmap_and_close(Dmirror()) == want
        assert _stats_after_read_munmap_and_close(Skel()) == want
    finally:
        del sys.modules[mod.__name__]
