"""nouveau_dmem: VRAM as device-private memory, migration to it and back.

Kernel counterpart: ``drivers/gpu/drm/nouveau/nouveau_dmem.c`` (mainline, about
6.15 to 6.17).

* VRAM comes in 2 MiB chunks (``DMEM_CHUNK_SIZE``). Each chunk has a pinned
  VRAM buffer and its own ``memremap_pages`` of ``MEMORY_DEVICE_PRIVATE`` pages
  with ``pgmap.owner`` = the DRM device. Chunks are made lazily, when the free
  list is empty: a new chunk puts 511 pages on the free list and hands out the
  512th. They are never freed before teardown. The free list is a singly
  linked list through ``zone_device_data``, so the page freed last is used first.
* RAM to VRAM (``NOUVEAU_SVM_BIND``): per VMA, in batches of
  ``SG_MAX_SINGLE_ALLOC`` pages, with ``MIGRATE_VMA_SELECT_SYSTEM``. For each
  page the source is DMA-mapped and copied by one copy command (a hole is
  cleared). After ``migrate_vma_pages`` and the fence, the whole batch is mapped
  on the GPU in one PFNMAP under ``svmm->mutex``: entries that did not migrate
  are NONE, which unmaps them. Then the DMA unmaps and ``migrate_vma_finalize``.
  So the GPU PTEs are written while the CPU still holds migration entries.
  Errors are ignored: migration is best effort.
* VRAM to RAM (``migrate_to_ram``, a CPU fault) moves exactly one page. If
  nothing was collected, the fault returns 0. If no zeroed page can be
  allocated, it also returns 0, and the CPU retries the fault. Otherwise,
  under ``svmm->mutex``, the GPU PTE is cleared and the copy issued. A copy
  failure is ``VM_FAULT_SIGBUS``.
* Teardown evicts every chunk with ``migrate_device_range`` and must-succeed
  destination pages.

Copies go through the DMA API: the copy engine reaches a host page only by the
bus address it was mapped at.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import numpy as np
from hmmsim.dma import (
    DMA_BIDIRECTIONAL,
    dma_map_page,
    dma_mapping_error,
    dma_read,
    dma_unmap_page,
    dma_write,
)
from hmmsim.errors import HmmsimError, OutOfMemory
from hmmsim.memremap import (
    MEMORY_DEVICE_PRIVATE,
    DevPagemap,
    VmFault,
    memremap_pages,
    memunmap_pages,
    zone_device_page_init,
)
from hmmsim.migrate import (
    MIGRATE_PFN_MIGRATE,
    MIGRATE_PFN_WRITE,
    MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
    MIGRATE_VMA_SELECT_SYSTEM,
    MigrateVma,
    migrate_device_finalize,
    migrate_device_pages,
    migrate_device_range,
    migrate_pfn,
    migrate_pfn_to_page,
    migrate_vma_finalize,
    migrate_vma_pages,
    migrate_vma_setup,
)
from hmmsim.mm import VM_FAULT_SIGBUS

from .uapi import (
    NVIF_VMM_PFNMAP_V0_ADDR_SHIFT,
    NVIF_VMM_PFNMAP_V0_NONE,
    NVIF_VMM_PFNMAP_V0_V,
    NVIF_VMM_PFNMAP_V0_VRAM,
    NVIF_VMM_PFNMAP_V0_W,
)

if TYPE_CHECKING:
    from hmmsim.mm import Vma

    from .device import NouveauDrm
    from .svm import NouveauSvmm

PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT
DMEM_CHUNK_SIZE: Final = 2 << 20
DMEM_CHUNK_NPAGES: Final = DMEM_CHUNK_SIZE >> PAGE_SHIFT
#: ``SG_MAX_SINGLE_ALLOC``: PAGE_SIZE / sizeof(struct scatterlist) on x86-64.
SG_MAX_SINGLE_ALLOC: Final = 128
_U64 = np.uint64


class _Chunk:
    """``struct nouveau_dmem_chunk``: a pinned 2 MiB VRAM buffer and its pagemap."""

    def __init__(self, pgmap: DevPagemap, vram_base: int) -> None:
        self.pgmap = pgmap
        self.vram_base = vram_base
        self.callocated = 0

    @property
    def pfns(self) -> range:
        assert self.pgmap.range is not None
        return self.pgmap.range


class NouveauDmem:
    """``struct nouveau_dmem``: chunks, the free-page list, the copy engine."""

    def __init__(self, drm: NouveauDrm, vram_bytes: int) -> None:
        self.drm = drm
        self.vram_chunks = vram_bytes // DMEM_CHUNK_SIZE
        self.chunks: list[_Chunk] = []
        #: The free list, head last (``drm->dmem->free_pages``).
        self.free_pages: list[int] = []
        #: ``page->zone_device_data``: the svmm a VRAM page was migrated for.
        self.zone_device_data: dict[int, NouveauSvmm] = {}
        #: Copy-engine commands issued (one per 4 KiB page) and clears.
        self.copies = 0
        self.clears = 0

    # ----- chunks and pages -------------------------------------------------------------
    def _chunk_alloc(self) -> int | None:
        """``nouveau_dmem_chunk_alloc``: a new chunk; returns the page it hands out."""
        if len(self.chunks) >= self.vram_chunks:
            return None  # the VRAM BO allocation fails: VRAM is full
        pgmap = DevPagemap(MEMORY_DEVICE_PRIVATE, owner=self.drm, ops=self)
        r = memremap_pages(self.drm.machine, pgmap, DMEM_CHUNK_NPAGES)
        chunk = _Chunk(pgmap, len(self.chunks) * DMEM_CHUNK_SIZE)
        self.chunks.append(chunk)
        self.free_pages.extend(range(r.start, r.stop - 1))
        chunk.callocated += 1
        return r.stop - 1

    def page_alloc_locked(self) -> int | None:
        """``nouveau_dmem_page_alloc_locked``: a locked VRAM page with refcount 1."""
        if self.free_pages:
            pfn = self.free_pages.pop()
            chunk = self._chunk_of(pfn)
            assert chunk is not None
            chunk.callocated += 1
        else:
            got = self._chunk_alloc()
            if got is None:
                return None
            pfn = got
        machine = self.drm.machine
        zone_device_page_init(machine, pfn)
        machine.phys.folio_lock(pfn)
        return pfn

    def _chunk_of(self, pfn: int) -> _Chunk | None:
        for chunk in self.chunks:
            if pfn in chunk.pfns:
                return chunk
        return None

    def page_addr(self, pfn: int) -> int:
        """``nouveau_dmem_page_addr``: the VRAM address of a device page."""
        chunk = self._chunk_of(pfn)
        assert chunk is not None, f"pfn {pfn:#x} is not VRAM"
        return chunk.vram_base + ((pfn - chunk.pfns.start) << PAGE_SHIFT)

    def vram_to_pfn(self, addr: int) -> int:
        """The device page at VRAM address ``addr`` (what a VRAM PTE points at)."""
        chunk = self.chunks[addr // DMEM_CHUNK_SIZE]
        return chunk.pfns.start + ((addr % DMEM_CHUNK_SIZE) >> PAGE_SHIFT)

    # ----- dev_pagemap_ops -----------------------------------------------------------------
    def folio_free(self, head: int) -> None:
        """``nouveau_dmem_folio_free``: the page goes back on the free list."""
        self.zone_device_data.pop(head, None)
        chunk = self._chunk_of(head)
        if chunk is None:
            return
        self.free_pages.append(head)
        chunk.callocated -= 1

    def migrate_to_ram(self, vmf: VmFault) -> int:
        """``nouveau_dmem_migrate_to_ram``: bring the one faulting page back."""
        drm = self.drm
        machine = drm.machine
        start = vmf.address & ~(PAGE_SIZE - 1)
        args = MigrateVma(
            vmf.vma,
            start,
            start + PAGE_SIZE,
            np.zeros(1, dtype=_U64),
            np.zeros(1, dtype=_U64),
            pgmap_owner=drm,
            flags=MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
            fault_page=vmf.page,
        )
        try:
            migrate_vma_setup(args)
        except HmmsimError:
            return VM_FAULT_SIGBUS
        assert args.src is not None and args.dst is not None
        if not args.cpages:
            return 0
        ret = 0
        dma_addr = None
        src = int(args.src[0])
        spage = migrate_pfn_to_page(src) if src & MIGRATE_PFN_MIGRATE else None
        try:
            dpage = machine.phys.alloc_one(0)
        except OutOfMemory:
            dpage = None  # the fault is simply retried
        if spage is not None and dpage is not None:
            machine.phys.zero_pages(np.array([dpage], dtype=np.int64))
            machine.phys.folio_lock(dpage)
            args.dst[0] = _U64(migrate_pfn(dpage))
            svmm = self.zone_device_data.get(spage)
            if svmm is not None:
                svmm.mutex.acquire()
            try:
                if svmm is not None:
                    svmm.invalidate(start, start + PAGE_SIZE)
                dma_addr = self.copy_to_host(dpage, spage)
            finally:
                if svmm is not None:
                    svmm.mutex.release()
            if dma_addr is None:
                ret = VM_FAULT_SIGBUS
            else:
                migrate_vma_pages(args)
                dma_unmap_page(drm.dma, dma_addr, PAGE_SIZE, DMA_BIDIRECTIONAL)
                if svmm is not None:
                    svmm.cli.stats.migrations_to_system += 1
        migrate_vma_finalize(args)
        return ret

    # ----- the copy engine ------------------------------------------------------------------
    def copy_to_vram(self, dpage: int, dma_addr: int) -> None:
        """One copy command: a host page (by bus address) into a VRAM page."""
        phys = self.drm.machine.phys
        phys.write(dpage, 0, dma_read(self.drm.dma, dma_addr, PAGE_SIZE))
        self.copies += 1

    def copy_to_host(self, dpage: int, spage: int) -> int | None:
        """``nouveau_dmem_copy_one``: map ``dpage`` for DMA and copy VRAM into it.

        Returns the bus address (unmapped by the caller after the fence), or
        None when the page cannot be mapped.
        """
        dma = self.drm.dma
        addr = dma_map_page(dma, dpage, 0, PAGE_SIZE, DMA_BIDIRECTIONAL)
        if dma_mapping_error(dma, addr):
            return None
        dma_write(dma, addr, self.drm.machine.phys.read(spage, 0, PAGE_SIZE))
        self.copies += 1
        return addr

    # ----- RAM to VRAM ------------------------------------------------------------------------
    def migrate_vma(self, svmm: NouveauSvmm, vma: Vma, start: int, end: int) -> None:
        """``nouveau_dmem_migrate_vma``: migrate [start, end) of one VMA in batches."""
        npages = (end - start) >> PAGE_SHIFT
        batch = min(SG_MAX_SINGLE_ALLOC, npages)
        addr = start
        while addr < end:
            nxt = min(end, addr + (batch << PAGE_SHIFT))
            n = (nxt - addr) >> PAGE_SHIFT
            args = MigrateVma(
                vma,
                addr,
                nxt,
                np.zeros(n, dtype=_U64),
                np.zeros(n, dtype=_U64),
                pgmap_owner=self.drm,
                flags=MIGRATE_VMA_SELECT_SYSTEM,
            )
            try:
                migrate_vma_setup(args)
            except HmmsimError:
                return
            if args.cpages:
                self._migrate_chunk(svmm, args)
            addr = nxt

    def _migrate_chunk(self, svmm: NouveauSvmm, args: MigrateVma) -> None:
        """``nouveau_dmem_migrate_chunk``."""
        assert args.src is not None and args.dst is not None
        n = args.npages
        dma_addrs: list[int] = []
        words = [NVIF_VMM_PFNMAP_V0_NONE] * n
        for i in range(n):
            d, word, dma_addr = self._migrate_copy_one(svmm, int(args.src[i]))
            args.dst[i] = _U64(d)
            words[i] = word
            if dma_addr is not None:
                dma_addrs.append(dma_addr)
        migrate_vma_pages(args)
        svmm.pfns_map(args.start, words)
        for dma_addr in reversed(dma_addrs):
            dma_unmap_page(self.drm.dma, dma_addr, PAGE_SIZE, DMA_BIDIRECTIONAL)
        migrate_vma_finalize(args)
        svmm.cli.stats.migrations_to_device += 1

    def _migrate_copy_one(self, svmm: NouveauSvmm, src: int) -> tuple[int, int, int | None]:
        """``nouveau_dmem_migrate_copy_one``: (dst entry, PFNMAP word, bus address)."""
        if not src & MIGRATE_PFN_MIGRATE:
            return 0, NVIF_VMM_PFNMAP_V0_NONE, None
        dpage = self.page_alloc_locked()
        if dpage is None:
            return 0, NVIF_VMM_PFNMAP_V0_NONE, None
        machine = self.drm.machine
        paddr = self.page_addr(dpage)
        spage = migrate_pfn_to_page(src)
        dma_addr = None
        if spage is not None:
            dma_addr = dma_map_page(self.drm.dma, spage, 0, PAGE_SIZE, DMA_BIDIRECTIONAL)
            if dma_mapping_error(self.drm.dma, dma_addr):
                machine.phys.folio_unlock(dpage)
                machine.phys.put_one(dpage)
                return 0, NVIF_VMM_PFNMAP_V0_NONE, None
            self.copy_to_vram(dpage, dma_addr)
        else:
            machine.phys.zero_pages(np.array([dpage], dtype=np.int64))
            self.clears += 1
        self.zone_device_data[dpage] = svmm
        word = (
            NVIF_VMM_PFNMAP_V0_V
            | NVIF_VMM_PFNMAP_V0_VRAM
            | ((paddr >> PAGE_SHIFT) << NVIF_VMM_PFNMAP_V0_ADDR_SHIFT)
        )
        if src & MIGRATE_PFN_WRITE:
            word |= NVIF_VMM_PFNMAP_V0_W
        return migrate_pfn(dpage), word, dma_addr

    # ----- teardown ---------------------------------------------------------------------------
    def evict_chunk(self, chunk: _Chunk) -> None:
        """``nouveau_dmem_evict_chunk``: every page in use back to RAM (must succeed)."""
        machine = self.drm.machine
        phys = machine.phys
        n = len(chunk.pfns)
        src = np.zeros(n, dtype=_U64)
        dst = np.zeros(n, dtype=_U64)
        migrate_device_range(machine, src, chunk.pfns.start, n)
        dma_addrs = []
        for i in np.flatnonzero((src & _U64(MIGRATE_PFN_MIGRATE)) != 0).tolist():
            spage = migrate_pfn_to_page(int(src[i]))
            if spage is None:
                continue
            dpage = phys.alloc_one(0)  # __GFP_NOFAIL
            phys.folio_lock(dpage)
            dma_addr = self.copy_to_host(dpage, spage)
            if dma_addr is None:  # the data must not be lost
                raise OutOfMemory(f"nouveau: cannot DMA-map pfn {dpage:#x} to evict VRAM")
            dma_addrs.append(dma_addr)
            dst[i] = _U64(migrate_pfn(dpage))
        migrate_device_pages(machine, src, dst, n)
        for dma_addr in dma_addrs:
            dma_unmap_page(self.drm.dma, dma_addr, PAGE_SIZE, DMA_BIDIRECTIONAL)
        migrate_device_finalize(machine, src, dst, n)

    def fini(self) -> None:
        """``nouveau_dmem_fini``: evict every chunk, then give the memory back."""
        for chunk in list(self.chunks):
            self.evict_chunk(chunk)
        self.free_pages.clear()
        for chunk in self.chunks:
            memunmap_pages(chunk.pgmap)
        self.chunks.clear()
