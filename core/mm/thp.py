"""Transparent huge pages: eligibility and PMD split.

Kernel counterpart: mm/huge_memory.c (``thp_vma_allowable_order``,
``__split_huge_pmd``). Collapsing small pages into a THP (``MADV_COLLAPSE``)
is in khugepaged.py, as in the kernel.

Splitting a PMD mapping leaves the folio whole: 512 PTEs then map the pages
of one order-9 folio (a "PTE-mapped THP"; its CPU mapping order is 0 while
the folio order stays 9).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from ..notifier import MMU_NOTIFY_CLEAR, invalidation
from .pagetable import (
    KIND_DEVICE_PRIVATE,
    KIND_PRESENT,
    KIND_PROTNONE,
    PAGE_SHIFT,
    PMD_PAGES,
    PTE_DIRTY,
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
from .physmem import ZERO_PFN, PG_anon, PG_dirty, PG_hugetlb, PhysMem
from .vma import VM_HUGEPAGE, VM_NOHUGEPAGE

if TYPE_CHECKING:
    from .vma import Vma


def thp_vma_suitable(vma: Vma, vpn: int) -> bool:
    """``thp_vma_suitable_order``: the aligned 2 MiB around ``vpn`` fits in the VMA.

    A VMA with a backing object (shmem, a file) must also map its object at
    a 2 MiB-aligned offset, so that a PMD maps one aligned page-cache folio.
    An anonymous VMA's pgoff is not checked: it is only the address the
    mapping was first made at (``mremap`` keeps it when it moves the VMA), and
    a THP fault or ``MADV_COLLAPSE`` after a move to an aligned address works
    on the host whatever the old address was.
    """
    haddr = vpn & ~(PMD_PAGES - 1)
    if haddr < vma.start_vpn or haddr + PMD_PAGES > vma.end_vpn:
        return False
    return vma.is_anonymous or (vma.start_vpn - vma.pgoff) % PMD_PAGES == 0


def thp_vma_allowable(vma: Vma, *, collapse: bool = False) -> bool:
    """THP may back this VMA: anonymous private memory, per the THP mode.

    ``MADV_COLLAPSE`` ignores the mode ("never" included); only
    ``VM_NOHUGEPAGE`` refuses it. shmem and regular files are modelled with
    THP off (the kernel's default ``shmem_enabled=never``, and filesystems
    without large folios); ``madvise_collapse`` (khugepaged.py) deals with
    shmem itself.
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
    was no PMD entry to split. A PMD mapping a page-cache folio (a shmem THP)
    is not split into PTEs but removed, as ``__split_huge_pmd_locked`` does
    for file VMAs: its pages fault back in through the PTE level (the folio
    stays whole in the page cache; the PMD's dirty bit moves to the folio).
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
        phys = mm.machine.phys
        if _maps_file_folio(phys, e):
            head = phys.head(pte_pfn(e))
            if e & PTE_DIRTY:
                heads = np.array([head], dtype=np.int64)
                phys.or_folio_flags(heads, int(phys.order[head]), PG_dirty)
            pt.set(pmdloc, 0)
            phys.unmap_folios(np.array([head], dtype=np.int64))
            mm.machine.costs.pte_writes += 1
            mm.machine.costs.thp_splits += 1
            return True
        t = pt.alloc_table()
        pt.rows[t] = split_leaf_entries(phys, e)
        pt.set(pmdloc, make_table_pointer(t))
        mm.machine.costs.pte_writes += PMD_PAGES + 1
        mm.machine.costs.thp_splits += 1
    return True


def _maps_file_folio(phys: PhysMem, e: int) -> bool:
    """A present (or PROT_NONE) PMD leaf that maps a page-cache folio."""
    if pte_kind(e) not in (KIND_PRESENT, KIND_PROTNONE) or e & PTE_SPECIAL:
        return False
    pfn = pte_pfn(e)
    return not phys.is_zero_pfn(pfn) and not phys.flags[pfn] & (PG_anon | PG_hugetlb)


def split_huge_pmds_in(vma: Vma, start_vpn: int, end_vpn: int) -> int:
    """Split every PMD leaf that [start_vpn, end_vpn) covers only partly."""
    split = 0
    for edge in (start_vpn, end_vpn):
        if edge & (PMD_PAGES - 1) and vma.start_vpn <= edge < vma.end_vpn:
            split += split_huge_pmd(vma, edge)
    return split
