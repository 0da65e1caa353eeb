"""dmirror's file: one open of the device, a mirror of the opener's mm.

Kernel counterpart: ``struct dmirror`` and its file operations in
lib/test_hmm.c — the whole-address-space interval notifier
(``dmirror_interval_invalidate``), the device page table, the device fault
(``dmirror_fault`` / ``dmirror_do_fault``), the ioctl table
(``dmirror_fops_unlocked_ioctl``), snapshot (``dmirror_snapshot``),
exclusive access (``dmirror_exclusive``) and release. The migration commands
live in migrate.py.

The device page table maps vpn → (page, tag), tag 0 read / 1 atomic /
3 write, under the mirror's mutex: the lock ``invalidate`` takes, and the
one the fault path checks ``mmu_interval_read_retry`` under.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Final

import numpy as np
from hmmsim import sched
from hmmsim.driver import DevicePte, Mirror, MirrorStats, check_user_pages, check_user_range
from hmmsim.errors import BadAddress, Busy, InvalidArgument, NoEntry, NotPermitted
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
from hmmsim.memremap import MEMORY_DEVICE_COHERENT, MEMORY_DEVICE_PRIVATE
from hmmsim.mm import (
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_ORDER,
    PUD_ORDER,
    ZERO_PFN,
    PG_dirty,
    vm_insert_page,
)
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

from . import migrate, uapi
from .uapi import DmirrorCmd

if TYPE_CHECKING:
    from hmmsim import Process
    from hmmsim.mm import Vma
    from hmmsim.notifier import IntervalNotifier, NotifierRange

    from .device import DmirrorDevice

#: Pages per ``hmm_range_fault`` window (``unsigned long pfns[32]`` on the stack).
FAULT_WINDOW: Final = 32

TAG_READ: Final = 0
TAG_ATOMIC: Final = 1
TAG_WRITE: Final = 3

_U64 = np.uint64


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
            self.erase(rng.start >> PAGE_SHIFT, rng.end >> PAGE_SHIFT)
            self.stats.invalidations += 1
        finally:
            self.mutex.release()
        return True

    def map_pages(self, vpn: int, pfn: int, nr: int, writable: bool) -> None:
        """Map ``nr`` pages from ``pfn`` at ``vpn`` on the device (the mutex held)."""
        tag = TAG_WRITE if writable else TAG_READ
        for j in range(nr):
            self.pt[vpn + j] = (pfn + j, tag)
        self.stats.pages_mapped += nr

    def erase(self, first: int, last: int) -> None:
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

    def user_buffer(self, cmd: DmirrorCmd, nbytes: int) -> bytearray:
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
            bounce = bytearray(self.user_buffer(cmd, size)[:size])
        else:
            self.user_buffer(cmd, size)
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
            self.stats.faults += 1
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
            self.stats.fault_rounds += 1  # the hmm_range_fault call below
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
                self.machine.warn(
                    "dmirror",
                    "dmirror_do_fault",
                    "hmm_range_fault returned 0 with a page not valid",
                    f"pfn entry {e:#x} at page {vpn + i:#x}",
                )
            tag = TAG_WRITE if e & HMM_PFN_WRITE else TAG_READ
            if write and tag != TAG_WRITE:
                raise BadAddress(f"dmirror: write requested but not granted at {vpn + i:#x}")
            self.pt[vpn + i] = (hmm_pfn_to_page(e), tag)
            self.stats.pages_mapped += 1
        if sched.active() is not None:
            sched.note("dpte", f"{self!r} maps {len(rng.hmm_pfns)} page(s) at {rng.start:#x}")

    def read_back(self, cmd: DmirrorCmd, why: str) -> None:
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

    # ----- exclusive access -----------------------------------------------------------------
    def cmd_exclusive(self, cmd: DmirrorCmd) -> None:
        size = cmd.npages << PAGE_SHIFT
        self.user_buffer(cmd, size)
        if not self.mm.mmget_not_zero():
            raise InvalidArgument("dmirror: the mm is gone")
        phys = self.machine.phys
        try:
            with self.mm.mmap_lock.read():
                for addr in range(cmd.addr, cmd.addr + size, PAGE_SIZE):
                    page, folio = make_device_exclusive(self.mm, addr, None)
                    with self.mutex:
                        self.pt[addr >> PAGE_SHIFT] = (page, TAG_ATOMIC)
                        self.stats.pages_mapped += 1
                    phys.folio_unlock(folio)
                    phys.put_page(folio)
        finally:
            self.mm.mmput()
        self.read_back(cmd, "exclusive pages vanished before the read-back")

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
            self.stats.pages_unmapped += len(self.pt)
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
            self.stats.faults += 1

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


_HANDLERS: dict[int, Callable[[DmirrorFile, DmirrorCmd], None]] = {
    uapi.HMM_DMIRROR_READ: DmirrorFile.cmd_read,
    uapi.HMM_DMIRROR_WRITE: DmirrorFile.cmd_write,
    uapi.HMM_DMIRROR_MIGRATE_TO_DEV: migrate.migrate_to_device,
    uapi.HMM_DMIRROR_MIGRATE_TO_SYS: migrate.migrate_to_system,
    uapi.HMM_DMIRROR_SNAPSHOT: DmirrorFile.cmd_snapshot,
    uapi.HMM_DMIRROR_EXCLUSIVE: DmirrorFile.cmd_exclusive,
    uapi.HMM_DMIRROR_CHECK_EXCLUSIVE: DmirrorFile.cmd_check_exclusive,
    uapi.HMM_DMIRROR_RELEASE: DmirrorFile.cmd_release,
    uapi.HMM_DMIRROR_FLAGS: DmirrorFile.cmd_flags,
}
