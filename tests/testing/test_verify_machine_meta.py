"""Meta-tests of ``verify_machine``: each consistency check fails on a state
crafted to break exactly that rule (a check that cannot fail is a defect)."""

from __future__ import annotations

import hmmsim
import pytest
from hmmsim import MADV_PAGEOUT, MAP_ANONYMOUS, MAP_PRIVATE, PROT_READ, PROT_WRITE
from hmmsim.mm.debug import verify_machine

PAGE = 4096
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS


@pytest.fixture
def m() -> hmmsim.Machine:
    return hmmsim.Machine(hmmsim.MachineConfig(ram_bytes=32 << 20, swap_bytes=4 << 20))


def _page(m: hmmsim.Machine) -> tuple[hmmsim.Process, int, int]:
    p = m.spawn()
    a = p.mmap(2 * PAGE, RW, ANON)
    p.write(a, b"x")
    pfn = p.pagemap(a, 1)[0].pfn
    assert pfn is not None
    verify_machine(m)
    return p, a, pfn


@pytest.mark.parametrize("delta", [1, -1])
def test_mapcount_that_disagrees_with_the_page_tables_fails(m: hmmsim.Machine, delta: int) -> None:
    _, _, pfn = _page(m)
    m.phys.mapcount[pfn] += delta
    with pytest.raises(AssertionError, match="mapcount"):
        verify_machine(m)


def test_mapcount_of_a_page_mapped_by_two_processes_is_recounted(m: hmmsim.Machine) -> None:
    p, a, pfn = _page(m)
    child = p.fork()
    assert child.pagemap(a, 1)[0].pfn == pfn
    assert int(m.phys.mapcount[pfn]) == 2
    verify_machine(m)
    m.phys.mapcount[pfn] = 1
    with pytest.raises(AssertionError, match="mapcount 1 but 2"):
        verify_machine(m)


def test_reference_not_accounted_for_fails_as_leak(m: hmmsim.Machine) -> None:
    _, _, pfn = _page(m)
    m.phys.refcount[pfn] += 1
    with pytest.raises(AssertionError, match="leak"):
        verify_machine(m)


def test_reference_below_the_mappings_fails(m: hmmsim.Machine) -> None:
    _, _, pfn = _page(m)
    m.phys.refcount[pfn] -= 1
    with pytest.raises(AssertionError, match="refcount"):
        verify_machine(m)


def test_mapped_frame_marked_free_fails(m: hmmsim.Machine) -> None:
    _, _, pfn = _page(m)
    m.phys.allocator.used[pfn] = False
    with pytest.raises(AssertionError, match="free"):
        verify_machine(m)


def _swapped(m: hmmsim.Machine) -> int:
    p = m.spawn()
    a = p.mmap(PAGE, RW, ANON)
    p.write(a, b"s")
    p.madvise(a, PAGE, MADV_PAGEOUT)
    slot = p.pagemap(a, 1)[0].swap_offset
    assert slot is not None
    verify_machine(m)
    return slot


def test_swap_slot_count_above_its_users_fails(m: hmmsim.Machine) -> None:
    slot = _swapped(m)
    m.swap.count[slot] += 1
    with pytest.raises(AssertionError, match=f"swap slot {slot}: count 2 but 1"):
        verify_machine(m)


def test_swap_entry_to_a_free_slot_fails(m: hmmsim.Machine) -> None:
    slot = _swapped(m)
    m.swap.count[slot] = 0
    with pytest.raises(AssertionError, match=f"swap slot {slot} referenced but free"):
        verify_machine(m)


def test_slot_held_by_nothing_fails(m: hmmsim.Machine) -> None:
    free = int(m.swap.alloc())  # taken, and no entry or cache refers to it
    with pytest.raises(AssertionError, match=f"swap slot {free}: count 1 but 0"):
        verify_machine(m)
