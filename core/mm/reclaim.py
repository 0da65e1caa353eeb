"""Page reclaim: swap-out of anonymous pages, dropping page-cache pages.

Kernel counterpart: mm/vmscan.c (``shrink_folio_list``, ``reclaim_pages``),
mm/rmap.c (``try_to_unmap``), mm/huge_memory.c (``split_folio``).

Reclaiming a folio first checks everything that could make it fail (extra
references such as GUP pins, a locked folio, no swap space), then unmaps it
from every mapping through the reverse map, one ``CLEAR`` invalidation per
mapping, as ``try_to_unmap_one`` does. Anonymous pages become swap entries;
file and shmem pages are written back if dirty and leave the page cache (the
next access reads them in again); clean lazy-free pages are discarded. Large
anonymous folios are split into base pages first.

The model does not age pages: ``reclaim_machine`` scans folios in physical
order from a rotating cursor (a clock hand without referenced bits).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..trace import COST_SWAP_IO_NS
from .pagetable import (
    KIND_PRESENT,
    PAGE_SIZE,
    PTE_DIRTY,
    PTE_SPECIAL,
    U64,
    make_swap,
)
from .physmem import (
    PG_anon,
    PG_dirty,
    PG_hugetlb,
    PG_locked,
    PG_reserved,
    PG_swapbacked,
    PG_swapcache,
    PG_zeroed,
    PG_zone_device,
)
from .rmap import RmapHit, folios_mapped_only_by, rmap_walk, try_to_unmap
from .swap import swapcache_del
from .thp import split_huge_pmd

if TYPE_CHECKING:
    from ..machine import Machine
    from .vma import Vma

_I64 = np.int64


def expected_refs(machine: Machine, head: int) -> int:
    """References a folio has when only its mappings and caches hold it."""
    phys = machine.phys
    flags = int(phys.flags[head])
    refs = int(phys.mapcount[head])
    if flags & PG_swapcache:
        refs += 1
    if not flags & PG_anon and phys.mapping[head] != 0:
        refs += 1  # the page cache's reference
    return refs


def split_folio(machine: Machine, head: int) -> bool:
    """Split a large anonymous folio into order-0 folios (``split_folio``).

    PMD mappings are split to PTEs first (``CLEAR`` each). Fails (False) for
    hugetlb folios and for folios with references beyond their mappings.
    """
    phys = machine.phys
    order = int(phys.order[head])
    if order == 0:
        return True
    if phys.flags[head] & (PG_hugetlb | PG_locked) or not phys.flags[head] & PG_anon:
        return False
    if phys.refcount[head] != expected_refs(machine, head):
        return False
    for hit in list(rmap_walk(machine, head)):
        for vpn in np.unique(hit.vpns[hit.levels > 0] & ~511).tolist():
            split_huge_pmd(hit.vma, vpn)
    nr = 1 << order
    counts = np.zeros(nr, dtype=np.int32)
    for hit in rmap_walk(machine, head):
        np.add.at(counts, hit.pfns - head, 1)
    pages = phys.split_folio_metadata(head, counts)
    unmapped = pages[counts == 0]
    if len(unmapped):
        # Pages of the folio that nothing maps any more are freed at once.
        phys.refcount[unmapped] = 1
        phys.put(unmapped)
    return True


def reclaimable(machine: Machine, head: int) -> bool:
    phys = machine.phys
    flags = int(phys.flags[head])
    if flags & (PG_reserved | PG_hugetlb | PG_locked | PG_zone_device):
        return False
    if phys.refcount[head] <= 0 or phys.refcount[head] != expected_refs(machine, head):
        return False
    if flags & PG_anon and flags & PG_swapbacked and not flags & PG_swapcache:
        return machine.swap.nr_free > 0
    return True


def reclaim_folio(machine: Machine, head: int) -> int:
    """Reclaim one folio; returns the number of base pages freed (0 if not)."""
    phys = machine.phys
    if not reclaimable(machine, head):
        return 0
    if phys.order[head] > 0:
        if not split_folio(machine, head):
            return 0
        freed = 0
        for pfn in range(head, head + 512):
            if phys.refcount[pfn] > 0:
                freed += reclaim_folio(machine, pfn)
        return freed
    hits = list(rmap_walk(machine, head))
    dirty = bool(phys.flags[head] & PG_dirty) or any(
        bool((h.entries & U64(PTE_DIRTY)).any()) for h in hits
    )
    flags = int(phys.flags[head])
    if flags & PG_anon:
        if not flags & PG_swapbacked and not dirty:
            try_to_unmap(machine, head, lambda e: 0)  # clean lazy-free page: discard
        else:
            phys.flags[head] |= np.uint16(PG_swapbacked)
            _swap_out(machine, head, hits)
    else:
        f = machine.mappings[int(phys.mapping[head])]
        if dirty:
            f.backing[int(phys.index[head])] = phys.read(head, 0, PAGE_SIZE)
            machine.clock.advance(COST_SWAP_IO_NS)
        phys.flags[head] &= np.uint16(~PG_dirty & 0xFFFF)
        try_to_unmap(machine, head, lambda e: 0)
        index = int(phys.index[head])
        f.cache[index] = -1
        phys.mapping[head] = 0
        phys.put_one(head)
    return 1


def _swap_out(machine: Machine, head: int, hits: list[RmapHit]) -> None:
    phys = machine.phys
    swap = machine.swap
    slot = swap.slot_of.get(head)
    if slot is None:
        slot = swap.alloc()
        zeroed = bool(phys.flags[head] & PG_zeroed)
        swap.write(slot, None if zeroed else phys.read_pages(np.array([head], dtype=_I64))[0])
        machine.costs.swap_outs += 1
        machine.clock.advance(COST_SWAP_IO_NS)
        owned = True
    else:
        owned = False
    entry = make_swap(slot)

    def one_more(_old: int) -> int:
        swap.count[slot] += 1
        return entry

    try_to_unmap(machine, head, one_more)
    if owned:
        swap.put(slot)  # the allocation's use: now only the entries hold it
    else:
        swapcache_del(swap, phys, head)


def pageout_range(vma: Vma, lo: int, hi: int) -> int:
    """``MADV_PAGEOUT``: reclaim the folios of [lo, hi) that only this mapping maps."""
    machine = vma.mm.machine
    phys = machine.phys
    walk = vma.mm.pt.walk(lo, hi - lo)
    present = (walk.kinds == KIND_PRESENT) & ((walk.entries & U64(PTE_SPECIAL)) == 0)
    if not present.any():
        return 0
    pfns = walk.pfns()[present]
    ok = ~phys.zero_mask(pfns)
    heads = phys.head_of(pfns[ok])
    uheads, exclusive = folios_mapped_only_by(phys.mapcount, heads, walk.loc[present][ok])
    freed = 0
    for head in uheads[exclusive].tolist():
        freed += reclaim_folio(machine, head)
    return freed


def reclaim_machine(machine: Machine, nbytes: int) -> int:
    """Reclaim folios across the machine until about ``nbytes`` are freed."""
    if nbytes <= 0:
        return 0
    phys = machine.phys
    want = (nbytes + PAGE_SIZE - 1) // PAGE_SIZE
    live = np.flatnonzero(phys.refcount[: phys.ram_pages] > 0)
    cursor = machine.reclaim_cursor
    order = np.concatenate([live[live >= cursor], live[live < cursor]])
    freed = 0
    for head in order.tolist():
        if freed >= want:
            machine.reclaim_cursor = head
            break
        if phys.refcount[head] > 0:
            freed += reclaim_folio(machine, head)
    return freed * PAGE_SIZE
