"""mmap / munmap / mremap / pagemap against Linux 6.18.

Each expectation here was checked on a Linux 6.18 host (ctypes calls in a
forked child): return values, errnos, the VMA layout of /proc/self/maps and
what pagemap reports.
"""

from __future__ import annotations

import time

import hmmsim
import pytest
from helpers import ANON, MB2, PAGE, RW
from hmmsim import (
    MADV_DONTNEED,
    MADV_HUGEPAGE,
    MAP_FIXED,
    MAP_HUGETLB,
    MAP_NONBLOCK,
    MAP_POPULATE,
    MAP_PRIVATE,
    MAP_SHARED,
    MREMAP_DONTUNMAP,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PROT_NONE,
    PROT_READ,
)
from hmmsim.errors import BadFileDescriptor
from hmmsim.mm.uapi import MAP_SHARED_VALIDATE, TASK_SIZE
from hmmsim.mm.vma import VM_ACCOUNT

SHARED_ANON = MAP_SHARED | hmmsim.MAP_ANONYMOUS
HUGE_ANON = ANON | MAP_HUGETLB
MOVE_FIXED = MREMAP_MAYMOVE | MREMAP_FIXED


def layout(proc, lo=0, hi=1 << 48):
    """(start, end, writable) of each VMA in [lo, hi), like /proc/self/maps."""
    return [
        (v.start - lo, v.end - lo, bool(v.flags & hmmsim.mm.vma.VM_WRITE))
        for v in proc.mm.vmas
        if v.start < hi and v.end > lo
    ]


def free_area(proc, size, align=MB2):
    """An unmapped, ``align``-aligned range of ``size`` bytes."""
    a = proc.mmap(size + align, RW, ANON)
    proc.munmap(a, size + align)
    return (a + align - 1) & ~(align - 1)


def orders(proc, addr, npages):
    return {(e.kind, e.order) for e in proc.pagemap(addr, npages)}


# ----- mremap of a range holding a PMD-mapped THP and PTE-mapped pages ------------


@pytest.mark.parametrize("fixed", [True, False])
def test_mremap_moves_range_with_pmd_thp_and_ptes(make_machine, fixed):
    m = make_machine(thp="always", ram_bytes=128 << 20)
    p = m.spawn()
    a = free_area(p, 2 * MB2)
    p.mmap(2 * MB2, RW, ANON | MAP_FIXED, addr=a)
    p.write(a, b"T" * PAGE)  # a PMD-mapped THP in the first 2 MiB
    p.write(a + MB2, b"P" * PAGE)
    p.madvise(a + MB2 + PAGE, PAGE, MADV_DONTNEED)  # the second is PTE-mapped
    p.write(a + MB2 + 5 * PAGE, b"Q")
    assert orders(p, a, 1) == {("anon", 9)}
    assert orders(p, a + MB2, 1) == {("anon", 0)}
    if fixed:
        dst = free_area(p, 2 * MB2)
        assert p.mremap(a, 2 * MB2, 2 * MB2, MOVE_FIXED, new_addr=dst) == dst
    else:
        p.mmap(PAGE, RW, ANON | MAP_FIXED, addr=a + 2 * MB2)  # no growth in place
        dst = p.mremap(a, 2 * MB2, 3 * MB2, MREMAP_MAYMOVE)
    assert p.mm.vmas.find(a) is None
    assert p.read(dst, 2) == b"TT"
    assert p.read(dst + MB2, 2) == b"PP"
    assert p.read(dst + MB2 + 5 * PAGE, 1) == b"Q"
    assert orders(p, dst, 1) == {("anon", 9)}
    assert orders(p, dst + MB2, 1) == {("anon", 0)}


# ----- hugetlb mremap -----------------------------------------------------------


def test_hugetlb_mremap_fixed_rounds_lengths_to_huge_pages(make_machine):
    m = make_machine(hugetlb_pages={MB2: 8}, ram_bytes=128 << 20)
    p = m.spawn()
    a = p.mmap(4 * MB2, RW, HUGE_ANON)
    p.write(a, b"A")
    p.write(a + MB2, b"B")
    tgt = p.mmap(4 * MB2, RW, ANON)
    p.write(tgt, b"x" * PAGE)
    # 2 MiB + 4 KiB rounds up to 4 MiB: two huge pages move.
    assert p.mremap(a, MB2 + PAGE, MB2 + PAGE, MOVE_FIXED, new_addr=tgt) == tgt
    v = p.mm.vmas.find(tgt)
    assert (v.start, v.end, v.is_hugetlb) == (tgt, tgt + 2 * MB2, True)
    rest = p.mm.vmas.find(tgt + 2 * MB2)
    assert (rest.start, rest.end, rest.is_hugetlb) == (tgt + 2 * MB2, tgt + 4 * MB2, False)
    assert p.read(tgt, 1) == b"A" and p.read(tgt + MB2, 1) == b"B"
    assert orders(p, tgt, 1) == {("hugetlb", 9)}


def test_hugetlb_mremap_shrinks_with_rounded_lengths(make_machine):
    m = make_machine(hugetlb_pages={MB2: 8}, ram_bytes=128 << 20)
    p = m.spawn()
    b = p.mmap(2 * MB2, RW, HUGE_ANON)
    assert p.mremap(b, 2 * MB2, MB2 - PAGE) == b  # rounds to 2 MiB
    assert [(v.start - b, v.end - b) for v in p.mm.vmas] == [(0, MB2)]
    with pytest.raises(hmmsim.InvalidArgument):
        p.mremap(b, PAGE, 3 * MB2 // 2, MREMAP_MAYMOVE)  # hugetlb never grows
    c = p.mmap(4 * MB2, RW, HUGE_ANON)
    tgt = free_area(p, 2 * MB2)
    assert p.mremap(c, 2 * MB2, MB2 - PAGE, MOVE_FIXED, new_addr=tgt) == tgt
    assert p.mm.vmas.find(c) is None and p.mm.vmas.find(c + MB2) is None
    assert p.mm.vmas.find(c + 2 * MB2).is_hugetlb
    assert p.mm.vmas.find(tgt).end == tgt + MB2


def test_hugetlb_mremap_fixed_to_unaligned_address_changes_nothing(make_machine):
    m = make_machine(hugetlb_pages={MB2: 4}, ram_bytes=128 << 20)
    p = m.spawn()
    a = p.mmap(MB2, RW, HUGE_ANON)
    tgt = p.mmap(4 * MB2, RW, ANON)
    before = layout(p)
    with pytest.raises(hmmsim.InvalidArgument):
        p.mremap(a, MB2, MB2, MOVE_FIXED, new_addr=tgt + PAGE)
    assert layout(p) == before


# ----- mremap duplicate (old_len 0) with MREMAP_FIXED ---------------------------------


def test_mremap_dup_with_fixed_replaces_mapped_target(proc):
    s = proc.mmap(4 * PAGE, RW, SHARED_ANON)
    proc.write(s, b"\x07")
    tgt = proc.mmap(4 * PAGE, RW, ANON)
    proc.write(tgt, b"\x09")
    assert proc.mremap(s, 0, 4 * PAGE, MOVE_FIXED, new_addr=tgt) == tgt
    assert proc.read(tgt, 1) == b"\x07"
    assert proc.mm.vmas.find(tgt).is_shared


# ----- pagemap at and past TASK_SIZE ---------------------------------------------------


def test_pagemap_reads_nothing_at_or_past_task_size(proc):
    a = proc.mmap(PAGE, RW, ANON)
    proc.write(a, b"x")
    assert proc.pagemap(a, 1)[0].present
    assert proc.pagemap(a + (1 << 48), 1) == []  # used to alias page a
    assert proc.pagemap(TASK_SIZE, 4) == []
    assert len(proc.pagemap(TASK_SIZE - PAGE, 4)) == 1
    with pytest.raises(hmmsim.InvalidArgument):
        proc.pagemap(-PAGE, 1)


# ----- munmap cost ---------------------------------------------------------------


def test_munmap_of_empty_terabyte_costs_what_is_mapped(proc):
    a = proc.mmap(PAGE, RW, ANON)
    proc.write(a, b"x")
    t0 = time.perf_counter()
    proc.munmap(1 << 40, 1 << 40)
    proc.munmap(hmmsim.mm.uapi.MMAP_MIN_ADDR, TASK_SIZE - hmmsim.mm.uapi.MMAP_MIN_ADDR)
    elapsed = time.perf_counter() - t0
    assert len(proc.mm.vmas) == 0
    assert proc.mm.pt.tables_in_use == 1  # every table but the PGD freed
    assert elapsed < 1.0  # was seconds for 1 TiB, 97 s for all of user space


def test_munmap_of_sparsely_touched_terabyte_mapping_is_fast(proc):
    a = proc.mmap(1 << 40, RW, ANON | hmmsim.MAP_NORESERVE)
    proc.write(a + (1 << 39), b"x")
    t0 = time.perf_counter()
    proc.munmap(a, 1 << 40)
    assert time.perf_counter() - t0 < 1.0
    assert proc.mm.pt.tables_in_use == 1


# ----- MAP_FIXED / MREMAP_FIXED over populated page tables --------------------------


def _populated_4k(p, a, size):
    p.mmap(size, RW, ANON | MAP_FIXED, addr=a)
    p.write(a, bytes(range(256)) * (size // 256))
    assert orders(p, a, size // PAGE) == {("anon", 0)}


def test_map_fixed_hugetlb_over_populated_range_maps_fresh_huge_pages(make_machine):
    m = make_machine(hugetlb_pages={MB2: 4}, ram_bytes=128 << 20)
    p = m.spawn()
    a = free_area(p, 2 * MB2)
    _populated_4k(p, a, 2 * MB2)
    free0 = m.phys.allocator.nr_free
    assert p.mmap(2 * MB2, RW, HUGE_ANON | MAP_FIXED, addr=a) == a
    assert m.phys.allocator.nr_free == free0 + 2 * 512  # the 4 KiB pages are gone
    assert p.read(a, 8) == bytes(8) and p.read(a + MB2 + 123, 8) == bytes(8)
    p.write(a + MB2, b"h")
    assert orders(p, a, 2 * 512) == {("hugetlb", 9)}
    pool = m.hugetlb[9]
    assert (pool.nr_free, pool.reserved) == (2, 0)
    p.munmap(a, 2 * MB2)
    assert (pool.nr_free, pool.reserved) == (4, 0)
    assert p.mm.pt.tables_in_use == 1


def test_map_fixed_anon_over_populated_range_gets_a_thp(make_machine):
    m = make_machine(thp="madvise", ram_bytes=128 << 20)
    p = m.spawn()
    a = free_area(p, MB2)
    _populated_4k(p, a, MB2)
    p.mmap(MB2, RW, ANON | MAP_FIXED, addr=a)
    p.madvise(a, MB2, MADV_HUGEPAGE)
    p.write(a, b"t")
    assert orders(p, a, 512) == {("anon", 9)}
    assert p.read(a + 77, 3) == bytes(3)


def test_map_fixed_4k_over_populated_range_reads_zeroes(proc):
    a = free_area(proc, 16 * PAGE, PAGE)
    _populated_4k(proc, a, 16 * PAGE)
    free0 = proc.machine.phys.allocator.nr_free
    proc.mmap(8 * PAGE, RW, ANON | MAP_FIXED, addr=a + 4 * PAGE)
    assert proc.machine.phys.allocator.nr_free == free0 + 8
    assert proc.read(a + 4 * PAGE, 8 * PAGE) == bytes(8 * PAGE)
    assert proc.read(a, 4) == bytes(range(4))


def test_mremap_fixed_hugetlb_onto_populated_target_faults_fresh_huge_pages(make_machine):
    m = make_machine(hugetlb_pages={MB2: 4}, ram_bytes=128 << 20)
    p = m.spawn()
    h = p.mmap(2 * MB2, RW, HUGE_ANON)
    p.write(h, b"H")  # only the first huge page exists
    tgt = free_area(p, 2 * MB2)
    _populated_4k(p, tgt, 2 * MB2)
    assert p.mremap(h, 2 * MB2, 2 * MB2, MOVE_FIXED, new_addr=tgt) == tgt
    assert p.read(tgt, 1) == b"H"
    assert p.read(tgt + MB2, 16) == bytes(16)  # not the old 4 KiB data
    p.write(tgt + MB2, b"I")
    assert orders(p, tgt, 1024) == {("hugetlb", 9)}
    assert p.read(tgt + MB2 + PAGE, 4) == bytes(4)


# ----- MAP_POPULATE ---------------------------------------------------------------


def test_map_populate_of_prot_none_populates_nothing(proc):
    a = proc.mmap(4 * PAGE, PROT_NONE, ANON | MAP_POPULATE)
    assert {e.present for e in proc.pagemap(a, 4)} == {False}
    b = proc.mmap(4 * PAGE, RW, ANON | MAP_POPULATE | MAP_NONBLOCK)
    assert {e.present for e in proc.pagemap(b, 4)} == {False}
    c = proc.mmap(4 * PAGE, RW, ANON | MAP_POPULATE)
    assert {e.present for e in proc.pagemap(c, 4)} == {True}


def test_map_populate_merges_before_populating(make_machine):
    m = make_machine(thp="always", ram_bytes=128 << 20)
    p = m.spawn()
    a = free_area(p, MB2)
    p.mmap(MB2 // 2, RW, ANON | MAP_FIXED, addr=a)
    p.mmap(MB2 // 2, RW, ANON | MAP_FIXED | MAP_POPULATE, addr=a + MB2 // 2)
    assert layout(p, a, a + MB2) == [(0, MB2, True)]
    assert orders(p, a + MB2 // 2, 1) == {("anon", 9)}  # the merged VMA holds a THP


# ----- mremap across VMAs and holes --------------------------------------------------


def _three_vmas(p):
    a = p.mmap(8 * PAGE, RW, ANON)
    p.mprotect(a + 2 * PAGE, 2 * PAGE, PROT_READ)
    p.write(a, b"\x05")
    p.write(a + 5 * PAGE, b"\x06")
    return a


def test_mremap_shrink_across_vmas_and_holes_unmaps_the_tail(proc):
    a = _three_vmas(proc)
    assert proc.mremap(a, 8 * PAGE, PAGE) == a
    assert layout(proc, a, a + 8 * PAGE) == [(0, PAGE, True)]
    b = proc.mmap(8 * PAGE, RW, ANON)
    proc.munmap(b + 2 * PAGE, PAGE)
    assert proc.mremap(b, 8 * PAGE, PAGE) == b
    assert layout(proc, b, b + 8 * PAGE) == [(0, PAGE, True)]
    c = proc.mmap(8 * PAGE, RW, ANON)
    proc.munmap(c, 2 * PAGE)
    before = layout(proc)
    with pytest.raises(hmmsim.BadAddress):
        proc.mremap(c, 8 * PAGE, PAGE)  # nothing mapped at c
    assert layout(proc) == before


def test_mremap_fixed_moves_several_vmas_and_keeps_holes(proc):
    a = _three_vmas(proc)
    proc.munmap(a + 6 * PAGE, PAGE)
    t = proc.mmap(8 * PAGE, PROT_READ | hmmsim.PROT_EXEC, ANON)
    assert proc.mremap(a, 8 * PAGE, 8 * PAGE, MOVE_FIXED, new_addr=t) == t
    assert proc.mm.vmas.intersecting(a, a + 8 * PAGE) == []
    assert layout(proc, t, t + 8 * PAGE) == [
        (0, 2 * PAGE, True),
        (2 * PAGE, 4 * PAGE, False),
        (4 * PAGE, 6 * PAGE, True),
        (6 * PAGE, 7 * PAGE, False),  # the target's page under the source's hole
        (7 * PAGE, 8 * PAGE, True),
    ]
    assert proc.read(t, 1) == b"\x05" and proc.read(t + 5 * PAGE, 1) == b"\x06"


@pytest.mark.parametrize(
    ("new_len", "flags"),
    [
        (10 * PAGE, MOVE_FIXED),  # growth
        (6 * PAGE, MOVE_FIXED),  # shrink
        (8 * PAGE, MREMAP_MAYMOVE | MREMAP_DONTUNMAP),  # no MREMAP_FIXED
        (9 * PAGE, MREMAP_MAYMOVE),
        (9 * PAGE, 0),
    ],
)
def test_mremap_of_several_vmas_without_a_fixed_move_is_efault(proc, new_len, flags):
    a = _three_vmas(proc)
    t = free_area(proc, 16 * PAGE, PAGE)
    before = layout(proc)
    with pytest.raises(hmmsim.BadAddress):
        proc.mremap(a, 8 * PAGE, new_len, flags, new_addr=t)
    assert layout(proc) == before


def test_mremap_fixed_of_range_starting_in_a_hole_is_efault(proc):
    a = _three_vmas(proc)
    proc.munmap(a, PAGE)
    t = free_area(proc, 16 * PAGE, PAGE)
    with pytest.raises(hmmsim.BadAddress):
        proc.mremap(a, 8 * PAGE, 8 * PAGE, MOVE_FIXED, new_addr=t)


def test_mremap_same_length_without_flags_returns_old_even_across_vmas(proc):
    a = _three_vmas(proc)
    assert proc.mremap(a, 8 * PAGE, 8 * PAGE) == a


# ----- VMA merging -----------------------------------------------------------------


def test_mremap_of_never_faulted_anon_merges_at_its_new_place(proc):
    r = free_area(proc, 64 * PAGE, PAGE)
    c = proc.mmap(4 * PAGE, RW, ANON | MAP_FIXED, addr=r)
    a = proc.mmap(4 * PAGE, RW, ANON | MAP_FIXED, addr=r + 32 * PAGE)
    proc.mremap(a, 4 * PAGE, 4 * PAGE, MOVE_FIXED, new_addr=c + 4 * PAGE)
    assert layout(proc, r, r + 64 * PAGE) == [(0, 8 * PAGE, True)]
    # A faulted one keeps its page offset (its pages are indexed by it): no merge.
    d = proc.mmap(4 * PAGE, RW, ANON | MAP_FIXED, addr=r + 32 * PAGE)
    proc.write(d, b"d")
    proc.mremap(d, 4 * PAGE, 4 * PAGE, MOVE_FIXED, new_addr=r + 8 * PAGE)
    assert layout(proc, r, r + 64 * PAGE) == [(0, 8 * PAGE, True), (8 * PAGE, 12 * PAGE, True)]
    assert proc.read(r + 8 * PAGE, 1) == b"d"


def test_once_writable_faulted_mapping_does_not_merge_with_never_writable(proc):
    r = free_area(proc, 64 * PAGE, PAGE)
    x = proc.mmap(4 * PAGE, RW, ANON | MAP_FIXED, addr=r)
    assert proc.mm.vmas.find(x).flags & VM_ACCOUNT
    proc.write(x, b"x")
    proc.mprotect(x, 4 * PAGE, PROT_READ)
    proc.mmap(4 * PAGE, PROT_READ, ANON | MAP_FIXED, addr=r + 4 * PAGE)
    assert layout(proc, r, r + 64 * PAGE) == [(0, 4 * PAGE, False), (4 * PAGE, 8 * PAGE, False)]
    # Never faulted: mprotect drops VM_ACCOUNT again, and the two merge.
    y = proc.mmap(4 * PAGE, RW, ANON | MAP_FIXED, addr=r + 16 * PAGE)
    proc.mprotect(y, 4 * PAGE, PROT_READ)
    proc.mmap(4 * PAGE, PROT_READ, ANON | MAP_FIXED, addr=r + 20 * PAGE)
    assert layout(proc, r + 16 * PAGE, r + 24 * PAGE) == [(0, 8 * PAGE, False)]


# ----- errors as Linux 6.18 gives them ------------------------------------------------


def test_mmap_shared_validate_anonymous_is_einval(proc):
    with pytest.raises(hmmsim.InvalidArgument):
        proc.mmap(PAGE, RW, MAP_SHARED_VALIDATE | hmmsim.MAP_ANONYMOUS)


def test_mmap_file_offset_2_63_is_eoverflow(machine, proc):
    f = machine.create_file(PAGE)
    with pytest.raises(hmmsim.Overflow):
        proc.mmap(PAGE, RW, MAP_PRIVATE, file=f, offset=1 << 63)


def test_mmap_without_file_or_map_anonymous_is_ebadf(proc):
    with pytest.raises(BadFileDescriptor) as info:
        proc.mmap(PAGE, RW, MAP_PRIVATE)
    assert info.value.errno == 9
    assert len(proc.mm.vmas) == 0


def test_mmap_file_shared_validate_unknown_flag_is_eopnotsupp(machine, proc):
    f = machine.create_file(PAGE)
    for flag in (0x200, 0x80000, 1 << 31):
        with pytest.raises(hmmsim.NotSupported):
            proc.mmap(PAGE, RW, MAP_SHARED_VALIDATE | flag, file=f)
    assert proc.mmap(PAGE, RW, MAP_SHARED_VALIDATE | 0x2000, file=f)  # MAP_LOCKED: known
    assert len(proc.mm.vmas) == 1


def test_mmap_ignores_unknown_legacy_flags_and_prot_bits(proc):
    for flag in (0x80, 0x200, 0x400, 0x800000, 1 << 31, 1 << 26):
        a = proc.mmap(PAGE, RW, ANON | flag)
        assert proc.mm.vmas.find(a) is not None
    for prot in (0x8, 0x100):
        a = proc.mmap(PAGE, RW | prot, ANON)
        proc.write(a, b"ok")


def test_map_fixed_below_mmap_min_addr_is_eperm(proc):
    with pytest.raises(hmmsim.NotPermitted):
        proc.mmap(PAGE, RW, ANON | MAP_FIXED, addr=0x1000)
    assert len(proc.mm.vmas) == 0


def test_mremap_fixed_to_zero_is_eperm(proc):
    a = proc.mmap(2 * PAGE, RW, ANON)
    proc.write(a, b"z")
    with pytest.raises(hmmsim.NotPermitted):
        proc.mremap(a, PAGE, PAGE, MOVE_FIXED, new_addr=0)
    with pytest.raises(hmmsim.NotPermitted):
        proc.mremap(a, 2 * PAGE, 2 * PAGE, MOVE_FIXED, new_addr=0)
    assert proc.read(a, 1) == b"z"


def test_mremap_of_old_range_past_task_size_is_efault(proc):
    with pytest.raises(hmmsim.BadAddress):
        proc.mremap(1 << 47, PAGE, PAGE)
    with pytest.raises(hmmsim.BadAddress):
        proc.mremap(TASK_SIZE, 2 * PAGE, PAGE)


def test_mremap_dontunmap_new_addr_past_task_size_is_einval(proc):
    a = proc.mmap(2 * PAGE, RW, ANON)
    with pytest.raises(hmmsim.InvalidArgument):
        proc.mremap(a, PAGE, PAGE, MREMAP_MAYMOVE | MREMAP_DONTUNMAP, new_addr=(1 << 47) + PAGE)


def test_mremap_dontunmap_compares_page_aligned_lengths(proc):
    a = proc.mmap(2 * PAGE, RW, ANON)
    proc.write(a, b"k")
    b = proc.mremap(a, PAGE, PAGE - 5, MREMAP_MAYMOVE | MREMAP_DONTUNMAP)
    assert b != a and proc.read(b, 1) == b"k"
    assert proc.mm.vmas.find(a) is not None


def test_mremap_fixed_shrink_may_cross_vmas_in_the_unmapped_tail(proc):
    a = _three_vmas(proc)
    t = free_area(proc, 16 * PAGE, PAGE)
    assert proc.mremap(a, 8 * PAGE, PAGE, MOVE_FIXED, new_addr=t) == t
    assert proc.mm.vmas.intersecting(a, a + 8 * PAGE) == []
    assert layout(proc, t, t + 16 * PAGE) == [(0, PAGE, True)]
    assert proc.read(t, 1) == b"\x05"


def test_mremap_dontunmap_of_part_of_a_vma_leaves_it_whole(proc):
    s = proc.mmap(16 * PAGE, RW, SHARED_ANON)
    proc.write(s + 4 * PAGE, b"s")
    b = proc.mremap(s + 4 * PAGE, 4 * PAGE, 4 * PAGE, MREMAP_MAYMOVE | MREMAP_DONTUNMAP)
    assert layout(proc, s, s + 16 * PAGE) == [(0, 16 * PAGE, True)]
    assert proc.read(b, 1) == b"s"


def test_munmap_ending_inside_a_huge_page_fails_after_splitting_the_first_vma(make_machine):
    m = make_machine(hugetlb_pages={MB2: 1}, ram_bytes=128 << 20)
    p = m.spawn()
    b = free_area(p, 2 * MB2)
    p.mmap(MB2, RW, SHARED_ANON | MAP_FIXED, addr=b)
    p.mmap(MB2, RW, HUGE_ANON | MAP_FIXED, addr=b + MB2)
    p.write(b + MB2, b"h")
    with pytest.raises(hmmsim.InvalidArgument):
        p.munmap(b + PAGE, MB2 + PAGE)
    assert [(v.start - b, v.end - b) for v in p.mm.vmas] == [
        (0, PAGE),
        (PAGE, MB2),
        (MB2, 2 * MB2),
    ]
    assert p.read(b + MB2, 1) == b"h"


def test_map_fixed_ending_inside_a_huge_page_fails_after_splitting_the_first_vma(make_machine):
    m = make_machine(hugetlb_pages={MB2: 1}, ram_bytes=128 << 20)
    p = m.spawn()
    b = free_area(p, 2 * MB2)
    p.mmap(MB2, RW, ANON | MAP_FIXED, addr=b)
    p.mmap(MB2, RW, HUGE_ANON | MAP_FIXED, addr=b + MB2)
    with pytest.raises(hmmsim.InvalidArgument):
        p.mmap(MB2, RW, ANON | MAP_FIXED | MAP_POPULATE, addr=b + PAGE)
    assert [(v.start - b, v.end - b) for v in p.mm.vmas] == [
        (0, PAGE),
        (PAGE, MB2),
        (MB2, 2 * MB2),
    ]
    with pytest.raises(hmmsim.InvalidArgument):  # the start cuts: nothing happens
        p.mmap(MB2, RW, ANON | MAP_FIXED, addr=b + MB2 + PAGE)
    assert len(p.mm.vmas) == 3


def test_mremap_fixed_target_cutting_a_huge_page_fails_after_the_target_split(make_machine):
    m = make_machine(hugetlb_pages={MB2: 2}, ram_bytes=128 << 20)
    p = m.spawn()
    src = p.mmap(MB2 - PAGE, RW, SHARED_ANON)
    t = free_area(p, 2 * MB2)
    p.mmap(2 * MB2, RW, HUGE_ANON | MAP_FIXED, addr=t)
    with pytest.raises(hmmsim.InvalidArgument):  # [t + 2 MiB - 4 KiB, ...) is not aligned
        p.mremap(src, MB2, MB2, MOVE_FIXED, new_addr=t + MB2 - PAGE)
    with pytest.raises(hmmsim.InvalidArgument):  # the range runs past src's VMA
        p.mremap(src, MB2, MB2, MOVE_FIXED, new_addr=t + MB2)
    assert [(v.start - t, v.end - t) for v in p.mm.vmas.intersecting(t, t + 2 * MB2)] == [
        (0, MB2),
        (MB2, 2 * MB2),
    ]
    assert p.mm.vmas.find(src).end == src + MB2 - PAGE


def test_map_locked_populates_even_with_map_nonblock(proc):
    locked = hmmsim.mm.uapi.MAP_LOCKED
    a = proc.mmap(4 * PAGE, RW, ANON | locked)
    b = proc.mmap(4 * PAGE, RW, ANON | locked | MAP_NONBLOCK)
    c = proc.mmap(4 * PAGE, PROT_NONE, ANON | locked)
    assert {e.present for e in proc.pagemap(a, 4) + proc.pagemap(b, 4)} == {True}
    assert {e.present for e in proc.pagemap(c, 4)} == {False}
