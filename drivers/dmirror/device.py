"""dmirror's device memory: chunks, free lists, allocation and eviction.

Kernel counterpart: ``struct dmirror_device`` and its ``dev_pagemap_ops`` in
lib/test_hmm.c (``dmirror_allocate_chunk``, ``dmirror_devmem_alloc_page``,
``dmirror_devmem_free``, ``dmirror_device_evict_chunk``,
``dmirror_device_remove_chunks``).

A ``DmirrorDevice`` owns device memory in 256 MiB chunks (``memremap_pages``)
with free lists of pages and of PMD-sized folios; a private device adds
chunks on demand, a coherent device has its one chunk. It is shared by every
open of the device (``DmirrorFile``, mirror.py).

Departure from the kernel, on purpose: ZONE_DEVICE pages in hmmsim carry
their own contents, so a private device page needs no hidden "backing"
system page; the device page table stores the device page itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import numpy as np
from hmmsim import sched
from hmmsim.driver import Device, Driver, MemoryKind
from hmmsim.errors import InvalidArgument, KernelBug, OutOfMemory
from hmmsim.memremap import (
    MEMORY_DEVICE_COHERENT,
    MEMORY_DEVICE_PRIVATE,
    DevPagemap,
    VmFault,
    memremap_pages,
    memunmap_pages,
    page_memory_kind,
    zone_device_page_init,
)
from hmmsim.migrate import (
    MIGRATE_PFN_COMPOUND,
    MIGRATE_PFN_MIGRATE,
    MIGRATE_PFN_SHIFT,
    MIGRATE_PFN_VALID,
    MIGRATE_PFN_WRITE,
    migrate_device_finalize,
    migrate_device_pages,
    migrate_device_range,
    migrate_pfn,
)
from hmmsim.mm import (
    PAGE_SIZE,
    PMD_ORDER,
    PMD_PAGES,
    VM_FAULT_SIGBUS,
    PG_locked,
    alloc_pages_nofail,
)
from numpy.typing import NDArray

from . import uapi
from .migrate import devmem_fault
from .mirror import DmirrorFile

if TYPE_CHECKING:
    from hmmsim import Machine, Process

DEVMEM_CHUNK_SIZE: Final = 256 << 20
DEVMEM_CHUNK_PAGES: Final = DEVMEM_CHUNK_SIZE // PAGE_SIZE

_U64 = np.uint64


class _Chunk:
    """One 256 MiB ``dev_pagemap`` of device memory."""

    def __init__(self, device: DmirrorDevice, pgmap: DevPagemap) -> None:
        self.device = device
        self.pgmap = pgmap
        self.removing = False

    @property
    def pfns(self) -> range:
        assert self.pgmap.range is not None
        return self.pgmap.range


class DmirrorDevice(Device):
    """``struct dmirror_device``: memory chunks and free lists shared by its opens."""

    def __init__(self, driver: Driver, machine: Machine, memory: str) -> None:
        super().__init__(driver, machine)
        if memory not in ("private", "coherent"):
            raise InvalidArgument(f"dmirror: memory must be private or coherent, not {memory!r}")
        self.memory = memory
        self.pgmap_type = MEMORY_DEVICE_PRIVATE if memory == "private" else MEMORY_DEVICE_COHERENT
        self.chunks: list[_Chunk] = []
        self.free_pages: list[int] = []
        #: Pages never handed out yet, as ranges taken from the front: a new
        #: chunk costs nothing until its pages are used.
        self.fresh_pages: list[range] = []
        self.free_folios: list[int] = []
        self.calloc = 0
        self.cfree = 0
        #: Which mirror migrated each device page in (``zone_device_data``).
        self.page_mirror: dict[int, DmirrorFile] = {}
        self.files: list[DmirrorFile] = []
        self.lock = sched.Mutex(f"dmirror{self.owner_id}.devmem_lock")
        self._add_chunk(with_folios=False)

    def __repr__(self) -> str:
        return f"DmirrorDevice(#{self.owner_id}, {self.memory})"

    # ----- chunks and allocation -------------------------------------------------
    def _add_chunk(self, with_folios: bool) -> bool:
        if self.memory == "coherent" and self.chunks:
            return False  # a coherent device has only its special-purpose memory
        pgmap = DevPagemap(self.pgmap_type, owner=self, ops=self)
        r = memremap_pages(self.machine, pgmap, DEVMEM_CHUNK_PAGES)
        self.chunks.append(_Chunk(self, pgmap))
        if with_folios:
            self.free_folios.extend(range(r.stop - PMD_PAGES, r.start - 1, -PMD_PAGES))
        else:
            self.fresh_pages.append(r)
        return True

    def _take_free(self, order: int) -> int | None:
        """A free page (freed ones first, last freed first) or folio, or None."""
        free = self.free_folios if order else self.free_pages
        if free:
            return free.pop()
        while not order and self.fresh_pages:
            r = self.fresh_pages[-1]
            if len(r):
                self.fresh_pages[-1] = r[1:]
                return r[0]
            self.fresh_pages.pop()
        return None

    def alloc_page(self, mirror: DmirrorFile | None, order: int) -> int | None:
        """``dmirror_devmem_alloc_page``: a locked device page or folio, or None."""
        if mirror is not None and mirror.flags & uapi.HMM_DMIRROR_FLAG_FAIL_ALLOC:
            mirror.flags &= ~uapi.HMM_DMIRROR_FLAG_FAIL_ALLOC  # one shot
            return None
        pfn = self._take_free(order)
        if pfn is None and self._add_chunk(with_folios=bool(order)):
            pfn = self._take_free(order)
        if pfn is None:
            return None
        zone_device_page_init(self.machine, pfn, order)
        self.machine.phys.folio_lock(pfn)
        self.calloc += 1 << order
        return pfn

    # ----- dev_pagemap_ops ----------------------------------------------------------
    def folio_free(self, head: int) -> None:
        order = int(self.machine.phys.order[head])
        self.page_mirror.pop(head, None)
        self.cfree += 1 << order
        chunk = self._chunk_of(head)
        if chunk is None or chunk.removing:
            return
        (self.free_folios if order else self.free_pages).append(head)

    def folio_split(self, head: int, tail: int) -> None:
        owner = self.page_mirror.get(head)
        if owner is not None:
            self.page_mirror[tail] = owner

    def migrate_to_ram(self, vmf: VmFault) -> int:
        mirror = self.page_mirror.get(self.machine.phys.head(vmf.page))
        if mirror is None:
            return VM_FAULT_SIGBUS
        if mirror.closed:
            # zone_device_data still points at the dmirror its release freed:
            # dmirror_devmem_fault would read freed memory (what KASAN
            # reports). Release evicts every page it migrated in for this.
            raise KernelBug(
                f"dmirror_devmem_fault: use after free of {mirror!r}, released with "
                f"device page {vmf.page:#x} still in the process"
            )
        return devmem_fault(mirror, vmf)

    def _chunk_of(self, pfn: int) -> _Chunk | None:
        for chunk in self.chunks:
            if pfn in chunk.pfns:
                return chunk
        return None

    # ----- eviction and removal ---------------------------------------------------
    def evict_chunk(self, chunk: _Chunk) -> None:
        """``dmirror_device_evict_chunk``: every page in use goes back to RAM.

        Destinations are allocated as with ``__GFP_NOFAIL``: when RAM is
        exhausted, reclaim runs and then the OOM killer kills the process
        with the largest footprint (possibly the owner of these very pages,
        whose device pages are then simply freed). Migration is never left
        half-way: ``migrate_device_pages`` and ``migrate_device_finalize``
        always run, so no migration entry outlives the call. Only when
        nothing is left to kill (where the kernel panics) does
        ``OutOfMemory`` propagate; the pages that got no destination then
        stay in device memory, mapped as before.

        A device THP whose PMD-sized destination cannot be allocated falls
        back to 512 order-0 destinations (the kernel has no fallback: its
        compound allocation is not ``__GFP_NOFAIL``).
        """
        machine = self.machine
        n = self._handed_out(chunk)
        if n == 0:
            return
        src = np.zeros(n, dtype=_U64)
        dst = np.zeros(n, dtype=_U64)
        migrate_device_range(machine, src, chunk.pfns.start, n)
        try:
            selected = np.flatnonzero(
                (src & _U64(MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE))
                == _U64(MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE)
            )
            compound = (src[selected] & _U64(MIGRATE_PFN_COMPOUND)) != 0
            small = selected[~compound]
            self._evict_small(
                dst,
                small,
                (src[small] >> _U64(MIGRATE_PFN_SHIFT)).astype(np.int64),
                src[small] & _U64(MIGRATE_PFN_WRITE),
            )
            for i in selected[compound].tolist():
                self._evict_folio(src, dst, i)
        finally:
            # Whatever happened above, the selected pages leave their migration
            # entries: those with a destination move, the others stay.
            migrate_device_pages(machine, src, dst, n)
            migrate_device_finalize(machine, src, dst, n)

    def _evict_small(
        self,
        dst: NDArray[np.uint64],
        idx: NDArray[np.int64],
        spages: NDArray[np.int64],
        write: NDArray[np.uint64],
    ) -> None:
        """Locked order-0 copies in RAM of ``spages``, as ``dst[idx]``, ``__GFP_NOFAIL``.

        Raises ``OutOfMemory`` when nothing is left to kill, after setting the
        destinations it got (the others stay 0)."""
        if len(idx) == 0:
            return
        phys = self.machine.phys
        new = alloc_pages_nofail(self.machine, len(idx))
        got = len(new)
        phys.flags[new] |= np.uint16(PG_locked)  # fresh pages: nobody else holds them
        phys.copy_pages(new, spages[:got])
        dst[idx[:got]] = (
            (new.astype(_U64) << _U64(MIGRATE_PFN_SHIFT)) | _U64(MIGRATE_PFN_VALID) | write[:got]
        )
        if got < len(idx):
            raise OutOfMemory(
                f"dmirror: no RAM for {len(idx) - got} evicted page(s) and no process "
                "left to kill (the kernel panics here)"
            )

    def _evict_folio(self, src: NDArray[np.uint64], dst: NDArray[np.uint64], i: int) -> None:
        """The destination of a device THP: a PMD-sized folio, else 512 pages
        (``migrate_device_pages`` then splits the source folio)."""
        phys = self.machine.phys
        s = int(src[i])
        spage = s >> MIGRATE_PFN_SHIFT
        write = s & MIGRATE_PFN_WRITE
        try:
            new = phys.alloc_one(PMD_ORDER)
        except OutOfMemory:
            self._evict_small(
                dst,
                np.arange(i, i + PMD_PAGES, dtype=np.int64),
                np.arange(spage, spage + PMD_PAGES, dtype=np.int64),
                np.full(PMD_PAGES, write, dtype=_U64),
            )
            return
        phys.folio_lock(new)
        phys.copy_pages(np.arange(new, new + PMD_PAGES), np.arange(spage, spage + PMD_PAGES))
        dst[i] = _U64(migrate_pfn(new) | write | MIGRATE_PFN_COMPOUND)

    def _handed_out(self, chunk: _Chunk) -> int:
        """How many pages from the chunk's start may be in use: all but the
        never-handed-out tail. (The kernel scans the whole chunk; the pages
        of that tail have no references, so ``migrate_device_range`` would
        skip them: leaving them out only saves scanning 64 Ki free pages.)"""
        pfns = chunk.pfns
        for fresh in self.fresh_pages:
            if fresh.stop == pfns.stop and fresh.start >= pfns.start:
                return fresh.start - pfns.start
        return len(pfns)

    def evict_all(self) -> None:
        for chunk in list(self.chunks):
            self.evict_chunk(chunk)

    def remove_chunks(self) -> None:
        """``dmirror_device_remove_chunks`` (HMM_DMIRROR_RELEASE)."""
        with self.lock:
            for chunk in list(self.chunks):
                chunk.removing = True
                r = chunk.pfns
                self.free_pages = [p for p in self.free_pages if p not in r]
                self.fresh_pages = [f for f in self.fresh_pages if not (f and f[0] in r)]
                self.free_folios = [p for p in self.free_folios if p not in r]
                self.evict_chunk(chunk)
                memunmap_pages(chunk.pgmap)
            self.chunks.clear()
            self.free_pages.clear()
            self.fresh_pages.clear()
            self.free_folios.clear()

    def remove(self) -> None:
        for f in list(self.files):
            f.close()
        self.remove_chunks()

    # ----- opening ------------------------------------------------------------------
    def open(self, process: Process) -> DmirrorFile:
        return DmirrorFile(self, process)

    def kind_of_page(self, pfn: int) -> MemoryKind:
        return page_memory_kind(self.machine, pfn)
