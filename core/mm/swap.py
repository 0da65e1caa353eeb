"""The swap device and the swap cache.

Kernel counterpart: mm/swapfile.c (slot allocation, ``swap_duplicate``,
``swap_free``), mm/swap_state.c (the swap cache) and the swap I/O path.

A slot has a use count (one per page-table entry that refers to it, plus one
while the page sits in the swap cache). Page contents written out live in a
lazily allocated NumPy arena of the swap size; a slot whose page was all
zero is only flagged.
"""

from __future__ import annotations

import attrs
import numpy as np
from numpy.typing import NDArray

from ..errors import KernelBug, OutOfMemory
from .pagetable import PAGE_SIZE
from .physmem import PG_dirty, PG_swapcache, PhysMem, lazy_zeros


@attrs.define(eq=False)
class SwapDevice:
    """One swap area of ``nslots`` page-sized slots."""

    nslots: int
    store_data: bool
    count: NDArray[np.int32] = attrs.field(init=False)
    zero: NDArray[np.bool_] = attrs.field(init=False)
    data: NDArray[np.uint8] | None = attrs.field(init=False)
    #: swap cache: slot -> pfn of the page that holds the slot's contents.
    cache: dict[int, int] = attrs.field(factory=dict)
    #: reverse of ``cache``.
    slot_of: dict[int, int] = attrs.field(factory=dict)
    _cursor: int = 0

    def __attrs_post_init__(self) -> None:
        self.count = np.zeros(self.nslots, dtype=np.int32)
        self.zero = np.zeros(self.nslots, dtype=np.bool_)
        # Slot contents in a lazily zero-filled host mapping: a machine that
        # never swaps pays nothing for its swap area.
        self.data = (
            lazy_zeros(self.nslots * PAGE_SIZE, np.uint8).reshape(self.nslots, PAGE_SIZE)
            if self.store_data and self.nslots
            else None
        )

    @property
    def nr_free(self) -> int:
        return int((self.count == 0).sum())

    def alloc(self) -> int:
        """A free slot (count becomes 1), or ``OutOfMemory`` when swap is full."""
        if self.nslots == 0:
            raise OutOfMemory("no swap space configured")
        for lo, hi in ((self._cursor, self.nslots), (0, self._cursor)):
            free = np.flatnonzero(self.count[lo:hi] == 0)
            if len(free):
                slot = lo + int(free[0])
                self.count[slot] = 1
                self._cursor = slot + 1 if slot + 1 < self.nslots else 0
                return slot
        raise OutOfMemory("swap space is full")

    def dup(self, slots: NDArray[np.int64]) -> None:
        """``swap_duplicate``: one more page-table entry refers to each slot."""
        np.add.at(self.count, slots, 1)

    def put(self, slot: int) -> None:
        """Drop one reference; a slot with no users left is free again."""
        self.count[slot] -= 1
        if self.count[slot] < 0:
            raise KernelBug(f"swap slot {slot} use count underflow")

    def put_many(self, slots: NDArray[np.int64]) -> None:
        np.subtract.at(self.count, slots, 1)
        if (self.count[slots] < 0).any():
            raise KernelBug("swap slot use count underflow")

    def write(self, slot: int, page: NDArray[np.uint8] | None) -> None:
        """Write a page out (``page`` None means it was all zero)."""
        if page is None or not page.any():
            self.zero[slot] = True
            return
        self.zero[slot] = False
        if self.data is not None:
            self.data[slot] = page

    def read(self, slot: int) -> NDArray[np.uint8] | None:
        """Contents of a slot; None means all zero."""
        if self.zero[slot] or self.data is None:
            return None
        page: NDArray[np.uint8] = self.data[slot]
        return page


# ----- the swap cache -----------------------------------------------------------
# A page in the swap cache holds one use of its slot and the cache holds one
# reference on the page. When every page-table entry that referred to the slot
# is gone, the cache is the last user and both are dropped.


def swapcache_add(swap: SwapDevice, phys: PhysMem, slot: int, pfn: int) -> None:
    swap.cache[slot] = pfn
    swap.slot_of[pfn] = slot
    swap.count[slot] += 1
    phys.refcount[pfn] += 1
    phys.flags[pfn] |= np.uint16(PG_swapcache)


def swapcache_del(swap: SwapDevice, phys: PhysMem, pfn: int, *, dirty: bool = True) -> None:
    """Remove a page from the swap cache, dropping the cache's slot use and page ref.

    The page is marked dirty (``folio_free_swap``, ``__try_to_reclaim_swap``):
    once the slot is gone, memory holds the only copy, and a clean anonymous
    page could be discarded (MADV_FREE) or never written out. Reclaim, which
    frees the page right after, passes ``dirty=False``.
    """
    slot = swap.slot_of.pop(pfn)
    del swap.cache[slot]
    swap.put(slot)
    phys.flags[pfn] &= np.uint16(~PG_swapcache & 0xFFFF)
    if dirty:
        phys.flags[pfn] |= np.uint16(PG_dirty)
    phys.put_one(pfn)


def swap_entries_dropped(swap: SwapDevice, phys: PhysMem, slots: NDArray[np.int64]) -> None:
    """Page-table entries referring to ``slots`` were removed (zap, exit)."""
    if len(slots) == 0:
        return
    swap.put_many(slots)
    for slot in np.unique(slots):
        s = int(slot)
        pfn = swap.cache.get(s)
        if pfn is not None and swap.count[s] == 1:
            swapcache_del(swap, phys, pfn)
