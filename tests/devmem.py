"""A small device with its own memory, for testing the HMM core directly.

It does what a driver's migration code does (dmirror-like, but no mirror):
device memory from ``memremap_pages``, ``migrate_to_ram`` on CPU faults,
migration to the device and back, eviction by pfn.
"""

from __future__ import annotations

import numpy as np
from hmmsim.memremap import (
    MEMORY_DEVICE_COHERENT,
    MEMORY_DEVICE_PRIVATE,
    DevPagemap,
    memremap_pages,
    zone_device_page_init,
)
from hmmsim.migrate import (
    MIGRATE_PFN_COMPOUND,
    MIGRATE_PFN_MIGRATE,
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
from hmmsim.mm.fault import VM_FAULT_SIGBUS

PAGE = 4096


class Device:
    def __init__(self, machine, memory="private", npages=2048, name="dev"):
        self.machine = machine
        self.name = name
        kind = MEMORY_DEVICE_PRIVATE if memory == "private" else MEMORY_DEVICE_COHERENT
        self.pgmap = DevPagemap(kind, owner=self, ops=self)
        self.range = memremap_pages(machine, self.pgmap, npages)
        self.free = list(range(self.range.stop - 1, self.range.start - 1, -1))
        self.fail_migrate_to_ram = False
        self.faults = 0
        self.freed = 0

    def __repr__(self):
        return f"Device({self.name})"

    @property
    def private(self):
        return self.pgmap.type == MEMORY_DEVICE_PRIVATE

    @property
    def select_self(self):
        return (
            MIGRATE_VMA_SELECT_DEVICE_PRIVATE
            if self.private
            else (MIGRATE_VMA_SELECT_DEVICE_COHERENT)
        )

    # ----- dev_pagemap_ops ------------------------------------------------------
    def folio_free(self, head):
        nr = 1 << int(self.machine.phys.order[head])
        self.free.extend(range(head + nr - 1, head - 1, -1))
        self.freed += nr

    def folio_split(self, head, tail):
        pass  # the free list is per page already

    def migrate_to_ram(self, vmf):
        self.faults += 1
        if self.fail_migrate_to_ram:
            return VM_FAULT_SIGBUS
        addr = vmf.address & ~(PAGE - 1)
        args = MigrateVma(
            vmf.vma,
            addr,
            addr + PAGE,
            np.zeros(1, np.uint64),
            np.zeros(1, np.uint64),
            pgmap_owner=self,
            flags=self.select_self,
            fault_page=vmf.page,
        )
        migrate_vma_setup(args)
        self._to_system(args.src, args.dst, 1)
        migrate_vma_pages(args)
        migrate_vma_finalize(args)
        return 0

    # ----- allocation -------------------------------------------------------------
    def alloc(self, order=0):
        phys = self.machine.phys
        if order == 0:
            pfn = self.free.pop()
        else:
            nr = 1 << order
            starts = sorted(
                p
                for p in self.free
                if p % nr == 0 and all(q in self.free for q in range(p, p + nr))
            )
            pfn = starts[0]
            for q in range(pfn, pfn + nr):
                self.free.remove(q)
        zone_device_page_init(self.machine, pfn, order)
        phys.folio_lock(pfn)
        return pfn

    def _to_system(self, src, dst, n):
        phys = self.machine.phys
        for i in range(n):
            if not int(src[i]) & MIGRATE_PFN_MIGRATE:
                continue
            spage = migrate_pfn_to_page(int(src[i]))
            if spage is None:
                continue
            new = phys.alloc_one(0)
            phys.folio_lock(new)
            phys.copy_pages(np.array([new]), np.array([spage]))
            dst[i] = migrate_pfn(new)

    # ----- migration ---------------------------------------------------------------
    def migrate_to_device(self, proc, addr, npages, compound=False):
        vma = proc.mm.find_vma(addr)
        src = np.zeros(npages, np.uint64)
        dst = np.zeros(npages, np.uint64)
        flags = MIGRATE_VMA_SELECT_SYSTEM | (MIGRATE_VMA_SELECT_COMPOUND if compound else 0)
        args = MigrateVma(vma, addr, addr + npages * PAGE, src, dst, pgmap_owner=self, flags=flags)
        phys = self.machine.phys
        with proc.mm.mmap_lock.read():
            migrate_vma_setup(args)
            i = 0
            while i < npages:
                s = int(src[i])
                if not s & MIGRATE_PFN_MIGRATE:
                    i += 1
                    continue
                if s & MIGRATE_PFN_COMPOUND:
                    new = self.alloc(9)
                    spage = migrate_pfn_to_page(s)
                    pages = np.arange(new, new + 512)
                    if spage is None:
                        phys.zero_pages(pages)
                    else:
                        phys.copy_pages(pages, np.arange(spage, spage + 512))
                    dst[i] = migrate_pfn(new) | MIGRATE_PFN_COMPOUND
                    i += 512
                    continue
                new = self.alloc()
                spage = migrate_pfn_to_page(s)
                if spage is None:
                    phys.zero_pages(np.array([new]))
                else:
                    phys.copy_pages(np.array([new]), np.array([spage]))
                dst[i] = migrate_pfn(new)
                i += 1
            migrate_vma_pages(args)
            moved = int(((src & np.uint64(MIGRATE_PFN_MIGRATE)) != 0).sum())
            migrate_vma_finalize(args)
        return moved, args

    def migrate_to_system(self, proc, addr, npages):
        vma = proc.mm.find_vma(addr)
        src = np.zeros(npages, np.uint64)
        dst = np.zeros(npages, np.uint64)
        args = MigrateVma(
            vma, addr, addr + npages * PAGE, src, dst, pgmap_owner=self, flags=self.select_self
        )
        with proc.mm.mmap_lock.read():
            migrate_vma_setup(args)
            self._to_system(src, dst, npages)
            migrate_vma_pages(args)
            moved = int(((src & np.uint64(MIGRATE_PFN_MIGRATE)) != 0).sum())
            migrate_vma_finalize(args)
        return moved

    def evict(self):
        n = len(self.range)
        src = np.zeros(n, np.uint64)
        dst = np.zeros(n, np.uint64)
        migrate_device_range(self.machine, src, self.range.start, n)
        self._to_system(src, dst, n)
        migrate_device_pages(self.machine, src, dst, n)
        migrate_device_finalize(self.machine, src, dst, n)
        return int(((src & np.uint64(MIGRATE_PFN_MIGRATE)) != 0).sum())

    def in_use(self):
        phys = self.machine.phys
        return int((phys.refcount[self.range.start : self.range.stop] > 0).sum())
