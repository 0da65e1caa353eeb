"""Swap-in and the swap cache as Linux 6.18's ``do_swap_page`` keeps them.

A read fault leaves the swapped-in folio in the swap cache: the slot still
holds its data, so the folio is clean and reclaim can drop it again without
writing. It is mapped writable (and clean) when exclusive. The folio leaves
the swap cache only through ``should_try_to_free_swap`` (a write fault with
no other user, swap more than half full, a locked VMA) or later, and leaving
it always marks the folio dirty (``folio_free_swap``): memory then holds the
only copy, which MADV_FREE must not treat as clean.

The host these tests were written on has no swap, so they follow the 6.18
sources; the data-loss test is the scenario a shadow-copy fuzzer found.
"""

from __future__ import annotations

import pytest
from hmmsim import (
    MADV_FREE,
    MADV_PAGEOUT,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    PROT_READ,
    PROT_WRITE,
    Machine,
    MachineConfig,
)
from hmmsim.mm.debug import verify_machine
from hmmsim.mm.physmem import PG_dirty, PG_swapcache

PAGE = 4096
RW = PROT_READ | PROT_WRITE


@pytest.fixture
def machine() -> Machine:
    return Machine(MachineConfig(ram_bytes=64 << 20, swap_bytes=16 << 20))


def swapped_page(machine: Machine, data: bytes, flags: int = 0):  # type: ignore[no-untyped-def]
    p = machine.spawn()
    a = p.mmap(PAGE, RW, MAP_PRIVATE | MAP_ANONYMOUS | flags)
    p.write(a, data)
    p.madvise(a, PAGE, MADV_PAGEOUT)
    assert p.pagemap(a, 1)[0].swapped
    return p, a


def test_a_read_fault_swap_in_keeps_the_folio_in_the_swap_cache_mapped_writable_and_clean(
    machine,
):
    p, a = swapped_page(machine, b"kept")
    outs = machine.costs.swap_outs
    assert p.read(a, 4) == b"kept"
    e = p.pagemap(a, 1)[0]
    flags = int(machine.phys.flags[e.pfn])
    assert flags & PG_swapcache and not flags & PG_dirty
    assert e.writable and not e.dirty and e.exclusive
    p.madvise(a, PAGE, MADV_PAGEOUT)  # clean and cached: dropped without writing
    assert p.pagemap(a, 1)[0].swapped and machine.costs.swap_outs == outs
    assert p.read(a, 4) == b"kept"
    verify_machine(machine)


def test_madv_free_in_a_child_after_a_read_swap_in_keeps_the_parents_data(machine):
    p, a = swapped_page(machine, b"parent data")
    assert p.read(a, 11) == b"parent data"
    c = p.fork()
    c.madvise(a, PAGE, MADV_FREE)  # a shared swap-cache folio: madvise_free skips it
    machine.reclaim(64 << 20)
    assert p.read(a, 11) == b"parent data"
    assert c.read(a, 11) == b"parent data"
    verify_machine(machine)


def test_a_store_after_a_read_swap_in_is_written_to_its_slot_again_at_reclaim(machine):
    p, a = swapped_page(machine, b"old")
    assert p.read(a, 3) == b"old"
    p.write(a, b"new")  # through the writable PTE: no fault, the PTE turns dirty
    outs = machine.costs.swap_outs
    p.madvise(a, PAGE, MADV_PAGEOUT)
    assert p.pagemap(a, 1)[0].swapped and machine.costs.swap_outs == outs + 1
    assert p.read(a, 3) == b"new"


def test_a_write_fault_swap_in_frees_the_slot_and_dirties_the_folio(machine):
    p, a = swapped_page(machine, b"w")
    free = machine.swap.nr_free
    p.write(a, b"W")
    e = p.pagemap(a, 1)[0]
    flags = int(machine.phys.flags[e.pfn])
    assert not flags & PG_swapcache and flags & PG_dirty
    assert e.writable and e.dirty and machine.swap.nr_free == free + 1
    assert p.read(a, 1) == b"W"


def test_a_read_swap_in_frees_the_slot_when_swap_is_more_than_half_full():
    m = Machine(MachineConfig(ram_bytes=64 << 20, swap_bytes=8 * PAGE))
    p = m.spawn()
    a = p.mmap(8 * PAGE, RW, MAP_PRIVATE | MAP_ANONYMOUS)
    p.write(a, b"".join(bytes([i + 1]) * PAGE for i in range(8)))
    p.madvise(a, 8 * PAGE, MADV_PAGEOUT)  # every slot used
    assert p.read(a, 1) == b"\x01"
    e = p.pagemap(a, 1)[0]
    assert not m.phys.flags[e.pfn] & PG_swapcache and m.phys.flags[e.pfn] & PG_dirty
    assert m.swap.nr_free == 1
