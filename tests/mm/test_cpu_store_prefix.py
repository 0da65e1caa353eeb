"""A CPU store that faults part-way has stored what came before the fault."""

from __future__ import annotations

import pytest
from helpers import PAGE, RW
from hmmsim import MAP_ANONYMOUS, MAP_SHARED, Machine, MachineConfig, SegmentationFault


def test_a_store_running_off_a_shared_mapping_leaves_its_prefix_for_the_other_sharers():
    m = Machine(MachineConfig(ram_bytes=32 << 20))
    p = m.spawn()
    a = p.mmap(2 * PAGE, RW, MAP_SHARED | MAP_ANONYMOUS)
    p.munmap(a + PAGE, PAGE)  # the store runs off the end of the mapping
    child = p.fork()
    with pytest.raises(SegmentationFault, match="no mapping"):
        p.write(a, b"\x11" * 2 * PAGE)
    # As with a CPU's store loop (Linux, checked on the host): the mapped page
    # was written before the fault, and a process sharing it sees the bytes.
    assert child.read(a, PAGE) == b"\x11" * PAGE


def test_a_load_that_faults_part_way_returns_nothing_and_changes_nothing():
    m = Machine(MachineConfig(ram_bytes=32 << 20))
    p = m.spawn()
    a = p.mmap(2 * PAGE, RW, MAP_SHARED | MAP_ANONYMOUS)
    p.write(a, b"x" * PAGE)
    p.munmap(a + PAGE, PAGE)
    with pytest.raises(SegmentationFault):
        p.read(a, 2 * PAGE)
    assert p.read(a, 1) == b"x"
