"""Hardware memory errors: poisoning a page and unmapping it everywhere.

Kernel counterpart: mm/memory-failure.c (``memory_failure``,
``hwpoison_user_mappings``) with ``try_to_unmap(TTU_HWPOISON)``.

The page gets ``PG_hwpoison`` and never returns to the allocator. Every
mapping of an anonymous or dirty page becomes a hwpoison entry (one ``CLEAR``
per mapping), so a later access gets SIGBUS; a clean page-cache page is just
unmapped and dropped from the cache (the next access reads the file again).
A large anonymous folio is split first so only the bad page is lost; if it
cannot be split (it is pinned) it stays mapped, poisoned, as in the kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import InvalidArgument
from .pagetable import make_hwpoison, pte_pfn
from .physmem import PG_anon, PG_dirty, PG_hugetlb, PG_hwpoison, PG_reserved
from .reclaim import split_folio
from .rmap import ptes_dirty, rmap_walk, try_to_unmap

if TYPE_CHECKING:
    from ..machine import Machine


def memory_failure(machine: Machine, pfn: int) -> None:
    phys = machine.phys
    if not 0 <= pfn < phys.ram_pages:
        raise InvalidArgument(f"memory_failure: pfn {pfn:#x} is not RAM")
    if phys.flags[pfn] & PG_hwpoison:
        return
    phys.flags[pfn] |= np.uint16(PG_hwpoison)
    if phys.flags[pfn] & PG_reserved:
        return  # the zero pages: nothing the model can recover
    head = phys.head(pfn)
    if phys.refcount[head] == 0:
        if phys.allocator.used[pfn]:
            return  # a hugetlb pool page: stays out of circulation when handed out
        phys.allocator.reserve(pfn, 1)
        return
    if phys.order[head] > 0 and not phys.flags[head] & PG_hugetlb:
        if not split_folio(machine, head):
            return
        head = pfn
    flags = int(phys.flags[head])
    hits = list(rmap_walk(machine, head))
    dirty = bool(flags & PG_dirty) or ptes_dirty(hits)
    poison_entries = bool(flags & PG_anon) or dirty or bool(flags & PG_hugetlb)
    try_to_unmap(machine, head, lambda e: make_hwpoison(pte_pfn(e)) if poison_entries else 0)
    if not flags & PG_anon and phys.mapping[head]:
        owner = machine.mappings.get(int(phys.mapping[head]))
        if owner is not None:
            owner.cache[int(phys.index[head])] = -1
            phys.mapping[head] = 0
            phys.put_one(head)
