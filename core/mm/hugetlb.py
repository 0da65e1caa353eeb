"""Hugetlb pools: persistent huge pages set aside at boot, per page size.

Kernel counterpart: mm/hugetlb.c (``struct hstate``, ``nr_hugepages``,
``struct resv_map``, ``hugetlb_reserve_pages``, ``alloc_hugetlb_folio``,
``unmap_ref_private``) and the hugetlbfs release of an object's pages.

A pool's pages are taken from the frame allocator when the machine boots and
never return to it. ``mmap(MAP_HUGETLB)`` reserves pages for the whole mapping
(ENOMEM if the pool cannot cover it) unless ``MAP_NORESERVE`` is given; a
fault then consumes a reserved page. A private mapping made with a
reservation is its reservation's owner (``HPAGE_RESV_OWNER``); a private
mapping made with ``MAP_NORESERVE`` and every copy of a private mapping a
fork makes own none, so their faults and COW copies take unreserved pages
(free beyond what is reserved), and get SIGBUS when there is none. The owner
is guaranteed its pages: when its own COW copy finds the pool empty, it
takes the page back from the fork children that still map it
(``unmap_ref_private``), and a child whose page was taken gets SIGBUS on its
next no-page fault anywhere in that mapping (``HPAGE_RESV_UNMAPPED``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import attrs
import numpy as np

from ..errors import OutOfMemory
from ..notifier import MMU_NOTIFY_CLEAR, invalidation
from .pagetable import PAGE_SHIFT
from .physmem import PG_hugetlb, PhysMem
from .rmap import rmap_walk
from .zap import zap_range

if TYPE_CHECKING:
    from .vma import Vma


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


def is_resv_owner(vma: Vma) -> bool:
    """``is_vma_resv_set(vma, HPAGE_RESV_OWNER)``: a private hugetlb mapping that
    reserved its pages when it was made (not a fork copy, not ``MAP_NORESERVE``)."""
    return not vma.is_shared and vma.hugetlb_resv is not None


def unmap_ref_private(vma: Vma, head: int, hvpn: int) -> None:
    """The owner ``vma`` could not copy the huge page ``head`` it shares with its
    fork children: unmap the page from every other private mapping of it that
    owns no reservation, and mark those mappings (``HPAGE_RESV_UNMAPPED``).

    Linux finds those mappings through the hugetlbfs object's ``i_mmap`` at
    the owner's address; the model asks the folio's rmap, which finds the
    same mappings (a child mapping the page at another address after an
    mremap is found too, where Linux would miss it and retry the COW again).
    """
    nr = 1 << vma.hugetlb_order
    for hit in list(rmap_walk(vma.mm.machine, head)):
        other = hit.vma
        if other is vma or other.is_shared or is_resv_owner(other):
            continue
        for vpn in np.unique(hit.vpns & ~(nr - 1)).tolist():
            addr = vpn << PAGE_SHIFT
            with invalidation(other.mm, MMU_NOTIFY_CLEAR, addr, addr + (nr << PAGE_SHIFT)):
                zap_range(other, vpn, nr)
        other.hugetlb_resv_unmapped = True


@contextlib.contextmanager
def hold_hugetlbfs_objects(vmas: Iterable[Vma]) -> Iterator[None]:
    """Keep the hugetlbfs objects behind ``vmas`` (and their pages and
    reservations) alive until the block ends, even if it unmaps them.

    A ``MAP_FIXED`` mmap clears the old mappings' entries and closes them
    (``vms_clean_up_area``) before the new mapping reserves its pages, but
    drops its references to their files (``fput``) only after: pages the old
    mappings' shared hugetlbfs objects hold still count against the new
    mapping's reservation, while a private mapping's own pages and
    reservations are back in the pool by then.
    """
    held = {
        f for f in (v.page_cache for v in vmas) if f is not None and f.hugetlb_order and f.anonymous
    }
    for f in held:
        f.anonymous = False  # unlink_file must not release it yet
    try:
        yield
    finally:
        for f in held:
            f.anonymous = True
            if not f.i_mmap:
                f.release()
