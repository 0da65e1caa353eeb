"""Fault-path and pagemap fidelity against Linux 6.18.

Every expectation here was first observed on a 6.18 host (x86-64,
``CONFIG_PAGE_MAPCOUNT=y``, ``fault_around_bytes`` = 64 KiB) with a small
ctypes program reading ``/proc/self/pagemap`` and ``/proc/kpageflags``.
"""

from __future__ import annotations

import hmmsim
import numpy as np
from helpers import ANON, MB2, PAGE, RW, EventLog
from hmmsim import (
    MADV_DONTNEED,
    MADV_HUGEPAGE,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    PROT_READ,
)


def _thp(p: hmmsim.Process) -> int:
    a = p.mmap(MB2, RW, ANON)
    assert a % MB2 == 0
    p.madvise(a, MB2, MADV_HUGEPAGE)
    p.write(a, b"t")
    assert p.pagemap(a, 1)[0].order == 9
    return a


def _pte_map(p: hmmsim.Process, a: int) -> None:
    """Split the PMD of the THP at ``a`` (mprotect one page and back)."""
    p.mprotect(a + PAGE, PAGE, PROT_READ)
    p.mprotect(a + PAGE, PAGE, RW)
    e = p.pagemap(a, 512)
    assert {x.order for x in e} == {0} and e[1].pfn == e[0].pfn + 1


def _excl(p: hmmsim.Process, a: int, n: int = 512) -> list[bool]:
    return [x.exclusive for x in p.pagemap(a, n)]


# ----- pagemap: PM_MMAP_EXCLUSIVE per page --------------------------------------


def test_pagemap_pmd_mapped_thp_of_one_process_is_exclusive(proc):
    a = _thp(proc)
    assert _excl(proc, a) == [True] * 512


def test_pagemap_pte_mapped_thp_of_one_process_is_exclusive_per_page(proc):
    a = _thp(proc)
    _pte_map(proc, a)
    assert _excl(proc, a) == [True] * 512


def test_pagemap_thp_shared_after_fork_is_not_exclusive(proc):
    a = _thp(proc)
    child = proc.fork()
    assert _excl(proc, a) == [False] * 512
    assert _excl(child, a) == [False] * 512


def test_pagemap_pte_mapped_thp_pages_cow_broken_by_child_become_exclusive(proc):
    a = _thp(proc)
    _pte_map(proc, a)
    child = proc.fork()
    child.write(a + 5 * PAGE, b"c")
    want = [False] * 512
    want[5] = True
    assert _excl(proc, a) == want
    assert _excl(child, a) == want  # the child's own copy of page 5


def test_pagemap_pmd_mapped_thp_exclusive_bit_follows_the_head_page(proc):
    """6.18 quirk: every page of a PMD mapping reports the head page's mapcount."""
    a = _thp(proc)
    child = proc.fork()
    child.write(a + 5 * PAGE, b"c")  # the child maps the head and 510 tails by PTE
    assert _excl(proc, a) == [False] * 512
    b = _thp(proc)
    child2 = proc.fork()
    child2.write(b, b"c")  # the child COWs the head page: it maps only tails
    assert _excl(proc, b) == [True] * 512  # head: one PMD mapping, no PTE of it
    assert _excl(child2, b, 2) == [True, False]


def test_pagemap_parent_thp_is_exclusive_again_after_child_exits(proc):
    a = _thp(proc)
    child = proc.fork()
    child.exit()
    assert _excl(proc, a) == [True] * 512


# ----- huge zero page write fault (6.14) -----------------------------------------


def test_write_to_huge_zero_pmd_allocates_a_pmd_thp(make_machine):
    m = make_machine(thp="always")
    p = m.spawn()
    a = p.mmap(MB2, RW, ANON)
    assert p.read(a + 3 * PAGE, 1) == b"\0"
    assert p.pagemap(a, 1)[0].kind == "zero" and p.pagemap(a, 1)[0].order == 9
    log = EventLog(m)
    p.write(a + 7 * PAGE, b"w")
    e = p.pagemap(a, 512)
    assert {x.order for x in e} == {9}
    assert {x.kind for x in e} == {"anon"} and all(x.writable for x in e)
    assert e[0].pfn % 512 == 0 and e[511].pfn == e[0].pfn + 511
    assert p.read(a + 7 * PAGE, 2) == b"w\0" and p.read(a, 1) == b"\0"
    # Replacing the huge zero mapping is one CLEAR over the 2 MiB range.
    assert [(x.event, x.start, x.end) for x in log.events] == [("CLEAR", a, a + MB2)]


def test_write_to_huge_zero_pmd_falls_back_to_a_small_page_without_thp(make_machine):
    m = make_machine(thp="always")
    p = m.spawn()
    a = p.mmap(MB2, RW, ANON)
    p.read(a, 1)
    hog = m.phys.alloc(0, m.phys.allocator.nr_free - 8)  # no free 2 MiB block left
    p.write(a + 7 * PAGE, b"w")
    e = p.pagemap(a, 8)
    assert e[7].order == 0 and e[7].kind == "anon" and e[0].kind == "zero"
    assert p.read(a + 7 * PAGE, 1) == b"w"
    m.phys.put(hog)


def test_write_to_huge_zero_pmd_allocates_a_thp_even_after_madv_nohugepage(proc):
    a = proc.mmap(MB2, RW, ANON)
    proc.madvise(a, MB2, MADV_HUGEPAGE)
    proc.read(a, 1)
    proc.madvise(a, MB2, hmmsim.MADV_NOHUGEPAGE)  # leaves the huge zero PMD in place
    assert proc.pagemap(a, 1)[0].kind == "zero" and proc.pagemap(a, 1)[0].order == 9
    proc.write(a + 7 * PAGE, b"w")
    e = proc.pagemap(a, 512)
    assert {x.order for x in e} == {9} and {x.kind for x in e} == {"anon"}


# ----- COW reuse of a PTE-mapped THP (6.15) ------------------------------------


def test_cow_reuses_page_of_pte_mapped_thp_after_sharer_exits(proc):
    a = _thp(proc)
    _pte_map(proc, a)
    before = proc.pagemap(a + 7 * PAGE, 1)[0].pfn
    child = proc.fork()
    child.exit()
    proc.write(a + 7 * PAGE, b"r")
    e = proc.pagemap(a + 7 * PAGE, 1)[0]
    assert e.pfn == before and e.writable
    assert proc.machine.phys.order[before & ~511] == 9


def test_cow_reuses_page_of_pte_mapped_thp_after_sharer_zaps_it(proc):
    a = _thp(proc)
    _pte_map(proc, a)
    before = proc.pagemap(a + 7 * PAGE, 1)[0].pfn
    child = proc.fork()
    child.madvise(a, MB2, MADV_DONTNEED)
    proc.write(a + 7 * PAGE, b"r")
    assert proc.pagemap(a + 7 * PAGE, 1)[0].pfn == before


def test_cow_copies_page_of_pte_mapped_thp_while_shared(proc):
    a = _thp(proc)
    _pte_map(proc, a)
    before = proc.pagemap(a + 7 * PAGE, 1)[0].pfn
    child = proc.fork()
    proc.write(a + 7 * PAGE, b"r")
    assert proc.pagemap(a + 7 * PAGE, 1)[0].pfn != before
    assert child.pagemap(a + 7 * PAGE, 1)[0].pfn == before


def test_cow_copies_the_last_mapped_page_of_a_thp(proc):
    """A large folio with a single page mapped is copied so it can be freed."""
    a = _thp(proc)
    _pte_map(proc, a)
    proc.madvise(a, 7 * PAGE, MADV_DONTNEED)
    proc.madvise(a + 8 * PAGE, MB2 - 8 * PAGE, MADV_DONTNEED)
    before = proc.pagemap(a + 7 * PAGE, 1)[0].pfn
    child = proc.fork()
    child.exit()
    proc.write(a + 7 * PAGE, b"r")
    e = proc.pagemap(a + 7 * PAGE, 1)[0]
    assert e.pfn != before and e.exclusive


def test_cow_of_pte_mapped_thp_with_extra_reference_copies(proc):
    a = _thp(proc)
    _pte_map(proc, a)
    before = proc.pagemap(a + 7 * PAGE, 1)[0].pfn
    child = proc.fork()
    child.exit()
    m = proc.machine
    head = before & ~511
    m.phys.refcount[head] += 1  # a GUP pin or an isolation reference
    try:
        proc.write(a + 7 * PAGE, b"r")
        assert proc.pagemap(a + 7 * PAGE, 1)[0].pfn != before
    finally:
        m.phys.refcount[head] -= 1


# ----- fault-around on page-cache read faults ----------------------------------


def _present(p: hmmsim.Process, a: int, n: int) -> str:
    return "".join("P" if x.present else "." for x in p.pagemap(a, n))


def test_shmem_read_fault_maps_cached_neighbours_in_the_64k_window(proc):
    n = 64
    a = proc.mmap(n * PAGE, RW, MAP_SHARED | MAP_ANONYMOUS)
    for i in range(n):
        if i not in (21, 40, 41):
            proc.write(a + i * PAGE, b"s")
    proc.madvise(a, n * PAGE, MADV_DONTNEED)
    assert _present(proc, a, n) == "." * n
    log = EventLog(proc.machine)
    proc.read(a + 20 * PAGE, 1)
    assert _present(proc, a, n) == "." * 16 + "PPPPP.PPPPPPPPPP" + "." * 32
    proc.read(a + 40 * PAGE, 1)  # a hole: read in, neighbours 41 stays out
    assert _present(proc, a, n) == "." * 16 + "PPPPP.PPPPPPPPPPPPPPPPPPP.PPPPPP" + "." * 16
    assert log.events == []  # filling empty PTEs sends no notifier event
    e = proc.pagemap(a + 22 * PAGE, 1)[0]
    # Shared shmem is not write-notified: prefaulted pages are writable, clean.
    assert e.writable and not e.dirty and e.kind == "shmem"


def test_shmem_write_fault_does_not_fault_around(proc):
    a = proc.mmap(32 * PAGE, RW, MAP_SHARED | MAP_ANONYMOUS)
    proc.write(a, bytes(32 * PAGE))
    proc.madvise(a, 32 * PAGE, MADV_DONTNEED)
    proc.write(a + 20 * PAGE, b"w")
    assert _present(proc, a, 32) == "." * 20 + "P" + "." * 11


def test_file_fault_around_is_clipped_to_the_vma(machine, proc):
    f = machine.create_file(64 * PAGE)
    f.pwrite(0, b"y" * (30 * PAGE))
    # Map file pages 3..12 at an address whose window starts one page in.
    base = proc.mmap(64 * PAGE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS)
    start = (((base >> 16) + 1) << 16) + 15 * PAGE
    d = proc.mmap(10 * PAGE, PROT_READ, MAP_SHARED | hmmsim.MAP_FIXED, f, 3 * PAGE, addr=start)
    proc.read(d + 2 * PAGE, 1)
    assert _present(proc, d, 10) == ".PPPPPPPPP"
    e = proc.pagemap(d + 3 * PAGE, 1)[0]
    assert not e.writable and e.kind == "file" and e.pfn == f.lookup(6)


def test_private_file_fault_around_maps_read_only_page_cache_pages(machine, proc):
    f = machine.create_file(64 * PAGE)
    f.pwrite(0, b"y" * (30 * PAGE))
    b = proc.mmap(64 * PAGE, RW, MAP_PRIVATE, f)
    assert b % (16 * PAGE) == 0
    proc.read(b + 5 * PAGE, 1)
    assert _present(proc, b, 64) == "P" * 16 + "." * 48
    e = proc.pagemap(b + 6 * PAGE, 16)
    assert not any(x.writable for x in e[:10]) and {x.kind for x in e[:10]} == {"file"}
    proc.write(b + 6 * PAGE, b"c")  # COW of a prefaulted page
    assert proc.pagemap(b + 6 * PAGE, 1)[0].kind == "anon"
    assert f.pread(6 * PAGE, 1) == b"y"


def test_fault_around_skips_pages_beyond_end_of_file(machine, proc):
    f = machine.create_file(20 * PAGE)
    f.pwrite(0, b"y" * (20 * PAGE))
    b = proc.mmap(32 * PAGE, PROT_READ, MAP_SHARED, f)
    proc.read(b + 17 * PAGE, 1)
    assert _present(proc, b, 32) == "." * 16 + "PPPP" + "." * 12


def test_populate_of_a_range_faults_around_its_edges(proc):
    a = proc.mmap(64 * PAGE, RW, MAP_SHARED | MAP_ANONYMOUS)
    proc.write(a, bytes(64 * PAGE))
    proc.madvise(a, 64 * PAGE, MADV_DONTNEED)
    proc.read(a + 18 * PAGE, 3 * PAGE)  # pages 18..20
    assert _present(proc, a, 64) == "." * 16 + "P" * 16 + "." * 32
    pfns = np.array([x.pfn for x in proc.pagemap(a + 16 * PAGE, 16)], dtype=np.int64)
    assert (proc.machine.phys.mapcount[pfns] == 1).all()
    assert (proc.machine.phys.refcount[pfns] == 2).all()  # the mapping and the cache


# ----- fork after a huge zero read ---------------------------------------------


def test_fork_copies_a_huge_zero_pmd_but_not_small_zero_ptes(make_machine):
    """The huge zero fault prepares the anon_vma first; the small zero fault does not."""
    m = make_machine(thp="always")
    p = m.spawn()
    a = p.mmap(MB2, RW, ANON)
    p.read(a + 7 * PAGE, 1)
    child = p.fork()
    e = child.pagemap(a, 512)
    assert all(x.present and x.kind == "zero" and x.order == 9 for x in e)
    q = make_machine(thp="never").spawn()
    b = q.mmap(4 * PAGE, RW, ANON)
    q.read(b, 1)
    assert q.pagemap(b, 1)[0].kind == "zero"
    assert not q.fork().pagemap(b, 1)[0].present


def test_hmm_range_fault_of_one_shmem_page_makes_its_cached_window_visible(proc):
    """A later snapshot (no fault requested) sees the pages fault-around mapped."""
    from hmmsim.hmm import (
        HMM_PFN_REQ_FAULT,
        HMM_PFN_VALID,
        HMM_PFN_WRITE,
        HmmRange,
        hmm_pfn_to_page,
        hmm_range_fault,
    )

    class Ops:
        def invalidate(self, sub, rng, cur_seq):
            hmmsim.mmu_interval_set_seq(sub, cur_seq)
            return True

    a = proc.mmap(32 * PAGE, RW, MAP_SHARED | MAP_ANONYMOUS)
    proc.write(a, bytes(32 * PAGE))
    proc.madvise(a, 32 * PAGE, MADV_DONTNEED)
    sub = hmmsim.mmu_interval_notifier_insert(proc.mm, a, 32 * PAGE, Ops())
    try:

        def snapshot(start: int, n: int, flags: int) -> np.ndarray:
            arr = np.zeros(n, np.uint64)
            rng = HmmRange(sub, start, start + n * PAGE, arr, default_flags=flags)
            rng.notifier_seq = hmmsim.mmu_interval_read_begin(sub)
            with proc.mm.mmap_lock.read():
                hmm_range_fault(rng)
            return arr

        snapshot(a + 20 * PAGE, 1, HMM_PFN_REQ_FAULT)
        arr = snapshot(a, 32, 0)
    finally:
        hmmsim.mmu_interval_notifier_remove(sub)
    valid = (arr & np.uint64(HMM_PFN_VALID)) != 0
    assert valid.tolist() == [False] * 16 + [True] * 16
    assert ((arr[16:] & np.uint64(HMM_PFN_WRITE)) != 0).all()  # shared shmem: writable
    pm = proc.pagemap(a + 16 * PAGE, 16)
    assert [hmm_pfn_to_page(int(x)) for x in arr[16:]] == [x.pfn for x in pm]


# ----- MADV_DONTNEED frees empty PTE tables (CONFIG_PT_RECLAIM) ----------------


def test_dontneed_of_a_whole_pte_mapped_chunk_lets_the_next_fault_get_a_thp(proc):
    a = _thp(proc)
    _pte_map(proc, a)
    proc.madvise(a, MB2, MADV_DONTNEED)  # the PTE table is freed with the pages
    proc.write(a + 3 * PAGE, b"again")
    assert proc.pagemap(a, 1)[0].order == 9


def test_dontneed_of_part_of_a_chunk_keeps_its_pte_table(proc):
    a = _thp(proc)
    _pte_map(proc, a)
    proc.madvise(a, MB2 - PAGE, MADV_DONTNEED)
    proc.madvise(a + MB2 - PAGE, PAGE, MADV_DONTNEED)  # two calls, neither covers 2 MiB
    proc.write(a + 3 * PAGE, b"again")
    assert proc.pagemap(a + 3 * PAGE, 1)[0].order == 0
