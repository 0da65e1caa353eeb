"""Files and their page cache; shmem (shared anonymous memory) is a file too.

Kernel counterpart: ``struct address_space`` and mm/filemap.c (page cache,
``filemap_fault``), mm/truncate.c (``truncate_pagecache``; hole punching via
``unmap_mapping_range``), mm/page-writeback.c (``page_mkclean`` on sync) and
mm/shmem.c for ``MAP_SHARED|MAP_ANONYMOUS``.

A ``File`` has a size, a page cache (a sparse ``PageCache``: the pfn caching
each file page, -1 when not cached) and a backing store (what is "on disk":
the pages written back). Its ``i_mmap`` is the set of VMAs that map it, used
by truncation, writeback and the reverse map. A page-cache page holds one
reference for the cache.

Sizes are bounded by the file system's ``s_maxbytes``: regular files model
ext4 with 4 KiB blocks (16 TiB - 4 KiB), shmem and hugetlbfs objects allow
``MAX_LFS_FILESIZE`` (2**63 - 1). A write starting at or past the limit,
a truncate beyond it, or a file created bigger fails with EFBIG; a write
crossing it is cut short, as ``generic_write_check_limits`` does.

Shared writable mappings of a regular file are write-notified as in Linux: a
read fault maps the page read-only, the first write marks it dirty and makes
the PTE writable, and ``sync()`` cleans it and write-protects the PTEs again
(``PROTECTION_PAGE`` per page and mapping). shmem is not write-notified.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Final

import attrs
import numpy as np
from numpy.typing import NDArray

from .. import sched
from ..errors import FileTooLarge, InvalidArgument, KernelBug
from ..notifier import MMU_NOTIFY_CLEAR, MMU_NOTIFY_PROTECTION_PAGE, invalidation
from .pagetable import PAGE_SHIFT, PAGE_SIZE, PTE_DIRTY, PTE_WRITE, U64
from .physmem import PG_dirty, PG_swapbacked, PG_uptodate
from .rmap import rmap_walk
from .zap import zap_range

if TYPE_CHECKING:
    from ..machine import Machine
    from .vma import Vma


#: ``MAX_LFS_FILESIZE`` on 64-bit: the largest ``loff_t``.
MAX_LFS_FILESIZE: Final = (1 << 63) - 1
#: ``s_maxbytes`` of ext4 with 4 KiB blocks (2**32 - 1 blocks).
EXT4_MAXBYTES: Final = (1 << 44) - PAGE_SIZE


class PageCache:
    """The pfns caching a file's pages: a sparse two-level array (``i_pages``).

    Slots are grouped in chunks of ``CHUNK`` pages; a chunk exists only while
    it caches a page, so a file's size costs nothing and one page at offset
    2**62 costs one chunk. Lookups and updates take index arrays and work
    chunk by chunk (vectorised within each). ``len()`` is the number of slots
    (the file size in cache units); an int index reads or writes one slot.
    """

    SHIFT: ClassVar[int] = 12
    CHUNK: ClassVar[int] = 1 << SHIFT

    def __init__(self, nslots: int) -> None:
        self.nslots = nslots
        self.chunks: dict[int, NDArray[np.int64]] = {}

    def __len__(self) -> int:
        return self.nslots

    def __getitem__(self, index: int) -> int:
        i = operator.index(index)
        arr = self.chunks.get(i >> self.SHIFT)
        return -1 if arr is None else int(arr[i & (self.CHUNK - 1)])

    def __setitem__(self, index: int, pfn: int) -> None:
        i = operator.index(index)
        self.set(np.array([i], dtype=np.int64), np.array([pfn], dtype=np.int64))

    def __repr__(self) -> str:
        return f"PageCache(slots={self.nslots}, cached={self.count()})"

    def _groups(self, idx: NDArray[np.int64]) -> Iterator[tuple[int, Any]]:
        """(chunk, selector of ``idx``) for every chunk that ``idx`` touches."""
        c = idx >> self.SHIFT
        if len(c) == 0:
            return
        first = int(c[0])
        if (c == first).all():
            yield first, slice(None)
            return
        if (c[1:] >= c[:-1]).all():
            order = None
            cs = c
        else:
            order = np.argsort(c, kind="stable")
            cs = c[order]
        bounds = (np.flatnonzero(cs[1:] != cs[:-1]) + 1).tolist()
        for lo, hi in zip([0, *bounds], [*bounds, len(cs)], strict=True):
            yield int(cs[lo]), (slice(lo, hi) if order is None else order[lo:hi])

    def get(self, idx: NDArray[np.int64]) -> NDArray[np.int64]:
        """pfns caching ``idx`` (-1 where not cached)."""
        out = np.full(len(idx), -1, dtype=np.int64)
        if not self.chunks:
            return out
        mask = self.CHUNK - 1
        for chunk, sel in self._groups(idx):
            arr = self.chunks.get(chunk)
            if arr is not None:
                out[sel] = arr[idx[sel] & mask]
        return out

    def set(self, idx: NDArray[np.int64], pfns: NDArray[np.int64]) -> None:
        """Cache ``pfns`` at ``idx`` (-1 removes); empty chunks are dropped."""
        mask = self.CHUNK - 1
        for chunk, sel in self._groups(idx):
            vals = pfns[sel]
            arr = self.chunks.get(chunk)
            if arr is None:
                if (vals < 0).all():
                    continue
                arr = self.chunks[chunk] = np.full(self.CHUNK, -1, dtype=np.int64)
            arr[idx[sel] & mask] = vals
            if (vals < 0).any() and (arr < 0).all():
                del self.chunks[chunk]

    def cached(self, first: int = 0, last: int | None = None) -> tuple[NDArray[np.int64], ...]:
        """(indices, pfns) of the cached slots in [first, last), by index."""
        last = self.nslots if last is None else last
        idx: list[NDArray[np.int64]] = []
        pfns: list[NDArray[np.int64]] = []
        if first < last:
            lo, hi = first >> self.SHIFT, (last - 1) >> self.SHIFT
            for chunk in sorted(c for c in self.chunks if lo <= c <= hi):
                arr = self.chunks[chunk]
                at = np.flatnonzero(arr >= 0) + (chunk << self.SHIFT)
                at = at[(at >= first) & (at < last)]
                idx.append(at)
                pfns.append(arr[at & (self.CHUNK - 1)])
        if not idx:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        return np.concatenate(idx), np.concatenate(pfns)

    def count(self) -> int:
        return sum(int((arr >= 0).sum()) for arr in self.chunks.values())

    def resize(self, nslots: int) -> None:
        """New number of slots; slots past it must already be uncached."""
        if nslots < self.nslots and len(self.cached(nslots)[0]):
            raise KernelBug("shrinking a page cache that still caches pages past the end")
        self.nslots = nslots


@attrs.define(eq=False, repr=False)
class File:
    """A regular file (or a shmem/hugetlbfs object) with a page cache."""

    machine: Machine
    id: int
    size: int
    shmem: bool = False
    #: Huge page order of a hugetlbfs object (its cache holds huge folios).
    hugetlb_order: int = 0
    name: str = ""
    cache: PageCache = attrs.field(init=False)
    backing: dict[int, bytes] = attrs.field(factory=dict)
    i_mmap: set[Vma] = attrs.field(factory=set)
    #: Reservations of a hugetlbfs object (a ``ResvMap``).
    hugetlb_resv: Any = None
    #: An unlinked object (shmem or hugetlbfs behind MAP_SHARED|MAP_ANONYMOUS)
    #: that goes away with its last mapping.
    anonymous: bool = False
    #: Marks page-cache files for VMAs (device files have their own mmap).
    is_page_cache: ClassVar[bool] = True

    def __attrs_post_init__(self) -> None:
        if self.size > self.max_bytes:
            raise FileTooLarge(f"size {self.size:#x} is past the file system's limit")
        self.cache = PageCache(self._cache_slots(self.size))

    def __repr__(self) -> str:
        kind = "shmem" if self.shmem else "hugetlbfs" if self.hugetlb_order else "file"
        return f"File#{self.id}({kind}, size={self.size:#x})"

    def _cache_slots(self, size: int) -> int:
        unit = PAGE_SIZE << self.hugetlb_order
        return (size + unit - 1) // unit

    @property
    def npages(self) -> int:
        """Size in base pages, rounded up."""
        return (self.size + PAGE_SIZE - 1) // PAGE_SIZE

    @property
    def max_bytes(self) -> int:
        """``s_maxbytes`` of the file system holding the file."""
        return MAX_LFS_FILESIZE if self.shmem or self.hugetlb_order else EXT4_MAXBYTES

    @property
    def writenotify(self) -> bool:
        """Shared writable mappings track dirtying through write faults."""
        return not self.shmem and not self.hugetlb_order

    # ----- file operations ------------------------------------------------------
    def mmap(self, vma: Vma) -> None:
        """``f_op->mmap``: page-cache files install their pages on fault."""
        self.i_mmap.add(vma)

    # ----- page cache -------------------------------------------------------------
    def lookup(self, index: int) -> int:
        """pfn caching page ``index``, or -1."""
        return self.cache[index] if 0 <= index < len(self.cache) else -1

    def get_pages(self, indices: NDArray[np.int64]) -> NDArray[np.int64]:
        """pfns caching ``indices``, reading missing pages in with one allocation."""
        if self.hugetlb_order:
            raise InvalidArgument("hugetlbfs pages are faulted by the hugetlb path")
        if len(indices) and int(indices.max()) >= len(self.cache):
            raise InvalidArgument(f"page index beyond the end of {self!r}")
        pfns = self.cache.get(indices)
        missing = pfns < 0
        if missing.any():
            self._read_in(np.unique(indices[missing]))
            pfns = self.cache.get(indices)
        return pfns

    def _read_in(self, idx: NDArray[np.int64]) -> None:
        phys = self.machine.phys
        new = phys.alloc(0, len(idx))
        flags = PG_uptodate | (PG_swapbacked if self.shmem else 0)
        phys.flags[new] |= np.uint16(flags)
        phys.mapping[new] = self.id
        phys.index[new] = idx
        self.cache.set(idx, new)
        if self.backing:
            for i, pfn in zip(idx.tolist(), new.tolist(), strict=True):
                data = self.backing.get(i)
                if data is not None:
                    phys.write(pfn, 0, data)

    def _resize_cache(self, size: int) -> None:
        self.cache.resize(self._cache_slots(size))

    # ----- syscalls ---------------------------------------------------------------
    def pwrite(self, offset: int, data: bytes) -> int:
        """``pwrite(2)`` through the page cache; extends the file as needed.

        Returns the number of bytes written: fewer than ``len(data)`` when the
        write crosses ``max_bytes`` (EFBIG when it starts at or past it).
        """
        self._check_rw(offset, len(data))
        if self.hugetlb_order:
            raise InvalidArgument("hugetlbfs files cannot be written with write(2)")
        if not data:
            return 0
        if offset >= self.max_bytes:
            raise FileTooLarge(f"write at {offset:#x}: past the file system's limit")
        data = bytes(data[: self.max_bytes - offset])
        end = offset + len(data)
        if end > self.size:
            self.size = end
            self._resize_cache(end)
        first, last = offset // PAGE_SIZE, (end - 1) // PAGE_SIZE
        pfns = self.get_pages(np.arange(first, last + 1, dtype=np.int64))
        phys = self.machine.phys
        off = offset - first * PAGE_SIZE
        if off == 0 and end % PAGE_SIZE == 0:
            pages = np.frombuffer(data, dtype=np.uint8)
        else:
            pages = phys.read_pages(pfns).reshape(-1)
            pages[off : off + len(data)] = np.frombuffer(data, dtype=np.uint8)
        phys.write_pages(pfns, pages.reshape(len(pfns), PAGE_SIZE))
        phys.flags[pfns] |= np.uint16(PG_dirty)
        return len(data)

    def pread(self, offset: int, length: int) -> bytes:
        """``pread(2)`` through the page cache; short at end of file.

        Holes of a shmem object read as zeros without being allocated
        (``SGP_READ``); a regular file reads every page into the cache.
        """
        self._check_rw(offset, length)
        end = min(self.size, offset + length)
        if end <= offset:
            return b""
        first, last = offset // PAGE_SIZE, (end - 1) // PAGE_SIZE
        indices = np.arange(first, last + 1, dtype=np.int64)
        if self.shmem:
            pfns = self.cache.get(indices)
            if self.backing and (pfns < 0).any():
                # Written-back ("swapped") pages come back in; holes stay holes.
                stored = (pfns < 0) & np.isin(indices, np.fromiter(self.backing, np.int64))
                pfns[stored] = self.get_pages(indices[stored])
        else:
            pfns = self.get_pages(indices)
        data = np.zeros((len(indices), PAGE_SIZE), dtype=np.uint8)
        cached = pfns >= 0
        if cached.any():
            data[cached] = self.machine.phys.read_pages(pfns[cached])
        base = first * PAGE_SIZE
        return data.reshape(-1)[offset - base : end - base].tobytes()

    @staticmethod
    def _check_rw(offset: int, length: int) -> None:
        """``rw_verify_area``: no negative offset, no offset + length past 2**63 - 1."""
        if offset < 0 or length < 0:
            raise InvalidArgument("negative file offset or length")
        if offset + length > MAX_LFS_FILESIZE:
            raise InvalidArgument(f"offset {offset:#x} + length {length:#x} overflows loff_t")

    def truncate(self, size: int) -> None:
        """``ftruncate(2)``: shrinking drops pages from every mapping, COW copies too."""
        if size < 0:
            raise InvalidArgument("negative file size")
        if size > self.max_bytes:
            raise FileTooLarge(f"size {size:#x} is past the file system's limit")
        if self.hugetlb_order and size % (PAGE_SIZE << self.hugetlb_order):
            raise InvalidArgument("hugetlbfs sizes are multiples of the huge page size")
        sched.point("truncate")
        old_npages = self.npages
        if size < self.size:
            first = (size + PAGE_SIZE - 1) // PAGE_SIZE
            self.size = size
            unmap_mapping_range(self, first, old_npages, even_cows=True)
            self._drop_cache(first, old_npages)
            if size % PAGE_SIZE:
                # The partial last page keeps only the bytes before EOF.
                index = size // PAGE_SIZE
                pfn = self.lookup(index)
                tail = PAGE_SIZE - size % PAGE_SIZE
                if pfn >= 0:
                    self.machine.phys.write(pfn, size % PAGE_SIZE, bytes(tail))
                elif index in self.backing:
                    kept = self.backing[index][: size % PAGE_SIZE]
                    self.backing[index] = kept + bytes(tail)
        else:
            self.size = size
        self._resize_cache(size)

    def punch_hole(self, offset: int, length: int) -> None:
        """``fallocate(PUNCH_HOLE)``: zero a page-aligned range, drop its pages.

        Private mappings keep their anonymous COW copies (``even_cows=0``).
        """
        if offset % PAGE_SIZE or length % PAGE_SIZE or length <= 0 or offset < 0:
            raise InvalidArgument("hole punch range must be page aligned and non-empty")
        first = offset // PAGE_SIZE
        last = min(self.npages, first + length // PAGE_SIZE)
        if first >= last:
            return
        sched.point("punch_hole")
        unmap_mapping_range(self, first, last, even_cows=False)
        self._drop_cache(first, last)

    def _drop_cache(self, first: int, last: int) -> None:
        """Drop file pages [first, last) (base-page indices) from cache and backing."""
        phys = self.machine.phys
        for i in [i for i in self.backing if first <= i < last]:
            del self.backing[i]
        unit = 1 << self.hugetlb_order
        idx, cached = self.cache.cached(first // unit, (last + unit - 1) // unit)
        if len(cached) and not self.hugetlb_order and phys.order[cached].any():
            idx, cached = self._split_partial_folios(idx, cached, first, last)
        if len(cached):
            self.cache.set(idx, np.full(len(idx), -1, dtype=np.int64))
            # The page cache holds one reference per folio, large or small.
            heads = cached
            if not self.hugetlb_order and phys.order[cached].any():
                heads = np.unique(phys.head_of(cached))
            phys.mapping[heads] = 0
            phys.put(heads)

    def _split_partial_folios(
        self, idx: NDArray[np.int64], cached: NDArray[np.int64], first: int, last: int
    ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """Large (shmem THP) folios only partly in [first, last): split them first.

        As ``truncate_inode_partial_folio``: the folio is split into order-0
        folios (their PMD mappings are gone already, the caller zapped the
        range) so that only the pages in the range leave the cache; a folio
        that cannot be split (extra references) stays whole and cached, its
        pages in the range zeroed. Returns the (indices, pfns) to drop.
        """
        phys = self.machine.phys
        heads = np.unique(phys.head_of(cached))
        keep = np.ones(len(idx), dtype=np.bool_)
        for head in heads[phys.order[heads] > 0].tolist():
            nr = 1 << int(phys.order[head])
            start = int(phys.index[head])
            if first <= start and start + nr <= last:
                continue
            inside = (cached >= head) & (cached < head + nr)
            if phys.refcount[head] != phys.mapcount[head] + 1:
                phys.zero_pages(cached[inside])
                keep &= ~inside
                continue
            counts = np.zeros(nr, dtype=np.int32)
            for hit in rmap_walk(self.machine, head):
                np.add.at(counts, hit.pfns - head, 1)
            pages = phys.split_folio_metadata(head, counts)
            phys.refcount[pages] += 1  # each page keeps its page-cache reference
        return idx[keep], cached[keep]

    def release(self) -> None:
        """The last reference to an unlinked object is gone: free its pages."""
        self.machine.files.remove(self)
        self.machine.mappings.pop(self.id, None)
        self._drop_cache(0, len(self.cache) << self.hugetlb_order)
        if self.hugetlb_resv is not None:
            self.hugetlb_resv.release(0, len(self.cache))

    def sync(self) -> int:
        """``fsync(2)``: write dirty pages back, write-protecting shared mappings.

        Returns the number of pages written back.
        """
        phys = self.machine.phys
        cached = self.cache.cached()[1]
        # shmem and unnotified mappings carry dirtiness in PTE dirty bits.
        for vma in self.i_mmap:
            if vma.is_shared:
                _collect_pte_dirty(vma)
        heads = phys.head_of(cached)
        dirty = (phys.flags[heads] & PG_dirty) != 0
        # A large folio (a shmem THP) is dirty as a whole: every page is written.
        dirty_heads = np.unique(heads[dirty]).tolist()
        for head in dirty_heads:
            page_mkclean(self.machine, head)
        for pfn, head in zip(cached[dirty].tolist(), heads[dirty].tolist(), strict=True):
            index = int(phys.index[head]) + pfn - head
            self.backing[index] = phys.read(pfn, 0, PAGE_SIZE)
        for head in dirty_heads:
            pages = phys.folio_pages(head)
            phys.flags[pages] &= np.uint16(~PG_dirty & 0xFFFF)
        return int(dirty.sum())


def _collect_pte_dirty(vma: Vma) -> None:
    walk = vma.mm.pt.walk(vma.start_vpn, vma.npages)
    dirty = (walk.entries & U64(PTE_DIRTY)) != 0
    if dirty.any():
        phys = vma.mm.machine.phys
        pfns = walk.pfns()[dirty]
        pfns = pfns[~phys.zero_mask(pfns)]
        phys.flags[phys.head_of(pfns)] |= np.uint16(PG_dirty)


def page_mkclean(machine: Machine, pfn: int) -> None:
    """Write-protect and clean every shared mapping of a page (``PROTECTION_PAGE``)."""
    for hit in rmap_walk(machine, pfn):
        if not hit.vma.is_shared:
            continue
        mm = hit.vma.mm
        for vpn, loc in zip(hit.vpns.tolist(), hit.locs.tolist(), strict=True):
            e = mm.pt.get(loc)
            if not e & (PTE_WRITE | PTE_DIRTY):
                continue
            addr = vpn << PAGE_SHIFT
            with invalidation(mm, MMU_NOTIFY_PROTECTION_PAGE, addr, addr + PAGE_SIZE):
                mm.pt.set(loc, mm.pt.get(loc) & ~(PTE_WRITE | PTE_DIRTY))
                machine.costs.pte_writes += 1


def unmap_mapping_range(f: File, first: int, last: int, *, even_cows: bool) -> None:
    """Zap file pages [first, last) from every VMA mapping them (``CLEAR``)."""
    for vma in sorted(f.i_mmap, key=lambda v: (v.mm.id, v.start)):
        lo = max(first, vma.pgoff)
        hi = min(last, vma.pgoff + vma.npages)
        if lo >= hi:
            continue
        start_vpn = vma.start_vpn + lo - vma.pgoff
        npages = hi - lo
        start = start_vpn << PAGE_SHIFT
        with invalidation(vma.mm, MMU_NOTIFY_CLEAR, start, start + (npages << PAGE_SHIFT)):
            zap_range(vma, start_vpn, npages, even_cows=even_cows)
