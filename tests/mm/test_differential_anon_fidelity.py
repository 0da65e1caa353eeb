"""Anonymous and shmem behaviours the differential test found the model got wrong.

Each test names a behaviour checked on the Linux 6.18 host (a ctypes script
in a forked child, with the differential run's THP settings: ``enabled`` and
``defrag`` ``madvise``, ``shmem_enabled=never``, no swap) and asserts what
the host did.
"""

from __future__ import annotations

import hmmsim
import numpy as np
from helpers import ANON, PAGE, RW
from hmmsim import (
    MADV_COLD,
    MADV_COLLAPSE,
    MADV_HUGEPAGE,
    MADV_PAGEOUT,
    MAP_FIXED,
    MAP_POPULATE,
    MAP_SHARED,
    MREMAP_DONTUNMAP,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
)
from hmmsim.mm.debug import verify_machine

BASE = 0x5A00_0000_0000  # 2 MiB aligned
MB = 1 << 20
THP = 512 * PAGE
MOVE = MREMAP_MAYMOVE | MREMAP_FIXED
SHMEM = hmmsim.MAP_ANONYMOUS | MAP_SHARED


def _folio_order(machine: hmmsim.Machine, proc: hmmsim.Process, addr: int) -> int:
    e = proc.pagemap(addr, 1)[0]
    assert e.present and e.pfn is not None
    return int(machine.phys.order[machine.phys.head(e.pfn)])


def test_collapse_after_move_to_aligned_address_ignores_anon_pgoff(machine, proc) -> None:
    """An anonymous VMA's pgoff does not decide whether a 2 MiB chunk fits.

    Host (differential seeds 60043, 62575): 512 populated pages mapped at
    0x1d4000 past a 2 MiB boundary and moved by ``mremap`` to an aligned
    address keep their old pgoff; ``MADV_COLLAPSE`` there returns 0 and the
    chunk is one PMD-mapped THP (the model said EINVAL).
    """
    a = proc.mmap(THP, RW, ANON | MAP_FIXED | MAP_POPULATE, addr=BASE + 0x1D4000)
    new = BASE + 0x600000
    assert proc.mremap(a, THP, THP, MOVE, new) == new
    proc.write(new + 0x3000, b"\x5a")
    proc.madvise(new, THP, MADV_COLLAPSE)
    for off in (0, 0x3000, THP - PAGE):
        e = proc.pagemap(new + off, 1)[0]
        assert (e.present, e.order) == (True, 9)
    assert proc.read(new + 0x3000, 2) == b"\x5a\x00"
    verify_machine(machine)


def test_thp_write_fault_after_move_ignores_anon_pgoff(machine, proc) -> None:
    """A write fault in an aligned 2 MiB chunk of a moved anonymous VMA maps a THP.

    Host: 4 MiB mapped at 0x1d4000 past a boundary, its last page written
    (so the VMA has an anon_vma and keeps its pgoff when moved), moved to an
    aligned address and given ``MADV_HUGEPAGE``: a write at +0x10000 maps a
    PMD THP; the moved page stays a small page.
    """
    size = 4 * MB
    a = proc.mmap(size, RW, ANON | MAP_FIXED, addr=BASE + 0x11D4000)
    proc.write(a + size - PAGE, b"\x01")
    new = BASE + 0x1800000
    assert proc.mremap(a, size, size, MOVE, new) == new
    proc.madvise(new, size, MADV_HUGEPAGE)
    proc.write(new + 0x10000, b"\x02")
    e = proc.pagemap(new + 0x10000, 1)[0]
    assert (e.present, e.order, e.exclusive) == (True, 9, True)
    last = proc.pagemap(new + size - PAGE, 1)[0]
    assert (last.present, last.order) == (True, 0)
    assert proc.read(new + size - PAGE, 1) == b"\x01"
    verify_machine(machine)


def test_dontunmap_of_aligned_chunk_moves_its_page_table_so_thp_fault_maps_pmd(
    machine, proc
) -> None:
    """MREMAP_DONTUNMAP of a whole aligned 2 MiB extent leaves no page table behind.

    Host (differential seed 10570): 512 populated small pages at an aligned
    address moved with ``MREMAP_DONTUNMAP`` to another aligned address; the
    kernel moves the PTE table itself (``move_normal_pmd``), so after
    ``MADV_HUGEPAGE`` a write to the old range maps a PMD THP there (the
    model left an empty PTE table and mapped a small page).
    """
    a = proc.mmap(THP, RW, ANON | MAP_FIXED | MAP_POPULATE, addr=BASE)
    proc.write(a + 0x5000, b"\x07")
    new = BASE + 0x400000
    assert proc.mremap(a, THP, THP, MOVE | MREMAP_DONTUNMAP, new) == new
    proc.madvise(a, THP, MADV_HUGEPAGE)
    proc.write(a, b"\x01")
    e = proc.pagemap(a, 1)[0]
    assert (e.present, e.order) == (True, 9)
    assert proc.read(a + 0x5000, 1) == b"\x00"  # the new THP, not the moved page
    moved = proc.pagemap(new + 0x5000, 1)[0]
    assert (moved.present, moved.order) == (True, 0)
    assert proc.read(new + 0x5000, 1) == b"\x07"
    verify_machine(machine)


def test_dontunmap_of_partial_chunk_keeps_its_page_table(machine, proc) -> None:
    """Only whole aligned extents move their table: a partial one moves PTEs.

    Host: 4 MiB at an aligned address with only page 0x5000 written; its
    first 1 MiB moved with ``MREMAP_DONTUNMAP``; after ``MADV_HUGEPAGE`` a
    write at the start maps a small page (the emptied PTE table stays), and a
    write in the next, untouched chunk maps a PMD THP.
    """
    a = proc.mmap(4 * MB, RW, ANON | MAP_FIXED, addr=BASE)
    proc.write(a + 0x5000, b"\x07")
    new = BASE + 0x500000
    assert proc.mremap(a, MB, MB, MOVE | MREMAP_DONTUNMAP, new) == new
    proc.madvise(a, 4 * MB, MADV_HUGEPAGE)
    proc.write(a, b"\x01")
    proc.write(a + THP, b"\x01")
    first, second = proc.pagemap(a, 1)[0], proc.pagemap(a + THP, 1)[0]
    assert (first.present, first.order) == (True, 0)
    assert (second.present, second.order) == (True, 9)
    assert proc.read(new + 0x5000, 1) == b"\x07"
    verify_machine(machine)


def _pte_mapped_shmem_thp(machine: hmmsim.Machine, proc: hmmsim.Process) -> int:
    """A shmem THP at BASE whose PMD was removed by a munmap of one page, read back by PTEs."""
    a = proc.mmap(THP, RW, SHMEM | MAP_FIXED, addr=BASE)
    proc.write(a, b"\x07" * THP)
    proc.madvise(a, THP, MADV_COLLAPSE)
    assert _folio_order(machine, proc, a) == 9
    proc.munmap(a + 0x100000, PAGE)
    for off in (0, 0x1F0000, 0x1F1000, THP - PAGE):
        assert proc.read(a + off, 1) == b"\x07"
    e = proc.pagemap(a, 1)[0]
    assert (e.present, e.order) == (True, 0)
    assert _folio_order(machine, proc, a) == 9
    return a


def test_pageout_of_part_of_pte_mapped_shmem_thp_splits_and_unmaps_all_of_it(machine, proc) -> None:
    """MADV_PAGEOUT of 2 pages of a PTE-mapped shmem THP unmaps the whole THP.

    Host (differential seeds 62208, 62872): the kernel splits the folio
    (``split_folio``), and splitting a page-cache folio leaves every mapping
    of it unmapped, outside the advised range too: pages 0, 0x1f0000 and
    0x1ff000 are absent after the call, which returns 0; a read then maps
    the old bytes from a small folio in the page cache.
    """
    a = _pte_mapped_shmem_thp(machine, proc)
    proc.madvise(a + 0x1F0000, 2 * PAGE, MADV_PAGEOUT)
    assert [e.present for e in proc.pagemap(a, 512)] == [False] * 512
    assert proc.read(a + 0x5000, 1) == b"\x07"
    assert proc.read(a + 0x1F0000, 1) == b"\x07"
    assert _folio_order(machine, proc, a + 0x5000) == 0
    verify_machine(machine)


def test_cold_of_part_of_pte_mapped_shmem_thp_splits_it_too(machine, proc) -> None:
    """MADV_COLD shares the split: the THP is unmapped and small afterwards."""
    a = _pte_mapped_shmem_thp(machine, proc)
    proc.madvise(a + 0x1F0000, 2 * PAGE, MADV_COLD)
    present = np.array([e.present for e in proc.pagemap(a, 512)])
    assert not present.any()
    assert proc.read(a, 1) == b"\x07"
    assert _folio_order(machine, proc, a) == 0
    verify_machine(machine)


def test_pageout_of_part_of_pmd_mapped_shmem_thp_splits_and_unmaps_it(machine, proc) -> None:
    """MADV_PAGEOUT of 2 pages of a PMD-mapped shmem THP splits the folio.

    Host: after ``MADV_COLLAPSE`` and a read, the THP is PMD-mapped;
    ``MADV_PAGEOUT`` of 2 pages near its end returns 0 and leaves pages 0,
    0x1f0000 and 0x1ff000 absent; reads at 0x5000 and 0x1f0000 then map small
    (non-compound) pages holding the old bytes.
    """
    a = proc.mmap(THP, RW, SHMEM | MAP_FIXED, addr=BASE)
    proc.write(a, b"\x07" * THP)
    proc.madvise(a, THP, MADV_COLLAPSE)
    assert proc.read(a, 1) == b"\x07"
    assert proc.pagemap(a, 1)[0].order == 9
    proc.madvise(a + 0x1F0000, 2 * PAGE, MADV_PAGEOUT)
    assert [e.present for e in proc.pagemap(a, 512)] == [False] * 512
    for off in (0x5000, 0x1F0000):
        assert proc.read(a + off, 1) == b"\x07"
        e = proc.pagemap(a + off, 1)[0]
        assert (e.present, e.order) == (True, 0)
        assert _folio_order(machine, proc, a + off) == 0
    verify_machine(machine)


def test_pageout_discards_clean_lazyfree_pages_also_under_prot_none(machine, proc) -> None:
    """MADV_PAGEOUT without swap discards clean lazy-free pages, PROT_NONE or not.

    Host (differential seed 10491, rerun pinned to CPUs): 100 populated
    pages, 2 of them made ``PROT_NONE`` and then ``MADV_FREE``d; a
    ``MADV_PAGEOUT`` of those 2 leaves them absent when it runs on the CPU
    that ran ``MADV_FREE``. On another CPU they stay mapped: ``MADV_FREE``
    left the folios in that CPU's lazy-free folio batch, off the LRU, and
    ``madvise_pageout`` drains only its own CPU's batches before it isolates
    folios, so it skips them. The model has no per-CPU batches and behaves as
    one CPU; that cross-CPU outcome is the host's scheduling, not a rule.
    """
    a = proc.mmap(100 * PAGE, RW, ANON | MAP_FIXED | MAP_POPULATE, addr=BASE)
    proc.write(a + 0x50000, b"\x09" * (2 * PAGE))
    proc.mprotect(a + 0x50000, 2 * PAGE, hmmsim.PROT_NONE)
    proc.madvise(a + 0x50000, 2 * PAGE, hmmsim.MADV_FREE)
    proc.madvise(a + 0x50000, 2 * PAGE, MADV_PAGEOUT)
    assert [e.present for e in proc.pagemap(a + 0x4F000, 4)] == [True, False, False, True]
    proc.mprotect(a + 0x50000, 2 * PAGE, RW)
    assert proc.read(a + 0x50000, 2 * PAGE) == bytes(2 * PAGE)
    verify_machine(machine)


def test_dontunmap_realigns_an_unaligned_start_so_a_mapping_in_front_can_take_a_thp(
    machine, proc
) -> None:
    """A move from an unaligned VMA start takes the table below it when it can.

    Host: 2 MiB populated at 0x1d4000, moved with ``MREMAP_DONTUNMAP`` to
    0x5d4000 (congruent); an anonymous mapping then made at [0, 0x1d4000)
    merges with the VMA left behind into [0, 0x3d4000), and after
    ``MADV_HUGEPAGE`` a write at 0 maps a PMD THP: the kernel realigned the
    move down to 0 (``try_realign_addr``) and moved the first table whole.
    With a mapping at 0x400000, below the destination, it cannot realign, the
    emptied table stays, and the same write maps a small page.
    """
    for blocked in (False, True):
        p = machine.spawn()
        a = p.mmap(THP, RW, ANON | MAP_FIXED | MAP_POPULATE, addr=BASE + 0x1D4000)
        if blocked:
            p.mmap(PAGE, RW, ANON | MAP_FIXED, addr=BASE + 0x400000)
        new = BASE + 0x5D4000
        assert p.mremap(a, THP, THP, MOVE | MREMAP_DONTUNMAP, new) == new
        p.mmap(0x1D4000, RW, ANON | MAP_FIXED, addr=BASE)
        vmas = [(v.start - BASE, v.end - BASE) for v in p.mm.vmas.intersecting(BASE, BASE + 4 * MB)]
        assert vmas[0] == (0, 0x3D4000)
        p.madvise(BASE, 0x3D4000, MADV_HUGEPAGE)
        p.write(BASE, b"\x01")
        e = p.pagemap(BASE, 1)[0]
        assert (e.present, e.order) == (True, 0 if blocked else 9)
        p.exit()
    verify_machine(machine)


def test_mremap_grow_in_place_of_forked_vma_merges_with_following_empty_vma(machine, proc) -> None:
    """Growing in place merges with the next VMA even if the grown one came from fork.

    Host (differential seed 63079): 2 MiB populated, the process forked; in
    the child a 4 MiB mapping at +4 MiB (never faulted) and an ``mremap`` of
    the tail [0x52000, 2 MiB) growing to end at +4 MiB: the maps show one
    VMA [0, 8 MiB). The kernel merges a range that grows in place with no
    source VMA, so the fork-inherited anon_vma chain does not forbid it (a
    VMA moved there by ``mremap`` would not merge: its source's chain counts).
    """
    proc.mmap(THP, RW, ANON | MAP_FIXED | MAP_POPULATE, addr=BASE)
    proc.write(BASE + 0x52000, b"\x03")
    child = proc.fork()
    child.mmap(4 * MB, RW, ANON | MAP_FIXED, addr=BASE + 4 * MB)
    old = BASE + 0x52000
    assert child.mremap(old, 430 * PAGE, 942 * PAGE, 0) == old
    vmas = [(v.start - BASE, v.end - BASE) for v in child.mm.vmas.intersecting(BASE, BASE + 8 * MB)]
    assert vmas == [(0, 8 * MB)]
    assert child.read(BASE + 0x52000, 1) == b"\x03"
    child.write(BASE + 6 * MB, b"\x04")
    assert proc.mm.vmas.intersecting(BASE + 6 * MB, BASE + 6 * MB + 1) == []
    verify_machine(machine)


def test_mremap_move_of_forked_vma_next_to_empty_vma_does_not_merge(machine, proc) -> None:
    """A VMA moved by mremap still carries its source's fork chain into the merge.

    Host: 2 MiB populated, forked; in the child an empty 2 MiB mapping right
    after it (not merged: the first VMA's anon_vma came through fork), the
    first VMA moved away and back: the maps still show two VMAs
    (``copy_vma`` merges with the source as ``copied_from``, whose chain
    is not single).
    """
    proc.mmap(THP, RW, ANON | MAP_FIXED | MAP_POPULATE, addr=BASE)
    child = proc.fork()
    child.mmap(THP, RW, ANON | MAP_FIXED, addr=BASE + THP)
    assert child.mremap(BASE, THP, THP, MOVE, BASE + 6 * MB) == BASE + 6 * MB
    assert child.mremap(BASE + 6 * MB, THP, THP, MOVE, BASE) == BASE
    vmas = [(v.start - BASE, v.end - BASE) for v in child.mm.vmas.intersecting(BASE, BASE + 8 * MB)]
    assert vmas == [(0, THP), (THP, 2 * THP)]
    verify_machine(machine)


def test_dontunmap_of_whole_vma_does_not_merge_what_it_leaves_behind(machine, proc) -> None:
    """The VMA a whole-VMA MREMAP_DONTUNMAP leaves behind merges with nothing.

    Host (differential seed 65355): 2 MiB mapped, forked, written in the
    child, forked again; in the grandchild a 2 MiB mapping at 0x129000 (not
    merged: the first VMA's anon_vma came through fork) and a
    ``MREMAP_DONTUNMAP`` move of [0, 2 MiB), both VMAs' pieces, to 4 MiB.
    The maps then show [0, 0x129000), [0x129000, 0x329000),
    [4 MiB, +0x129000), [+0x129000, 6 MiB): the first old VMA lost its
    anon_vma (it moved whole) and became compatible with the second, but
    ``dontunmap_complete`` merges nothing (the model merged them).
    """
    proc.mmap(THP, RW, ANON | MAP_FIXED, addr=BASE)
    child = proc.fork()
    child.write(BASE, b"\x01" * THP)
    grandchild = child.fork()
    grandchild.mmap(THP, RW, ANON | MAP_FIXED, addr=BASE + 0x129000)
    new = BASE + 4 * MB
    assert grandchild.mremap(BASE, THP, THP, MOVE | MREMAP_DONTUNMAP, new) == new
    vmas = [
        (v.start - BASE, v.end - BASE) for v in grandchild.mm.vmas.intersecting(BASE, BASE + 8 * MB)
    ]
    assert vmas == [
        (0, 0x129000),
        (0x129000, 0x329000),
        (4 * MB, 4 * MB + 0x129000),
        (4 * MB + 0x129000, 6 * MB),
    ]
    assert grandchild.read(new, 1) == b"\x01"
    assert grandchild.read(BASE, 1) == b"\x00"
    verify_machine(machine)


def test_read_over_shmem_holes_faults_on_each_hole_and_each_fault_maps_around(
    machine, proc
) -> None:
    """Fault-around maps only cached pages: every hole in a read faults by itself.

    Host (differential seed 65160): 1024 shmem pages at 0x2d0000, 2 pages
    at 0x325000 made read-only (so a VMA starts at 0x327000), forked; the
    parent writes 0x33c000 and 0x33d000, then the child reads the 8 pages
    from 0x32c000 (holes). Present in the child afterwards: 0x32c000 to
    0x333000 and 0x33c000, 0x33d000. The fault at 0x32c000 has the window
    [0x327000, 0x337000) (shifted to the VMA start) but maps no hole; the
    hole at 0x330000 faults in turn, and its window [0x330000, 0x340000)
    maps the two cached pages (the model had taken the first window as
    mapping everything in it).
    """
    a = proc.mmap(1024 * PAGE, RW, SHMEM | MAP_FIXED, addr=BASE + 0x2D0000)
    proc.mprotect(BASE + 0x325000, 2 * PAGE, hmmsim.PROT_READ)
    child = proc.fork()
    proc.write(BASE + 0x33C000, b"\x01" * (2 * PAGE))
    assert child.read(BASE + 0x32C000, 8 * PAGE) == bytes(8 * PAGE)
    present = [e.addr - BASE for e in child.pagemap(BASE + 0x320000, 0x20) if e.present]
    assert present == [0x32C000 + i * PAGE for i in range(8)] + [0x33C000, 0x33D000]
    assert child.read(BASE + 0x33C000, 1) == b"\x01"
    assert a == BASE + 0x2D0000
    verify_machine(machine)


def test_dontunmap_into_the_same_vma_leaves_its_rest_one_vma(machine, proc) -> None:
    """A DONTUNMAP move whose target lies in the source VMA keeps the rest whole.

    Host (differential seed 60271): 512 shmem pages at 6 MiB, read; 2 pages
    at 0x6d4000 moved with ``MREMAP_DONTUNMAP`` to 6 MiB, inside the same
    VMA. The target's unmap cuts [6 MiB, 0x602000) out first; the maps then
    show [6 MiB, 0x602000) (the moved pages) and [0x602000, 8 MiB): what is
    left of the source VMA, the two old pages included, stays one VMA.
    """
    a = proc.mmap(THP, RW, SHMEM | MAP_FIXED, addr=BASE + 6 * MB)
    proc.read(a, THP)
    old = a + 0xD4000
    assert proc.mremap(old, 2 * PAGE, 2 * PAGE, MOVE | MREMAP_DONTUNMAP, a) == a
    vmas = [(v.start - a, v.end - a) for v in proc.mm.vmas.intersecting(a, a + THP)]
    assert vmas == [(0, 2 * PAGE), (2 * PAGE, THP)]
    verify_machine(machine)
