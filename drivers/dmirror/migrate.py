"""dmirror's migration: to the device, back to system memory, and the CPU fault.

Kernel counterpart: the migration half of lib/test_hmm.c —
``dmirror_migrate_to_device`` (``HMM_DMIRROR_MIGRATE_TO_DEV``),
``dmirror_migrate_to_system`` (``HMM_DMIRROR_MIGRATE_TO_SYS``) and
``dmirror_devmem_fault`` (``dev_pagemap_ops.migrate_to_ram``), each a
``migrate_vma_setup`` → allocate and copy → ``migrate_vma_pages`` →
``migrate_vma_finalize`` sequence over one window at a time.

The functions take the open file (``struct dmirror *`` in the kernel) as
their first argument; ``mirror.py`` dispatches the ioctls to them and the
device's ``migrate_to_ram`` calls ``devmem_fault``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import numpy as np
from hmmsim.errors import HmmsimError, InvalidArgument, OutOfMemory
from hmmsim.memremap import VmFault
from hmmsim.migrate import (
    MIGRATE_PFN_COMPOUND,
    MIGRATE_PFN_MIGRATE,
    MIGRATE_PFN_SHIFT,
    MIGRATE_PFN_VALID,
    MIGRATE_PFN_WRITE,
    MIGRATE_VMA_SELECT_COMPOUND,
    MIGRATE_VMA_SELECT_DEVICE_COHERENT,
    MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
    MIGRATE_VMA_SELECT_SYSTEM,
    MigrateVma,
    migrate_pfn,
    migrate_pfn_to_page,
    migrate_vma_finalize,
    migrate_vma_pages,
    migrate_vma_setup,
)
from hmmsim.mm import (
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_ORDER,
    PMD_PAGES,
    VM_FAULT_OOM,
    VM_FAULT_SIGBUS,
    VM_READ,
    PG_locked,
)

from . import uapi
from .uapi import DmirrorCmd

if TYPE_CHECKING:
    from hmmsim.mm import Vma

    from .mirror import DmirrorFile

#: Pages per migration window (``PTRS_PER_PTE``: one PMD fits).
MIGRATE_WINDOW: Final = 512

_U64 = np.uint64


# ----- migration to the device ----------------------------------------------------
def _migration_windows(dmirror: DmirrorFile, cmd: DmirrorCmd) -> list[tuple[Vma, int, int]]:
    """The VMA walk of MIGRATE_TO_DEV/SYS: -EINVAL for uncovered or unreadable VMAs."""
    out = []
    addr, end = cmd.addr, cmd.addr + (cmd.npages << PAGE_SHIFT)
    while addr < end:
        vma = dmirror.mm.find_vma(addr)
        if vma is None or not vma.flags & VM_READ:
            raise InvalidArgument(f"dmirror: no readable mapping at {addr:#x}")
        nxt = min(end, addr + MIGRATE_WINDOW * PAGE_SIZE, vma.end)
        out.append((vma, addr, nxt))
        addr = nxt
    return out


def _migrate_args(dmirror: DmirrorFile, vma: Vma, start: int, end: int, flags: int) -> MigrateVma:
    """Empty src/dst arrays for one window, this device as the pgmap owner."""
    n = (end - start) >> PAGE_SHIFT
    return MigrateVma(
        vma,
        start,
        end,
        np.zeros(n, dtype=_U64),
        np.zeros(n, dtype=_U64),
        pgmap_owner=dmirror.device,
        flags=flags,
    )


def migrate_to_device(dmirror: DmirrorFile, cmd: DmirrorCmd) -> None:
    size = cmd.npages << PAGE_SHIFT
    dmirror.user_buffer(cmd, size)
    if not dmirror.mm.mmget_not_zero():
        raise InvalidArgument("dmirror: the mm is gone")
    try:
        with dmirror.mm.mmap_lock.read():
            for vma, start, end in _migration_windows(dmirror, cmd):
                args = _migrate_args(
                    dmirror,
                    vma,
                    start,
                    end,
                    MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_SELECT_COMPOUND,
                )
                migrate_vma_setup(args)
                alloc_and_copy_to_device(dmirror, args)
                migrate_vma_pages(args)
                finalize_and_map(dmirror, args)
                migrate_vma_finalize(args)
                if args.cpages:  # a window that collected nothing moved nothing
                    dmirror.stats.migrations_to_device += 1
    finally:
        dmirror.mm.mmput()
    dmirror.read_back(cmd, "some pages are not in this device's page table")


def alloc_and_copy_to_device(dmirror: DmirrorFile, args: MigrateVma) -> None:
    phys = dmirror.machine.phys
    assert args.src is not None and args.dst is not None
    src, dst = args.src, args.dst
    i = 0
    while i < args.npages:
        s = int(src[i])
        if not s & MIGRATE_PFN_MIGRATE:
            i += 1
            continue
        spage = migrate_pfn_to_page(s)
        if spage is not None and phys.pgmap_of(spage) is not None:
            dmirror.machine.warn(
                "dmirror",
                "dmirror_migrate_alloc_and_copy",
                "a ZONE_DEVICE page was collected where only system pages were selected",
                f"source pfn {spage:#x}",
            )
            i += 1
            continue
        compound = bool(s & MIGRATE_PFN_COMPOUND)
        write = s & MIGRATE_PFN_WRITE
        if compound:
            dpage = dmirror.device.alloc_page(dmirror, PMD_ORDER)
            if dpage is not None:
                _fill(dmirror, dpage, spage, PMD_PAGES)
                dst[i] = _U64(migrate_pfn(dpage) | MIGRATE_PFN_COMPOUND | write)
                dmirror.device.page_mirror[dpage] = dmirror
            else:
                # No device folio: single pages, and the core splits the THP.
                for j in range(PMD_PAGES):
                    page = dmirror.device.alloc_page(dmirror, 0)
                    if page is None:
                        continue
                    _fill(dmirror, page, None if spage is None else spage + j, 1)
                    dst[i + j] = _U64(migrate_pfn(page) | write)
                    dmirror.device.page_mirror[page] = dmirror
            i += PMD_PAGES
            continue
        dpage = dmirror.device.alloc_page(dmirror, 0)
        if dpage is not None:
            _fill(dmirror, dpage, spage, 1)
            dst[i] = _U64(migrate_pfn(dpage) | write)
            dmirror.device.page_mirror[dpage] = dmirror
        i += 1


def _fill(dmirror: DmirrorFile, dpage: int, spage: int | None, nr: int) -> None:
    phys = dmirror.machine.phys
    pages = np.arange(dpage, dpage + nr, dtype=np.int64)
    if spage is None:
        phys.zero_pages(pages)
    else:
        phys.copy_pages(pages, np.arange(spage, spage + nr, dtype=np.int64))


def finalize_and_map(dmirror: DmirrorFile, args: MigrateVma) -> None:
    """``dmirror_migrate_finalize_and_map``: map every migrated page on the device."""
    assert args.src is not None and args.dst is not None
    phys = dmirror.machine.phys
    base = args.start >> PAGE_SHIFT
    with dmirror.mutex:
        for i in range(args.npages):
            s, d = int(args.src[i]), int(args.dst[i])
            dpage = migrate_pfn_to_page(d)
            if not s & MIGRATE_PFN_MIGRATE or dpage is None:
                continue
            nr = 1 << int(phys.order[dpage])
            dmirror.map_pages(base + i, dpage, nr, bool(d & MIGRATE_PFN_WRITE))


# ----- migration back to system memory -----------------------------------------------


def alloc_and_copy_to_ram(dmirror: DmirrorFile, args: MigrateVma) -> bool:
    """``dmirror_devmem_fault_alloc_and_copy``: a system page (or folio) for each
    migrating device page, the data copied, the device entries erased.

    FAIL_ALLOC is consumed by the first migrating entry: for a compound
    source it turns the folio allocation into one allocation per subpage
    (the core then splits the device folio); for an order-0 source it is
    a failed allocation. A failed order-0 allocation ends the call at once
    with False (VM_FAULT_OOM, or -ENOMEM for MIGRATE_TO_SYS), as the
    kernel's does. The entries already given a page keep it and the rest
    keep ``dst`` 0; the caller always runs ``migrate_vma_pages`` and then
    finalize, so the pages that got a copy move with their metadata and
    the others stay on the device (their device entries erased: a device
    access faults them back in).
    """
    phys = dmirror.machine.phys
    assert args.src is not None and args.dst is not None
    src, dst = args.src, args.dst
    base = args.start >> PAGE_SHIFT
    if _alloc_and_copy_to_ram_order0(dmirror, args):
        return True
    i = 0
    while i < args.npages:
        s = int(src[i])
        spage = migrate_pfn_to_page(s)
        if spage is None or not s & MIGRATE_PFN_MIGRATE:
            i += 1
            continue
        if phys.pgmap_of(spage) is None:
            dmirror.machine.warn(
                "dmirror",
                "dmirror_devmem_fault_alloc_and_copy",
                "a system page was collected where only device pages were selected",
                f"source pfn {spage:#x}",
            )
            i += 1
            continue
        # The kernel takes the order of the backing folio; a source entry
        # is COMPOUND exactly when it stands for a whole device folio.
        order = PMD_ORDER if s & MIGRATE_PFN_COMPOUND else 0
        nr = 1 << order
        flags = (MIGRATE_PFN_COMPOUND if order else 0) | (s & MIGRATE_PFN_WRITE)
        new: int | None = None
        if dmirror.flags & uapi.HMM_DMIRROR_FLAG_FAIL_ALLOC:
            dmirror.flags &= ~uapi.HMM_DMIRROR_FLAG_FAIL_ALLOC  # one shot
            flags &= ~MIGRATE_PFN_COMPOUND
        else:
            try:
                new = phys.alloc_one(order)
            except OutOfMemory:
                new = None
        if new is None and not order:
            return False
        if new is not None:
            phys.folio_lock(new)
            _fill(dmirror, new, spage, nr)
            dst[i] = _U64(migrate_pfn(new) | flags)
        else:
            # No folio: one page per subpage.
            for j in range(nr):
                try:
                    page = phys.alloc_one(0)
                except OutOfMemory:
                    with dmirror.mutex:
                        dmirror.erase(base + i, base + i + j - 1)
                    return False
                phys.folio_lock(page)
                _fill(dmirror, page, spage + j, 1)
                dst[i + j] = _U64(migrate_pfn(page))
        with dmirror.mutex:
            dmirror.erase(base + i, base + i + nr - 1)
        i += nr
    return True


def _alloc_and_copy_to_ram_order0(dmirror: DmirrorFile, args: MigrateVma) -> bool:
    """The common case of ``alloc_and_copy_to_ram``, vectorised: every
    migrating entry is an order-0 device page, FAIL_ALLOC is clear and
    there are enough free pages for all of them. Then the per-entry walk
    would allocate, copy and erase each in turn with no failure, and this
    does the same at once. Returns False (having done nothing) otherwise.
    """
    if dmirror.flags & uapi.HMM_DMIRROR_FLAG_FAIL_ALLOC or args.npages <= 8:
        return False
    assert args.src is not None and args.dst is not None
    phys = dmirror.machine.phys
    n = args.npages
    src = args.src[:n]
    want = _U64(MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE)
    idx = np.flatnonzero((src & want) == want)
    if len(idx) == 0:
        return True
    s = src[idx]
    if (s & _U64(MIGRATE_PFN_COMPOUND)).any():
        return False
    spages = (s >> _U64(MIGRATE_PFN_SHIFT)).astype(np.int64)
    if not phys.is_device(spages).all():
        return False  # the per-entry walk warns about each system page
    try:
        new = phys.alloc(0, len(idx))
    except OutOfMemory:
        return False  # the per-entry walk fails where the kernel's would
    phys.flags[new] |= np.uint16(PG_locked)  # folio_lock of fresh pages
    phys.copy_pages(new, spages)
    args.dst[idx] = (
        (new.astype(_U64) << _U64(MIGRATE_PFN_SHIFT))
        | _U64(MIGRATE_PFN_VALID)
        | (s & _U64(MIGRATE_PFN_WRITE))
    )
    base = args.start >> PAGE_SHIFT
    pt = dmirror.pt
    with dmirror.mutex:
        erased = 0
        for vpn in (idx + base).tolist():
            if pt.pop(vpn, None) is not None:
                erased += 1
        dmirror.stats.pages_unmapped += erased
    return True


def devmem_fault(dmirror: DmirrorFile, vmf: VmFault) -> int:
    """``dmirror_devmem_fault`` (``migrate_to_ram``)."""
    # The order of the CPU entry that faulted, not of the folio: a device THP
    # the CPU maps with PTEs migrates one page at a time.
    order = vmf.order
    size = PAGE_SIZE << order
    start = vmf.address & ~(size - 1)
    n = size >> PAGE_SHIFT
    flags = (
        MIGRATE_VMA_SELECT_DEVICE_PRIVATE
        if dmirror.device.memory == "private"
        else MIGRATE_VMA_SELECT_DEVICE_COHERENT
    )
    if order:
        flags |= MIGRATE_VMA_SELECT_COMPOUND
    args = MigrateVma(
        vmf.vma,
        start,
        start + size,
        np.zeros(n, dtype=_U64),
        np.zeros(n, dtype=_U64),
        pgmap_owner=dmirror.device,
        flags=flags,
        fault_page=vmf.page,
    )
    try:
        migrate_vma_setup(args)
    except HmmsimError:
        return VM_FAULT_SIGBUS
    # Pages and finalize run even when an allocation failed: the page
    # that got no destination stays on the device (dst 0).
    ok = alloc_and_copy_to_ram(dmirror, args)
    migrate_vma_pages(args)
    migrate_vma_finalize(args)
    if not ok:
        return VM_FAULT_OOM
    if args.cpages:
        dmirror.stats.migrations_to_system += 1
    return 0


def migrate_to_system(dmirror: DmirrorFile, cmd: DmirrorCmd) -> None:
    if not dmirror.mm.mmget_not_zero():
        raise InvalidArgument("dmirror: the mm is gone")
    flags = (
        MIGRATE_VMA_SELECT_DEVICE_PRIVATE
        if dmirror.device.memory == "private"
        else MIGRATE_VMA_SELECT_DEVICE_COHERENT
    ) | MIGRATE_VMA_SELECT_COMPOUND
    try:
        with dmirror.mm.mmap_lock.read():
            for vma, start, end in _migration_windows(dmirror, cmd):
                args = _migrate_args(dmirror, vma, start, end, flags)
                migrate_vma_setup(args)
                # Pages and finalize run even when an allocation failed:
                # what got no destination stays on the device (dst 0).
                ok = alloc_and_copy_to_ram(dmirror, args)
                migrate_vma_pages(args)
                assert args.src is not None
                moved = (args.src & _U64(MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE)) == _U64(
                    MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE
                )
                cmd.cpages += int(moved.sum())
                migrate_vma_finalize(args)
                if not ok:
                    raise OutOfMemory("dmirror: no system memory to migrate back")
                if args.cpages:
                    dmirror.stats.migrations_to_system += 1
    finally:
        dmirror.mm.mmput()
