"""The GPU page table of an SVM client: PFNMAP, PFNCLR, TLB flushes, GPU loads and stores.

Kernel counterpart: nvkm's gp100 VMM as ``NVIF_VMM_V0_PFNMAP`` and
``NVIF_VMM_V0_PFNCLR`` reach it (``nvkm/subdev/mmu/vmmgp100.c``:
``gp100_vmm_pgt_pfn`` for 4 KiB PTEs, ``gp100_vmm_pd0_pfn`` for 2 MiB PD0
entries).

* A PFNMAP writes one entry per word at a page shift of 12 or 21; those are
  the only sizes the gp100 PFN writers have. A word without V unmaps. For a
  HOST-aperture word nvkm DMA-maps the page (4 KiB or 2 MiB) through the DMA
  API when it writes the PTE and stores the bus address; a VRAM word holds
  the page's VRAM address.
* A PFNCLR marks the entries invalid, flushes the GPU TLB, and only then
  DMA-unmaps the host pages they pointed at.
* A GPU load or store walks this table: 4 KiB PTEs first, then the PD0
  entry. Reads need V, writes W, atomics A. Host memory is reached only
  through the entry's bus address (``hmmsim.dma``), so an access through a
  stale entry is caught as an IOMMU fault.

Not verified against nvkm, modelled conservatively: writing a 2 MiB entry
clears the 4 KiB PTEs below it, and writing a 4 KiB PTE under a live 2 MiB
entry clears that entry first, each with a TLB flush before the unmaps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import attrs
from hmmsim.dma import (
    DMA_BIDIRECTIONAL,
    dma_map_page,
    dma_mapping_error,
    dma_read,
    dma_unmap_page,
    dma_write,
)
from hmmsim.errors import InvalidArgument, OutOfMemory

from .uapi import (
    NVIF_VMM_PFNMAP_V0_A,
    NVIF_VMM_PFNMAP_V0_ADDR,
    NVIF_VMM_PFNMAP_V0_APER,
    NVIF_VMM_PFNMAP_V0_V,
    NVIF_VMM_PFNMAP_V0_VRAM,
    NVIF_VMM_PFNMAP_V0_W,
)

if TYPE_CHECKING:
    from hmmsim.driver import MirrorStats

    from .device import NouveauDrm

PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT
#: The page shifts the gp100 PFN writers implement: PTE and PD0.
PFN_SHIFTS: Final = (12, 21)
_PD0_ORDER: Final = 9


@attrs.define(slots=True)
class GpuPte:
    """One valid GPU page-table entry (a PTE or a PD0 entry)."""

    #: The PFNMAP word it was written from (V/W/A, aperture, address).
    word: int
    shift: int
    #: Backdoor: the first page it maps (system or device pfn), for ``device_ptes``.
    pfn: int
    #: HOST aperture: the bus address nvkm mapped and must unmap after a flush.
    dma_addr: int | None = None

    @property
    def vram(self) -> bool:
        return (self.word & NVIF_VMM_PFNMAP_V0_APER) == NVIF_VMM_PFNMAP_V0_VRAM


class GpuFault(Exception):
    """A GPU access the page table cannot satisfy (the hardware raises a fault)."""


class GpuVmm:
    """``nvkm_vmm`` of one SVM client, with the DMA mappings its entries hold."""

    def __init__(self, drm: NouveauDrm, stats: MirrorStats) -> None:
        self.drm = drm
        self.stats = stats
        self.ptes: dict[int, GpuPte] = {}
        self.pd0: dict[int, GpuPte] = {}
        self.tlb_flushes = 0
        self.pfnmap_calls = 0
        self.pfnclr_calls = 0

    def __len__(self) -> int:
        return len(self.ptes) + len(self.pd0)

    # ----- writing -------------------------------------------------------------------
    def pfnmap(self, addr: int, page_shift: int, words: list[int]) -> None:
        """``NVIF_VMM_V0_PFNMAP``: one entry per word from ``addr`` at ``page_shift``.

        Raises:
            InvalidArgument: a page shift the GPU PTE writers lack, or an
                unaligned address.
            OutOfMemory: a host page could not be DMA-mapped.
        """
        if page_shift not in PFN_SHIFTS:
            raise InvalidArgument(f"nvkm: PFNMAP with page shift {page_shift} is not supported")
        size = 1 << page_shift
        if addr % size:
            raise InvalidArgument(f"nvkm: PFNMAP at {addr:#x} is not aligned to {size:#x}")
        self.pfnmap_calls += 1
        stale: list[GpuPte] = []
        try:
            for i, word in enumerate(words):
                a = addr + i * size
                stale += self._take(a, size)
                if word & NVIF_VMM_PFNMAP_V0_V:
                    self._write(a, page_shift, word)
        finally:
            # Even when a later entry fails, the replaced ones are flushed
            # and unmapped: nothing the GPU can no longer reach stays mapped.
            self._flush_and_unmap(stale)

    def _write(self, addr: int, shift: int, word: int) -> None:
        drm = self.drm
        target = word & NVIF_VMM_PFNMAP_V0_ADDR
        if (word & NVIF_VMM_PFNMAP_V0_APER) == NVIF_VMM_PFNMAP_V0_VRAM:
            pfn = drm.dmem.vram_to_pfn(target)
            pte = GpuPte(word, shift, pfn)
        else:
            pfn = target >> PAGE_SHIFT
            bus = dma_map_page(drm.dma, pfn, 0, 1 << shift, DMA_BIDIRECTIONAL)
            if dma_mapping_error(drm.dma, bus):
                raise OutOfMemory(f"nvkm: cannot DMA-map pfn {pfn:#x} for the GPU")
            pte = GpuPte(word, shift, pfn, bus)
            self.stats.dma_maps += 1
        if shift == PAGE_SHIFT:
            self.ptes[addr >> PAGE_SHIFT] = pte
        else:
            self.pd0[addr >> (PAGE_SHIFT + _PD0_ORDER)] = pte
        drm.machine.costs.pte_writes += 1

    def _take(self, addr: int, size: int) -> list[GpuPte]:
        """Remove the entries overlapping [addr, addr + size) (not yet unmapped)."""
        out: list[GpuPte] = []
        first, last = addr >> PAGE_SHIFT, (addr + size - 1) >> PAGE_SHIFT
        lo, hi = first >> _PD0_ORDER, last >> _PD0_ORDER
        bigs = (
            [b for b in self.pd0 if lo <= b <= hi]
            if len(self.pd0) < hi - lo + 1
            else range(lo, hi + 1)
        )
        for big in bigs:
            pte = self.pd0.pop(big, None)
            if pte is not None:
                out.append(pte)
        if len(self.ptes) < last - first + 1:
            for vpn in [v for v in self.ptes if first <= v <= last]:
                out.append(self.ptes.pop(vpn))
        else:
            for vpn in range(first, last + 1):
                pte = self.ptes.pop(vpn, None)
                if pte is not None:
                    out.append(pte)
        return out

    def pfnclr(self, addr: int, size: int) -> int:
        """``NVIF_VMM_V0_PFNCLR``: invalidate [addr, addr + size), flush, unmap.

        Returns the number of entries cleared.
        """
        self.pfnclr_calls += 1
        stale = self._take(addr, size)
        self._flush_and_unmap(stale)
        return len(stale)

    def _flush_and_unmap(self, stale: list[GpuPte]) -> None:
        if not stale:
            return
        self.tlb_flushes += 1
        drm = self.drm
        drm.machine.costs.device_tlb_flushes += 1
        for pte in stale:
            if pte.dma_addr is not None:
                dma_unmap_page(drm.dma, pte.dma_addr, 1 << pte.shift, DMA_BIDIRECTIONAL)
        self.stats.pages_unmapped += sum(1 << (p.shift - PAGE_SHIFT) for p in stale)

    def clear_all(self) -> None:
        """Tear the page table down (the client's VMM goes away)."""
        stale = list(self.ptes.values()) + list(self.pd0.values())
        self.ptes.clear()
        self.pd0.clear()
        self._flush_and_unmap(stale)

    # ----- reading -------------------------------------------------------------------
    def lookup(self, addr: int) -> GpuPte | None:
        """The entry that translates ``addr``: a 4 KiB PTE, else the PD0 entry."""
        vpn = addr >> PAGE_SHIFT
        pte = self.ptes.get(vpn)
        if pte is None:
            pte = self.pd0.get(vpn >> _PD0_ORDER)
        return pte

    def satisfies(self, addr: int, need: int) -> bool:
        """Whether the entry at ``addr`` has every bit of ``need`` (V, W, A)."""
        pte = self.lookup(addr)
        return pte is not None and (pte.word & need) == need

    def access(self, addr: int, need: int, data: bytes | None, length: int) -> bytes:
        """A GPU load (``data`` None) or store within one page.

        Raises:
            GpuFault: the entry is missing or lacks a bit of ``need``.
        """
        pte = self.lookup(addr)
        if pte is None or (pte.word & need) != need:
            raise GpuFault(f"GPU fault at {addr:#x}")
        offset = addr & ((1 << pte.shift) - 1)
        drm = self.drm
        if pte.vram:
            pfn = pte.pfn + (offset >> PAGE_SHIFT)
            if data is None:
                return drm.machine.phys.read(pfn, offset & (PAGE_SIZE - 1), length)
            drm.machine.phys.write(pfn, offset & (PAGE_SIZE - 1), data)
            return b""
        assert pte.dma_addr is not None
        if data is None:
            return dma_read(drm.dma, pte.dma_addr + offset, length)
        dma_write(drm.dma, pte.dma_addr + offset, data)
        # Lose no store: a page the GPU wrote is dirty (a departure from nouveau,
        # which relies on the CPU PTE's dirty bit from the write fault).
        drm.machine.phys.folio_mark_dirty(pte.pfn + (offset >> PAGE_SHIFT))
        return b""


#: Bits a GPU access of each kind needs in its PTE.
NEED_READ: Final = NVIF_VMM_PFNMAP_V0_V
NEED_WRITE: Final = NVIF_VMM_PFNMAP_V0_V | NVIF_VMM_PFNMAP_V0_W
NEED_ATOMIC: Final = NVIF_VMM_PFNMAP_V0_V | NVIF_VMM_PFNMAP_V0_W | NVIF_VMM_PFNMAP_V0_A
