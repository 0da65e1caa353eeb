"""Physical memory: page frames, folio metadata, page contents, zero pages.

Kernel counterpart: mm/page_alloc.c (the buddy allocator), ``struct page`` /
``struct folio`` (include/linux/mm_types.h, page-flags.h) and the zero pages
(``ZERO_PAGE``, mm/huge_memory.c's huge zero folio).

Folio metadata is a struct of NumPy arrays indexed by pfn: ``refcount`` and
``mapcount`` live at the head pfn, ``order`` is written on every pfn of a
folio (so the head of any pfn is ``pfn & ~((1 << order) - 1)``), and
``flags`` carries folio flags at the head and the per-page flags
(``PG_anon_exclusive``, ``PG_hwpoison``) on each page. ``mapcount`` counts
mappings the way the kernel's large mapcount does: a PMD or PUD mapping counts
once, every PTE mapping counts once. Each mapping holds one reference.

The metadata arrays and the page contents live in anonymous host mappings
(zero-filled lazily by the host), so device memory ranges added later extend
the metadata without copying it, and untouched memory costs nothing. A
freshly allocated page is only *flagged* zero (``PG_zeroed``);
the arena row is cleared the first time the page is written, so untouched
memory costs neither time nor host RAM. With ``store_data=False`` there is no
arena: reads return zeros and writes are dropped (metadata-only runs).

The allocator is a bitmap plus per-2 MiB-block free counts rather than buddy
free lists: it hands out naturally aligned blocks of any order 0…18, prefers
partly used blocks for small orders (which keeps 2 MiB blocks free for THP, as
the buddy allocator's fragmentation avoidance does), and allocates a whole
batch in one vectorised call.
"""

from __future__ import annotations

import mmap
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import numpy as np
from numpy.typing import NDArray

from ..errors import InvalidArgument, KernelBug, OutOfMemory
from ..sched import WaitQueue
from ..trace import Costs
from .pagetable import PAGE_SIZE, PMD_ORDER, PMD_PAGES

if TYPE_CHECKING:
    from .hugetlb import HugetlbPool

MAX_ORDER: Final = 18

PG_locked: Final = 1 << 0
PG_anon: Final = 1 << 1
PG_dirty: Final = 1 << 2
PG_swapbacked: Final = 1 << 3
PG_hugetlb: Final = 1 << 4
PG_reserved: Final = 1 << 5
PG_zeroed: Final = 1 << 6
PG_anon_exclusive: Final = 1 << 7
PG_hwpoison: Final = 1 << 8
PG_swapcache: Final = 1 << 9
PG_zone_device: Final = 1 << 10
PG_uptodate: Final = 1 << 11

#: Flags that belong to a page rather than to its folio.
PER_PAGE_FLAGS: Final = PG_anon_exclusive | PG_hwpoison | PG_zeroed

ZERO_PFN: Final = 0
HUGE_ZERO_PFN: Final = PMD_PAGES

I64 = np.int64

#: Host mappings for metadata and contents: private (shared anonymous memory
#: is shmem, dearer to fault in and to free), and not accounted against the
#: host's commit limit (MAP_NORESERVE, Linux's 0x4000: Python's mmap module
#: does not name it): a machine reserves far more than it touches, and with
#: the arenas accounted a long-lived process holding a few machines could no
#: longer fork (the explorer's and the bug zoo's workers) under the host's
#: default heuristic overcommit.
_MAP_NORESERVE: Final = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform == "linux" else 0)
_PRIVATE_ANON: Final = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE

#: The folio metadata arrays, indexed by pfn.
_META_FIELDS: Final = (
    ("refcount", np.int32),
    ("mapcount", np.int32),
    ("order", np.uint8),
    ("flags", np.uint16),
    ("mapping", np.int32),
    ("index", np.int64),
)
#: Metadata room reserved beyond RAM for device memory ranges (1 GiB of pages):
#: ranges added within it cost no copy.
DEVICE_RESERVE_PAGES: Final = 1 << 18


def lazy_zeros(n: int, dtype: Any) -> NDArray[Any]:
    """A zeroed array in its own anonymous host mapping, zero-filled page by page
    on first touch (``np.zeros`` may take a recycled heap block and clear it all)."""
    itemsize = np.dtype(dtype).itemsize
    area = mmap.mmap(-1, max(n * itemsize, 1), flags=_PRIVATE_ANON)
    return np.frombuffer(area, dtype=dtype, count=n)


def as_pfns(pfns: NDArray[np.integer] | list[int] | int) -> NDArray[np.int64]:
    return np.atleast_1d(np.asarray(pfns, dtype=I64))


class FrameAllocator:
    """Naturally aligned blocks of 2**order frames out of ``npages`` frames."""

    def __init__(self, npages: int) -> None:
        self.nblocks = npages // PMD_PAGES
        self.npages = self.nblocks * PMD_PAGES
        self.used = np.zeros(self.npages, dtype=np.bool_)
        self.used2d = self.used.reshape(self.nblocks, PMD_PAGES)
        self.block_used = np.zeros(self.nblocks, dtype=np.int32)
        self.nr_free = self.npages
        self._hint = 0

    def reserve(self, pfn: int, count: int) -> None:
        """Take frames out of the allocator for good (zero pages, firmware …)."""
        sl = slice(pfn, pfn + count)
        if self.used[sl].any():
            raise KernelBug("reserving frames that are in use")
        self.used[sl] = True
        for block in range(pfn >> PMD_ORDER, ((pfn + count - 1) >> PMD_ORDER) + 1):
            lo = max(pfn, block << PMD_ORDER)
            hi = min(pfn + count, (block + 1) << PMD_ORDER)
            self.block_used[block] += hi - lo
        self.nr_free -= count

    def alloc(self, order: int, count: int = 1) -> NDArray[np.int64]:
        """Head pfns of ``count`` free blocks of ``2**order`` frames (all or nothing)."""
        if not 0 <= order <= MAX_ORDER:
            raise KernelBug(f"order {order} outside 0..{MAX_ORDER}")
        if count <= 0:
            return np.empty(0, dtype=I64)
        size = 1 << order
        if size * count > self.nr_free:
            raise OutOfMemory(f"cannot allocate {count} block(s) of order {order}")
        if order >= PMD_ORDER:
            heads = self._alloc_large(order, count)
        elif count == 1 and order == 0:
            heads = self._alloc_one_small()
        else:
            heads = self._alloc_small(order, count)
        self._mark(heads, size, True)
        return heads

    def _alloc_large(self, order: int, count: int) -> NDArray[np.int64]:
        per = 1 << (order - PMD_ORDER)
        free_blocks = self.block_used == 0
        if per > 1:
            ngroups = self.nblocks // per
            free_blocks = free_blocks[: ngroups * per].reshape(ngroups, per).all(axis=1)
        groups = np.flatnonzero(free_blocks)[:count]
        if len(groups) < count:
            raise OutOfMemory(f"no {count} free contiguous block(s) of order {order}")
        return groups.astype(I64) << order

    def _alloc_one_small(self) -> NDArray[np.int64]:
        return np.array([self._pick_one_page()], dtype=I64)

    def _pick_one_page(self) -> int:
        b = self._hint
        if self.block_used[b] < PMD_PAGES:
            return b * PMD_PAGES + int(np.argmin(self.used2d[b]))
        pfn = int(self._alloc_small(0, 1)[0])
        self._hint = pfn >> PMD_ORDER
        return pfn

    def alloc_page(self) -> int:
        """``alloc(0)`` for one frame, with scalars (the fault paths' common case)."""
        if self.nr_free < 1:
            raise OutOfMemory("cannot allocate 1 block(s) of order 0")
        pfn = self._pick_one_page()
        self.used[pfn] = True
        self.block_used[pfn >> PMD_ORDER] += 1
        self.nr_free -= 1
        return pfn

    def _alloc_small(self, order: int, count: int) -> NDArray[np.int64]:
        size = 1 << order
        per = PMD_PAGES >> order
        bu = self.block_used
        partial = np.flatnonzero((bu > 0) & (bu <= PMD_PAGES - size))
        empty = np.flatnonzero(bu == 0)
        cand = np.concatenate([partial, empty])
        found: list[NDArray[np.int64]] = []
        need = count
        i = 0
        while need > 0 and i < len(cand):
            capacity = (PMD_PAGES - bu[cand[i:]]) >> order
            # enough blocks to cover the need if each were unfragmented
            j = int(np.searchsorted(np.cumsum(capacity), need)) + 1
            take = cand[i : i + j]
            i += j
            slots = ~self.used2d[take].reshape(len(take), per, size).any(axis=2)
            idx = np.flatnonzero(slots)[:need]
            heads = take[idx // per].astype(I64) * PMD_PAGES + (idx % per).astype(I64) * size
            found.append(heads)
            need -= len(heads)
        if need > 0:
            raise OutOfMemory(f"memory too fragmented for {count} block(s) of order {order}")
        return found[0] if len(found) == 1 else np.concatenate(found)

    def _mark(self, heads: NDArray[np.int64], size: int, used: bool) -> None:
        if size == 1:
            idx = heads
        elif size >= PMD_PAGES:
            blocks = (heads[:, None] // PMD_PAGES + np.arange(size // PMD_PAGES)).reshape(-1)
            self.used2d[blocks] = used
            self.block_used[blocks] = PMD_PAGES if used else 0
            self.nr_free += -size * len(heads) if used else size * len(heads)
            return
        else:
            idx = (heads[:, None] + np.arange(size)).reshape(-1)
        self.used[idx] = used
        per_block = np.bincount(heads >> PMD_ORDER, minlength=self.nblocks).astype(np.int32)
        self.block_used += per_block * (size if used else -size)
        self.nr_free += -size * len(heads) if used else size * len(heads)

    def free(self, heads: NDArray[np.int64], order: int) -> None:
        size = 1 << order
        if not self.used[heads].all():
            raise KernelBug("double free of page frames")
        self._mark(heads, size, False)


class PageArena:
    """Page contents by pfn, in segments: RAM first, then each device memory range.

    Each segment is one anonymous ``mmap`` of the host, zero-filled lazily
    page by page (``np.zeros`` may instead take a recycled heap block and
    clear all of it, a cost paid per machine whatever is touched). A
    gather or scatter that stays inside one segment (the usual case) is one
    fancy-indexing operation.
    """

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.blocks: list[NDArray[np.uint8]] = []

    def add(self, start: int, npages: int) -> None:
        self.starts.append(start)
        self.ends.append(start + npages)
        area = mmap.mmap(-1, npages * PAGE_SIZE, flags=_PRIVATE_ANON)
        self.blocks.append(np.frombuffer(area, dtype=np.uint8).reshape(npages, PAGE_SIZE))

    def _segment(self, pfns: NDArray[np.int64]) -> int:
        """Index of the one segment holding all ``pfns``, or -1 if they straddle."""
        lo, hi = int(pfns.min()), int(pfns.max())
        for i, (start, end) in enumerate(zip(self.starts, self.ends, strict=True)):
            if start <= lo and hi < end:
                return i
        return -1

    def _split(self, pfns: NDArray[np.int64]) -> list[tuple[NDArray[np.bool_], int]]:
        parts = []
        for i, (start, end) in enumerate(zip(self.starts, self.ends, strict=True)):
            sel = (pfns >= start) & (pfns < end)
            if sel.any():
                parts.append((sel, i))
        return parts

    def gather(self, pfns: NDArray[np.int64]) -> NDArray[np.uint8]:
        if len(pfns) == 0:
            return np.zeros((0, PAGE_SIZE), dtype=np.uint8)
        i = self._segment(pfns)
        if i >= 0:
            return self.blocks[i][pfns - self.starts[i]]
        out = np.empty((len(pfns), PAGE_SIZE), dtype=np.uint8)
        for sel, j in self._split(pfns):
            out[sel] = self.blocks[j][pfns[sel] - self.starts[j]]
        return out

    def scatter(self, pfns: NDArray[np.int64], data: NDArray[np.uint8] | int) -> None:
        if len(pfns) == 0:
            return
        i = self._segment(pfns)
        if i >= 0:
            self.blocks[i][pfns - self.starts[i]] = data
            return
        for sel, j in self._split(pfns):
            part = data if isinstance(data, int) else data[sel]
            self.blocks[j][pfns[sel] - self.starts[j]] = part

    def page(self, pfn: int) -> NDArray[np.uint8]:
        """A writable view of one page."""
        for start, end, block in zip(self.starts, self.ends, self.blocks, strict=True):
            if start <= pfn < end:
                page: NDArray[np.uint8] = block[pfn - start]
                return page
        raise IndexError(f"pfn {pfn:#x} has no storage")


class PhysMem:
    """All frames of the machine with their folio metadata and contents."""

    def __init__(self, ram_bytes: int, store_data: bool, costs: Costs) -> None:
        if ram_bytes < 8 * PMD_PAGES * PAGE_SIZE:
            raise InvalidArgument("ram_bytes must be at least 16 MiB")
        self.costs = costs
        self.store_data = store_data
        #: Called with the heads and orders of folios about to be freed
        #: (DMA-API debugging checks that no live mapping covers them).
        self.free_watchers: list[Callable[[NDArray[np.int64], NDArray[np.int64]], None]] = []
        self.ram_pages = (ram_bytes // PAGE_SIZE) // PMD_PAGES * PMD_PAGES
        self.allocator = FrameAllocator(self.ram_pages)
        #: Order-0 allocations refused for want of free frames: a fault that
        #: returns VM_FAULT_OOM after one of these ran out of memory, where the
        #: kernel's allocator would have reclaimed first.
        self.order0_failures = 0
        n = self.ram_pages
        self.capacity = n
        self.refcount: NDArray[np.int32]
        self.mapcount: NDArray[np.int32]
        self.order: NDArray[np.uint8]
        self.flags: NDArray[np.uint16]
        self.mapping: NDArray[np.int32]
        self.index: NDArray[np.int64]
        self._meta: dict[str, NDArray[Any]] = {}
        self._reserve_metadata(n + DEVICE_RESERVE_PAGES)
        self.arena: PageArena | None = PageArena() if store_data else None
        if self.arena is not None:
            self.arena.add(0, n)
        # The zero page and the huge zero folio: reserved, always zero.
        self.allocator.reserve(ZERO_PFN, 1)
        self.allocator.reserve(HUGE_ZERO_PFN, PMD_PAGES)
        self.flags[ZERO_PFN] = PG_reserved | PG_zeroed
        self.flags[HUGE_ZERO_PFN : HUGE_ZERO_PFN + PMD_PAGES] = PG_reserved | PG_zeroed
        self.order[HUGE_ZERO_PFN : HUGE_ZERO_PFN + PMD_PAGES] = PMD_ORDER
        self.refcount[ZERO_PFN] = 1
        self.refcount[HUGE_ZERO_PFN] = 1
        #: Sleepers on folio locks (``folio_wait_locked``).
        self.lock_wq = WaitQueue("folio_lock")
        #: Device memory ranges: (first pfn, end pfn, dev_pagemap).
        self.pgmaps: list[tuple[int, int, Any]] = []
        #: FOLL_PIN pins by folio head (``folio_maybe_dma_pinned``).
        self.pins: dict[int, int] = {}
        #: References held outside page tables and caches (GUP pins, drivers),
        #: by folio head: what ``get_page``/``put_page`` track.
        self.extra_refs: dict[int, int] = {}
        #: Hugetlb pages go back to their pool instead of the allocator.
        self.hugetlb_release: dict[int, HugetlbPool] = {}

    # ----- folio lock ------------------------------------------------------------
    def folio_trylock(self, head: int) -> bool:
        if self.flags[head] & PG_locked:
            return False
        self.flags[head] |= np.uint16(PG_locked)
        return True

    def folio_lock(self, head: int) -> None:
        """``folio_lock``: sleep until the folio is unlocked, then take it."""
        if not self.folio_trylock(head):
            self.lock_wq.wait_event(lambda: not self.flags[head] & PG_locked)
            self.flags[head] |= np.uint16(PG_locked)

    def folio_unlock(self, head: int) -> None:
        if not self.flags[head] & PG_locked:
            raise KernelBug(f"folio_unlock of unlocked folio {head:#x}")
        self.flags[head] &= np.uint16(~PG_locked & 0xFFFF)
        self.lock_wq.wake_up_all()

    def folio_locked(self, head: int) -> bool:
        return bool(self.flags[head] & PG_locked)

    # ----- device memory (ZONE_DEVICE) -----------------------------------------
    def add_device_range(self, npages: int, pgmap: Any) -> int:
        """Struct pages for ``npages`` of device memory; returns the first pfn.

        Ranges start 2 MiB-aligned above RAM and every earlier range, so device
        THPs are possible. Metadata arrays grow; contents get their own segment.
        """
        if npages <= 0:
            raise KernelBug("a device range needs pages")
        start = (self.capacity + PMD_PAGES - 1) & ~(PMD_PAGES - 1)
        end = start + ((npages + PMD_PAGES - 1) & ~(PMD_PAGES - 1))
        if end > len(self._meta["refcount"]):
            self._reserve_metadata(max(end, 2 * len(self._meta["refcount"])))
        self.capacity = end
        self._expose_metadata()
        if self.arena is not None:
            self.arena.add(start, end - start)
        self.flags[start:end] = PG_zone_device
        self.pgmaps.append((start, start + npages, pgmap))
        return start

    def _reserve_metadata(self, npfns: int) -> None:
        """Room for the metadata of ``npfns`` pfns (keeping what is there)."""
        old = self._meta
        self._meta = {name: lazy_zeros(npfns, dtype) for name, dtype in _META_FIELDS}
        for name, arr in old.items():
            self._meta[name][: self.capacity] = arr[: self.capacity]
        self._expose_metadata()

    def _expose_metadata(self) -> None:
        # The public arrays are views of exactly ``capacity`` pfns, so an
        # out-of-range pfn still raises IndexError.
        for name, _ in _META_FIELDS:
            setattr(self, name, self._meta[name][: self.capacity])

    def remove_device_range(self, pgmap: Any) -> None:
        self.pgmaps = [r for r in self.pgmaps if r[2] is not pgmap]

    def pgmap_of(self, pfn: int) -> Any:
        """The ``dev_pagemap`` a device pfn belongs to (``page_pgmap``), or None."""
        for start, end, pgmap in self.pgmaps:
            if start <= pfn < end:
                return pgmap
        return None

    def pgmap_owners(self, pfns: NDArray[np.int64]) -> list[Any]:
        """``pgmap->owner`` of each pfn (None for pfns outside device memory)."""
        return [getattr(self.pgmap_of(int(p)), "owner", None) for p in pfns.tolist()]

    def is_device(self, pfns: NDArray[np.int64]) -> NDArray[np.bool_]:
        return pfns >= self.ram_pages

    # ----- identity ----------------------------------------------------------
    def head_of(self, pfns: NDArray[np.int64]) -> NDArray[np.int64]:
        order = self.order[pfns].astype(I64)
        return pfns & ~((I64(1) << order) - 1)

    def head(self, pfn: int) -> int:
        return pfn & ~((1 << int(self.order[pfn])) - 1)

    def is_zero_pfn(self, pfn: int) -> bool:
        return pfn == ZERO_PFN or HUGE_ZERO_PFN <= pfn < HUGE_ZERO_PFN + PMD_PAGES

    def zero_mask(self, pfns: NDArray[np.int64]) -> NDArray[np.bool_]:
        mask: NDArray[np.bool_] = (pfns == ZERO_PFN) | (
            (pfns >= HUGE_ZERO_PFN) & (pfns < HUGE_ZERO_PFN + PMD_PAGES)
        )
        return mask

    def valid_pfn(self, pfn: int) -> bool:
        return 0 <= pfn < self.capacity

    # ----- allocation and references -----------------------------------------
    def alloc(self, order: int, count: int = 1, flags: int = 0) -> NDArray[np.int64]:
        """Allocate ``count`` folios of ``order``: refcount 1, contents zero."""
        try:
            heads = self.allocator.alloc(order, count)
        except OutOfMemory:
            if order == 0:
                self.order0_failures += 1
            raise
        self.init_folios(heads, order, flags)
        return heads

    def init_folios(self, heads: NDArray[np.int64] | int, order: int, flags: int) -> None:
        """Fresh folio metadata for just-allocated blocks: refcount 1, contents zero.

        ``heads`` may be one order-0 pfn (an int), which spares the fault paths' single
        page allocations the cost of index arrays.
        """
        size = 1 << order
        if order == 0:
            self.order[heads] = 0
            self.flags[heads] = PG_zeroed | flags
        elif isinstance(heads, int):
            raise KernelBug("init_folios takes a single pfn only for an order-0 folio")
        else:
            self.set_folio_field(self.order, heads, order, order)
            self.set_folio_field(self.flags, heads, order, PG_zeroed | flags)  # on every page
        # Free frames always have refcount and mapcount 0 (``release`` keeps it
        # so); mapping and index are only meaningful at the head.
        self.mapcount[heads] = 0
        self.mapping[heads] = 0
        self.index[heads] = 0
        self.refcount[heads] = 1
        self.costs.pages_allocated += size * np.size(heads)

    def pages_of(self, heads: NDArray[np.int64], order: int) -> NDArray[np.int64]:
        """Every pfn of the given folios, in order."""
        if order == 0:
            return heads
        return (heads[:, None] + np.arange(1 << order, dtype=I64)).reshape(-1)

    def or_folio_flags(self, heads: NDArray[np.int64], order: int, flags: int) -> None:
        """Set ``flags`` on every page of the folios, keeping each page's other bits."""
        value = np.uint16(flags)
        if order == 0:
            self.flags[heads] |= value
        elif order >= PMD_ORDER:
            rows = self.flags[: self.ram_pages].reshape(-1, PMD_PAGES)
            blocks = self.pages_of(heads >> PMD_ORDER, order - PMD_ORDER)
            rows[blocks] |= value
        else:
            self.flags[self.pages_of(heads, order)] |= value

    def set_folio_field(
        self, arr: NDArray[np.generic], heads: NDArray[np.int64], order: int, value: int
    ) -> None:
        """``arr[p] = value`` for every page p of the folios (row fills when PMD-sized)."""
        if order == 0:
            arr[heads] = value
        elif order >= PMD_ORDER:
            rows = arr[: self.ram_pages].reshape(-1, PMD_PAGES)
            blocks = self.pages_of(heads >> PMD_ORDER, order - PMD_ORDER)
            rows[blocks] = value
        else:
            arr[self.pages_of(heads, order)] = value

    def alloc_one(self, order: int = 0, flags: int = 0) -> int:
        if order:
            return int(self.alloc(order, 1, flags)[0])
        try:
            pfn = self.allocator.alloc_page()
        except OutOfMemory:
            self.order0_failures += 1
            raise
        self.init_folios(pfn, 0, flags)
        return pfn

    def _check_pfn(self, pfn: int, what: str) -> None:
        if not isinstance(pfn, int | np.integer) or not self.valid_pfn(int(pfn)):
            raise InvalidArgument(f"{what}: pfn {pfn!r} is not a frame of this machine")

    def get_page(self, pfn: int) -> int:
        """``get_page``/``folio_get``: an extra reference; returns the folio head.

        Raises:
            InvalidArgument: ``pfn`` is not a frame of this machine.
            KernelBug: the frame is free (a reference to a page nobody holds).
        """
        self._check_pfn(pfn, "get_page")
        head = self.head(pfn)
        if self.refcount[head] <= 0:
            raise KernelBug(f"get_page on free frame {pfn:#x}")
        self.refcount[head] += 1
        self.extra_refs[head] = self.extra_refs.get(head, 0) + 1
        return head

    def put_page(self, pfn: int) -> None:
        """``put_page``: drop a reference taken with ``get_page``.

        Raises:
            InvalidArgument: ``pfn`` is not a frame of this machine.
            KernelBug: no ``get_page`` on this folio is outstanding.
        """
        self._check_pfn(pfn, "put_page")
        head = self.head(pfn)
        held = self.extra_refs.get(head, 0)
        if held <= 0:
            raise KernelBug(f"put_page on {pfn:#x} without a matching get_page")
        if held == 1:
            del self.extra_refs[head]
        else:
            self.extra_refs[head] = held - 1
        self.put_one(head)

    def folio_mark_dirty(self, pfn: int) -> None:
        """``folio_mark_dirty``: a device stored into the page, so its folio is dirty.

        Drivers call it for pages their device wrote through a DMA or
        device mapping, as ODP's unmap path calls ``set_page_dirty``:
        otherwise reclaim could drop a clean-looking page and lose the store.
        """
        self._check_pfn(pfn, "folio_mark_dirty")
        self.flags[self.head(pfn)] |= np.uint16(PG_dirty)

    def get(self, heads: NDArray[np.int64], n: int = 1) -> None:
        np.add.at(self.refcount, heads, n)

    def unmap_folios(self, heads: NDArray[np.int64]) -> None:
        """One mapping of each entry's folio is gone: mapcount and reference drop."""
        if len(heads) == 0:
            return
        if self.order[heads].any():
            np.subtract.at(self.mapcount, heads, 1)
        else:  # order-0 folios: heads are distinct, plain fancy indexing works
            self.mapcount[heads] -= 1
        self.put(heads)

    def put(self, heads: NDArray[np.int64]) -> None:
        """Drop one reference per entry; folios reaching zero are freed."""
        if len(heads) == 0:
            return
        if self.order[heads].any():
            np.subtract.at(self.refcount, heads, 1)
        else:
            self.refcount[heads] -= 1
        rc = self.refcount[heads]
        if (rc <= 0).any():
            dead = heads[rc <= 0]
            if len(dead) > 1 and self.order[dead].any():
                dead = np.unique(dead)  # a large folio appears once per mapping
            if (self.refcount[dead] < 0).any():
                raise KernelBug("folio refcount underflow")
            self.release(dead)

    def put_one(self, head: int) -> None:
        self.refcount[head] -= 1
        rc = int(self.refcount[head])
        if rc == 0:
            self.release(np.array([head], dtype=I64))
        elif rc < 0:
            raise KernelBug(f"folio refcount underflow at pfn {head:#x}")

    def release(self, heads: NDArray[np.int64]) -> None:
        """Free folios whose last reference is gone.

        A folio freed while still counted as mapped is ``BUG: Bad page
        state`` (``free_page_is_bad``): a mapping count was never dropped.
        """
        for watch in self.free_watchers:
            watch(heads, self.order[heads].astype(I64))
        if self.mapcount[heads].any():
            bad = heads[self.mapcount[heads] != 0]
            raise KernelBug(f"BUG: Bad page state: pfn {int(bad[0]):#x} freed while mapped")
        self.mapcount[heads] = 0
        device = (self.flags[heads] & PG_zone_device) != 0
        if device.any():
            # ZONE_DEVICE folios are free at refcount 0: the driver gets them back.
            for h in heads[device].tolist():
                self.mapping[h] = 0
                span = slice(h, h + (1 << int(self.order[h])))
                self.flags[span] &= np.uint16(~(PG_anon | PG_anon_exclusive | PG_locked) & 0xFFFF)
                pgmap = self.pgmap_of(h)
                if pgmap is not None and pgmap.ops is not None:
                    pgmap.ops.folio_free(h)
            heads = heads[~device]
            if len(heads) == 0:
                return
        orders = self.order[heads]
        hugetlb = (self.flags[heads] & PG_hugetlb) != 0
        for order in np.unique(orders) if orders.any() else (0,):
            sel = (orders == order) & ~hugetlb
            if sel.any():
                hs = heads[sel]
                self.allocator.free(hs, int(order))
                self.costs.pages_freed += len(hs) << int(order)
        if hugetlb.any():
            for h in heads[hugetlb]:
                self.hugetlb_release[int(self.order[h])].free_page(int(h))
        poisoned = (self.flags[heads] & PG_hwpoison) != 0
        if poisoned.any():
            # A poisoned frame never goes back into circulation.
            for h in heads[poisoned]:
                self.allocator.reserve(int(h), 1 << int(self.order[h]))

    # ----- contents ----------------------------------------------------------
    def read_pages(self, pfns: NDArray[np.int64]) -> NDArray[np.uint8]:
        """Contents of whole pages, shape (len(pfns), PAGE_SIZE)."""
        if self.arena is None:
            return np.zeros((len(pfns), PAGE_SIZE), dtype=np.uint8)
        out = self.arena.gather(pfns)
        zeroed = (self.flags[pfns] & PG_zeroed) != 0
        if zeroed.any():
            out[zeroed] = 0
        return out

    def read(self, pfn: int, offset: int, length: int) -> bytes:
        if self.arena is None or self.flags[pfn] & PG_zeroed:
            return bytes(length)
        return self.arena.page(pfn)[offset : offset + length].tobytes()

    def _materialize(self, pfns: NDArray[np.int64]) -> None:
        assert self.arena is not None
        zeroed = (self.flags[pfns] & PG_zeroed) != 0
        if zeroed.any():
            z = pfns[zeroed]
            self.arena.scatter(z, 0)
            self.flags[z] &= np.uint16(~PG_zeroed & 0xFFFF)

    def write(self, pfn: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.arena is None:
            return
        self._materialize(np.array([pfn], dtype=I64))
        self.arena.page(pfn)[offset : offset + len(data)] = np.frombuffer(data, dtype=np.uint8)

    def write_pages(self, pfns: NDArray[np.int64], data: NDArray[np.uint8]) -> None:
        """Overwrite whole pages (``data`` has shape (len(pfns), PAGE_SIZE))."""
        if self.arena is None:
            return
        self.arena.scatter(pfns, data)
        self.flags[pfns] &= np.uint16(~PG_zeroed & 0xFFFF)

    def copy_pages(self, dst: NDArray[np.int64], src: NDArray[np.int64]) -> None:
        """Copy page contents (``copy_highpage``), keeping lazy zeroes lazy."""
        self.costs.pages_copied += len(dst)
        self.costs.bytes_copied += len(dst) * PAGE_SIZE
        if self.arena is None:
            return
        if len(dst) == 1:
            # One page (a fault's migration): scalars beat building masks.
            d, s = int(dst[0]), int(src[0])
            if self.flags[s] & PG_zeroed:
                self.flags[d] |= np.uint16(PG_zeroed)
            else:
                self.arena.page(d)[:] = self.arena.page(s)
                self.flags[d] &= np.uint16(~PG_zeroed & 0xFFFF)
            return
        src_zero = (self.flags[src] & PG_zeroed) != 0
        keep = ~src_zero
        if keep.any():
            self.arena.scatter(dst[keep], self.arena.gather(src[keep]))
            self.flags[dst[keep]] &= np.uint16(~PG_zeroed & 0xFFFF)
        if src_zero.any():
            self.flags[dst[src_zero]] |= np.uint16(PG_zeroed)

    def zero_pages(self, pfns: NDArray[np.int64]) -> None:
        self.flags[pfns] |= np.uint16(PG_zeroed)

    def split_folio_metadata(self, head: int, counts: NDArray[np.int32]) -> NDArray[np.int64]:
        """Turn a large folio into order-0 folios (``__split_folio_to_order``).

        ``counts[i]`` is the number of mappings of page i, which becomes its
        mapcount and refcount; folio flags, the rmap key (mapping, index + i)
        move to every page. Returns the pages.
        """
        nr = 1 << int(self.order[head])
        pages = np.arange(head, head + nr, dtype=I64)
        folio_flags = np.uint16(int(self.flags[head]) & ~PER_PAGE_FLAGS)
        self.flags[pages] = (self.flags[pages] & np.uint16(PER_PAGE_FLAGS)) | folio_flags
        self.order[pages] = 0
        self.mapcount[pages] = counts
        self.refcount[pages] = counts
        self.mapping[pages] = self.mapping[head]
        self.index[pages] = self.index[head] + np.arange(nr, dtype=I64)
        return pages

    def folio_pages(self, head: int) -> NDArray[np.int64]:
        return np.arange(head, head + (1 << int(self.order[head])), dtype=I64)
