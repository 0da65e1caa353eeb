"""Page reclaim: swap-out of anonymous pages, dropping page-cache pages.

Kernel counterpart: mm/vmscan.c (``shrink_folio_list``, ``reclaim_pages``),
mm/rmap.c (``try_to_unmap``), mm/huge_memory.c (``split_folio``).

Reclaiming a folio first checks everything that could make it fail (extra
references such as GUP pins, a locked folio, no swap space), then unmaps it
from every mapping through the reverse map, one ``CLEAR`` invalidation per
mapping, as ``try_to_unmap_one`` does. Anonymous pages become swap entries;
file pages are written back if dirty and leave the page cache (the next
access reads them in again), and so are shmem pages when the machine has
free swap (shmem's written-back copies are kept with the object, not in swap
slots); without swap a dirty shmem page is only unmapped and stays cached,
as in Linux. Clean lazy-free pages are discarded. Large anonymous folios are split
into base pages first; a shmem THP is unmapped and stays whole.

The model does not age pages: ``reclaim_machine`` scans folios in physical
order from a rotating cursor (a clock hand without referenced bits).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from ..notifier import MMU_NOTIFY_CLEAR, invalidation
from ..trace import COST_SWAP_IO_NS
from .pagetable import (
    KIND_PRESENT,
    KIND_PROTNONE,
    PAGE_SHIFT,
    PAGE_SIZE,
    PTE_PRESENT,
    PTE_PROTNONE,
    U64,
    make_present,
    make_swap,
    pte_kind_array,
)
from .physmem import (
    ZERO_PFN,
    PG_anon,
    PG_dirty,
    PG_hugetlb,
    PG_hwpoison,
    PG_locked,
    PG_reserved,
    PG_swapbacked,
    PG_swapcache,
    PG_zeroed,
    PG_zone_device,
)
from .rmap import RmapHit, ptes_dirty, rmap_walk, try_to_unmap
from .swap import swapcache_del
from .thp import split_huge_pmd
from .vma import VM_LOCKED

if TYPE_CHECKING:
    from ..machine import Machine

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
    """Split a large folio into order-0 folios (``split_folio``).

    PMD mappings are split to PTEs first (``CLEAR`` each). Fails (False) for
    hugetlb folios and for folios with references beyond their mappings.
    As Linux does since 6.12 (``try_to_map_unused_to_zeropage``), every
    mapped subpage that is all zeros is then remapped to the shared zero page
    (one ``CLEAR`` per mapping that changes) and freed, except in locked VMAs.
    A page-cache folio (a shmem THP) is split as ``_split_file_folio`` says.
    """
    phys = machine.phys
    order = int(phys.order[head])
    if order == 0:
        return True
    if phys.flags[head] & (PG_hugetlb | PG_locked):
        return False
    if phys.refcount[head] != expected_refs(machine, head):
        return False
    if not phys.flags[head] & PG_anon:
        return _split_file_folio(machine, head)
    for hit in list(rmap_walk(machine, head)):
        for vpn in np.unique(hit.vpns[hit.levels > 0] & ~511).tolist():
            split_huge_pmd(hit.vma, vpn)
    nr = 1 << order
    counts = np.zeros(nr, dtype=np.int32)
    hits = list(rmap_walk(machine, head))
    for hit in hits:
        np.add.at(counts, hit.pfns - head, 1)
    pages = phys.split_folio_metadata(head, counts)
    unmapped = pages[counts == 0]
    if len(unmapped):
        # Pages of the folio that nothing maps any more are freed at once.
        phys.refcount[unmapped] = 1
        phys.put(unmapped)
    _remap_zero_filled(machine, pages[counts > 0], hits)
    return True


def _split_file_folio(machine: Machine, head: int) -> bool:
    """Split a page-cache folio (a shmem THP) into order-0 folios in the cache.

    As ``unmap_folio`` does for a folio that is not anonymous, every mapping
    of it, PMD or PTE, in every process, is removed first (``CLEAR`` per
    mapping; PTE dirty bits move to the folio) and not put back: the pages
    stay cached, one folio each, and fault back in on the next access. So a
    split that ``MADV_PAGEOUT``/``MADV_COLD`` of part of a shmem THP asks for
    unmaps the whole THP, also the pages outside the advised range (observed
    on Linux 6.18). A folio no longer in the page cache is not split.
    """
    phys = machine.phys
    if phys.mapping[head] == 0:
        return False
    hits = list(rmap_walk(machine, head))
    if ptes_dirty(hits):
        phys.flags[head] |= np.uint16(PG_dirty)
    try_to_unmap(machine, head, lambda e: 0)
    nr = 1 << int(phys.order[head])
    pages = phys.split_folio_metadata(head, np.zeros(nr, dtype=np.int32))
    phys.refcount[pages] += 1  # each page keeps its page-cache reference
    return True


def _remap_zero_filled(machine: Machine, pages: NDArray[np.int64], hits: list[RmapHit]) -> None:
    """Map the zero page where a just-split subpage in ``pages`` holds only zeros."""
    phys = machine.phys
    if not len(pages) or phys.flags[pages[0]] & PG_swapcache:
        return
    zero = np.zeros(int(pages.max()) + 1 - int(pages.min()), dtype=np.bool_)
    data = phys.read_pages(pages) if phys.arena is not None else None
    filled = (phys.flags[pages] & PG_zeroed) != 0
    if data is not None:
        filled |= ~data.any(axis=1)
    filled &= (phys.flags[pages] & PG_hwpoison) == 0
    if not filled.any():
        return
    base = int(pages.min())
    zero[pages[filled] - base] = True
    for hit in hits:
        vma = hit.vma
        if vma.flags & VM_LOCKED:
            continue
        rel = hit.pfns - base
        inside = (rel >= 0) & (rel < len(zero))
        sel = inside & (hit.levels == 0)
        sel[sel] = zero[rel[sel]]
        kinds = pte_kind_array(hit.entries)
        sel &= (kinds == KIND_PRESENT) | (kinds == KIND_PROTNONE)
        if not sel.any():
            continue
        mm = vma.mm
        vpns = hit.vpns[sel]
        start, end = int(vpns.min()) << PAGE_SHIFT, (int(vpns.max()) + 1) << PAGE_SHIFT
        with invalidation(mm, MMU_NOTIFY_CLEAR, start, end):
            locs = hit.locs[sel]
            old = mm.pt.flat[locs]
            new = np.full(len(locs), make_present(ZERO_PFN, special=True), dtype=U64)
            protnone = pte_kind_array(old) == KIND_PROTNONE
            new[protnone] = (new[protnone] & ~U64(PTE_PRESENT)) | U64(PTE_PROTNONE)
            mm.pt.flat[locs] = new
            machine.costs.pte_writes += len(locs)
            phys.unmap_folios(hit.pfns[sel])


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


def reclaim_folio(machine: Machine, head: int, *, pageout: bool = False) -> int:
    """Reclaim one folio; returns the number of base pages freed (0 if not).

    A lazy-free page that was written to again is not freed: it becomes
    swap-backed again and stays (``try_to_unmap_one`` aborts, the folio is
    activated); a clean one is discarded, a large one whole. ``pageout``
    (MADV_PAGEOUT, which calls ``shrink_folio_list`` even without swap) splits
    a large swap-backed folio that cannot go to swap, as Linux does when
    ``add_to_swap`` fails.
    """
    phys = machine.phys
    if not reclaimable(machine, head):
        flags = int(phys.flags[head])
        if (
            pageout
            and phys.order[head] > 0
            and flags & PG_anon
            and flags & PG_swapbacked
            and not flags & PG_swapcache
            and machine.swap.nr_free == 0
            and phys.refcount[head] == expected_refs(machine, head)
        ):
            split_folio(machine, head)
        return 0
    flags = int(phys.flags[head])
    if flags & PG_anon and not flags & PG_swapbacked:
        hits = list(rmap_walk(machine, head))
        if flags & PG_dirty or ptes_dirty(hits):
            phys.flags[head] |= np.uint16(PG_swapbacked)
            return 0
        nr = 1 << int(phys.order[head])
        try_to_unmap(machine, head, lambda e: 0)  # clean lazy-free folio: discard
        return nr
    if phys.order[head] > 0 and not flags & PG_anon:
        # A page-cache THP (shmem): shrink_folio_list unmaps it from every
        # mapping (TTU_SPLIT_HUGE_PMD), then shmem_writeout finds no swap to
        # split it to and keeps it, whole and cached. The model keeps it so
        # with swap too: it does not split shmem THPs for swap-out.
        try_to_unmap(machine, head, lambda e: 0)
        return 0
    if phys.order[head] > 0:
        nr = 1 << int(phys.order[head])
        if not split_folio(machine, head):
            return 0
        freed = 0
        for pfn in range(head, head + nr):
            if phys.refcount[pfn] > 0 and phys.order[pfn] == 0:
                freed += reclaim_folio(machine, pfn)
        return freed
    hits = list(rmap_walk(machine, head))
    if flags & PG_anon:
        _swap_out(machine, head, hits)
    else:
        f = machine.mappings[int(phys.mapping[head])]
        pte_dirty = ptes_dirty(hits)
        # shrink_folio_list unmaps before it looks at the dirty bit: the
        # PTEs' dirty bits move to the folio, and the notifier invalidations
        # of try_to_unmap let a device driver dirty the folio as it drops its
        # own mapping (set_page_dirty on unmap, as ODP does).
        try_to_unmap(machine, head, lambda e: 0)
        dirty = pte_dirty or bool(phys.flags[head] & PG_dirty)
        if f.shmem and dirty and machine.swap.nr_free == 0:
            # A dirty shmem page goes to swap: with none, shmem_writeout
            # finds no slot and the page stays cached, dirty. A clean one (a
            # hole read in) is dropped as any clean page.
            phys.flags[head] |= np.uint16(PG_dirty)
            return 0
        if dirty:
            f.backing[int(phys.index[head])] = phys.read(head, 0, PAGE_SIZE)
            machine.clock.advance(COST_SWAP_IO_NS)
        phys.flags[head] &= np.uint16(~PG_dirty & 0xFFFF)
        index = int(phys.index[head])
        f.cache[index] = -1
        phys.mapping[head] = 0
        phys.put_one(head)
    return 1


def _swap_out(machine: Machine, head: int, hits: list[RmapHit]) -> None:
    phys = machine.phys
    swap = machine.swap
    slot = swap.slot_of.get(head)
    owned = slot is None
    if slot is None:
        slot = swap.alloc()
    # A new slot is written; so is the slot of a folio in the swap cache that
    # was written since it was read in (through a writable PTE, or marked
    # dirty): that slot is stale, and shrink_folio_list pages a dirty folio
    # out to it again.
    if owned or phys.flags[head] & PG_dirty or ptes_dirty(hits):
        zeroed = bool(phys.flags[head] & PG_zeroed)
        swap.write(slot, None if zeroed else phys.read_pages(np.array([head], dtype=_I64))[0])
        machine.costs.swap_outs += 1
        machine.clock.advance(COST_SWAP_IO_NS)
    entry = make_swap(slot)

    def one_more(_old: int) -> int:
        swap.count[slot] += 1
        return entry

    try_to_unmap(machine, head, one_more)
    if owned:
        swap.put(slot)  # the allocation's use: now only the entries hold it
    else:
        swapcache_del(swap, phys, head, dirty=False)  # the folio is freed now


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


#: Pages direct reclaim tries to free per attempt (``SWAP_CLUSTER_MAX``).
SWAP_CLUSTER_MAX = 32


def direct_reclaim(machine: Machine, npages: int, *, since: int) -> bool:
    """A user page allocation found RAM exhausted: reclaim about ``npages``.

    What the page allocator's slow path does before it fails a user page
    (``__alloc_pages_direct_reclaim``), done once a fault has returned
    ``VM_FAULT_OOM``, and followed by a retry of the fault. Only if an order-0
    allocation failed since ``since`` (``PhysMem.order0_failures`` before the
    fault): a ``VM_FAULT_OOM`` without one is a fault handler's own failure,
    which reclaim cannot help. True if anything was freed.

    Departure from the kernel: when reclaim frees nothing the allocator
    would invoke the OOM killer (``__alloc_pages_may_oom``) and the fault
    would succeed once the victim is reaped; the model's CPU access raises
    ``OutOfMemory`` instead and kills nobody. Only allocations that must not
    fail (device eviction, ``hmmsim.mm.oom``) OOM-kill. And a CPU copy loop
    faults and copies page by page, where the model faults a whole access in
    before it copies: one access larger than what RAM can hold at once
    keeps evicting its own pages and ends as a livelock (``BusError``).
    GUP and ``hmm_range_fault`` faults reclaim the same way before they
    fail (ENOMEM, EFAULT).
    """
    # SWAP_CLUSTER_MAX at a time: the fault is retried with what was freed,
    # and a bigger batch would evict the pages this access just faulted in.
    if machine.phys.order0_failures == since:
        return False
    return reclaim_machine(machine, min(max(npages, 1), SWAP_CLUSTER_MAX) * PAGE_SIZE) > 0
