"""Swap entries through zap, fork, swap-in and mremap: slot use counts, the
anon-exclusive flag and the data, asserted exactly (mutation-testing gaps)."""

from __future__ import annotations

import hmmsim
import numpy as np
import pytest
from hmmsim import (
    MADV_PAGEOUT,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PROT_READ,
    PROT_WRITE,
)
from hmmsim.gup import pin_user_pages, unpin_user_pages
from hmmsim.mm.debug import verify_machine
from hmmsim.mm.physmem import PG_anon_exclusive

PAGE = 4096
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS


@pytest.fixture
def m() -> hmmsim.Machine:
    return hmmsim.Machine(hmmsim.MachineConfig(ram_bytes=32 << 20, swap_bytes=4 << 20))


def _swapped_out(m: hmmsim.Machine, p: hmmsim.Process, n: int) -> tuple[int, list[int]]:
    """n pages of distinct bytes, paged out; (address, swap slots)."""
    a = p.mmap(n * PAGE, RW, ANON)
    for i in range(n):
        p.write(a + i * PAGE, bytes([0x40 + i]) * PAGE)
    p.madvise(a, n * PAGE, MADV_PAGEOUT)
    pm = p.pagemap(a, n)
    assert [e.kind for e in pm] == ["swap"] * n
    assert all(e.swapped and not e.present for e in pm)
    slots = [e.swap_offset for e in pm]
    assert None not in slots
    return a, [int(s) for s in slots]  # type: ignore[arg-type]


def test_pageout_puts_each_page_in_its_own_slot_with_one_user(m: hmmsim.Machine) -> None:
    p = m.spawn()
    free0 = m.swap.nr_free
    _, slots = _swapped_out(m, p, 4)
    assert len(set(slots)) == 4
    assert [int(m.swap.count[s]) for s in slots] == [1, 1, 1, 1]
    assert m.swap.nr_free == free0 - 4
    assert not any(s in m.swap.cache for s in slots)
    verify_machine(m)


def test_munmap_of_swapped_out_pages_frees_their_slots(m: hmmsim.Machine) -> None:
    p = m.spawn()
    free0 = m.swap.nr_free
    a, slots = _swapped_out(m, p, 4)
    p.munmap(a + PAGE, 2 * PAGE)
    assert [int(m.swap.count[s]) for s in slots] == [1, 0, 0, 1]
    assert m.swap.nr_free == free0 - 2
    verify_machine(m)
    p.munmap(a, 4 * PAGE)
    assert m.swap.nr_free == free0
    verify_machine(m)


def test_exit_with_swapped_out_pages_frees_their_slots(m: hmmsim.Machine) -> None:
    p = m.spawn()
    free0 = m.swap.nr_free
    _, slots = _swapped_out(m, p, 3)
    p.exit()
    assert [int(m.swap.count[s]) for s in slots] == [0, 0, 0]
    assert m.swap.nr_free == free0
    verify_machine(m)


def test_fork_of_swapped_out_pages_takes_a_slot_reference_per_child(m: hmmsim.Machine) -> None:
    p = m.spawn()
    a, slots = _swapped_out(m, p, 3)
    child = p.fork()
    assert [int(m.swap.count[s]) for s in slots] == [2, 2, 2]
    assert [e.swap_offset for e in child.pagemap(a, 3)] == slots
    verify_machine(m)
    child.exit()
    assert [int(m.swap.count[s]) for s in slots] == [1, 1, 1]
    # The parent's entries still refer to live slots with the data.
    assert p.read(a, 3 * PAGE) == b"".join(bytes([0x40 + i]) * PAGE for i in range(3))
    verify_machine(m)


def test_child_swap_in_after_fork_keeps_parent_contents(m: hmmsim.Machine) -> None:
    p = m.spawn()
    a, _ = _swapped_out(m, p, 1)
    child = p.fork()
    child.write(a, b"\x99" * 8)
    assert child.read(a, 8) == b"\x99" * 8
    assert p.read(a, PAGE) == b"\x40" * PAGE
    verify_machine(m)


def test_swap_in_of_sole_user_page_marks_it_anon_exclusive(m: hmmsim.Machine) -> None:
    p = m.spawn()
    a, _ = _swapped_out(m, p, 1)
    assert p.read(a, 4) == b"\x40" * 4
    (e,) = p.pagemap(a, 1)
    assert e.present and e.kind == "anon" and e.pfn is not None
    assert m.phys.flags[e.pfn] & PG_anon_exclusive
    # An exclusive page is pinned read-only as it is: no unshare copy.
    with p.mm.mmap_lock.read():
        pins = pin_user_pages(p.mm, a, 1, 0)
    assert pins == [e.pfn]
    unpin_user_pages(m, pins)
    verify_machine(m)


def test_swap_in_of_shared_slot_is_not_anon_exclusive(m: hmmsim.Machine) -> None:
    p = m.spawn()
    a, _ = _swapped_out(m, p, 1)
    child = p.fork()
    assert p.read(a, 4) == b"\x40" * 4
    (e,) = p.pagemap(a, 1)
    assert e.pfn is not None
    assert not m.phys.flags[e.pfn] & PG_anon_exclusive
    child.exit()
    verify_machine(m)


def test_write_after_swap_in_reuses_the_exclusive_page(m: hmmsim.Machine) -> None:
    p = m.spawn()
    a, slots = _swapped_out(m, p, 1)
    p.read(a, 1)
    (before,) = p.pagemap(a, 1)
    p.write(a, b"\x01")
    (after,) = p.pagemap(a, 1)
    assert after.pfn == before.pfn and after.writable and after.dirty
    # The read swap-in kept the page in the swap cache and mapped it writable,
    # so the store needed no fault: the cache still holds the slot, whose copy
    # is stale now and is written again if reclaim takes the page.
    assert before.writable and not before.dirty
    assert int(m.swap.count[slots[0]]) == 1
    verify_machine(m)


@pytest.mark.parametrize("grow", [0, 3])
def test_mremap_of_swapped_out_memory_keeps_every_byte(m: hmmsim.Machine, grow: int) -> None:
    p = m.spawn()
    a, slots = _swapped_out(m, p, 4)
    # A real move: to a fixed address elsewhere, or grown past a blocker.
    if grow:
        p.mmap(PAGE, PROT_READ, ANON | hmmsim.MAP_FIXED, addr=a + 4 * PAGE)
        b = p.mremap(a, 4 * PAGE, (4 + grow) * PAGE, MREMAP_MAYMOVE)
    else:
        dst = p.mmap(8 * PAGE, PROT_READ, ANON)
        b = p.mremap(a, 4 * PAGE, 4 * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, dst + 2 * PAGE)
        assert b == dst + 2 * PAGE
    assert b != a
    assert p.pagemap(a, 4)[0].kind == "none"
    pm = p.pagemap(b, 4)
    assert [e.kind for e in pm] == ["swap"] * 4
    assert [e.swap_offset for e in pm] == slots
    assert [int(m.swap.count[s]) for s in slots] == [1, 1, 1, 1]
    verify_machine(m)
    want = b"".join(bytes([0x40 + i]) * PAGE for i in range(4)) + bytes(grow * PAGE)
    assert p.read(b, (4 + grow) * PAGE) == want
    verify_machine(m)


def test_dontneed_of_swapped_out_page_frees_slot_and_reads_zero(m: hmmsim.Machine) -> None:
    p = m.spawn()
    free0 = m.swap.nr_free
    a, slots = _swapped_out(m, p, 2)
    p.madvise(a, PAGE, hmmsim.MADV_DONTNEED)
    assert int(m.swap.count[slots[0]]) == 0 and int(m.swap.count[slots[1]]) == 1
    assert m.swap.nr_free == free0 - 1
    # Nonzero bytes went out, so zero here means the entry really went.
    assert p.read(a, PAGE) == bytes(PAGE)
    assert p.read(a + PAGE, PAGE) == b"\x41" * PAGE
    verify_machine(m)


def test_swap_slot_data_is_what_was_written(m: hmmsim.Machine) -> None:
    p = m.spawn()
    _, slots = _swapped_out(m, p, 2)
    for i, s in enumerate(slots):
        data = m.swap.read(s)
        assert data is not None
        assert np.array_equal(data, np.full(PAGE, 0x40 + i, dtype=np.uint8))
