"""Files and their page cache; shmem (shared anonymous memory) is a file too.

Kernel counterpart: ``struct address_space`` and mm/filemap.c (page cache,
``filemap_fault``), mm/truncate.c (``truncate_pagecache``; hole punching via
``unmap_mapping_range``), mm/page-writeback.c (``page_mkclean`` on sync) and
mm/shmem.c for ``MAP_SHARED|MAP_ANONYMOUS``.

A ``File`` has a size, a page cache (one pfn slot per file page, -1 when not
cached) and a backing store (what is "on disk": the pages written back). Its
``i_mmap`` is the set of VMAs that map it, used by truncation, writeback and
the reverse map. A page-cache page holds one reference for the cache.

Shared writable mappings of a regular file are write-notified as in Linux: a
read fault maps the page read-only, the first write marks it dirty and makes
the PTE writable, and ``sync()`` cleans it and write-protects the PTEs again
(``PROTECTION_PAGE`` per page and mapping). shmem is not write-notified.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import attrs
import numpy as np
from numpy.typing import NDArray

from .. import sched
from ..errors import InvalidArgument
from ..notifier import MMU_NOTIFY_CLEAR, MMU_NOTIFY_PROTECTION_PAGE, invalidation
from .pagetable import PAGE_SHIFT, PAGE_SIZE, PTE_DIRTY, PTE_WRITE, U64
from .physmem import PG_dirty, PG_swapbacked, PG_uptodate
from .rmap import rmap_walk
from .zap import zap_range

if TYPE_CHECKING:
    from ..machine import Machine
    from .vma import Vma


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
    cache: NDArray[np.int64] = attrs.field(init=False)
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
        self.cache = np.full(self._cache_slots(self.size), -1, dtype=np.int64)

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
        return int(self.cache[index]) if index < len(self.cache) else -1

    def get_pages(self, indices: NDArray[np.int64]) -> NDArray[np.int64]:
        """pfns caching ``indices``, reading missing pages in with one allocation."""
        if self.hugetlb_order:
            raise InvalidArgument("hugetlbfs pages are faulted by the hugetlb path")
        if len(indices) and int(indices.max()) >= len(self.cache):
            raise InvalidArgument(f"page index beyond the end of {self!r}")
        pfns = self.cache[indices]
        missing = pfns < 0
        if missing.any():
            self._read_in(np.unique(indices[missing]))
            pfns = self.cache[indices]
        return pfns

    def _read_in(self, idx: NDArray[np.int64]) -> None:
        phys = self.machine.phys
        new = phys.alloc(0, len(idx))
        flags = PG_uptodate | (PG_swapbacked if self.shmem else 0)
        phys.flags[new] |= np.uint16(flags)
        phys.mapping[new] = self.id
        phys.index[new] = idx
        self.cache[idx] = new
        if self.backing:
            for i, pfn in zip(idx.tolist(), new.tolist(), strict=True):
                data = self.backing.get(i)
                if data is not None:
                    phys.write(pfn, 0, data)

    def _resize_cache(self, size: int) -> None:
        slots = self._cache_slots(size)
        if slots > len(self.cache):
            grown = np.full(slots, -1, dtype=np.int64)
            grown[: len(self.cache)] = self.cache
            self.cache = grown
        else:
            self.cache = self.cache[:slots].copy()

    # ----- syscalls ---------------------------------------------------------------
    def pwrite(self, offset: int, data: bytes) -> int:
        """``pwrite(2)`` through the page cache; extends the file as needed."""
        if offset < 0:
            raise InvalidArgument("negative file offset")
        if self.hugetlb_order:
            raise InvalidArgument("hugetlbfs files cannot be written with write(2)")
        end = offset + len(data)
        if end > self.size:
            self.size = end
            self._resize_cache(end)
        phys = self.machine.phys
        pos = offset
        view = memoryview(bytes(data))
        while pos < end:
            index, off = divmod(pos, PAGE_SIZE)
            chunk = min(PAGE_SIZE - off, end - pos)
            pfn = int(self.get_pages(np.array([index], dtype=np.int64))[0])
            phys.write(pfn, off, view[pos - offset : pos - offset + chunk])
            phys.flags[pfn] |= np.uint16(PG_dirty)
            pos += chunk
        return len(data)

    def pread(self, offset: int, length: int) -> bytes:
        """``pread(2)`` through the page cache; short at end of file."""
        if offset < 0 or length < 0:
            raise InvalidArgument("negative file offset or length")
        end = min(self.size, offset + length)
        if end <= offset:
            return b""
        first, last = offset // PAGE_SIZE, (end - 1) // PAGE_SIZE
        pfns = self.get_pages(np.arange(first, last + 1, dtype=np.int64))
        data = self.machine.phys.read_pages(pfns).reshape(-1)
        base = first * PAGE_SIZE
        return data[offset - base : end - base].tobytes()

    def truncate(self, size: int) -> None:
        """``ftruncate(2)``: shrinking drops pages from every mapping, COW copies too."""
        if size < 0:
            raise InvalidArgument("negative file size")
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
        phys = self.machine.phys
        seg = self.cache[first:last]
        cached = seg[seg >= 0]
        for i in [i for i in self.backing if first <= i < last]:
            del self.backing[i]
        if len(cached):
            seg[seg >= 0] = -1
            phys.mapping[cached] = 0
            phys.put(cached)

    def release(self) -> None:
        """The last reference to an unlinked object is gone: free its pages."""
        self.machine.files.remove(self)
        self.machine.mappings.pop(self.id, None)
        self._drop_cache(0, len(self.cache))
        if self.hugetlb_resv is not None:
            self.hugetlb_resv.release(0, len(self.cache))

    def sync(self) -> int:
        """``fsync(2)``: write dirty pages back, write-protecting shared mappings.

        Returns the number of pages written back.
        """
        phys = self.machine.phys
        cached = self.cache[self.cache >= 0]
        # shmem and unnotified mappings carry dirtiness in PTE dirty bits.
        for vma in self.i_mmap:
            if vma.is_shared:
                _collect_pte_dirty(vma)
        dirty = cached[(phys.flags[cached] & PG_dirty) != 0]
        for pfn in dirty.tolist():
            page_mkclean(self.machine, pfn)
            self.backing[int(phys.index[pfn])] = phys.read(pfn, 0, PAGE_SIZE)
            phys.flags[pfn] &= np.uint16(~PG_dirty & 0xFFFF)
        return len(dirty)


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
