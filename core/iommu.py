"""IOMMU domains: the I/O page table, its IOTLB and the IOVA allocator.

Kernel counterparts: ``drivers/iommu/iommu.c`` (``iommu_map``,
``iommu_unmap``, ``iommu_iotlb_sync``) and ``drivers/iommu/iova.c`` (the
top-down, size-aligned IOVA allocator with its cached node).

A DMA-capable device behind an ``IommuDomain`` reaches memory only through
the I/O virtual addresses this page table translates; ``hmmsim.dma_mapping``
allocates and maps them for the DMA API, and ``hmmsim.dma`` is the public face
of both.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Final

import attrs

from .errors import InvalidArgument
from .mm.pagetable import PAGE_SHIFT

if TYPE_CHECKING:
    from .machine import Machine


#: ``IOMMU_*`` protection bits of an IOMMU page-table entry.
IOMMU_READ: Final = 1 << 0
IOMMU_WRITE: Final = 1 << 1
IOMMU_MMIO: Final = 1 << 4

#: Page sizes an IOMMU domain maps with (``pgsize_bitmap``), largest first.
IOMMU_PAGE_ORDERS: Final = (18, 9, 0)

#: ``IOVA_RANGE_CACHE_MAX_SIZE``: IOVA allocations below 2^(6-1) pages are
#: rounded up to a power of two (``iommu_dma_alloc_iova``).
_IOVA_ROUNDUP_PAGES: Final = 1 << 5
#: The lowest IOVA page handed out (``iova_domain`` start pfn: page 0 is never used).
_IOVA_START_PFN: Final = 1

#: Modelled costs in virtual nanoseconds.
COST_IOMMU_PTE_NS: Final = 20
COST_IOTLB_FLUSH_NS: Final = 500


# ----- IOMMU domains --------------------------------------------------------------


class _IovaRanges:
    """Disjoint allocated [start, end) IOVA page ranges, sorted by start.

    The rbtree of ``struct iova_domain``, as a list of sorted chunks: a
    top-down allocator inserts every range below all others and a teardown
    frees them in address order, so a flat sorted list would move every
    entry on each call (quadratic over a 1 GiB MR of 4 KiB mappings); a
    chunk holds at most ``2 * _LOAD`` ranges, so an insert or a removal
    moves at most that many. A position is a (chunk, index) pair.
    """

    _LOAD: Final = 512

    def __init__(self) -> None:
        self._starts: list[list[int]] = []
        self._ends: list[list[int]] = []
        #: The first start of each chunk (what the chunk is found by).
        self._firsts: list[int] = []

    def start_at(self, at: tuple[int, int]) -> int:
        return self._starts[at[0]][at[1]]

    def end_at(self, at: tuple[int, int]) -> int:
        return self._ends[at[0]][at[1]]

    def last_below(self, x: int) -> tuple[int, int] | None:
        """The position of the last range starting below ``x``, or None."""
        c = bisect.bisect_left(self._firsts, x) - 1
        if c < 0:
            return None
        return c, bisect.bisect_left(self._starts[c], x) - 1

    def prev(self, at: tuple[int, int]) -> tuple[int, int] | None:
        """The position of the range before ``at``, or None."""
        c, i = at
        if i > 0:
            return c, i - 1
        if c > 0:
            return c - 1, len(self._starts[c - 1]) - 1
        return None

    def first_above(self, x: int) -> int | None:
        """The start of the first range starting above ``x``, or None."""
        c = max(0, bisect.bisect_right(self._firsts, x) - 1)
        while c < len(self._starts):
            chunk = self._starts[c]
            i = bisect.bisect_right(chunk, x)
            if i < len(chunk):
                return chunk[i]
            c += 1
        return None

    def insert(self, start: int, end: int) -> None:
        if not self._starts:
            self._starts.append([start])
            self._ends.append([end])
            self._firsts.append(start)
            return
        c = max(0, bisect.bisect_right(self._firsts, start) - 1)
        starts, ends = self._starts[c], self._ends[c]
        i = bisect.bisect_left(starts, start)
        starts.insert(i, start)
        ends.insert(i, end)
        if i == 0:
            self._firsts[c] = start
        if len(starts) > 2 * self._LOAD:
            half = len(starts) // 2
            self._starts[c + 1 : c + 1] = [starts[half:]]
            self._ends[c + 1 : c + 1] = [ends[half:]]
            self._firsts.insert(c + 1, starts[half])
            del starts[half:], ends[half:]

    def remove(self, start: int) -> bool:
        """Drop the range starting at ``start``; False if there is none."""
        c = bisect.bisect_right(self._firsts, start) - 1
        if c < 0:
            return False
        starts, ends = self._starts[c], self._ends[c]
        i = bisect.bisect_left(starts, start)
        if i == len(starts) or starts[i] != start:
            return False
        del starts[i], ends[i]
        if not starts:
            del self._starts[c], self._ends[c], self._firsts[c]
        elif i == 0:
            self._firsts[c] = starts[0]
        return True

    def total(self) -> int:
        """Pages in all ranges."""
        return sum(
            e - s
            for ss, es in zip(self._starts, self._ends, strict=True)
            for s, e in zip(ss, es, strict=True)
        )


@attrs.define(eq=False)
class IommuDomain:
    """``struct iommu_domain`` of type ``IOMMU_DOMAIN_DMA``: an I/O page table.

    Entries are kept per page size (4 KiB, 2 MiB, 1 GiB): a mapping whose IOVA
    and physical address are both aligned to a larger size is mapped with
    that size, as ``iommu_map`` picks from ``pgsize_bitmap``. Translations are
    cached in an IOTLB; ``iommu_unmap`` flushes the range it unmapped.
    """

    machine: Machine
    name: str = "iommu"
    #: Highest IOVA page + 1 (a 48-bit aperture).
    aperture_pages: int = 1 << (48 - PAGE_SHIFT)
    #: order -> {iova index at that order: (pfn, prot)}
    entries: dict[int, dict[int, tuple[int, int]]] = attrs.field(
        factory=lambda: {o: {} for o in IOMMU_PAGE_ORDERS}
    )
    #: Cached translations: (order, index).
    iotlb: set[tuple[int, int]] = attrs.field(factory=set)
    #: Allocated IOVA ranges (start page -> end page), sorted.
    _ranges: _IovaRanges = attrs.field(init=False, factory=lambda: _IovaRanges())
    #: ``cached_node``: where the next top-down search starts (page number).
    _cached: int = 1 << (48 - PAGE_SHIFT)
    iotlb_flushes: int = 0
    ptes: int = 0
    #: The IOMMU caches non-present entries (Intel VT-d caching mode, AMD
    #: NpCache: an IOMMU emulated for a guest), so a new mapping must be
    #: flushed too (``iotlb_sync_map``). Bare-metal IOMMUs need no flush to map.
    caching_mode: bool = False

    # IOVA allocation (drivers/iommu/iova.c): top-down below the limit.
    def alloc_iova(self, npages: int, limit_pages: int) -> int | None:
        """``alloc_iova_fast``: a free IOVA range of ``npages``; None when full.

        As ``iommu_dma_alloc_iova`` asks: sizes under 32 pages are rounded up
        to a power of two, and every range is aligned to the power of two at
        or above its size (``size_aligned``), so a 2 MiB range can use 2 MiB
        IOMMU entries. As ``__alloc_and_insert_iova_range`` searches: top-down
        from the cached node (the last range allocated, moved up by a free
        above it), then once more from the limit down to where that search
        began; with packed allocations this costs O(log n), not O(n).
        """
        if npages <= 0:
            raise InvalidArgument("alloc_iova of no pages")
        size = npages
        if size < _IOVA_ROUNDUP_PAGES:
            size = 1 << (size - 1).bit_length()
        align = 1 << (size - 1).bit_length()
        limit = min(limit_pages, self.aperture_pages)
        cached = min(limit, self._cached)
        start = self._search(cached, size, align, _IOVA_START_PFN)
        if start is None and cached < limit:
            start = self._search(limit, size, align, cached)  # the kernel's retry
        if start is None:
            return None
        self._ranges.insert(start, start + size)
        self._cached = start
        self.machine.costs.iova_bytes += size << PAGE_SHIFT
        return start

    def _search(self, hi: int, size: int, align: int, floor: int) -> int | None:
        """The highest aligned free range of ``size`` pages below ``hi``, at or above
        ``floor``, walking the allocated ranges down from ``hi``."""
        ranges = self._ranges
        at = ranges.last_below(hi)  # the last range starting below hi
        while hi > floor:
            if at is not None and ranges.end_at(at) > hi:  # that range reaches past hi
                hi = ranges.start_at(at)
                at = ranges.prev(at)
                continue
            lo = max(floor, ranges.end_at(at) if at is not None else _IOVA_START_PFN)
            cand = (hi - size) & ~(align - 1)
            if cand >= lo:
                return cand
            if at is None:
                return None
            hi = ranges.start_at(at)
            at = ranges.prev(at)
        return None

    def free_iova(self, start: int) -> None:
        """``free_iova``: give back the range allocated at ``start``.

        Freeing at or above the cached node moves it to the next range up
        (``__cached_rbnode_delete_update``), so the next search finds the hole.
        """
        if not self._ranges.remove(start):
            raise InvalidArgument(f"free_iova: no IOVA range at page {start:#x}")
        if start >= self._cached:
            above = self._ranges.first_above(start)
            self._cached = above if above is not None else self.aperture_pages

    def iova_allocated(self) -> int:
        """Pages of IOVA space currently allocated."""
        return self._ranges.total()

    # The I/O page table.
    def map(self, iova_pfn: int, pfn: int, npages: int, prot: int) -> None:
        """``iommu_map``: map ``npages`` from ``pfn`` at ``iova_pfn``, largest pages first."""
        if npages == 1:  # one 4 KiB entry (no larger page fits): skip the search
            table = self.entries[0]
            if iova_pfn in table:
                raise InvalidArgument(f"iommu_map: IOVA page {iova_pfn:#x} is already mapped")
            table[iova_pfn] = (pfn, prot)
            self.ptes += 1
            self.machine.costs.iommu_ptes += 1
            self.machine.clock.advance(COST_IOMMU_PTE_NS)
            return
        done = written = 0
        while done < npages:
            v, p, left = iova_pfn + done, pfn + done, npages - done
            for order in IOMMU_PAGE_ORDERS:
                n = 1 << order
                if v % n == 0 and p % n == 0 and left >= n:
                    table = self.entries[order]
                    if (v >> order) in table:
                        raise InvalidArgument(f"iommu_map: IOVA page {v:#x} is already mapped")
                    table[v >> order] = (p, prot)
                    written += 1
                    done += n
                    break
        self.ptes += written
        self.machine.costs.iommu_ptes += written
        # One entry costs the same whatever page size it maps.
        self.machine.clock.advance(COST_IOMMU_PTE_NS * written)

    def unmap(self, iova_pfn: int, npages: int) -> None:
        """``iommu_unmap`` + IOTLB flush of the range."""
        done = 0
        while done < npages:
            v = iova_pfn + done
            for order in IOMMU_PAGE_ORDERS:
                key = v >> order
                if key in self.entries[order] and v % (1 << order) == 0:
                    del self.entries[order][key]
                    self.iotlb.discard((order, key))
                    done += 1 << order
                    break
            else:
                raise InvalidArgument(f"iommu_unmap: IOVA page {v:#x} is not mapped")
        self.flush_iotlb()

    def sync_map(self) -> None:
        """``iommu_sync_map``: a flush only where the IOMMU caches non-present entries."""
        if self.caching_mode:
            self.flush_iotlb()

    def flush_iotlb(self) -> None:
        """``iommu_iotlb_sync``: one flush command (``unmap`` already dropped its entries)."""
        self.iotlb_flushes += 1
        self.machine.costs.iotlb_flushes += 1
        self.machine.clock.advance(COST_IOTLB_FLUSH_NS)

    def translate(self, iova_pfn: int) -> tuple[int, int] | None:
        """The (pfn, prot) an IOVA page translates to, or None (an IOMMU fault)."""
        for order in IOMMU_PAGE_ORDERS:
            key = iova_pfn >> order
            hit = self.entries[order].get(key)
            if hit is not None:
                self.iotlb.add((order, key))
                return hit[0] + (iova_pfn & ((1 << order) - 1)), hit[1]
        return None
