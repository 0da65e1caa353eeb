"""madvise(2) against Linux 6.18: every outcome here was checked on a 6.18 host.

Argument checks and their order, every valid advice value, half-applied
advice, MADV_COLLAPSE's error cases, hugetlb, PROT_NONE pages, lazy-free
pages that were written again, and partial advice over THPs (folio split with
zero-filled subpages remapped to the shared zero page).
"""

from __future__ import annotations

import hmmsim
import pytest
from helpers import ANON, MB2, PAGE, RW, EventLog
from hmmsim import (
    MADV_COLD,
    MADV_COLLAPSE,
    MADV_DODUMP,
    MADV_DOFORK,
    MADV_DONTDUMP,
    MADV_DONTFORK,
    MADV_DONTNEED,
    MADV_DONTNEED_LOCKED,
    MADV_FREE,
    MADV_GUARD_INSTALL,
    MADV_GUARD_REMOVE,
    MADV_HUGEPAGE,
    MADV_KEEPONFORK,
    MADV_MERGEABLE,
    MADV_NOHUGEPAGE,
    MADV_NORMAL,
    MADV_PAGEOUT,
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
    MADV_RANDOM,
    MADV_REMOVE,
    MADV_SEQUENTIAL,
    MADV_UNMERGEABLE,
    MADV_WILLNEED,
    MADV_WIPEONFORK,
    MAP_FIXED,
    MAP_HUGETLB,
    MAP_SHARED,
    PROT_NONE,
    PROT_READ,
)
from hmmsim.mm.debug import verify_machine

#: A 2 MiB-aligned address for THP experiments.
BASE = 0x4000_0000
TASK_SIZE = (1 << 47) - PAGE


def thp_area(p: hmmsim.Process, size: int = 2 * MB2, prot: int = RW, flags: int = ANON) -> int:
    return p.mmap(size, prot, flags | MAP_FIXED, addr=BASE)


def make_thp(p: hmmsim.Process, a: int) -> None:
    """A PMD-mapped THP at ``a`` whose page 0 holds 7 and page 2 holds 9."""
    p.madvise(a, 2 * MB2, MADV_HUGEPAGE)
    p.write(a, b"\x07")
    p.write(a + 2 * PAGE, b"\x09")
    assert p.pagemap(a, 1)[0].order == 9


def kinds(p: hmmsim.Process, a: int, n: int) -> list[str]:
    return [e.kind for e in p.pagemap(a, n)]


# ----- argument checks ----------------------------------------------------------------


def test_madvise_checks_advice_then_alignment_then_wrap_then_zero_length(proc):
    a = proc.mmap(PAGE, RW, ANON)
    with pytest.raises(hmmsim.InvalidArgument):
        proc.madvise(a, 0, 999)  # an invalid advice fails even with length 0
    with pytest.raises(hmmsim.InvalidArgument):
        proc.madvise(a + 1, 0, MADV_DONTNEED)  # so does a misaligned start
    proc.madvise(1 << 63, 0, MADV_DONTNEED)  # then length 0 is success
    with pytest.raises(hmmsim.InvalidArgument):
        proc.madvise(a, (1 << 64) - a, MADV_DONTNEED)  # a wrapping range: EINVAL
    with pytest.raises(hmmsim.InvalidArgument):
        proc.madvise(a, -PAGE, MADV_DONTNEED)  # size_t -4096 wraps too
    with pytest.raises(hmmsim.InvalidArgument):
        proc.madvise(a, (1 << 64) - 1, MADV_DONTNEED)  # rounds up to 0: EINVAL


def test_madvise_beyond_task_size_fails_enomem(proc):
    with pytest.raises(hmmsim.OutOfMemory):
        proc.madvise(TASK_SIZE, 2 * PAGE, MADV_DONTNEED)
    with pytest.raises(hmmsim.OutOfMemory):
        proc.madvise(1 << 47, PAGE, MADV_NORMAL)
    with pytest.raises(hmmsim.InvalidArgument):
        proc.madvise(TASK_SIZE, 2 * PAGE, 999)


@pytest.mark.parametrize(
    "advice",
    [
        MADV_NORMAL,
        MADV_RANDOM,
        MADV_SEQUENTIAL,
        MADV_WILLNEED,
        MADV_DONTNEED,
        MADV_FREE,
        MADV_DONTFORK,
        MADV_DOFORK,
        MADV_MERGEABLE,
        MADV_UNMERGEABLE,
        MADV_HUGEPAGE,
        MADV_NOHUGEPAGE,
        MADV_DONTDUMP,
        MADV_DODUMP,
        MADV_WIPEONFORK,
        MADV_KEEPONFORK,
        MADV_COLD,
        MADV_PAGEOUT,
        MADV_POPULATE_READ,
        MADV_POPULATE_WRITE,
        MADV_DONTNEED_LOCKED,
    ],
)
def test_every_valid_advice_succeeds_on_private_anonymous_memory(proc, advice):
    a = proc.mmap(4 * PAGE, RW, ANON)
    proc.write(a, b"x" * (4 * PAGE))
    proc.madvise(a, 4 * PAGE, advice)
    verify_machine(proc.machine)


def test_valid_advice_the_model_does_not_implement_is_eopnotsupp_not_einval(proc):
    a = proc.mmap(PAGE, RW, ANON)
    for advice in (MADV_GUARD_INSTALL, MADV_GUARD_REMOVE):
        with pytest.raises(hmmsim.NotSupported):
            proc.madvise(a, PAGE, advice)


def test_madv_remove_punches_a_hole_in_shmem_and_checks_the_mapping(make_machine):
    m = make_machine()
    p = m.spawn()
    s = p.mmap(4 * PAGE, RW, MAP_SHARED | hmmsim.MAP_ANONYMOUS)
    p.write(s, b"\x07" * 4 * PAGE)
    child = p.fork()
    p.madvise(s + PAGE, 2 * PAGE, MADV_REMOVE)
    assert kinds(p, s, 4) == ["shmem", "none", "none", "shmem"]
    assert child.read(s, 4 * PAGE)[::PAGE] == b"\x07\x00\x00\x07"
    ro = p.mmap(PAGE, PROT_READ, MAP_SHARED | hmmsim.MAP_ANONYMOUS)
    p.madvise(ro, PAGE, MADV_REMOVE)  # shared anon memory may always be written
    with pytest.raises(hmmsim.InvalidArgument):
        p.madvise(p.mmap(PAGE, RW, ANON), PAGE, MADV_REMOVE)
    f = m.create_file(2 * PAGE)
    with pytest.raises(hmmsim.PermissionDenied):
        p.madvise(p.mmap(PAGE, RW, hmmsim.MAP_PRIVATE, file=f), PAGE, MADV_REMOVE)
    verify_machine(m)


def test_new_madv_constants_have_linux_values():
    assert (MADV_REMOVE, MADV_DONTFORK, MADV_DOFORK, MADV_MERGEABLE) == (9, 10, 11, 12)
    assert (MADV_UNMERGEABLE, MADV_DONTDUMP, MADV_DODUMP, MADV_WIPEONFORK) == (13, 16, 17, 18)
    assert (MADV_KEEPONFORK, MADV_COLD, MADV_POPULATE_READ, MADV_POPULATE_WRITE) == (19, 20, 22, 23)
    assert (MADV_DONTNEED_LOCKED, MADV_GUARD_INSTALL, MADV_GUARD_REMOVE) == (24, 102, 103)
    assert (hmmsim.PROT_SEM, hmmsim.PROT_GROWSDOWN, hmmsim.PROT_GROWSUP) == (8, 1 << 24, 1 << 25)


# ----- flag advice: no change, no split -----------------------------------------------


def test_madvise_that_changes_no_flags_does_not_split_the_vma_or_the_thp(proc):
    a = thp_area(proc)
    make_thp(proc, a)
    log = EventLog(proc.machine)
    nvmas = len(proc.mm.vmas)
    proc.madvise(a + PAGE, PAGE, MADV_HUGEPAGE)  # already VM_HUGEPAGE
    proc.madvise(a + PAGE, PAGE, MADV_NORMAL)  # already neither RAND nor SEQ
    proc.madvise(a + PAGE, PAGE, MADV_DOFORK)
    assert len(proc.mm.vmas) == nvmas
    assert proc.pagemap(a, 1)[0].order == 9
    assert log.events == []


def test_madvise_that_changes_flags_splits_the_vma_and_the_thp(proc):
    a = thp_area(proc)
    make_thp(proc, a)
    log = EventLog(proc.machine)
    proc.madvise(a + PAGE, PAGE, MADV_SEQUENTIAL)
    assert [(v.start, v.end) for v in proc.mm.vmas] == [
        (a, a + PAGE),
        (a + PAGE, a + 2 * PAGE),
        (a + 2 * PAGE, a + 2 * MB2),
    ]
    assert proc.pagemap(a, 1)[0].order == 0
    assert log.names() == ["CLEAR"]
    proc.madvise(a + PAGE, PAGE, MADV_NORMAL)  # equal again: merged back
    assert [(v.start, v.end) for v in proc.mm.vmas] == [(a, a + 2 * MB2)]


def test_madvise_refused_by_a_later_vma_keeps_the_advice_on_earlier_ones(proc):
    a = proc.mmap(2 * PAGE, RW, ANON | MAP_FIXED, addr=BASE)
    proc.mmap(PAGE, RW, MAP_SHARED | hmmsim.MAP_ANONYMOUS | MAP_FIXED, addr=BASE + 2 * PAGE)
    proc.write(a, b"data")
    assert proc.pagemap(a, 1)[0].dirty
    with pytest.raises(hmmsim.InvalidArgument):
        proc.madvise(a, 3 * PAGE, MADV_FREE)  # shmem refuses FREE
    assert not proc.pagemap(a, 1)[0].dirty  # but the anon page was made lazy-free


def test_madvise_with_a_hole_advises_the_rest_then_fails_enomem(proc):
    a = proc.mmap(3 * PAGE, RW, ANON)
    proc.write(a, b"a" * 3 * PAGE)
    proc.munmap(a + PAGE, PAGE)
    with pytest.raises(hmmsim.OutOfMemory):
        proc.madvise(a, 3 * PAGE, MADV_DONTNEED)
    assert kinds(proc, a, 1) == ["none"] and kinds(proc, a + 2 * PAGE, 1) == ["none"]


def test_wipeonfork_child_gets_an_empty_vma_and_dontfork_none(proc):
    a = proc.mmap(PAGE, RW, ANON)
    b = proc.mmap(PAGE, RW, ANON)
    proc.write(a, b"wipe")
    proc.write(b, b"gone")
    proc.madvise(a, PAGE, MADV_WIPEONFORK)
    proc.madvise(b, PAGE, MADV_DONTFORK)
    child = proc.fork()
    assert child.read(a, 4) == bytes(4)
    assert proc.read(a, 4) == b"wipe"
    assert child.mm.vmas.find(b) is None
    grandchild = child.fork()  # the flag stays on the child's VMA
    child.write(a, b"next")
    assert grandchild.read(a, 4) == bytes(4)
    verify_machine(proc.machine)


def test_wipeonfork_on_shared_or_hugetlb_fails_einval(make_machine):
    m = make_machine(hugetlb_pages={MB2: 1})
    p = m.spawn()
    s = p.mmap(PAGE, RW, MAP_SHARED | hmmsim.MAP_ANONYMOUS)
    h = p.mmap(MB2, RW, ANON | MAP_HUGETLB)
    for addr, length in ((s, PAGE), (h, MB2)):
        with pytest.raises(hmmsim.InvalidArgument):
            p.madvise(addr, length, MADV_WIPEONFORK)


# ----- hugetlb ----------------------------------------------------------------------------


def test_madvise_on_hugetlb_free_pageout_cold_collapse_fail_but_thp_hints_succeed(make_machine):
    m = make_machine(hugetlb_pages={MB2: 1})
    p = m.spawn()
    h = p.mmap(MB2, RW, ANON | MAP_HUGETLB)
    p.write(h, b"huge")
    for advice in (MADV_FREE, MADV_PAGEOUT, MADV_COLD, MADV_COLLAPSE):
        with pytest.raises(hmmsim.InvalidArgument):
            p.madvise(h, MB2, advice)
    p.madvise(h, MB2, MADV_HUGEPAGE)
    p.madvise(h, MB2, MADV_NOHUGEPAGE)
    p.madvise(h, MB2, MADV_WILLNEED)
    assert p.read(h, 4) == b"huge"


# ----- MADV_COLLAPSE ----------------------------------------------------------------------


def test_collapse_of_vma_without_anon_vma_fails_einval(proc):
    a = thp_area(proc)
    proc.read(a, MB2)  # zero-page reads: a page table, but no anon_vma
    with pytest.raises(hmmsim.InvalidArgument):
        proc.madvise(a, MB2, MADV_COLLAPSE)
    assert set(kinds(proc, a, 512)) == {"zero"}


def test_collapse_of_untouched_vma_or_vma_without_a_whole_chunk_fails_einval(proc):
    a = thp_area(proc)
    with pytest.raises(hmmsim.InvalidArgument):
        proc.madvise(a + PAGE, MB2 - PAGE, MADV_COLLAPSE)  # no anon_vma, no chunk
    small = proc.mmap(4 * PAGE, RW, ANON)
    proc.write(small, b"x")
    with pytest.raises(hmmsim.InvalidArgument):
        proc.madvise(small, 4 * PAGE, MADV_COLLAPSE)  # no 2 MiB chunk fits


def test_collapse_of_chunk_without_page_table_fails_einval_and_maps_nothing(proc):
    a = thp_area(proc)
    proc.write(a, b"x")
    with pytest.raises(hmmsim.InvalidArgument):
        proc.madvise(a + MB2, MB2, MADV_COLLAPSE)
    assert kinds(proc, a + MB2, 1) == ["none"]


def test_collapse_stops_at_the_first_chunk_without_page_table(proc):
    a = thp_area(proc)
    proc.write(a + MB2, b"x")
    with pytest.raises(hmmsim.InvalidArgument):
        proc.madvise(a, 2 * MB2, MADV_COLLAPSE)
    assert proc.pagemap(a + MB2, 1)[0].order == 0  # never reached


def test_collapse_does_the_chunks_before_one_without_page_table(proc):
    a = thp_area(proc)
    proc.write(a, b"x")
    with pytest.raises(hmmsim.InvalidArgument):
        proc.madvise(a, 2 * MB2, MADV_COLLAPSE)
    assert proc.pagemap(a, 1)[0].order == 9
    assert proc.read(a, 1) == b"x"


def test_collapse_of_anonymous_shmem_follows_linux_where_the_model_can(proc):
    a = thp_area(proc, flags=MAP_SHARED | hmmsim.MAP_ANONYMOUS)
    with pytest.raises(hmmsim.InvalidArgument):
        proc.madvise(a, MB2, MADV_COLLAPSE)  # a chunk with no page at all
    proc.madvise(a + PAGE, MB2 - PAGE, MADV_COLLAPSE)  # no chunk: 0
    with pytest.raises(hmmsim.InvalidArgument):
        proc.madvise(a + PAGE, 2 * PAGE, MADV_COLLAPSE)  # inverted chunks
    proc.write(a, b"s" * (16 * PAGE))
    # Linux collapses this into a shmem THP (tests/mm/test_shmem_collapse.py).
    proc.madvise(a, MB2, MADV_COLLAPSE)
    assert proc.pagemap(a, 1)[0].order == 9
    tiny = proc.mmap(4 * PAGE, RW, MAP_SHARED | hmmsim.MAP_ANONYMOUS)
    with pytest.raises(hmmsim.InvalidArgument):
        proc.madvise(tiny, 4 * PAGE, MADV_COLLAPSE)


def test_collapse_with_unaligned_start_inside_one_chunk_fails_einval(proc):
    a = thp_area(proc)
    proc.write(a, b"x" * MB2)
    with pytest.raises(hmmsim.InvalidArgument):
        proc.madvise(a + PAGE, 2 * PAGE, MADV_COLLAPSE)
    proc.madvise(a + PAGE, MB2, MADV_COLLAPSE)  # no chunk, but no underflow: 0
    proc.madvise(a, 2 * PAGE, MADV_COLLAPSE)  # aligned start: 0 chunks, 0
    assert proc.pagemap(a, 1)[0].order == 0


def test_collapse_leaves_the_huge_zero_pmd_and_succeeds(proc):
    a = thp_area(proc)
    proc.madvise(a, 2 * MB2, MADV_HUGEPAGE)
    proc.read(a, 1)
    pfn = proc.pagemap(a, 1)[0].pfn
    proc.madvise(a, MB2, MADV_COLLAPSE)
    e = proc.pagemap(a, 1)[0]
    assert (e.kind, e.order, e.pfn) == ("zero", 9, pfn)


@pytest.mark.parametrize("prot", [PROT_READ, PROT_NONE])
def test_collapse_of_read_only_or_prot_none_chunk_succeeds(proc, prot):
    a = thp_area(proc)
    proc.write(a, b"abc")
    proc.mprotect(a, 2 * MB2, prot)
    proc.madvise(a, MB2, MADV_COLLAPSE)
    e = proc.pagemap(a, 1)[0]
    assert (e.kind, e.order, e.writable) == ("anon", 9, False)
    proc.mprotect(a, 2 * MB2, RW)
    assert proc.read(a, 3) == b"abc"
    verify_machine(proc.machine)


# ----- POPULATE_READ / POPULATE_WRITE -----------------------------------------------------


def test_populate_read_maps_the_zero_page_and_write_maps_dirty_anon_pages(proc):
    a = proc.mmap(2 * PAGE, RW, ANON)
    proc.madvise(a, PAGE, MADV_POPULATE_READ)
    proc.madvise(a + PAGE, PAGE, MADV_POPULATE_WRITE)
    r, w = proc.pagemap(a, 2)
    assert r.kind == "zero"
    assert (w.kind, w.writable, w.dirty) == ("anon", True, True)


def test_populate_errors_are_linux_errors(make_machine):
    m = make_machine()
    p = m.spawn()
    none = p.mmap(PAGE, PROT_NONE, ANON)
    ro = p.mmap(PAGE, PROT_READ, ANON)
    for addr, advice in ((none, MADV_POPULATE_READ), (none, MADV_POPULATE_WRITE)):
        with pytest.raises(hmmsim.InvalidArgument):
            p.madvise(addr, PAGE, advice)
    with pytest.raises(hmmsim.InvalidArgument):
        p.madvise(ro, PAGE, MADV_POPULATE_WRITE)
    p.madvise(ro, PAGE, MADV_POPULATE_READ)
    holey = p.mmap(4 * PAGE, RW, ANON)
    p.munmap(holey + PAGE, PAGE)
    with pytest.raises(hmmsim.OutOfMemory):
        p.madvise(holey, 4 * PAGE, MADV_POPULATE_WRITE)
    assert kinds(p, holey, 4) == ["anon", "none", "none", "none"]
    f = m.create_file(PAGE)
    short = p.mmap(3 * PAGE, PROT_READ, hmmsim.MAP_PRIVATE, file=f)
    with pytest.raises(hmmsim.BadAddress):
        p.madvise(short, 3 * PAGE, MADV_POPULATE_READ)  # SIGBUS past EOF: EFAULT
    assert kinds(p, short, 3) == ["file", "none", "none"]


# ----- FREE / PAGEOUT on PROT_NONE and re-dirtied pages ----------------------------------


def test_madv_free_and_pageout_act_on_prot_none_pages(proc):
    a = proc.mmap(2 * PAGE, RW, ANON)
    proc.write(a, b"\x05" * 2 * PAGE)
    proc.mprotect(a, 2 * PAGE, PROT_NONE)
    proc.madvise(a, 2 * PAGE, MADV_FREE)
    proc.madvise(a, 2 * PAGE, MADV_PAGEOUT)  # clean lazy-free pages: discarded
    proc.mprotect(a, 2 * PAGE, RW)
    assert proc.read(a, 2 * PAGE) == bytes(2 * PAGE)


def test_pageout_of_redirtied_lazyfree_page_without_swap_succeeds_and_keeps_it(proc):
    a = proc.mmap(2 * PAGE, RW, ANON)
    proc.write(a, b"\x05" * 2 * PAGE)
    proc.madvise(a, 2 * PAGE, MADV_FREE)
    proc.write(a, b"\x06")
    proc.madvise(a, 2 * PAGE, MADV_PAGEOUT)  # no swap: reclaim fails silently
    assert proc.read(a, 1) == b"\x06" and proc.read(a + PAGE, 1) == b"\x00"
    verify_machine(proc.machine)


# ----- partial advice over THPs -------------------------------------------------------


@pytest.mark.parametrize("advice", [MADV_FREE, MADV_PAGEOUT, MADV_COLD])
def test_partial_advice_splits_exclusive_thp_and_zero_pages_its_zero_subpages(proc, advice):
    a = thp_area(proc)
    make_thp(proc, a)
    zero_pfn = proc.mmap(PAGE, PROT_READ, ANON)
    proc.read(zero_pfn, 1)
    zpfn = proc.pagemap(zero_pfn, 1)[0].pfn
    proc.madvise(a + PAGE, PAGE, advice)
    e = proc.pagemap(a, 4)
    assert [x.kind for x in e] == ["anon", "zero", "anon", "zero"]
    assert [x.order for x in e] == [0, 0, 0, 0]
    assert e[1].pfn == e[3].pfn == zpfn
    assert proc.pagemap(a + MB2 - PAGE, 1)[0].kind == "zero"
    assert proc.read(a, 3 * PAGE)[::PAGE] == b"\x07\x00\x09"
    # The split folio is order-0 pages now: only the data pages stay allocated.
    heads = {x.pfn for x in e if x.kind == "anon"}
    assert all(proc.machine.phys.order[h] == 0 for h in heads)
    verify_machine(proc.machine)


@pytest.mark.parametrize("advice", [MADV_FREE, MADV_PAGEOUT])
def test_partial_advice_leaves_the_huge_zero_pmd_alone(proc, advice):
    a = thp_area(proc)
    proc.madvise(a, 2 * MB2, MADV_HUGEPAGE)
    proc.read(a, 1)
    log = EventLog(proc.machine)
    proc.madvise(a + PAGE, PAGE, advice)
    e = proc.pagemap(a, 1)[0]
    assert (e.kind, e.order) == ("zero", 9)
    # No split's CLEAR over the 2 MiB: FREE sends only its own over the range.
    expected = [("CLEAR", a + PAGE, a + 2 * PAGE)] if advice == MADV_FREE else []
    assert [(ev.event, ev.start, ev.end) for ev in log.events] == expected


@pytest.mark.parametrize("advice", [MADV_FREE, MADV_PAGEOUT, MADV_COLD])
def test_partial_advice_skips_a_thp_shared_with_a_child(proc, advice):
    a = thp_area(proc)
    make_thp(proc, a)
    child = proc.fork()
    proc.madvise(a + PAGE, PAGE, advice)
    for p in (proc, child):
        e = p.pagemap(a, 4)
        assert [x.order for x in e] == [9, 9, 9, 9]
    assert child.read(a + 2 * PAGE, 1) == b"\x09"


def test_pageout_of_whole_thp_without_swap_splits_it_and_keeps_the_data(proc):
    a = thp_area(proc)
    make_thp(proc, a)
    proc.madvise(a, MB2, MADV_PAGEOUT)
    assert kinds(proc, a, 4) == ["anon", "zero", "anon", "zero"]
    assert proc.read(a, 3 * PAGE)[::PAGE] == b"\x07\x00\x09"
    verify_machine(proc.machine)


def test_free_then_pageout_of_whole_thp_discards_it_whole(proc):
    a = thp_area(proc)
    make_thp(proc, a)
    free_before = proc.machine.phys.allocator.nr_free
    proc.madvise(a, MB2, MADV_FREE)
    assert proc.pagemap(a, 1)[0].order == 9  # whole: no split
    proc.madvise(a, MB2, MADV_PAGEOUT)
    assert set(kinds(proc, a, 512)) == {"none"}
    assert proc.machine.phys.allocator.nr_free == free_before + 512
    assert proc.read(a, 1) == b"\x00"
    verify_machine(proc.machine)


def test_map_fixed_over_a_populated_chunk_frees_its_page_table_so_a_thp_can_fault(proc):
    a = thp_area(proc)
    proc.write(a, b"4k")  # no MADV_HUGEPAGE: a PTE table for the chunk
    assert proc.pagemap(a, 1)[0].order == 0
    proc.mmap(MB2, RW, ANON | MAP_FIXED, addr=a)
    proc.madvise(a, MB2, MADV_HUGEPAGE)
    proc.write(a, b"2m")
    assert proc.pagemap(a, 1)[0].order == 9
    verify_machine(proc.machine)


@pytest.mark.parametrize("advice", [MADV_FREE, MADV_PAGEOUT, MADV_COLD])
def test_partial_advice_skips_a_pte_mapped_thp_another_process_maps(proc, advice):
    a = thp_area(proc)
    make_thp(proc, a)
    child = proc.fork()
    proc.write(a + 2 * PAGE, b"\x0a")  # COW: the parent's PMD is split
    pfn = proc.pagemap(a, 1)[0].pfn
    assert proc.pagemap(a, 1)[0].order == 0
    proc.madvise(a + PAGE, PAGE, advice)
    phys = proc.machine.phys
    assert int(phys.order[phys.head(pfn)]) == 9  # the folio was not split
    assert kinds(proc, a, 2) == ["anon", "anon"]
    assert child.pagemap(a, 1)[0].order == 9
    verify_machine(proc.machine)


@pytest.mark.parametrize(("length", "order"), [(MB2, 9), (MB2 - PAGE, 0)])
def test_dontneed_of_a_whole_chunk_frees_its_empty_page_table(proc, length, order):
    a = thp_area(proc)
    proc.write(a, b"4k")  # a PTE table for the first chunk
    proc.madvise(a, length, MADV_DONTNEED)
    proc.madvise(a, 2 * MB2, MADV_HUGEPAGE)
    proc.write(a + 5 * PAGE, b"x")
    assert proc.pagemap(a + 5 * PAGE, 1)[0].order == order
    verify_machine(proc.machine)


def test_madv_free_makes_a_clean_folio_shared_with_a_child_lazy_free(proc):
    a = proc.mmap(4 * PAGE, RW, ANON)
    proc.write(a, b"\x05" * 4 * PAGE)
    child = proc.fork()
    proc.madvise(a, 4 * PAGE, MADV_FREE)
    phys = proc.machine.phys
    pfns = [e.pfn for e in proc.pagemap(a, 4)]
    assert not any(phys.flags[p] & hmmsim.mm.physmem.PG_swapbacked for p in pfns)
    assert not any(e.dirty for e in proc.pagemap(a, 4))
    assert all(e.dirty for e in child.pagemap(a, 4))
    # Reclaim finds the child's dirty PTEs: the pages stay, swap-backed again.
    proc.machine.reclaim(64 << 20)
    assert child.read(a, 1) == b"\x05" and proc.read(a + 3 * PAGE, 1) == b"\x05"
    assert all(phys.flags[p] & hmmsim.mm.physmem.PG_swapbacked for p in pfns)
    verify_machine(proc.machine)
