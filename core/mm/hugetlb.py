"""Hugetlb pools: persistent huge pages set aside at boot, per page size.

Kernel counterpart: mm/hugetlb.c (``struct hstate``, ``nr_hugepages``,
``struct resv_map``, ``hugetlb_reserve_pages``, ``alloc_hugetlb_folio``,
the reservation restore of ``__unmap_hugepage_range``) and the hugetlbfs
release of an object's pages.

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
(``unmap_ref_private``, in fault.py with the COW it serves), and a child
whose page was taken gets SIGBUS on its next no-page fault anywhere in that
mapping (``HPAGE_RESV_UNMAPPED``). Unmapping an owner's page reserves its
index again (see ``restore_reservations``), and mremap of part of a private
mapping leaves the rest without reservations (``clear_vma_resv_huge_pages``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import attrs
import numpy as np

from ..errors import OutOfMemory
from .physmem import PG_anon, PG_hugetlb, PhysMem

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from .vma import Vma


@attrs.define(eq=False)
class HugetlbPool:
    """The free huge pages of one size (``struct hstate``).

    ``reserved`` is ``resv_huge_pages``; a new mapping can get
    ``nr_free - reserved`` pages. It can drop below zero for a while: when the
    owner of a private mapping unmaps a page a fork child still maps, the
    owner's reservation for that index comes back (``restore_reserve``) and
    is given up when the owner's mapping closes, before the page is free; the
    pool takes the reservation back when the page is finally freed. Linux's
    counter is unsigned and includes every other mapping's reservations, so
    it shows the same drop (or wraps, with the same modular arithmetic, on a
    machine where nothing else holds any).
    """

    phys: PhysMem
    order: int
    nr_pages: int = 0
    free_pages: list[int] = attrs.field(factory=list)
    reserved: int = 0
    #: Heads of folios that give a reservation back to the pool when freed
    #: (``folio_test_hugetlb_restore_reserve``).
    restore_reserve: set[int] = attrs.field(factory=set)

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
        """Give up ``count`` reservations (``hugetlb_acct_memory(h, -count)``)."""
        self.reserved -= count

    def alloc(self, *, reserved: bool) -> int | None:
        """Take a page (consuming a reservation if ``reserved``); None when empty.

        An unreserved allocation may not eat into pages reserved by others; a
        reserved one takes any free page (``dequeue_hugetlb_folio_vma`` with no
        global charge checks nothing else) and fails only when none is free,
        keeping its reservation.
        """
        if not self.free_pages:
            return None
        if reserved:
            self.reserved -= 1
        elif len(self.free_pages) <= self.reserved:
            return None
        head = self.free_pages.pop()
        self.phys.init_folios(np.array([head], dtype=np.int64), self.order, PG_hugetlb)
        return head

    def free_page(self, head: int) -> None:
        """``free_huge_folio``: back to the free list, restoring its reservation if
        it carries one."""
        self.free_pages.append(head)
        if head in self.restore_reserve:
            self.restore_reserve.discard(head)
            self.reserved += 1


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

    def restore(self, index: int) -> None:
        """The page at ``index`` was unmapped: the index is reserved again
        (``vma_add_reservation``); the pool's count follows when the page is freed."""
        self.indexes.add(index)

    def release(self, lo: int, hi: int) -> None:
        """Give back the reservations of indexes in [lo, hi) (``hugetlb_vm_op_close``)."""
        gone = [i for i in self.indexes if lo <= i < hi]
        for i in gone:
            self.indexes.discard(i)
        self.pool.unreserve(len(gone))


def alloc_hugetlb_folio(pool: HugetlbPool, resv: ResvMap | None, index: int) -> int | None:
    """A page for a fault at huge-page ``index`` (``alloc_hugetlb_folio``): the
    mapping's reservation for it if it has one, else an unreserved page. On
    failure (None) the reservation stays, as ``vma_end_reservation`` leaves it."""
    if resv is None:
        return pool.alloc(reserved=False)
    reserved = resv.consume(index)
    got = pool.alloc(reserved=reserved)
    if got is None and reserved:
        resv.indexes.add(index)
    return got


def is_resv_owner(vma: Vma) -> bool:
    """``is_vma_resv_set(vma, HPAGE_RESV_OWNER)``: a private hugetlb mapping that
    reserved its pages when it was made (not a fork copy, not ``MAP_NORESERVE``)."""
    return not vma.is_shared and vma.hugetlb_resv is not None


def restore_reservations(vma: Vma, vpns: NDArray[np.int64], pfns: NDArray[np.int64]) -> None:
    """The owner ``vma`` is unmapping the huge pages ``pfns`` mapped at ``vpns``:
    each anonymous one is marked to give a reservation back when freed, and
    its index is reserved again in the owner's map, as
    ``__unmap_hugepage_range`` does (so the backing page cannot be stolen).

    The pool's count rises only when a page is freed: while a fork child still
    maps it, the owner holds a reservation the pool does not count, and gives
    it up when its mapping closes (see ``HugetlbPool``).
    """
    resv = vma.hugetlb_resv
    pool = resv.pool
    anon = (pool.phys.flags[pfns] & PG_anon) != 0
    if not anon.any():
        return
    heads = pool.phys.head_of(pfns[anon])
    pool.restore_reserve.update(heads.tolist())
    shift = vma.hugetlb_order
    for vpn in vpns[anon].tolist():
        resv.restore(vma.linear_index(vpn) >> shift)


def clear_vma_resv_huge_pages(vmas: Iterable[Vma]) -> None:
    """mremap moved part of a private hugetlb VMA: what is left of the source
    VMA (``vmas``, its pieces around the moved range) loses the reservation
    map and its flags (``clear_vma_resv_huge_pages`` on the whole source VMA,
    before the moved range is cut out of it).

    Those pieces no longer own a reservation: their faults take unreserved
    pages. Their indexes stay reserved in the map the moved VMA took, which
    releases only its own range when it closes, so those reservations are
    never given back (a Linux 6.18 leak, seen on the host: HugePages_Rsvd
    stays one higher after a process that moved one page of an untouched
    2-page private mapping exited).
    """
    for vma in vmas:
        if vma.is_hugetlb and not vma.is_shared:
            vma.hugetlb_resv = None
            vma.hugetlb_resv_unmapped = False


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
