"""Transparent huge pages: eligibility, PMD split, and MADV_COLLAPSE.

Kernel counterpart: mm/huge_memory.c (``thp_vma_allowable_order``,
``__split_huge_pmd``) and mm/khugepaged.c (``madvise_collapse``).

Splitting a PMD mapping leaves the folio whole: 512 PTEs then map the pages
of one order-9 folio (a "PTE-mapped THP"; its CPU mapping order is 0 while
the folio order stays 9).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from ..errors import Again, InvalidArgument, NotSupported, OutOfMemory
from ..notifier import MMU_NOTIFY_CLEAR, invalidation
from .pagetable import (
    KIND_DEVICE_PRIVATE,
    KIND_PRESENT,
    KIND_PROTNONE,
    PAGE_SHIFT,
    PMD_ORDER,
    PMD_PAGES,
    PTE_HUGE,
    PTE_PFN_MASK,
    PTE_PRESENT,
    PTE_PROTNONE,
    PTE_SPECIAL,
    PTE_YOUNG,
    U64,
    is_table_pointer,
    make_present,
    make_table_pointer,
    pte_kind,
    pte_pfn,
)
from .physmem import ZERO_PFN, PG_anon, PhysMem
from .rmap import folio_add_new_anon_rmap
from .vma import VM_ACCESS_FLAGS, VM_HUGEPAGE, VM_NOHUGEPAGE, VM_WRITE

if TYPE_CHECKING:
    from .vma import Vma


def thp_vma_suitable(vma: Vma, vpn: int) -> bool:
    """The aligned 2 MiB around ``vpn`` fits in the VMA, and pgoff is aligned too."""
    haddr = vpn & ~(PMD_PAGES - 1)
    if haddr < vma.start_vpn or haddr + PMD_PAGES > vma.end_vpn:
        return False
    return (vma.start_vpn - vma.pgoff) % PMD_PAGES == 0


def thp_vma_allowable(vma: Vma, *, collapse: bool = False) -> bool:
    """THP may back this VMA: anonymous private memory, per the THP mode.

    ``MADV_COLLAPSE`` ignores the mode ("never" included); only
    ``VM_NOHUGEPAGE`` refuses it. shmem and regular files are modelled with
    THP off (the kernel's default ``shmem_enabled=never``, and filesystems
    without large folios); ``madvise_collapse`` deals with shmem itself.
    """
    if not vma.is_anonymous or vma.is_hugetlb or vma.is_shared:
        return False
    if vma.flags & VM_NOHUGEPAGE:
        return False
    if collapse:
        return True
    mode = vma.mm.machine.config.thp
    return mode == "always" or (mode == "madvise" and bool(vma.flags & VM_HUGEPAGE))


def split_leaf_entries(phys: PhysMem, e: int) -> NDArray[np.uint64]:
    """The 512 PTEs equivalent to the PMD entry ``e``, adjusting folio counts.

    A PMD mapping counts once in the folio's mapcount and holds one
    reference; 512 PTE mappings count 512 times.
    """
    kind = pte_kind(e)
    base = pte_pfn(e)
    if kind in (KIND_PRESENT, KIND_PROTNONE) and phys.is_zero_pfn(base):
        zero = make_present(ZERO_PFN, special=True, young=bool(e & PTE_YOUNG))
        if kind == KIND_PROTNONE:
            zero = (zero & ~PTE_PRESENT) | PTE_PROTNONE
        return np.full(PMD_PAGES, zero, dtype=U64)
    low = U64(e & ~PTE_PFN_MASK & ~PTE_HUGE)
    ptes = (U64(base) + np.arange(PMD_PAGES, dtype=U64)) | low
    if kind in (KIND_PRESENT, KIND_PROTNONE, KIND_DEVICE_PRIVATE):
        head = phys.head(base)
        phys.mapcount[head] += PMD_PAGES - 1
        phys.refcount[head] += PMD_PAGES - 1
    return ptes


def split_huge_pmd(vma: Vma, vpn: int) -> bool:
    """``__split_huge_pmd``: replace the PMD entry covering ``vpn`` by 512 PTEs.

    Emits ``MMU_NOTIFY_CLEAR`` over the 2 MiB range. Returns False if there
    was no PMD entry to split.
    """
    mm = vma.mm
    pt = mm.pt
    haddr = vpn & ~(PMD_PAGES - 1)
    pmdloc = pt.pmd_loc(haddr)
    if pmdloc < 0:
        return False
    e = pt.get(pmdloc)
    if e == 0 or is_table_pointer(e):
        return False
    start = haddr << PAGE_SHIFT
    with invalidation(mm, MMU_NOTIFY_CLEAR, start, start + (PMD_PAGES << PAGE_SHIFT)):
        e = pt.get(pmdloc)
        if e == 0 or is_table_pointer(e):
            return False
        t = pt.alloc_table()
        pt.rows[t] = split_leaf_entries(mm.machine.phys, e)
        pt.set(pmdloc, make_table_pointer(t))
        mm.machine.costs.pte_writes += PMD_PAGES + 1
        mm.machine.costs.thp_splits += 1
    return True


def split_huge_pmds_in(vma: Vma, start_vpn: int, end_vpn: int) -> int:
    """Split every PMD leaf that [start_vpn, end_vpn) covers only partly."""
    split = 0
    for edge in (start_vpn, end_vpn):
        if edge & (PMD_PAGES - 1) and vma.start_vpn <= edge < vma.end_vpn:
            split += split_huge_pmd(vma, edge)
    return split


def madvise_collapse(vma: Vma, start_vpn: int, end_vpn: int) -> None:
    """``MADV_COLLAPSE`` over the 2 MiB-aligned chunks of [start_vpn, end_vpn).

    Each chunk is copied into a fresh THP mapped by one PMD (``CLEAR`` over
    the chunk). Missing and zero pages become zero; swapped-out pages are
    faulted in first; read-only and PROT_NONE chunks collapse too. A chunk
    already mapped by a PMD (a THP or the huge zero page) counts as done.

    Errors, as ``madvise_collapse`` reports them (Linux 6.18):

    * a VMA THP may not back, one too small to hold an aligned 2 MiB chunk,
      or one with no ``anon_vma`` yet (only zero-page reads so far) fails
      with EINVAL before anything is done;
    * a chunk without a page table stops the walk with EINVAL
      (``SCAN_PMD_NULL`` is not among the results it continues after);
    * a chunk with a pinned page or one that cannot be faulted in is skipped
      and the call ends with EAGAIN; no free huge page stops it with ENOMEM;
    * a range whose aligned chunks are inverted (a start that is not 2 MiB
      aligned and an end before the next 2 MiB boundary past it) fails with
      EINVAL: the kernel's chunk count underflows. That is the ABI.
    """
    from .fault import swap_in_range

    shmem = vma.page_cache is not None and vma.page_cache.shmem
    if not (shmem and not vma.flags & VM_NOHUGEPAGE) and not thp_vma_allowable(vma, collapse=True):
        raise InvalidArgument(f"MADV_COLLAPSE is not allowed on {vma}")
    # __thp_vma_allowable_orders outside the fault path: some 2 MiB chunk must
    # fit in the VMA, and an anonymous VMA must have an anon_vma.
    if vma.npages < PMD_PAGES or not thp_vma_suitable(vma, vma.end_vpn - PMD_PAGES):
        raise InvalidArgument(f"MADV_COLLAPSE: no 2 MiB chunk fits in {vma}")
    if not shmem and vma.anon_vma is None:
        raise InvalidArgument(f"MADV_COLLAPSE: {vma} has no anon_vma")
    first = (start_vpn + PMD_PAGES - 1) & ~(PMD_PAGES - 1)
    last = end_vpn & ~(PMD_PAGES - 1)
    if first > last:
        raise InvalidArgument("MADV_COLLAPSE: the range holds no aligned chunk (count underflow)")
    if shmem:
        _shmem_collapse(vma, first, last)
        return
    mm = vma.mm
    pt = mm.pt
    machine = mm.machine
    phys = machine.phys
    again = 0
    for haddr in range(first, last, PMD_PAGES):
        if not thp_vma_suitable(vma, haddr):
            raise InvalidArgument(f"MADV_COLLAPSE: {haddr << PAGE_SHIFT:#x} does not fit {vma}")
        pmdloc = pt.pmd_loc(haddr)
        e = pt.get(pmdloc) if pmdloc >= 0 else 0
        if e == 0:
            raise InvalidArgument(f"MADV_COLLAPSE: no page table at {haddr << PAGE_SHIFT:#x}")
        if not is_table_pointer(e):
            if pte_kind(e) in (KIND_PRESENT, KIND_PROTNONE):
                continue  # already PMD-mapped (a THP or the huge zero page)
            again += 1  # a PMD migration entry: SCAN_PMD_MAPPED is not reached
            continue
        if swap_in_range(vma, haddr, PMD_PAGES):
            again += 1
            continue
        walk = pt.walk(haddr, PMD_PAGES)
        kinds = walk.kinds
        mapped = (kinds == KIND_PRESENT) | (kinds == KIND_PROTNONE)
        if (~mapped & (kinds != 0)).any():
            again += 1
            continue
        pfns = walk.pfns()
        normal = mapped & ((walk.entries & U64(PTE_SPECIAL)) == 0)
        heads = phys.head_of(pfns[normal])
        uheads, nmaps = np.unique(heads, return_counts=True)
        if ((phys.flags[uheads] & PG_anon) == 0).any():
            raise InvalidArgument(f"MADV_COLLAPSE: a page of {vma} is not anonymous")
        if (phys.refcount[uheads] > phys.mapcount[uheads]).any():
            again += 1
            continue
        try:
            head = phys.alloc_one(PMD_ORDER)
        except OutOfMemory:
            raise OutOfMemory("MADV_COLLAPSE: no free huge page") from None
        start = haddr << PAGE_SHIFT
        with invalidation(mm, MMU_NOTIFY_CLEAR, start, start + (PMD_PAGES << PAGE_SHIFT)):
            dst = np.arange(head, head + PMD_PAGES, dtype=np.int64)
            if normal.any():
                phys.copy_pages(dst[normal], pfns[normal])
            folio_add_new_anon_rmap(
                machine,
                vma,
                np.array([head], dtype=np.int64),
                np.array([haddr], dtype=np.int64),
                PMD_ORDER,
            )
            pmdloc = pt.pmd_loc(haddr, alloc=True)
            old = pt.get(pmdloc)
            if old and is_table_pointer(old):
                pt.set(pmdloc, 0)
                pt.free_table(pte_pfn(old))
            new = make_present(head, write=bool(vma.flags & VM_WRITE), dirty=True, huge=True)
            if not vma.flags & VM_ACCESS_FLAGS:
                new = (new & ~PTE_PRESENT) | PTE_PROTNONE
            pt.set(pmdloc, new)
            machine.costs.pte_writes += PMD_PAGES + 1
            if len(uheads):
                np.subtract.at(phys.mapcount, uheads, nmaps.astype(np.int32))
                phys.put(np.repeat(uheads, nmaps))
    if again:
        raise Again(f"MADV_COLLAPSE could not collapse {again} chunk(s) of {vma}")


def _shmem_collapse(vma: Vma, first: int, last: int) -> None:
    """MADV_COLLAPSE of shared anonymous memory: the part the model can do.

    Linux collapses a chunk of shmem that has at least one page (cached or
    swapped) into a shmem THP, even with ``shmem_enabled=never`` (forced
    collapse), and fails a chunk with no page at all with EINVAL. The model
    keeps shmem in base pages only, so the first chunk with a page fails with
    ``NotSupported`` (EOPNOTSUPP) instead of pretending; the argument and
    empty-chunk outcomes are Linux's.
    """
    f = vma.page_cache
    for haddr in range(first, last, PMD_PAGES):
        lo = vma.linear_index(haddr)
        idx = np.arange(lo, min(lo + PMD_PAGES, len(f.cache)), dtype=np.int64)
        cached = f.cache.get(idx)
        if (cached >= 0).any() or any(lo <= i < lo + PMD_PAGES for i in f.backing):
            raise NotSupported(f"MADV_COLLAPSE: the model has no shmem THPs ({vma})")
        raise InvalidArgument(f"MADV_COLLAPSE: no page of {vma} at {haddr << PAGE_SHIFT:#x}")
