"""Hugetlb pools: persistent huge pages set aside at boot, per page size.

Kernel counterpart: mm/hugetlb.c (``struct hstate``, ``nr_hugepages``,
reservations made at mmap time, ``alloc_hugetlb_folio``).

A pool's pages are taken from the frame allocator when the machine boots and
never return to it. ``mmap(MAP_HUGETLB)`` reserves pages for the whole mapping
(ENOMEM if the pool cannot cover it) unless ``MAP_NORESERVE`` is given; a
fault then consumes a reserved page. A fault that finds the pool empty (a
``MAP_NORESERVE`` mapping, or a COW copy after fork) gets SIGBUS, as in Linux.
"""

from __future__ import annotations

import attrs
import numpy as np

from ..errors import OutOfMemory
from .physmem import PG_hugetlb, PhysMem


@attrs.define(eq=False)
class HugetlbPool:
    """The free huge pages of one size (``struct hstate``)."""

    phys: PhysMem
    order: int
    nr_pages: int = 0
    free_pages: list[int] = attrs.field(factory=list)
    reserved: int = 0

    @classmethod
    def boot(cls, phys: PhysMem, order: int, count: int) -> HugetlbPool:
        pool = cls(phys, order)
        if count:
            try:
                heads = phys.allocator.alloc(order, count)
            except OutOfMemory as exc:
                raise OutOfMemory(
                    f"cannot set aside {count} huge page(s) of order {order} at boot"
                ) from exc
            pool.free_pages = [int(h) for h in heads[::-1]]
            pool.nr_pages = count
        phys.hugetlb_release[order] = pool
        return pool

    @property
    def page_size(self) -> int:
        return 4096 << self.order

    @property
    def nr_free(self) -> int:
        return len(self.free_pages)

    def reserve(self, count: int) -> None:
        """Reserve ``count`` pages for a new mapping (``hugetlb_reserve_pages``)."""
        if self.reserved + count > len(self.free_pages):
            raise OutOfMemory(
                f"hugetlb pool of {self.page_size >> 20} MiB pages cannot reserve {count} "
                f"more ({len(self.free_pages)} free, {self.reserved} already reserved)"
            )
        self.reserved += count

    def unreserve(self, count: int) -> None:
        self.reserved = max(0, self.reserved - count)

    def alloc(self, *, reserved: bool) -> int | None:
        """Take a page (consuming a reservation if ``reserved``); None when empty.

        An unreserved allocation may not eat into pages reserved by others.
        """
        if reserved:
            self.reserved -= 1
        elif len(self.free_pages) <= self.reserved:
            return None
        head = self.free_pages.pop()
        self.phys.init_folios(np.array([head], dtype=np.int64), self.order, PG_hugetlb)
        return head

    def free_page(self, head: int) -> None:
        self.free_pages.append(head)


@attrs.define(eq=False)
class ResvMap:
    """Huge pages reserved for a mapping, by huge-page index (``struct resv_map``)."""

    pool: HugetlbPool
    indexes: set[int] = attrs.field(factory=set)

    def reserve(self, indexes: list[int]) -> None:
        """Reserve the given indexes (all or nothing)."""
        new = [i for i in indexes if i not in self.indexes]
        self.pool.reserve(len(new))
        self.indexes.update(new)

    def consume(self, index: int) -> bool:
        """A fault at ``index`` takes its reservation, if it has one."""
        if index in self.indexes:
            self.indexes.discard(index)
            return True
        return False

    def release(self, lo: int, hi: int) -> None:
        """Give back reservations of indexes in [lo, hi) that were never used."""
        gone = [i for i in self.indexes if lo <= i < hi]
        for i in gone:
            self.indexes.discard(i)
        self.pool.unreserve(len(gone))
