"""Tearing down translations: zapping a range of an address space.

Kernel counterpart: mm/memory.c ``unmap_page_range``/``zap_pte_range``/
``zap_pmd_range`` and ``unmap_mapping_range``; mm/hugetlb.c
``unmap_hugepage_range``.

The caller has already started the MMU-notifier invalidation (UNMAP for
munmap/exit, CLEAR for MADV_DONTNEED/truncate …); zapping clears the
entries, drops each mapping's count and reference on its folio (freeing
folios that lose their last reference), moves PTE dirty bits into file
folios, and releases swap slots. A huge leaf only partly inside the range is
split first (with its own CLEAR event), as ``zap_pmd_range`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from .hugetlb import is_resv_owner, restore_reservations
from .pagetable import (
    KIND_DEVICE_EXCLUSIVE,
    KIND_DEVICE_PRIVATE,
    KIND_PRESENT,
    KIND_PROTNONE,
    KIND_SWAP,
    PMD_PAGES,
    PTE_DIRTY,
    PTE_SPECIAL,
    U64,
    pte_pfn_array,
)
from .physmem import PG_anon, PG_dirty
from .swap import swap_entries_dropped
from .thp import split_huge_pmd

if TYPE_CHECKING:
    from .vma import Vma

#: Entry kinds that hold a mapping (mapcount + reference) of their folio.
MAPPING_KINDS = (KIND_PRESENT, KIND_PROTNONE, KIND_DEVICE_PRIVATE, KIND_DEVICE_EXCLUSIVE)
#: ``MAPPING_KINDS`` as a table indexed by kind: one gather instead of ``np.isin``,
#: whose sorting setup dominated the zap of a single page.
_MAPPING_LUT = np.zeros(256, dtype=np.bool_)
_MAPPING_LUT[list(MAPPING_KINDS)] = True


def zap_range(vma: Vma, start_vpn: int, npages: int, *, even_cows: bool = True) -> int:
    """Clear every entry of [start_vpn, start_vpn + npages) in ``vma``.

    ``even_cows=False`` (hole punching) leaves anonymous COW copies in
    private file mappings alone and zaps only the file's own pages.
    Only the 1 GiB regions that hold page tables are walked, so zapping a
    large, sparsely touched VMA costs what is mapped, not its length.
    Returns the number of entries cleared.
    """
    if npages <= 0:
        return 0
    return sum(
        _zap_span(vma, lo, hi - lo, even_cows)
        for lo, hi in vma.mm.pt.spans(start_vpn, start_vpn + npages)
    )


def _zap_span(vma: Vma, start_vpn: int, npages: int, even_cows: bool) -> int:
    pt = vma.mm.pt
    end_vpn = start_vpn + npages
    if not vma.is_hugetlb:
        walk = pt.walk(start_vpn, npages, per_page=False)
        if walk.huge:
            # Split PMD leaves that stick out of the range (zap_pmd_range).
            for first, _level, _loc, _e in walk.leaves():
                if first < start_vpn or first + PMD_PAGES > end_vpn:
                    split_huge_pmd(vma, max(first, start_vpn))
    slots = pt.walk(start_vpn, npages).slots()
    if not len(slots):
        return 0
    kinds = slots.kinds
    if not even_cows:
        phys = vma.mm.machine.phys
        pfns = slots.pfns
        mapped = _MAPPING_LUT[kinds]
        anon = np.zeros(len(kinds), dtype=np.bool_)
        anon[mapped] = (phys.flags[pfns[mapped]] & PG_anon) != 0
        keep = ~anon & (kinds != KIND_SWAP)
        slots = slots.select(keep)
        kinds = kinds[keep]
    if vma.is_hugetlb and is_resv_owner(vma):
        present = (kinds == KIND_PRESENT) | (kinds == KIND_PROTNONE)
        restore_reservations(vma, slots.vpns[present], slots.pfns[present])
    _drop_entries(vma, kinds, slots.pfns, slots.entries)
    pt.flat[slots.locs] = 0
    vma.mm.machine.costs.pte_writes += len(slots)
    return len(slots)


def _drop_entries(
    vma: Vma, kinds: NDArray[np.uint8], pfns: NDArray[np.int64], entries: NDArray[np.uint64]
) -> int:
    """Release what each removed entry held: folio mapping, swap slot."""
    machine = vma.mm.machine
    phys = machine.phys
    mapped = _MAPPING_LUT[kinds] & ((entries & U64(PTE_SPECIAL)) == 0)
    mapped &= ~phys.zero_mask(pfns)
    if mapped.any():
        heads = phys.head_of(pfns[mapped])
        dirty = (entries[mapped] & U64(PTE_DIRTY)) != 0
        if dirty.any():
            file_pages = heads[dirty]
            file_pages = file_pages[(phys.flags[file_pages] & PG_anon) == 0]
            phys.flags[file_pages] |= np.uint16(PG_dirty)
        phys.unmap_folios(heads)
    swapped = kinds == KIND_SWAP
    if swapped.any():
        swap_entries_dropped(machine.swap, phys, pte_pfn_array(entries[swapped]))
    return len(kinds)
