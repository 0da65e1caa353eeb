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

from .pagetable import (
    KIND_DEVICE_EXCLUSIVE,
    KIND_DEVICE_PRIVATE,
    KIND_NONE,
    KIND_PRESENT,
    KIND_PROTNONE,
    KIND_SWAP,
    LEVEL_PTE,
    PTE_DIRTY,
    PTE_SPECIAL,
    U64,
    entry_pfn,
)
from .physmem import PG_anon, PG_dirty
from .swap import swap_entries_dropped
from .thp import split_huge_pmd

if TYPE_CHECKING:
    from .vma import Vma

#: Entry kinds that hold a mapping (mapcount + reference) of their folio.
MAPPING_KINDS = (KIND_PRESENT, KIND_PROTNONE, KIND_DEVICE_PRIVATE, KIND_DEVICE_EXCLUSIVE)


def zap_range(vma: Vma, start_vpn: int, npages: int, *, even_cows: bool = True) -> int:
    """Clear every entry of [start_vpn, start_vpn + npages) in ``vma``.

    ``even_cows=False`` (hole punching) leaves anonymous COW copies in
    private file mappings alone and zaps only the file's own pages.
    Returns the number of entries cleared.
    """
    if npages <= 0:
        return 0
    pt = vma.mm.pt
    end_vpn = start_vpn + npages
    if not vma.is_hugetlb:
        walk = pt.walk(start_vpn, npages)
        levels = walk.chunk_levels()
        if (levels >= 2).any():
            # Split huge leaves that stick out of the range.
            for edge in (start_vpn, end_vpn - 1):
                lvl = pt.lookup(edge)[2]
                if lvl != LEVEL_PTE and not _leaf_inside(edge, lvl, start_vpn, end_vpn):
                    split_huge_pmd(vma, edge)
    walk = pt.walk(start_vpn, npages)
    kinds = walk.kinds
    mask = kinds != KIND_NONE
    if not mask.any():
        return 0
    locs = walk.loc
    level = walk.level
    pfns = walk.pfns()
    entries = walk.entries
    phys = vma.mm.machine.phys
    if not even_cows:
        anon = np.zeros(len(kinds), dtype=np.bool_)
        mapped = np.isin(kinds, MAPPING_KINDS)
        anon[mapped] = (phys.flags[pfns[mapped]] & PG_anon) != 0
        mask &= ~anon & (kinds != KIND_SWAP)
    # One action per entry: a huge leaf covers many pages but is one entry.
    _, first = np.unique(np.where(mask, locs, -1), return_index=True)
    sel = np.zeros(len(kinds), dtype=np.bool_)
    sel[first] = True
    sel &= mask
    big = level > 0
    if big.any():
        # the pfn of a huge leaf is its head
        pfns = np.where(
            big, pfns - (pfns & ((np.int64(1) << walk.order.astype(np.int64)) - 1)), pfns
        )
    cleared = _drop_entries(vma, kinds[sel], pfns[sel], entries[sel])
    pt.flat[locs[sel]] = 0
    vma.mm.machine.costs.pte_writes += int(sel.sum())
    return cleared


def _leaf_inside(vpn: int, level: int, start: int, end: int) -> bool:
    nr = 1 << (9 if level == 1 else 18)
    base = vpn & ~(nr - 1)
    return start <= base and base + nr <= end


def _drop_entries(
    vma: Vma, kinds: NDArray[np.uint8], pfns: NDArray[np.int64], entries: NDArray[np.uint64]
) -> int:
    """Release what each removed entry held: folio mapping, swap slot."""
    machine = vma.mm.machine
    phys = machine.phys
    mapped = np.isin(kinds, MAPPING_KINDS) & ((entries & U64(PTE_SPECIAL)) == 0)
    mapped &= ~phys.zero_mask(pfns)
    if mapped.any():
        heads = phys.head_of(pfns[mapped])
        dirty = (entries[mapped] & U64(PTE_DIRTY)) != 0
        if dirty.any():
            file_pages = heads[dirty]
            file_pages = file_pages[(phys.flags[file_pages] & PG_anon) == 0]
            phys.flags[file_pages] |= np.uint16(PG_dirty)
        np.subtract.at(phys.mapcount, heads, 1)
        phys.put(heads)
    swapped = kinds == KIND_SWAP
    if swapped.any():
        swap_entries_dropped(machine.swap, phys, entry_pfn(entries[swapped]))
    return len(kinds)
