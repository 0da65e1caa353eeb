"""dmirror: the kernel's HMM test driver (lib/test_hmm.c), modelled.

Kernel counterpart: lib/test_hmm.c with its hmm-tests selftests (the
2026 version: device-private THP, 32-page fault windows, eviction on close).

* A ``DmirrorDevice`` owns device memory in 256 MiB chunks (``memremap_pages``)
  with free lists of pages and of PMD-sized folios; private devices add
  chunks on demand, a coherent device has its one chunk.
* ``DmirrorFile`` is one open of the device: a mirror of the opening
  process's mm with a whole-address-space interval notifier, a device page
  table (vpn → page, tag 0 read / 1 atomic / 3 write) under a mutex, and the
  ioctl commands of the UAPI.

Departure from the kernel, on purpose: ZONE_DEVICE pages in hmmsim carry
their own contents, so a private device page needs no hidden "backing"
system page; the device page table stores the device page itself.
"""

from __future__ import annotations

import errno
from collections.abc import Hashable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Final

import numpy as np
from hmmsim import sched
from hmmsim.driver import (
    Capability,
    Device,
    DevicePte,
    Driver,
    MemoryKind,
    Mirror,
    MirrorStats,
    Parameter,
    check_user_pages,
    check_user_range,
)
from hmmsim.errors import (
    BadAddress,
    Busy,
    HmmsimError,
    InvalidArgument,
    NoEntry,
    NotPermitted,
    OutOfMemory,
)
from hmmsim.exclusive import make_device_exclusive
from hmmsim.hmm import (
    HMM_PFN_ERROR,
    HMM_PFN_REQ_FAULT,
    HMM_PFN_REQ_WRITE,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    HMM_RANGE_DEFAULT_TIMEOUT,
    HmmRange,
    hmm_pfn_to_map_order,
    hmm_pfn_to_page,
    hmm_range_fault,
)
from hmmsim.memremap import (
    MEMORY_DEVICE_COHERENT,
    MEMORY_DEVICE_PRIVATE,
    DevPagemap,
    VmFault,
    memremap_pages,
    memunmap_pages,
    zone_device_page_init,
)
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
    migrate_device_finalize,
    migrate_device_pages,
    migrate_device_range,
    migrate_pfn,
    migrate_pfn_to_page,
    migrate_vma_finalize,
    migrate_vma_pages,
    migrate_vma_setup,
)
from hmmsim.mm.fault import VM_FAULT_OOM, VM_FAULT_SIGBUS
from hmmsim.mm.oom import alloc_pages_nofail
from hmmsim.mm.pagetable import PAGE_SHIFT, PAGE_SIZE, PMD_ORDER, PMD_PAGES, PUD_ORDER
from hmmsim.mm.pfnmap import vm_insert_page
from hmmsim.mm.physmem import ZERO_PFN, PG_dirty, PG_locked
from hmmsim.mm.vma import VM_READ
from hmmsim.notifier import (
    ULONG_MAX,
    MmuNotifyEvent,
    mmu_interval_notifier_insert,
    mmu_interval_notifier_remove,
    mmu_interval_read_begin,
    mmu_interval_read_retry,
    mmu_interval_set_seq,
)
from numpy.typing import NDArray

from . import uapi
from .uapi import DmirrorCmd

if TYPE_CHECKING:
    from hmmsim.machine import Machine
    from hmmsim.mm.process import Process
    from hmmsim.mm.vma import Vma
    from hmmsim.notifier import IntervalNotifier, NotifierRange

DEVMEM_CHUNK_SIZE: Final = 256 << 20
DEVMEM_CHUNK_PAGES: Final = DEVMEM_CHUNK_SIZE // PAGE_SIZE
#: Pages per ``hmm_range_fault`` window (``unsigned long pfns[32]`` on the stack).
FAULT_WINDOW: Final = 32
#: Pages per migration window (``PTRS_PER_PTE``: one PMD fits).
MIGRATE_WINDOW: Final = 512

TAG_READ: Final = 0
TAG_ATOMIC: Final = 1
TAG_WRITE: Final = 3

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
        return mirror.devmem_fault(vmf)

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
        pgmap = self.machine.phys.pgmap_of(pfn)
        if pgmap is None:
            return MemoryKind.SYSTEM
        return (
            MemoryKind.DEVICE_PRIVATE
            if pgmap.type == MEMORY_DEVICE_PRIVATE
            else (
                MemoryKind.DEVICE_COHERENT
                if pgmap.type == MEMORY_DEVICE_COHERENT
                else MemoryKind.P2P
            )
        )


class _SnapshotOps:
    """``dmirror_snapshot_invalidate``: the temporary notifier of one snapshot window.

    Any invalidation in the window spoils the whole window, so it only bumps
    the sequence; but it does so under the mirror's mutex (the lock the
    snapshot holds while it checks the sequence and encodes), and, like the
    mirror's own notifier, refuses a non-blockable invalidation when that
    mutex is taken.
    """

    def __init__(self, mirror: DmirrorFile) -> None:
        self.mirror = mirror

    def __repr__(self) -> str:
        return f"_SnapshotOps({self.mirror!r})"

    def invalidate(self, sub: IntervalNotifier, rng: NotifierRange, cur_seq: int) -> bool:
        lock = self.mirror.mutex
        if not rng.blockable:
            if not lock.try_acquire():
                return False
        else:
            lock.acquire()
        try:
            mmu_interval_set_seq(sub, cur_seq)
        finally:
            lock.release()
        return True


class DmirrorFile(Mirror):
    """One open of a dmirror device: ``struct dmirror``, and the generic Mirror API."""

    def __init__(self, device: DmirrorDevice, process: Process) -> None:
        self.device = device
        self.machine = device.machine
        self.process = process
        self.mm = process.mm
        self.stats = MirrorStats()
        self.flags = 0
        #: The device page table: vpn -> (pfn, tag).
        self.pt: dict[int, tuple[int, int]] = {}
        self.mutex = sched.Mutex(f"dmirror{device.owner_id}.mutex")
        self.closed = False
        self.warnings: list[str] = []
        self.notifier = mmu_interval_notifier_insert(self.mm, 0, ULONG_MAX & ~(PAGE_SIZE - 1), self)
        device.files.append(self)

    def __repr__(self) -> str:
        return f"DmirrorFile({self.device!r}, pid {self.process.pid})"

    # ----- interval notifier -------------------------------------------------------
    def invalidate(self, sub: IntervalNotifier, rng: NotifierRange, cur_seq: int) -> bool:
        """``dmirror_interval_invalidate``."""
        if rng.event == MmuNotifyEvent.MIGRATE and rng.owner is self.device:
            return True  # our own migration: we manage our page table ourselves
        if rng.blockable:
            self.mutex.acquire()
        elif not self.mutex.try_acquire():
            return False
        try:
            mmu_interval_set_seq(sub, cur_seq)
            self._erase(rng.start >> PAGE_SHIFT, rng.end >> PAGE_SHIFT)
            self.stats.invalidations += 1
        finally:
            self.mutex.release()
        return True

    def _erase(self, first: int, last: int) -> None:
        """Drop entries first..last *inclusive* (the xarray walk includes its last index)."""
        pt = self.pt
        if last - first + 1 < len(pt):
            victims = [v for v in range(first, last + 1) if v in pt]
        else:
            victims = [v for v in pt if first <= v <= last]
        for v in victims:
            del pt[v]
        self.stats.pages_unmapped += len(victims)

    # ----- ioctl ---------------------------------------------------------------------
    def ioctl(self, command: int, cmd: DmirrorCmd) -> int:
        """``dmirror_fops_unlocked_ioctl``: returns 0 or raises the errno exception.

        Counters (``cpages``, ``faults``) and data are copied back only on success.
        """
        if self.closed:
            raise BadAddress("dmirror: ioctl on a closed file")
        if cmd.addr % PAGE_SIZE:
            raise InvalidArgument(f"dmirror: address {cmd.addr:#x} is not page aligned")
        if cmd.npages <= 0 or cmd.addr + (cmd.npages << PAGE_SHIFT) > ULONG_MAX:
            raise InvalidArgument("dmirror: empty or wrapping range")
        handler = _HANDLERS.get(command)
        if handler is None:
            raise InvalidArgument(f"dmirror: unknown command {command:#x}")
        out = DmirrorCmd(cmd.addr, cmd.npages, cmd.buf)
        handler(self, out)
        cmd.cpages = out.cpages
        cmd.faults = out.faults
        return 0

    def _buffer(self, cmd: DmirrorCmd, nbytes: int) -> bytearray:
        if cmd.buf is None or len(cmd.buf) < nbytes:
            raise BadAddress(f"dmirror: buffer smaller than {nbytes} bytes")
        return cmd.buf

    # ----- READ / WRITE --------------------------------------------------------------
    def _mapped_prefix(self, start: int, end: int, need_write: bool) -> NDArray[np.int64]:
        """pfns of the pages from ``start`` that the device maps (with write if asked),
        up to the first one it does not."""
        pfns = []
        for vpn in range(start >> PAGE_SHIFT, end >> PAGE_SHIFT):
            entry = self.pt.get(vpn)
            if entry is None or (need_write and entry[1] != TAG_WRITE):
                break
            pfns.append(entry[0])
        return np.array(pfns, dtype=np.int64)

    def _do_read(self, start: int, end: int, bounce: bytearray, base: int) -> int:
        """Copy mapped pages into ``bounce``; -ENOENT at the first unmapped one."""
        pfns = self._mapped_prefix(start, end, need_write=False)
        off = start - base
        if len(pfns):
            view = np.frombuffer(bounce, dtype=np.uint8)
            view[off : off + len(pfns) * PAGE_SIZE] = self.machine.phys.read_pages(pfns).reshape(-1)
        self._cpages += len(pfns)
        return 0 if start + len(pfns) * PAGE_SIZE == end else -errno.ENOENT

    def _do_write(self, start: int, end: int, bounce: bytearray, base: int) -> int:
        """Copy ``bounce`` into the mapped pages, marking their folios dirty.

        Departure from lib/test_hmm.c, on purpose: its ``dmirror_do_write``
        copies into the page and never dirties it, so a store into a page the
        CPU maps writable but clean (a shmem page after a read fault, a
        lazy-free anonymous page) would be dropped by reclaim. Real drivers
        dirty what the device wrote (ODP's unmap path calls
        ``set_page_dirty``); the model must lose no data, so it does too.
        """
        pfns = self._mapped_prefix(start, end, need_write=True)
        off = start - base
        if len(pfns):
            phys = self.machine.phys
            data = np.frombuffer(bounce, dtype=np.uint8)[off : off + len(pfns) * PAGE_SIZE]
            phys.write_pages(pfns, data.reshape(len(pfns), PAGE_SIZE))
            phys.flags[phys.head_of(pfns)] |= np.uint16(PG_dirty)
        self._cpages += len(pfns)
        return 0 if start + len(pfns) * PAGE_SIZE == end else -errno.ENOENT

    def _access(self, cmd: DmirrorCmd, write: bool) -> bytearray:
        size = cmd.npages << PAGE_SHIFT
        start = cmd.addr
        end = cmd.addr + size
        if write:
            bounce = bytearray(self._buffer(cmd, size)[:size])
        else:
            self._buffer(cmd, size)
            bounce = bytearray(size)
        self._cpages = 0
        while True:
            with self.mutex:
                if write:
                    ret = self._do_write(start, end, bounce, cmd.addr)
                else:
                    ret = self._do_read(start, end, bounce, cmd.addr)
            if ret == 0:
                break
            start = cmd.addr + (self._cpages << PAGE_SHIFT)
            self.fault(start, end, write)  # raises on failure
            cmd.faults += 1
            self.stats.fault_rounds += 1
        cmd.cpages = self._cpages
        return bounce

    def cmd_read(self, cmd: DmirrorCmd) -> None:
        bounce = self._access(cmd, write=False)
        assert cmd.buf is not None
        cmd.buf[: len(bounce)] = bounce

    def cmd_write(self, cmd: DmirrorCmd) -> None:
        self._access(cmd, write=True)

    # ----- device fault ------------------------------------------------------------------
    def fault(self, start: int, end: int, write: bool) -> None:
        """``dmirror_fault``: one fault round over [start, end), in 32-page windows.

        The kernel's fault returns 0 with nothing done when the mm is gone
        (the caller cannot be running then); here a command can outlive its
        process, so that case is ``BadAddress`` rather than an endless loop.
        """
        if not self.mm.mmget_not_zero():
            raise BadAddress("dmirror: the mirrored mm is gone")
        try:
            addr = start
            while addr < end:
                nxt = min(end, addr + FAULT_WINDOW * PAGE_SIZE)
                self._range_fault(addr, nxt, write)
                addr = nxt
        finally:
            self.mm.mmput()

    def _range_fault(self, start: int, end: int, write: bool) -> None:
        clock = self.machine.clock
        deadline = clock.now_ns + HMM_RANGE_DEFAULT_TIMEOUT * 1_000_000
        flags = HMM_PFN_REQ_FAULT | (HMM_PFN_REQ_WRITE if write else 0)
        pfns = np.zeros((end - start) >> PAGE_SHIFT, dtype=_U64)
        rng = HmmRange(
            self.notifier, start, end, pfns, default_flags=flags, dev_private_owner=self.device
        )
        while True:
            if clock.now_ns > deadline:
                raise Busy(f"dmirror: fault of [{start:#x}, {end:#x}) timed out")
            rng.notifier_seq = mmu_interval_read_begin(self.notifier)
            try:
                with self.mm.mmap_lock.read():
                    hmm_range_fault(rng)
            except Busy:
                self.stats.retries += 1
                continue
            sched.point("dmirror:after_range_fault")
            self.mutex.acquire()
            if mmu_interval_read_retry(self.notifier, rng.notifier_seq):
                self.mutex.release()
                self.stats.retries += 1
                continue
            try:
                self._do_fault(rng, write)
            finally:
                self.mutex.release()
            return

    def _do_fault(self, rng: HmmRange, write: bool) -> None:
        """``dmirror_do_fault``: program the device page table from ``hmm_pfns``."""
        # Held: the driver lock. Another CPU may run meanwhile; its invalidate
        # must wait for the lock (or, if non-blockable, be refused).
        sched.point("dmirror:programming")
        vpn = rng.start >> PAGE_SHIFT
        for i, e in enumerate(rng.hmm_pfns.tolist()):
            if e & HMM_PFN_ERROR or not e & HMM_PFN_VALID:
                self.warnings.append(f"dmirror_do_fault: bad pfn {e:#x} at page {vpn + i:#x}")
            tag = TAG_WRITE if e & HMM_PFN_WRITE else TAG_READ
            if write and tag != TAG_WRITE:
                raise BadAddress(f"dmirror: write requested but not granted at {vpn + i:#x}")
            self.pt[vpn + i] = (hmm_pfn_to_page(e), tag)
            self.stats.faults += 1
            self.stats.pages_mapped += 1
        if sched.active() is not None:
            sched.note("dpte", f"{self!r} maps {len(rng.hmm_pfns)} page(s) at {rng.start:#x}")

    # ----- migration to the device ----------------------------------------------------
    def _migration_windows(self, cmd: DmirrorCmd) -> list[tuple[Vma, int, int]]:
        """The VMA walk of MIGRATE_TO_DEV/SYS: -EINVAL for uncovered or unreadable VMAs."""
        out = []
        addr, end = cmd.addr, cmd.addr + (cmd.npages << PAGE_SHIFT)
        while addr < end:
            vma = self.mm.find_vma(addr)
            if vma is None or not vma.flags & VM_READ:
                raise InvalidArgument(f"dmirror: no readable mapping at {addr:#x}")
            nxt = min(end, addr + MIGRATE_WINDOW * PAGE_SIZE, vma.end)
            out.append((vma, addr, nxt))
            addr = nxt
        return out

    def _migrate_args(self, vma: Vma, start: int, end: int, flags: int) -> MigrateVma:
        """Empty src/dst arrays for one window, this device as the pgmap owner."""
        n = (end - start) >> PAGE_SHIFT
        return MigrateVma(
            vma,
            start,
            end,
            np.zeros(n, dtype=_U64),
            np.zeros(n, dtype=_U64),
            pgmap_owner=self.device,
            flags=flags,
        )

    def cmd_migrate_to_dev(self, cmd: DmirrorCmd) -> None:
        size = cmd.npages << PAGE_SHIFT
        self._buffer(cmd, size)
        if not self.mm.mmget_not_zero():
            raise InvalidArgument("dmirror: the mm is gone")
        try:
            with self.mm.mmap_lock.read():
                for vma, start, end in self._migration_windows(cmd):
                    args = self._migrate_args(
                        vma, start, end, MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_SELECT_COMPOUND
                    )
                    migrate_vma_setup(args)
                    self._alloc_and_copy_to_device(args)
                    migrate_vma_pages(args)
                    self._finalize_and_map(args)
                    migrate_vma_finalize(args)
                    self.stats.migrations_to_device += 1
        finally:
            self.mm.mmput()
        self._read_back(cmd, "some pages are not in this device's page table")

    def _read_back(self, cmd: DmirrorCmd, why: str) -> None:
        """Read the range through the device page table into the caller's buffer.

        Every page must have an entry, else -ENOENT (nothing copied out).
        """
        size = cmd.npages << PAGE_SHIFT
        bounce = bytearray(size)
        self._cpages = 0
        with self.mutex:
            ret = self._do_read(cmd.addr, cmd.addr + size, bounce, cmd.addr)
        if ret:
            raise NoEntry(f"dmirror: {why}")
        cmd.cpages = self._cpages
        assert cmd.buf is not None
        cmd.buf[:size] = bounce

    def _alloc_and_copy_to_device(self, args: MigrateVma) -> None:
        phys = self.machine.phys
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
                self.warnings.append(f"dmirror: zone-device source {spage:#x} selected")
                i += 1
                continue
            compound = bool(s & MIGRATE_PFN_COMPOUND)
            write = s & MIGRATE_PFN_WRITE
            if compound:
                dpage = self.device.alloc_page(self, PMD_ORDER)
                if dpage is not None:
                    self._fill(dpage, spage, PMD_PAGES)
                    dst[i] = _U64(migrate_pfn(dpage) | MIGRATE_PFN_COMPOUND | write)
                    self.device.page_mirror[dpage] = self
                else:
                    # No device folio: single pages, and the core splits the THP.
                    for j in range(PMD_PAGES):
                        page = self.device.alloc_page(self, 0)
                        if page is None:
                            continue
                        self._fill(page, None if spage is None else spage + j, 1)
                        dst[i + j] = _U64(migrate_pfn(page) | write)
                        self.device.page_mirror[page] = self
                i += PMD_PAGES
                continue
            dpage = self.device.alloc_page(self, 0)
            if dpage is not None:
                self._fill(dpage, spage, 1)
                dst[i] = _U64(migrate_pfn(dpage) | write)
                self.device.page_mirror[dpage] = self
            i += 1

    def _fill(self, dpage: int, spage: int | None, nr: int) -> None:
        phys = self.machine.phys
        pages = np.arange(dpage, dpage + nr, dtype=np.int64)
        if spage is None:
            phys.zero_pages(pages)
        else:
            phys.copy_pages(pages, np.arange(spage, spage + nr, dtype=np.int64))

    def _finalize_and_map(self, args: MigrateVma) -> None:
        """``dmirror_migrate_finalize_and_map``: map every migrated page on the device."""
        assert args.src is not None and args.dst is not None
        phys = self.machine.phys
        base = args.start >> PAGE_SHIFT
        with self.mutex:
            for i in range(args.npages):
                s, d = int(args.src[i]), int(args.dst[i])
                dpage = migrate_pfn_to_page(d)
                if not s & MIGRATE_PFN_MIGRATE or dpage is None:
                    continue
                nr = 1 << int(phys.order[dpage])
                tag = TAG_WRITE if d & MIGRATE_PFN_WRITE else TAG_READ
                for j in range(nr):
                    self.pt[base + i + j] = (dpage + j, tag)
                self.stats.pages_mapped += nr

    # ----- migration back to system memory -----------------------------------------------
    def _alloc_and_copy_to_ram(self, args: MigrateVma) -> bool:
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
        phys = self.machine.phys
        assert args.src is not None and args.dst is not None
        src, dst = args.src, args.dst
        base = args.start >> PAGE_SHIFT
        if self._alloc_and_copy_to_ram_order0(args):
            return True
        i = 0
        while i < args.npages:
            s = int(src[i])
            spage = migrate_pfn_to_page(s)
            if spage is None or not s & MIGRATE_PFN_MIGRATE:
                i += 1
                continue
            if phys.pgmap_of(spage) is None:
                self.warnings.append(f"dmirror: system page {spage:#x} selected for RAM")
                i += 1
                continue
            # The kernel takes the order of the backing folio; a source entry
            # is COMPOUND exactly when it stands for a whole device folio.
            order = PMD_ORDER if s & MIGRATE_PFN_COMPOUND else 0
            nr = 1 << order
            flags = (MIGRATE_PFN_COMPOUND if order else 0) | (s & MIGRATE_PFN_WRITE)
            new: int | None = None
            if self.flags & uapi.HMM_DMIRROR_FLAG_FAIL_ALLOC:
                self.flags &= ~uapi.HMM_DMIRROR_FLAG_FAIL_ALLOC  # one shot
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
                self._fill(new, spage, nr)
                dst[i] = _U64(migrate_pfn(new) | flags)
            else:
                # No folio: one page per subpage.
                for j in range(nr):
                    try:
                        page = phys.alloc_one(0)
                    except OutOfMemory:
                        with self.mutex:
                            self._erase(base + i, base + i + j - 1)
                        return False
                    phys.folio_lock(page)
                    self._fill(page, spage + j, 1)
                    dst[i + j] = _U64(migrate_pfn(page))
            with self.mutex:
                self._erase(base + i, base + i + nr - 1)
            i += nr
        return True

    def _alloc_and_copy_to_ram_order0(self, args: MigrateVma) -> bool:
        """The common case of ``_alloc_and_copy_to_ram``, vectorised: every
        migrating entry is an order-0 device page, FAIL_ALLOC is clear and
        there are enough free pages for all of them. Then the per-entry walk
        would allocate, copy and erase each in turn with no failure, and this
        does the same at once. Returns False (having done nothing) otherwise.
        """
        if self.flags & uapi.HMM_DMIRROR_FLAG_FAIL_ALLOC or args.npages <= 8:
            return False
        assert args.src is not None and args.dst is not None
        phys = self.machine.phys
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
        pt = self.pt
        with self.mutex:
            erased = 0
            for vpn in (idx + base).tolist():
                if pt.pop(vpn, None) is not None:
                    erased += 1
            self.stats.pages_unmapped += erased
        return True

    def devmem_fault(self, vmf: VmFault) -> int:
        """``dmirror_devmem_fault`` (``migrate_to_ram``)."""
        phys = self.machine.phys
        head = phys.head(vmf.page)
        order = int(phys.order[head])
        _loc, _e, level = vmf.vma.mm.pt.lookup(vmf.address >> PAGE_SHIFT)
        if level == 0:
            order = 0  # faulted through a PTE: one page
        size = PAGE_SIZE << order
        start = vmf.address & ~(size - 1)
        n = size >> PAGE_SHIFT
        flags = (
            MIGRATE_VMA_SELECT_DEVICE_PRIVATE
            if self.device.memory == "private"
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
            pgmap_owner=self.device,
            flags=flags,
            fault_page=vmf.page,
        )
        try:
            migrate_vma_setup(args)
        except HmmsimError:
            return VM_FAULT_SIGBUS
        # Pages and finalize run even when an allocation failed: the page
        # that got no destination stays on the device (dst 0).
        ok = self._alloc_and_copy_to_ram(args)
        migrate_vma_pages(args)
        migrate_vma_finalize(args)
        if not ok:
            return VM_FAULT_OOM
        self.stats.migrations_to_system += 1
        return 0

    def cmd_migrate_to_sys(self, cmd: DmirrorCmd) -> None:
        if not self.mm.mmget_not_zero():
            raise InvalidArgument("dmirror: the mm is gone")
        flags = (
            MIGRATE_VMA_SELECT_DEVICE_PRIVATE
            if self.device.memory == "private"
            else MIGRATE_VMA_SELECT_DEVICE_COHERENT
        ) | MIGRATE_VMA_SELECT_COMPOUND
        try:
            with self.mm.mmap_lock.read():
                for vma, start, end in self._migration_windows(cmd):
                    args = self._migrate_args(vma, start, end, flags)
                    migrate_vma_setup(args)
                    # Pages and finalize run even when an allocation failed:
                    # what got no destination stays on the device (dst 0).
                    ok = self._alloc_and_copy_to_ram(args)
                    migrate_vma_pages(args)
                    assert args.src is not None
                    moved = (args.src & _U64(MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE)) == _U64(
                        MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE
                    )
                    cmd.cpages += int(moved.sum())
                    migrate_vma_finalize(args)
                    if not ok:
                        raise OutOfMemory("dmirror: no system memory to migrate back")
                    self.stats.migrations_to_system += 1
        finally:
            self.mm.mmput()

    # ----- exclusive access -----------------------------------------------------------------
    def cmd_exclusive(self, cmd: DmirrorCmd) -> None:
        size = cmd.npages << PAGE_SHIFT
        self._buffer(cmd, size)
        if not self.mm.mmget_not_zero():
            raise InvalidArgument("dmirror: the mm is gone")
        phys = self.machine.phys
        try:
            with self.mm.mmap_lock.read():
                for addr in range(cmd.addr, cmd.addr + size, PAGE_SIZE):
                    page, folio = make_device_exclusive(self.mm, addr, None)
                    with self.mutex:
                        self.pt[addr >> PAGE_SHIFT] = (page, TAG_ATOMIC)
                    phys.folio_unlock(folio)
                    phys.put_page(folio)
        finally:
            self.mm.mmput()
        self._read_back(cmd, "exclusive pages vanished before the read-back")

    def cmd_check_exclusive(self, cmd: DmirrorCmd) -> None:
        with self.mutex:
            first = cmd.addr >> PAGE_SHIFT
            for vpn in range(first, first + cmd.npages):
                entry = self.pt.get(vpn)
                if entry is not None and entry[1] == TAG_ATOMIC:
                    raise NotPermitted(f"dmirror: page {vpn << PAGE_SHIFT:#x} is still atomic")

    # ----- snapshot ------------------------------------------------------------------------
    def cmd_snapshot(self, cmd: DmirrorCmd) -> None:
        """``dmirror_snapshot``: one protection byte per page, 32-page window by window.

        Each window's bytes are copied out to the caller's buffer, and counted
        in ``cpages``, as soon as the window is done: an error in a later
        window (-EBUSY, or -EFAULT when the buffer cannot take the window)
        leaves the earlier windows' bytes written, though the command fails
        and its counters are not copied back. The kernel's ``copy_to_user``
        may also leave part of the failing window written; here it writes
        none of it.
        """
        if not self.mm.mmget_not_zero():
            raise InvalidArgument("dmirror: the mm is gone")
        try:
            addr, end = cmd.addr, cmd.addr + (cmd.npages << PAGE_SHIFT)
            while addr < end:
                nxt = min(end, addr + FAULT_WINDOW * PAGE_SIZE)
                perm = self._snapshot_window(addr, nxt)
                off = (addr - cmd.addr) >> PAGE_SHIFT
                if cmd.buf is None or len(cmd.buf) < off + len(perm):
                    raise BadAddress(f"dmirror: snapshot buffer ends before byte {off + len(perm)}")
                cmd.buf[off : off + len(perm)] = perm
                cmd.cpages += len(perm)
                addr = nxt
        finally:
            self.mm.mmput()

    def _snapshot_window(self, start: int, end: int) -> bytes:
        """``dmirror_range_snapshot``: the protection bytes of one window."""
        sub = mmu_interval_notifier_insert(self.mm, start, end - start, _SnapshotOps(self))
        try:
            clock = self.machine.clock
            deadline = clock.now_ns + HMM_RANGE_DEFAULT_TIMEOUT * 1_000_000
            pfns = np.zeros((end - start) >> PAGE_SHIFT, dtype=_U64)
            rng = HmmRange(sub, start, end, pfns, dev_private_owner=self.device)
            while True:
                if clock.now_ns > deadline:
                    raise Busy(f"dmirror: snapshot of [{start:#x}, {end:#x}) timed out")
                rng.notifier_seq = mmu_interval_read_begin(sub)
                try:
                    with self.mm.mmap_lock.read():
                        hmm_range_fault(rng)
                except Busy:
                    continue
                sched.point("dmirror:snapshot_after_range_fault")
                with self.mutex:
                    if mmu_interval_read_retry(sub, rng.notifier_seq):
                        continue
                    sched.point("dmirror:snapshot_encoding")
                    return bytes(self._mkentry(e) for e in pfns.tolist())
        finally:
            mmu_interval_notifier_remove(sub)

    def _mkentry(self, e: int) -> int:
        """``dmirror_mkentry``: one protection byte per page."""
        if e & HMM_PFN_ERROR:
            return uapi.HMM_DMIRROR_PROT_ERROR
        if not e & HMM_PFN_VALID:
            return uapi.HMM_DMIRROR_PROT_NONE
        pfn = hmm_pfn_to_page(e)
        phys = self.machine.phys
        pgmap = phys.pgmap_of(pfn)
        value = 0
        if pgmap is not None and pgmap.type == MEMORY_DEVICE_PRIVATE:
            value = (
                uapi.HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL
                if pgmap.owner is self.device
                else uapi.HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE
            )
        elif pgmap is not None and pgmap.type == MEMORY_DEVICE_COHERENT:
            value = (
                uapi.HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL
                if pgmap.owner is self.device
                else uapi.HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE
            )
        elif pfn == ZERO_PFN:
            # is_zero_pfn() matches the 4 KiB zero page only: the huge zero
            # page reads as an ordinary read-only PMD (READ|PMD, 0x05).
            value = uapi.HMM_DMIRROR_PROT_ZERO
        value |= uapi.HMM_DMIRROR_PROT_WRITE if e & HMM_PFN_WRITE else uapi.HMM_DMIRROR_PROT_READ
        order = hmm_pfn_to_map_order(e)
        if order == PMD_ORDER:
            value |= uapi.HMM_DMIRROR_PROT_PMD
        elif order == PUD_ORDER:
            value |= uapi.HMM_DMIRROR_PROT_PUD
        return value

    # ----- release and flags --------------------------------------------------------------
    def cmd_release(self, cmd: DmirrorCmd) -> None:
        self.device.remove_chunks()

    def cmd_flags(self, cmd: DmirrorCmd) -> None:
        self.flags = cmd.npages

    # ----- file operations -------------------------------------------------------------------
    def mmap(self, vma: Vma) -> None:
        """``dmirror_fops_mmap``: a zeroed kernel page per page, via vm_insert_page."""
        phys = self.machine.phys
        for addr in range(vma.start, vma.end, PAGE_SIZE):
            page = phys.alloc_one(0)
            vm_insert_page(vma, addr, page)
            phys.put_one(page)  # the mapping holds it now

    def close(self) -> None:
        """``dmirror_fops_release``: remove the notifier, evict the device, free the table."""
        if self.closed:
            return
        mmu_interval_notifier_remove(self.notifier)
        self.closed = True
        try:
            self.device.evict_all()
        finally:
            # Closed even if eviction found nothing left to kill (see evict_chunk).
            self.pt.clear()
            if self in self.device.files:
                self.device.files.remove(self)

    # ----- the generic Mirror API, built on the commands above ----------------------------------
    def _pages_covering(self, addr: int, length: int) -> tuple[int, int]:
        first = addr & ~(PAGE_SIZE - 1)
        end = (addr + length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        return first, (end - first) >> PAGE_SHIFT

    def read(self, addr: int, length: int) -> bytes:
        check_user_range(addr, length, "dmirror read")
        if length == 0:
            return b""
        first, n = self._pages_covering(addr, length)
        cmd = DmirrorCmd(first, n, bytearray(n << PAGE_SHIFT))
        self.ioctl(uapi.HMM_DMIRROR_READ, cmd)
        assert cmd.buf is not None
        off = addr - first
        return bytes(memoryview(cmd.buf)[off : off + length])

    def write(self, addr: int, data: bytes) -> None:
        """A device store of exactly ``data``: the bytes around it are never rewritten.

        The WRITE command stores whole pages; a sub-page store built on it
        would read the pages first and write them back, losing a CPU store
        to the same page in between. So the store runs the command's fault
        loop and, once every page is mapped writable, copies only its own
        bytes, all under the mirror lock (an invalidation cannot split it:
        nothing is stored unless every page is mapped).
        """
        check_user_range(addr, len(data), "dmirror write")
        if not data:
            return
        if self.closed:
            raise BadAddress("dmirror: write on a closed file")
        first, n = self._pages_covering(addr, len(data))
        end = first + (n << PAGE_SHIFT)
        if end > ULONG_MAX:
            raise InvalidArgument("dmirror: wrapping range")
        while True:
            with self.mutex:
                pfns = self._mapped_prefix(first, end, need_write=True)
                if len(pfns) == n:
                    self._store(pfns, addr - first, memoryview(data))
                    return
            start = first + (len(pfns) << PAGE_SHIFT)
            self.fault(start, end, True)  # raises on failure
            self.stats.fault_rounds += 1

    def _store(self, pfns: NDArray[np.int64], off: int, data: memoryview) -> None:
        """Copy ``data`` to byte ``off`` of the pages ``pfns`` (whole middle pages
        in one scatter) and dirty their folios, as ``_do_write`` does."""
        phys = self.machine.phys
        n = len(pfns)
        head = min(len(data), PAGE_SIZE - off) if off else 0
        full = (len(data) - head) // PAGE_SIZE
        if head:
            phys.write(int(pfns[0]), off, data[:head])
        if full:
            k = 1 if head else 0
            body = np.frombuffer(data[head : head + full * PAGE_SIZE], dtype=np.uint8)
            phys.write_pages(pfns[k : k + full], body.reshape(full, PAGE_SIZE))
        tail = data[head + full * PAGE_SIZE :]
        if len(tail):
            phys.write(int(pfns[n - 1]), 0, tail)
        phys.flags[phys.head_of(pfns)] |= np.uint16(PG_dirty)

    def device_ptes(self, addr: int, npages: int) -> list[DevicePte | None]:
        # A debug read, lock-free on purpose (see Mirror.device_ptes).
        check_user_pages(addr & ~(PAGE_SIZE - 1), npages, "dmirror device_ptes")
        if not self.pt:
            return [None] * npages
        out: list[DevicePte | None] = []
        for vpn in range(addr >> PAGE_SHIFT, (addr >> PAGE_SHIFT) + npages):
            entry = self.pt.get(vpn)
            if entry is None:
                out.append(None)
                continue
            pfn, tag = entry
            out.append(
                DevicePte(
                    vpn << PAGE_SHIFT,
                    pfn,
                    tag == TAG_WRITE,
                    tag == TAG_ATOMIC,
                    0,
                    self.device.kind_of_page(pfn),
                )
            )
        return out

    def device_pte_state(self, addr: int, npages: int) -> Hashable | None:
        # The raw (pfn, tag) entries determine device_ptes (a pfn's memory
        # kind never changes), at a fraction of the cost of building them.
        if not self.pt:
            return None
        vpn = addr >> PAGE_SHIFT
        state = tuple(map(self.pt.get, range(vpn, vpn + npages)))
        return state if state.count(None) < npages else None

    def migrate_to_device(self, addr: int, npages: int) -> int:
        check_user_pages(addr, npages, "dmirror migrate_to_device")
        cmd = DmirrorCmd(addr, npages, bytearray(npages << PAGE_SHIFT))
        self.ioctl(uapi.HMM_DMIRROR_MIGRATE_TO_DEV, cmd)
        return cmd.cpages

    def migrate_to_system(self, addr: int, npages: int) -> int:
        check_user_pages(addr, npages, "dmirror migrate_to_system")
        cmd = DmirrorCmd(addr, npages)
        self.ioctl(uapi.HMM_DMIRROR_MIGRATE_TO_SYS, cmd)
        return cmd.cpages

    def make_exclusive(self, addr: int, npages: int) -> None:
        check_user_pages(addr, npages, "dmirror make_exclusive")
        self.ioctl(
            uapi.HMM_DMIRROR_EXCLUSIVE, DmirrorCmd(addr, npages, bytearray(npages << PAGE_SHIFT))
        )


_HANDLERS: dict[int, Any] = {
    uapi.HMM_DMIRROR_READ: DmirrorFile.cmd_read,
    uapi.HMM_DMIRROR_WRITE: DmirrorFile.cmd_write,
    uapi.HMM_DMIRROR_MIGRATE_TO_DEV: DmirrorFile.cmd_migrate_to_dev,
    uapi.HMM_DMIRROR_MIGRATE_TO_SYS: DmirrorFile.cmd_migrate_to_sys,
    uapi.HMM_DMIRROR_SNAPSHOT: DmirrorFile.cmd_snapshot,
    uapi.HMM_DMIRROR_EXCLUSIVE: DmirrorFile.cmd_exclusive,
    uapi.HMM_DMIRROR_CHECK_EXCLUSIVE: DmirrorFile.cmd_check_exclusive,
    uapi.HMM_DMIRROR_RELEASE: DmirrorFile.cmd_release,
    uapi.HMM_DMIRROR_FLAGS: DmirrorFile.cmd_flags,
}


class Dmirror(Driver):
    """The ``dmirror`` driver: ``m.probe("dmirror", memory="private" | "coherent")``."""

    name = "dmirror"
    capabilities = (
        Capability.MIRROR
        | Capability.READ
        | Capability.WRITE
        | Capability.MIGRATE
        | Capability.EXCLUSIVE
        | Capability.DEVICE_PRIVATE
    )
    parameters: ClassVar[Mapping[str, Parameter | str]] = {
        "memory": Parameter(
            "the kind of device memory: unaddressable device-private or CPU-coherent",
            choices=("private", "coherent"),
            default="private",
        ),
    }
    #: What ``hmmsim check`` and the suite test when no variant is named.
    variants: ClassVar[list[dict[str, str]]] = [{"memory": "private"}, {"memory": "coherent"}]

    def capabilities_for(self, **params: Any) -> Capability:
        if params.get("memory", "private") == "coherent":
            return (self.capabilities & ~Capability.DEVICE_PRIVATE) | Capability.DEVICE_COHERENT
        return self.capabilities

    def probe(self, machine: Machine, **params: Any) -> DmirrorDevice:
        unknown = set(params) - set(self.parameters)
        if unknown:
            raise InvalidArgument(f"dmirror: unknown parameter(s) {', '.join(sorted(unknown))}")
        return DmirrorDevice(self, machine, str(params.get("memory", "private")))
