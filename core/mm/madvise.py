"""``madvise(2)``: DONTNEED, FREE, HUGEPAGE, NOHUGEPAGE, COLLAPSE, PAGEOUT.

Kernel counterpart: mm/madvise.c, mm/khugepaged.c (``madvise_collapse``) and
mm/vmscan.c (``reclaim_pages`` for MADV_PAGEOUT).

As in Linux, a range with holes is processed for its mapped parts and then
fails with ENOMEM; arguments that are invalid for any VMA of the range fail
with EINVAL before anything is changed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import numpy as np

from ..errors import InvalidArgument, OutOfMemory
from ..notifier import MMU_NOTIFY_CLEAR, invalidation
from .mmap import check_range, isolate_range, page_align, try_merge
from .pagetable import (
    KIND_PRESENT,
    KIND_SWAP,
    PAGE_SHIFT,
    PTE_DIRTY,
    PTE_SPECIAL,
    PTE_YOUNG,
    U64,
)
from .physmem import PG_anon, PG_dirty, PG_swapbacked
from .reclaim import pageout_range
from .rmap import folios_mapped_only_by
from .thp import madvise_collapse, split_huge_pmds_in
from .uapi import (
    MADV_COLLAPSE,
    MADV_DONTNEED,
    MADV_FREE,
    MADV_HUGEPAGE,
    MADV_NOHUGEPAGE,
    MADV_PAGEOUT,
)
from .vma import VM_HUGEPAGE, VM_LOCKED, VM_NOHUGEPAGE, VM_PFNMAP, VM_SPECIAL, Vma
from .zap import zap_range

if TYPE_CHECKING:
    from .address_space import AddressSpace

SUPPORTED_ADVICE: Final = (
    MADV_DONTNEED,
    MADV_FREE,
    MADV_HUGEPAGE,
    MADV_NOHUGEPAGE,
    MADV_COLLAPSE,
    MADV_PAGEOUT,
)
#: Advice that changes VMA flags and so needs ``mmap_lock`` for write.
WRITE_LOCKED_ADVICE: Final = (MADV_HUGEPAGE, MADV_NOHUGEPAGE)


def check_advice(advice: int) -> None:
    if advice not in SUPPORTED_ADVICE:
        raise InvalidArgument(f"madvise: advice {advice} is not supported")


def do_madvise(mm: AddressSpace, addr: int, length: int, advice: int) -> None:
    check_range(addr, length, "madvise")
    check_advice(advice)
    if length == 0:
        return
    end = addr + page_align(length)
    vmas = mm.vmas.intersecting(addr, end)
    if not vmas:
        raise OutOfMemory(f"madvise: [{addr:#x}, {end:#x}) is not mapped")
    for vma in vmas:
        _validate(vma, advice, max(addr, vma.start))
    covered = sum(min(end, v.end) - max(addr, v.start) for v in vmas)
    if advice in WRITE_LOCKED_ADVICE:
        for vma in isolate_range(mm, addr, end):
            if advice == MADV_HUGEPAGE:
                vma.flags = (vma.flags | VM_HUGEPAGE) & ~VM_NOHUGEPAGE
            else:
                vma.flags = (vma.flags | VM_NOHUGEPAGE) & ~VM_HUGEPAGE
            try_merge(vma)
    else:
        for vma in vmas:
            lo = max(addr, vma.start) >> PAGE_SHIFT
            hi = min(end, vma.end) >> PAGE_SHIFT
            _apply(vma, advice, lo, hi)
    if covered < end - addr:
        raise OutOfMemory(f"madvise: [{addr:#x}, {end:#x}) has unmapped holes")


def _validate(vma: Vma, advice: int, start: int) -> None:
    if advice == MADV_DONTNEED:
        if vma.flags & (VM_LOCKED | VM_PFNMAP):
            raise InvalidArgument(f"madvise(DONTNEED) on locked or PFNMAP {vma}")
        if vma.is_hugetlb and start % vma.huge_page_size:
            raise InvalidArgument(f"madvise(DONTNEED): {start:#x} is not huge-page aligned")
    elif advice == MADV_FREE:
        if not vma.is_anonymous or vma.is_shared:
            raise InvalidArgument(f"madvise(FREE) needs private anonymous memory, not {vma}")
    elif advice == MADV_PAGEOUT:
        if vma.flags & (VM_LOCKED | VM_PFNMAP) or vma.is_hugetlb:
            raise InvalidArgument(f"madvise(PAGEOUT) on locked, PFNMAP or hugetlb {vma}")
    elif advice in (MADV_HUGEPAGE, MADV_NOHUGEPAGE) and (vma.flags & VM_SPECIAL or vma.is_hugetlb):
        raise InvalidArgument(f"madvise(HUGEPAGE/NOHUGEPAGE) on special {vma}")


def _apply(vma: Vma, advice: int, lo: int, hi: int) -> None:
    if advice == MADV_DONTNEED:
        if vma.is_hugetlb:
            nr = 1 << vma.hugetlb_order
            hi = hi & ~(nr - 1)
            if hi <= lo:
                return
        with invalidation(vma.mm, MMU_NOTIFY_CLEAR, lo << PAGE_SHIFT, hi << PAGE_SHIFT):
            zap_range(vma, lo, hi - lo)
            # CONFIG_PT_RECLAIM (6.14+): PTE tables of fully covered 2 MiB
            # chunks left empty are freed, so a later fault may map a THP.
            if not vma.is_hugetlb:
                vma.mm.pt.free_empty_pte_tables(lo, hi - lo)
    elif advice == MADV_FREE:
        madvise_free(vma, lo, hi)
    elif advice == MADV_COLLAPSE:
        madvise_collapse(vma, lo, hi)
    elif advice == MADV_PAGEOUT:
        pageout_range(vma, lo, hi)


def madvise_free(vma: Vma, lo: int, hi: int) -> None:
    """Mark exclusively mapped anonymous pages lazily freeable; drop swap entries.

    A lazy-free page that is still clean when reclaim finds it is discarded
    (the next read sees zeros); writing to it first keeps it.
    """
    mm = vma.mm
    phys = mm.machine.phys
    with invalidation(mm, MMU_NOTIFY_CLEAR, lo << PAGE_SHIFT, hi << PAGE_SHIFT):
        split_huge_pmds_in(vma, lo, hi)
        walk = mm.pt.walk(lo, hi - lo)
        kinds = walk.kinds
        swapped = np.flatnonzero(kinds == KIND_SWAP)
        for i in swapped.tolist():
            zap_range(vma, lo + i, 1)
        present = (kinds == KIND_PRESENT) & ((walk.entries & U64(PTE_SPECIAL)) == 0)
        if not present.any():
            return
        locs = walk.loc[present]
        pfns = walk.pfns()[present]
        heads = phys.head_of(pfns)
        anon = (phys.flags[heads] & PG_anon) != 0
        uheads, exclusive = folios_mapped_only_by(phys.mapcount, heads[anon], locs[anon])
        lazy = uheads[exclusive]
        sel = anon & np.isin(heads, lazy)
        if sel.any():
            e = mm.pt.flat[locs[sel]]
            mm.pt.flat[locs[sel]] = e & ~U64(PTE_DIRTY | PTE_YOUNG)
            phys.flags[lazy] &= np.uint16(~(PG_dirty | PG_swapbacked) & 0xFFFF)
            mm.machine.costs.pte_writes += int(sel.sum())
