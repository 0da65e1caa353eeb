"""A small device with its own memory, for exercising the HMM core directly.

It does what a driver's migration code does (like dmirror's, without the
mirror): device memory from ``memremap_pages``, ``migrate_to_ram`` on CPU
faults, migration to the device and back with ``migrate_vma_*``, THP
migration with ``MIGRATE_VMA_SELECT_COMPOUND``, eviction by pfn with
``migrate_device_*``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from numpy.typing import NDArray

from ..errors import OutOfMemory
from ..migrate import (
    MIGRATE_PFN_COMPOUND,
    MIGRATE_PFN_MIGRATE,
    MIGRATE_PFN_SHIFT,
    MIGRATE_PFN_VALID,
    MIGRATE_VMA_SELECT_COMPOUND,
    MIGRATE_VMA_SELECT_DEVICE_COHERENT,
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
from ..mm.fault import VM_FAULT_OOM, VM_FAULT_SIGBUS
from ..mm.memremap import (
    MEMORY_DEVICE_COHERENT,
    MEMORY_DEVICE_PRIVATE,
    DevPagemap,
    VmFault,
    memremap_pages,
    zone_device_page_init,
    zone_device_pages_init,
)
from ..mm.oom import alloc_pages_nofail
from ..mm.pagetable import PAGE_SIZE, PMD_ORDER, PMD_PAGES
from ..mm.physmem import FrameAllocator, PG_locked

if TYPE_CHECKING:
    from ..machine import Machine
    from ..mm.process import Process

_U64 = np.uint64


def _migrated(src: NDArray[np.uint64]) -> int:
    return int(((src & _U64(MIGRATE_PFN_MIGRATE)) != 0).sum())


class Device:
    """Device memory of ``npages`` pages, private (unaddressable) or coherent."""

    def __init__(
        self,
        machine: Machine,
        memory: Literal["private", "coherent"] = "private",
        npages: int = 2048,
        name: str = "dev",
    ) -> None:
        self.machine = machine
        self.name = name
        kind = MEMORY_DEVICE_PRIVATE if memory == "private" else MEMORY_DEVICE_COHERENT
        self.pgmap = DevPagemap(kind, owner=self, ops=self)
        npages = (npages + PMD_PAGES - 1) // PMD_PAGES * PMD_PAGES  # whole 2 MiB blocks
        self.range = memremap_pages(machine, self.pgmap, npages)
        # The device's own allocator over its pages (2 MiB blocks for THPs).
        self.allocator = FrameAllocator(npages)
        self._pending: dict[int, list[int]] = {0: [], PMD_ORDER: []}
        self.fail_migrate_to_ram = False
        self.faults = 0
        self.freed = 0

    def __repr__(self) -> str:
        return f"Device({self.name})"

    @property
    def private(self) -> bool:
        return self.pgmap.type == MEMORY_DEVICE_PRIVATE

    @property
    def select_self(self) -> int:
        if self.private:
            return MIGRATE_VMA_SELECT_DEVICE_PRIVATE
        return MIGRATE_VMA_SELECT_DEVICE_COHERENT

    # ----- dev_pagemap_ops ---------------------------------------------------------
    def folio_free(self, head: int) -> None:
        order = int(self.machine.phys.order[head])
        # Batched back into the allocator at the next allocation (cheap per call).
        self._pending[order].append(head - self.range.start)
        self.freed += 1 << order

    def _reclaim_pending(self) -> None:
        for order, heads in self._pending.items():
            if heads:
                self.allocator.free(np.array(heads, dtype=np.int64), order)
                heads.clear()

    def folio_split(self, head: int, tail: int) -> None:
        """Nothing to do: the free list is per page already."""

    def migrate_to_ram(self, vmf: VmFault) -> int:
        self.faults += 1
        if self.fail_migrate_to_ram:
            return VM_FAULT_SIGBUS
        addr = vmf.address & ~(PAGE_SIZE - 1)
        src = np.zeros(1, dtype=_U64)
        dst = np.zeros(1, dtype=_U64)
        args = MigrateVma(
            vmf.vma,
            addr,
            addr + PAGE_SIZE,
            src,
            dst,
            pgmap_owner=self,
            flags=self.select_self,
            fault_page=vmf.page,
        )
        migrate_vma_setup(args)
        # Pages and finalize run whatever the allocation gave: a page without
        # a destination just stays here.
        ok = self._to_system(src, dst, 1)
        migrate_vma_pages(args)
        migrate_vma_finalize(args)
        return 0 if ok else VM_FAULT_OOM

    # ----- allocation ----------------------------------------------------------------
    def alloc(self, order: int = 0) -> int:
        """A locked device folio with refcount 1 (``zone_device_folio_init``)."""
        self._reclaim_pending()
        pfn = self.range.start + int(self.allocator.alloc(order, 1)[0])
        zone_device_page_init(self.machine, pfn, order)
        self.machine.phys.folio_lock(pfn)
        return pfn

    def alloc_pages(self, count: int) -> NDArray[np.int64]:
        """``count`` locked order-0 device pages, in one batch."""
        self._reclaim_pending()
        pfns = self.range.start + self.allocator.alloc(0, count)
        zone_device_pages_init(self.machine, pfns)
        self.machine.phys.flags[pfns] |= np.uint16(PG_locked)
        return pfns

    def _to_system(
        self, src: NDArray[np.uint64], dst: NDArray[np.uint64], n: int, *, nofail: bool = False
    ) -> bool:
        """Locked system pages (THPs for compound entries) with a copy of each source.

        A THP that finds no free PMD block gets 512 small pages. An entry whose
        page cannot be allocated keeps ``dst`` 0 (its page stays here); returns
        False if that happened. With ``nofail`` (eviction) allocations reclaim
        and OOM-kill as ``__GFP_NOFAIL`` does.
        """
        phys = self.machine.phys
        s = src[:n]
        want = ((s & _U64(MIGRATE_PFN_MIGRATE)) != 0) & ((s & _U64(MIGRATE_PFN_VALID)) != 0)
        compound = want & ((s & _U64(MIGRATE_PFN_COMPOUND)) != 0)
        small = np.flatnonzero(want & ~compound)
        spages = (s[small] >> _U64(MIGRATE_PFN_SHIFT)).astype(np.int64)
        for i in np.flatnonzero(compound).tolist():
            spage = int(s[i]) >> MIGRATE_PFN_SHIFT
            try:
                new = phys.alloc_one(PMD_ORDER)
            except OutOfMemory:
                small = np.concatenate([small, np.arange(i, i + PMD_PAGES)])
                spages = np.concatenate([spages, np.arange(spage, spage + PMD_PAGES)])
                continue
            phys.folio_lock(new)
            phys.copy_pages(np.arange(new, new + PMD_PAGES), np.arange(spage, spage + PMD_PAGES))
            dst[i] = migrate_pfn(new) | MIGRATE_PFN_COMPOUND
        if len(small) == 0:
            return True
        if nofail:
            pages = alloc_pages_nofail(self.machine, len(small))
        else:  # as many as are free (order-0 frames never fragment)
            pages = phys.alloc(0, min(phys.allocator.nr_free, len(small)))
        complete = len(pages) == len(small)
        small, spages = small[: len(pages)], spages[: len(pages)]
        phys.flags[pages] |= np.uint16(PG_locked)
        phys.copy_pages(pages, spages)
        dst[small] = (pages.astype(_U64) << _U64(MIGRATE_PFN_SHIFT)) | _U64(MIGRATE_PFN_VALID)
        return complete

    # ----- migration -------------------------------------------------------------------
    def migrate_to_device(
        self, proc: Process, addr: int, npages: int, compound: bool = False
    ) -> tuple[int, MigrateVma]:
        """Move [addr, +npages) here; returns (entries migrated, the MigrateVma)."""
        vma = proc.mm.find_vma(addr)
        src = np.zeros(npages, dtype=_U64)
        dst = np.zeros(npages, dtype=_U64)
        flags = MIGRATE_VMA_SELECT_SYSTEM | (MIGRATE_VMA_SELECT_COMPOUND if compound else 0)
        args = MigrateVma(
            vma, addr, addr + npages * PAGE_SIZE, src, dst, pgmap_owner=self, flags=flags
        )
        phys = self.machine.phys
        with proc.mm.mmap_lock.read():
            migrate_vma_setup(args)
            selected = (src & _U64(MIGRATE_PFN_MIGRATE)) != 0
            compound = selected & ((src & _U64(MIGRATE_PFN_COMPOUND)) != 0)
            for i in np.flatnonzero(compound).tolist():
                try:
                    new = self.alloc(PMD_ORDER)
                except OutOfMemory:
                    continue  # no device folio: dst stays 0 and the THP stays in RAM
                pages = np.arange(new, new + PMD_PAGES)
                spage = migrate_pfn_to_page(int(src[i]))
                if spage is None:
                    phys.zero_pages(pages)
                else:
                    phys.copy_pages(pages, np.arange(spage, spage + PMD_PAGES))
                dst[i] = migrate_pfn(new) | MIGRATE_PFN_COMPOUND
            small = np.flatnonzero(selected & ~compound)
            self._reclaim_pending()
            small = small[: self.allocator.nr_free]  # the rest stays in RAM (dst 0)
            if len(small):
                new_pages = self.alloc_pages(len(small))
                has_src = (src[small] & _U64(MIGRATE_PFN_VALID)) != 0
                spages = (src[small] >> _U64(MIGRATE_PFN_SHIFT)).astype(np.int64)
                phys.copy_pages(new_pages[has_src], spages[has_src])
                phys.zero_pages(new_pages[~has_src])
                dst[small] = (new_pages.astype(_U64) << _U64(MIGRATE_PFN_SHIFT)) | _U64(
                    MIGRATE_PFN_VALID
                )
            migrate_vma_pages(args)
            moved = _migrated(src)
            migrate_vma_finalize(args)
        return moved, args

    def migrate_to_system(self, proc: Process, addr: int, npages: int) -> int:
        """Move this device's pages of [addr, +npages) back to RAM; returns how many."""
        vma = proc.mm.find_vma(addr)
        src = np.zeros(npages, dtype=_U64)
        dst = np.zeros(npages, dtype=_U64)
        args = MigrateVma(
            vma,
            addr,
            addr + npages * PAGE_SIZE,
            src,
            dst,
            pgmap_owner=self,
            flags=self.select_self | MIGRATE_VMA_SELECT_COMPOUND,
        )
        with proc.mm.mmap_lock.read():
            migrate_vma_setup(args)
            ok = self._to_system(src, dst, npages)
            migrate_vma_pages(args)
            moved = _migrated(src)
            migrate_vma_finalize(args)
        if not ok:
            raise OutOfMemory(f"devmem: RAM ran out; {moved} page(s) moved back")
        return moved

    def evict(self) -> int:
        """Move every page in use back to RAM (driver unbind); returns how many."""
        n = len(self.range)
        src = np.zeros(n, dtype=_U64)
        dst = np.zeros(n, dtype=_U64)
        migrate_device_range(self.machine, src, self.range.start, n)
        # Even with nothing left to kill, pages and finalize run: no migration
        # entry stays behind, and what got no destination stays here.
        ok = self._to_system(src, dst, n, nofail=True)
        migrate_device_pages(self.machine, src, dst, n)
        moved = _migrated(src)
        migrate_device_finalize(self.machine, src, dst, n)
        if not ok:
            raise OutOfMemory(f"devmem: nothing left to kill; {moved} page(s) evicted")
        return moved

    def in_use(self) -> int:
        phys = self.machine.phys
        return int((phys.refcount[self.range.start : self.range.stop] > 0).sum())
