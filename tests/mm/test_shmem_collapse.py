"""MADV_COLLAPSE of shmem: a THP in the page cache, seen by every mapping.

Every outcome here was checked on the Linux 6.18 host (``shmem_enabled=never``:
forced collapse ignores it): the collapsing range becomes one PMD-mapped
order-9 folio holding the old bytes, other mappings of the old pages lose
them, and fault them back in by a PMD where their VMA is PMD-aligned on the
file, by PTEs (fault-around) where it is not.
"""

from __future__ import annotations

import hmmsim
import numpy as np
import pytest
from helpers import MB2, PAGE, RW, EventLog
from hmmsim import (
    MADV_COLLAPSE,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_SHARED,
    MREMAP_DONTUNMAP,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
)
from hmmsim.mm.debug import verify_machine

BASE = 0x4000_0000
SHARED = MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED
MOVE = MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP


def _shared(p: hmmsim.Process, size: int = 2 * MB2) -> int:
    a = p.mmap(size, RW, SHARED, addr=BASE)
    p.write(a + 5 * PAGE, b"\x07" * (3 * PAGE))
    return a


def test_collapse_of_shared_anonymous_memory_maps_one_pmd_thp(proc, machine) -> None:
    a = _shared(proc)
    proc.write(a + MB2 + 100 * PAGE, b"\x09")
    proc.madvise(a, 2 * MB2, MADV_COLLAPSE)
    for chunk in (a, a + MB2):
        pm = proc.pagemap(chunk, 512)
        assert {e.order for e in pm} == {9}
        assert all(e.present and e.exclusive for e in pm)
        assert [e.pfn for e in pm] == list(range(pm[0].pfn, pm[0].pfn + 512))
    assert proc.read(a + 5 * PAGE, 1) == b"\x07" and proc.read(a + 7 * PAGE + 4095, 1) == b"\x07"
    assert proc.read(a + 4 * PAGE, 1) == b"\x00"
    assert proc.read(a + MB2 + 100 * PAGE, 1) == b"\x09"
    verify_machine(machine)


def test_shmem_collapse_stops_at_a_chunk_with_no_page(proc, machine) -> None:
    a = _shared(proc)
    with pytest.raises(hmmsim.InvalidArgument):
        proc.madvise(a + MB2, MB2, MADV_COLLAPSE)
    with pytest.raises(hmmsim.InvalidArgument):
        proc.madvise(a, 2 * MB2, MADV_COLLAPSE)  # the first chunk is done first
    assert proc.pagemap(a, 1)[0].order == 9
    assert not proc.pagemap(a + MB2, 1)[0].present
    verify_machine(machine)


def test_shmem_collapse_unmaps_the_old_pages_from_every_mapping(proc, machine) -> None:
    a = _shared(proc)
    b = BASE + 4 * MB2
    assert proc.mremap(a, 2 * MB2, 2 * MB2, MOVE, b) == b
    proc.read(a + 5 * PAGE, 1)  # the old view faults the same shmem pages back in
    log = EventLog(machine)
    with pytest.raises(hmmsim.InvalidArgument):  # the second chunk has no page
        proc.madvise(a, 2 * MB2, MADV_COLLAPSE)
    assert not any(e.present for e in proc.pagemap(b, 512))
    assert ("CLEAR", b + 5 * PAGE, b + 6 * PAGE) in [(e.event, e.start, e.end) for e in log.events]
    head = proc.pagemap(a, 1)[0].pfn
    # The aligned view faults the THP back in by a PMD, shared with the first.
    assert proc.read(b + 9 * PAGE, 1) == b"\x00"
    pm = proc.pagemap(b, 512)
    assert {e.order for e in pm} == {9} and pm[0].pfn == head
    assert not pm[0].exclusive
    # An unaligned view maps the folio's pages by PTEs, 16 around the fault.
    c = BASE + 8 * MB2 + PAGE
    assert proc.mremap(b, MB2, MB2, MOVE, c) == c
    assert proc.read(c + 9 * PAGE, 1) == b"\x00"
    pm = proc.pagemap(c, 511)
    present = [i for i, e in enumerate(pm) if e.present]
    assert present == list(range(16))
    assert [pm[i].pfn for i in present] == list(range(head, head + 16))
    assert {pm[i].order for i in present} == {0}
    verify_machine(machine)


def test_shmem_collapse_in_a_child_unmaps_the_parents_pages(proc, machine) -> None:
    a = _shared(proc)
    child = proc.fork()
    log = EventLog(machine)
    with pytest.raises(hmmsim.InvalidArgument):
        child.madvise(a, 2 * MB2, MADV_COLLAPSE)
    assert not any(e.present for e in proc.pagemap(a, 512))
    assert {e.mm for e in log.of("CLEAR")} >= {proc.mm.id}
    assert proc.read(a + 6 * PAGE, 1) == b"\x07"
    assert proc.pagemap(a, 1)[0].pfn == child.pagemap(a, 1)[0].pfn
    assert proc.pagemap(a, 1)[0].order == 9
    verify_machine(machine)


def test_partial_munmap_and_truncate_of_a_shmem_thp_keep_the_rest(proc, machine) -> None:
    a = _shared(proc)
    with pytest.raises(hmmsim.InvalidArgument):
        proc.madvise(a, 2 * MB2, MADV_COLLAPSE)
    proc.munmap(a + MB2 // 2, PAGE)  # the PMD goes, the folio stays whole
    assert not proc.pagemap(a, 1)[0].present
    assert proc.read(a + 5 * PAGE, 1) == b"\x07"
    assert proc.pagemap(a + 5 * PAGE, 1)[0].order == 0
    verify_machine(machine)
    proc.munmap(a, 2 * MB2)
    verify_machine(machine)
    assert machine.phys.refcount[: machine.phys.ram_pages].sum() >= 0


def test_hmm_range_fault_sees_a_collapsed_shmem_thp_as_order_9(proc) -> None:
    from hmmsim.hmm import HMM_PFN_REQ_FAULT, HmmRange, hmm_pfn_to_map_order, hmm_range_fault

    class Ops:
        def invalidate(self, sub, rng, cur_seq):
            hmmsim.mmu_interval_set_seq(sub, cur_seq)
            return True

    a = _shared(proc)
    with pytest.raises(hmmsim.InvalidArgument):
        proc.madvise(a, 2 * MB2, MADV_COLLAPSE)
    c = BASE + 8 * MB2 + PAGE  # a second, unaligned view: PTE-mapped
    assert proc.mremap(a, MB2, MB2, MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP, c) == c
    # An unaligned move cannot take the PMD along: it is removed, not split.
    assert not any(e.present for e in proc.pagemap(c, 512))
    b = BASE + 4 * MB2
    assert proc.mremap(c, MB2, MB2, MREMAP_MAYMOVE | MREMAP_FIXED, b) == b  # aligned again
    orders = {}
    for start in (a, b):
        sub = hmmsim.mmu_interval_notifier_insert(proc.mm, start, MB2, Ops())
        try:
            arr = np.zeros(512, np.uint64)
            rng = HmmRange(sub, start, start + MB2, arr, default_flags=HMM_PFN_REQ_FAULT)
            rng.notifier_seq = hmmsim.mmu_interval_read_begin(sub)
            with proc.mm.mmap_lock.read():
                hmm_range_fault(rng)
            orders[start] = {hmm_pfn_to_map_order(int(x)) for x in arr}
        finally:
            hmmsim.mmu_interval_notifier_remove(sub)
    assert orders == {a: {9}, b: {9}}


def test_pageout_of_a_shmem_thp_unmaps_it_and_keeps_it_cached(proc, machine) -> None:
    from hmmsim import MADV_PAGEOUT

    a = _shared(proc)
    with pytest.raises(hmmsim.InvalidArgument):
        proc.madvise(a, 2 * MB2, MADV_COLLAPSE)
    head = proc.pagemap(a, 1)[0].pfn
    proc.madvise(a, MB2, MADV_PAGEOUT)
    assert not any(e.present for e in proc.pagemap(a, 512))
    assert proc.read(a + 5 * PAGE, 1) == b"\x07"
    pm = proc.pagemap(a, 512)
    assert {e.order for e in pm} == {9} and pm[0].pfn == head
    proc.madvise(a, 16 * PAGE, MADV_PAGEOUT)  # part of it: the PMD goes
    assert not any(e.present for e in proc.pagemap(a, 512))
    verify_machine(machine)


def test_nohugepage_vma_maps_a_shmem_thp_by_ptes(proc, machine) -> None:
    from hmmsim import MADV_NOHUGEPAGE

    a = _shared(proc)
    child = proc.fork()
    with pytest.raises(hmmsim.InvalidArgument):
        child.madvise(a, 2 * MB2, MADV_COLLAPSE)
    proc.madvise(a, MB2, MADV_NOHUGEPAGE)  # vma_thp_disabled: no do_set_pmd
    assert proc.read(a + 5 * PAGE, 1) == b"\x07"
    pm = proc.pagemap(a, 512)
    assert {pm[i].order for i in range(512) if pm[i].present} == {0}
    assert [i for i in range(512) if pm[i].present] == list(range(16))
    verify_machine(machine)


def test_move_pages_of_a_shmem_thp_moves_every_page_cache_slot(proc, machine) -> None:
    a = _shared(proc)
    with pytest.raises(hmmsim.InvalidArgument):
        proc.madvise(a, 2 * MB2, MADV_COLLAPSE)
    old = proc.pagemap(a, 1)[0].pfn
    assert proc.move_pages(a, 1) == [0]
    new = proc.pagemap(a, 1)[0].pfn
    assert new != old and proc.pagemap(a + 300 * PAGE, 1)[0].pfn == new + 300
    proc.munmap(a, 2 * MB2)  # drops the mapping; the cache then is the only user
    assert machine.files == [] or all(f.cache.count() == 0 for f in machine.files)
    verify_machine(machine)
