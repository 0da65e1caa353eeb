"""mprotect(2) against Linux 6.18: every outcome here was checked on a 6.18 host.

The argument checks and their order, a VMA whose flags would not change (left
whole: no split, no invalidation, even across a hugetlb page), and the kernel's
half-applied failures (VMAs before a hole or a failing hugetlb split keep their
new protection).
"""

from __future__ import annotations

import hmmsim
import pytest
from helpers import ANON, MB2, PAGE, RW, EventLog
from hmmsim import MADV_HUGEPAGE, MAP_FIXED, MAP_HUGETLB, PROT_NONE, PROT_READ, PROT_WRITE
from hmmsim.mm.debug import verify_machine

BASE = 0x4000_0000
TASK_SIZE = (1 << 47) - PAGE


def layout(p: hmmsim.Process) -> list[tuple[int, int, int]]:
    return [(v.start, v.end, v.flags & 0x7) for v in p.mm.vmas]


def test_mprotect_checks_alignment_then_zero_length_then_wrap_then_prot(proc):
    a = proc.mmap(PAGE, RW, ANON)
    with pytest.raises(hmmsim.InvalidArgument):
        proc.mprotect(a + 1, 0, PROT_READ)  # misaligned, even with length 0
    proc.mprotect(a, 0, 0x10)  # length 0: success before the prot check
    proc.mprotect(1 << 63, 0, PROT_READ)
    for length in ((1 << 64) - PAGE, (1 << 64) - a, (1 << 64) - 1, -PAGE):
        with pytest.raises(hmmsim.OutOfMemory):
            proc.mprotect(a, length, PROT_READ)  # a wrapping range: ENOMEM
    with pytest.raises(hmmsim.InvalidArgument):
        proc.mprotect(TASK_SIZE, 2 * PAGE, 0x10)  # bad prot before the VMA lookup
    with pytest.raises(hmmsim.InvalidArgument):
        proc.mprotect(a, PAGE, hmmsim.PROT_GROWSDOWN | hmmsim.PROT_GROWSUP)
    with pytest.raises(hmmsim.InvalidArgument):
        proc.mprotect(a, PAGE, hmmsim.PROT_GROWSDOWN | PROT_READ)  # VMA does not grow
    with pytest.raises(hmmsim.OutOfMemory):
        proc.mprotect(0x10000, PAGE, hmmsim.PROT_GROWSDOWN)  # no VMA at all: ENOMEM


def test_mprotect_beyond_task_size_fails_enomem(proc):
    for addr, length in ((TASK_SIZE, 2 * PAGE), (TASK_SIZE - PAGE, 3 * PAGE), (1 << 47, PAGE)):
        with pytest.raises(hmmsim.OutOfMemory):
            proc.mprotect(addr, length, PROT_READ)


def test_mprotect_accepts_prot_sem(proc):
    a = proc.mmap(PAGE, RW, ANON)
    proc.mprotect(a, PAGE, hmmsim.PROT_SEM | PROT_READ)
    assert layout(proc) == [(a, a + PAGE, PROT_READ)]


def test_mprotect_that_changes_no_flags_keeps_thp_pmd_mapped_and_sends_nothing(proc):
    a = proc.mmap(MB2, RW, ANON | MAP_FIXED, addr=BASE)
    proc.madvise(a, MB2, MADV_HUGEPAGE)
    proc.write(a, b"thp")
    log = EventLog(proc.machine)
    proc.mprotect(a + PAGE, PAGE, RW)
    assert proc.pagemap(a, 1)[0].order == 9
    assert len(proc.mm.vmas) == 1
    assert log.events == []


def test_mprotect_that_changes_no_flags_inside_a_hugetlb_page_succeeds(make_machine):
    m = make_machine(hugetlb_pages={MB2: 1})
    p = m.spawn()
    h = p.mmap(MB2, RW, ANON | MAP_HUGETLB)
    p.mprotect(h + PAGE, PAGE, RW)
    with pytest.raises(hmmsim.InvalidArgument):
        p.mprotect(h + PAGE, PAGE, PROT_READ)
    assert layout(p) == [(h, h + MB2, RW)]


def test_mprotect_only_splits_the_vmas_whose_flags_change(proc):
    a = proc.mmap(4 * PAGE, RW, ANON | MAP_FIXED, addr=BASE)
    proc.mprotect(a, 2 * PAGE, PROT_READ)
    proc.mprotect(a + PAGE, 2 * PAGE, PROT_READ)
    assert layout(proc) == [(a, a + 3 * PAGE, PROT_READ), (a + 3 * PAGE, a + 4 * PAGE, RW)]


def test_mprotect_with_a_hole_keeps_the_change_before_it_and_fails_enomem(proc):
    a = proc.mmap(4 * PAGE, RW, ANON | MAP_FIXED, addr=BASE)
    proc.munmap(a + PAGE, PAGE)
    proc.write(a, b"x")
    with pytest.raises(hmmsim.OutOfMemory):
        proc.mprotect(a, 4 * PAGE, PROT_READ)
    assert layout(proc) == [(a, a + PAGE, PROT_READ), (a + 2 * PAGE, a + 4 * PAGE, RW)]
    assert not proc.pagemap(a, 1)[0].writable


def test_mprotect_starting_in_a_hole_changes_nothing(proc):
    a = proc.mmap(4 * PAGE, RW, ANON | MAP_FIXED, addr=BASE)
    proc.munmap(a, PAGE)
    with pytest.raises(hmmsim.OutOfMemory):
        proc.mprotect(a, 4 * PAGE, PROT_READ)
    assert layout(proc) == [(a + PAGE, a + 4 * PAGE, RW)]


def test_mprotect_keeps_earlier_vmas_changed_when_a_hugetlb_split_fails(make_machine):
    m = make_machine(hugetlb_pages={MB2: 1})
    p = m.spawn()
    h = p.mmap(MB2, RW, ANON | MAP_HUGETLB | MAP_FIXED, addr=BASE + MB2)
    a = p.mmap(2 * PAGE, RW, ANON | MAP_FIXED, addr=BASE + MB2 - 2 * PAGE)
    with pytest.raises(hmmsim.InvalidArgument):
        p.mprotect(a, 2 * PAGE + PAGE, PROT_READ)  # ends inside the huge page
    assert layout(p) == [(a, a + 2 * PAGE, PROT_READ), (h, h + MB2, RW)]


def test_mprotect_keeps_the_split_at_start_when_the_split_at_end_fails(make_machine):
    m = make_machine(hugetlb_pages={MB2: 2})
    p = m.spawn()
    h = p.mmap(2 * MB2, RW, ANON | MAP_HUGETLB | MAP_FIXED, addr=BASE)
    with pytest.raises(hmmsim.InvalidArgument):
        p.mprotect(h + MB2, PAGE, PROT_READ)
    assert layout(p) == [(h, h + MB2, RW), (h + MB2, h + 2 * MB2, RW)]


def test_mprotect_prot_none_then_back_keeps_data(proc):
    a = proc.mmap(2 * PAGE, RW, ANON)
    proc.write(a, b"keep")
    proc.mprotect(a, 2 * PAGE, PROT_NONE)
    proc.mprotect(a, 2 * PAGE, PROT_READ | PROT_WRITE)
    assert proc.read(a, 4) == b"keep"
    verify_machine(proc.machine)


@pytest.mark.parametrize(("written", "nvmas"), [(True, 2), (False, 1)])
def test_mprotect_read_only_keeps_commit_of_touched_memory_so_it_does_not_merge(
    proc, written, nvmas
):
    a = proc.mmap(4 * PAGE, RW, ANON | MAP_FIXED, addr=BASE)
    proc.mmap(4 * PAGE, PROT_NONE, ANON | MAP_FIXED, addr=BASE + 4 * PAGE)
    if written:
        proc.write(a, b"x")  # an anon_vma: VM_ACCOUNT stays on read-only
    proc.mprotect(a, 8 * PAGE, PROT_READ)
    assert len(proc.mm.vmas) == nvmas


def test_first_write_reuses_the_neighbours_anon_vma_so_mprotect_can_merge_them(proc):
    a = proc.mmap(8 * PAGE, RW, ANON | MAP_FIXED, addr=BASE)
    proc.write(a + 7 * PAGE, b"x")
    proc.mprotect(a + 4 * PAGE, 4 * PAGE, PROT_NONE)
    proc.mmap(4 * PAGE, RW, ANON | MAP_FIXED, addr=a)
    proc.write(a, b"y")
    proc.mprotect(a + 4 * PAGE, 4 * PAGE, RW)
    assert layout(proc) == [(a, a + 8 * PAGE, RW)]
    verify_machine(proc.machine)


def test_merge_prefers_the_previous_vma_when_both_neighbours_cannot_join(proc):
    a = proc.mmap(3 * PAGE, RW, ANON | MAP_FIXED, addr=BASE)
    proc.mprotect(a + PAGE, PAGE, PROT_READ)
    proc.write(a, b"p")  # prev and next get different anon_vmas
    proc.mprotect(a + 2 * PAGE, PAGE, PROT_NONE)
    proc.mprotect(a + 2 * PAGE, PAGE, RW)
    proc.write(a + 2 * PAGE, b"n")
    proc.mprotect(a + PAGE, PAGE, RW)
    assert layout(proc) == [(a, a + 2 * PAGE, RW), (a + 2 * PAGE, a + 3 * PAGE, RW)]
