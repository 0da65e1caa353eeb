"""nouveau SVM: the replayable fault buffer, the fault work item, the svmm notifiers.

Kernel counterpart: ``drivers/gpu/drm/nouveau/nouveau_svm.c``. The mainline
path follows the ~6.17 source; the v5.8 and v5.7 paths follow the April 2020
source, where faults were serviced in 16-entry windows.

Mainline (v5.9+), in the kernel's order:

1. The fault-buffer event only schedules the work item, ``nouveau_svm_fault``.
2. Drain: every 32-byte entry from GET to PUT is decoded. An entry without the
   valid bit is dropped with a warning, not cancelled. Then GET is written back.
3. The batch is sorted by (instance, address, access priority), with PREFETCH
   0 < READ 1 < WRITE 2 < ATOMIC 3 ascending, so the *weakest* access at an
   address is handled first. (The source comment still says "WRITE faults
   appear first"; it describes the pre-5.14 comparator.)
4. Each instance is looked up to its svmm. A fault with no svmm is cancelled.
5. Each group head gets a 4 KiB window. The unmanaged-hole clip is computed
   and then overwritten: dead code, kept dead here. READ asks ``REQ_FAULT``;
   PREFETCH asks nothing (a snapshot); ATOMIC takes the atomic path; anything
   else asks ``REQ_FAULT|REQ_WRITE``.
6. ``nouveau_range_fault`` inserts a transient interval notifier over the
   window. One 1000 ms deadline covers both the -EBUSY and the read_retry
   loops. ``svmm->mutex`` is held from read_retry through the PFNMAP. The GPU
   mapping grows to the CPU's mapping order.
7. Later faults are folded into the group while they belong to the same svmm,
   lie below the mapped end, and the PFNMAP word satisfies the *head* fault's
   access. A stronger fault folded after a weaker head just faults again
   after the replay. On error every fault of the group is cancelled, which
   kills the channel. One replay is issued after the batch if any group
   succeeded.

Quirks kept, each from the source:

* ``atomic`` is set by the first ATOMIC fault of a batch and never reset, so
  every fault handled after it in the same batch takes the atomic path.
* The transient notifier covers 4 KiB while the mapping may be 2 MiB.
  Correctness rests on the whole-mm notifier, which clears the whole
  invalidated range (the source calls this arrangement a hack).
* The whole-mm notifier skips ``MMU_NOTIFY_MIGRATE`` of nouveau's own
  migrations. The transient one skips ``MMU_NOTIFY_EXCLUSIVE`` of nouveau's
  own owner.
* The whole-mm notifier has no ``.release``: GPU PTEs outlive the mm until
  the client's SVM is torn down.
* A range that straddles the unmanaged hole is cleared as
  [start, hole end) and then [hole end, end). The first PFNCLR includes the
  hole.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import numpy as np
from hmmsim import sched
from hmmsim.errors import BadAddress, Busy, HmmsimError, InvalidArgument, NotSupported
from hmmsim.exclusive import make_device_exclusive
from hmmsim.hmm import (
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
from hmmsim.notifier import (
    MMU_NOTIFY_EXCLUSIVE,
    MMU_NOTIFY_MIGRATE,
    MmuNotifier,
    mmu_interval_notifier_insert,
    mmu_interval_notifier_remove,
    mmu_interval_read_begin,
    mmu_interval_read_retry,
    mmu_interval_set_seq,
    mmu_notifier_register,
    mmu_notifier_unregister,
)

from . import uapi
from .uapi import (
    FAULT_ACCESS_ATOMIC,
    FAULT_ACCESS_PREFETCH,
    FAULT_ACCESS_READ,
    FAULT_ACCESS_WRITE,
    FAULT_ENTRY_SIZE,
    NVIF_VMM_PFNMAP_V0_A,
    NVIF_VMM_PFNMAP_V0_HOST,
    NVIF_VMM_PFNMAP_V0_V,
    NVIF_VMM_PFNMAP_V0_VRAM,
    NVIF_VMM_PFNMAP_V0_W,
    FaultEntry,
    decode_fault,
    encode_fault,
)
from .vmm import PAGE_SHIFT, PAGE_SIZE, GpuVmm

if TYPE_CHECKING:
    from hmmsim import AddressSpace
    from hmmsim.notifier import IntervalNotifier, NotifierRange

    from .device import NouveauCli, NouveauDrm

#: Fault-buffer entries (the hardware's ``entries``).
FAULT_BUFFER_ENTRIES: Final = 256
#: The fault-window size of v5.7/5.8 (``u64 phys[16]``).
WINDOW_PAGES: Final = 16
#: ``nouveau_svm_fault_priority``; an unknown access code is -1 (sorts first).
_PRIORITY: Final = {
    FAULT_ACCESS_PREFETCH: 0,
    FAULT_ACCESS_READ: 1,
    FAULT_ACCESS_WRITE: 2,
    FAULT_ACCESS_ATOMIC: 3,
}


class FaultBuffer:
    """The replayable fault buffer: a ring of 32-byte entries with GET and PUT."""

    def __init__(self, entries: int = FAULT_BUFFER_ENTRIES) -> None:
        self.entries = entries
        self.mem = bytearray(entries * FAULT_ENTRY_SIZE)
        self.get = 0
        self.put = 0
        #: Faults the GPU could not record because the ring was full.
        self.overflows = 0

    def free_slots(self) -> int:
        return self.entries - 1 - (self.put - self.get) % self.entries

    def push(self, entry: FaultEntry, valid: bool = True) -> bool:
        """The GPU records a fault. False when the ring is full (the fault is lost)."""
        if self.free_slots() == 0:
            self.overflows += 1
            return False
        off = self.put * FAULT_ENTRY_SIZE
        self.mem[off : off + FAULT_ENTRY_SIZE] = encode_fault(entry, valid)
        self.put = (self.put + 1) % self.entries
        return True


class SvmmNotifier(MmuNotifier):
    """``nouveau_mn_ops``: the whole-mm notifier (invalidate_range_start only)."""

    def __init__(self, svmm: NouveauSvmm) -> None:
        self.svmm = svmm

    def invalidate_range_start(self, rng: NotifierRange) -> int:
        """``nouveau_svmm_invalidate_range_start``."""
        svmm = self.svmm
        if not rng.blockable:
            return -11  # -EAGAIN
        with svmm.mutex:
            if svmm.vmm is None:
                return 0
            # Own migrations update GPU PTEs themselves (v5.9+; v5.7/5.8 had no filter).
            if (
                svmm.drm.era == "mainline"
                and rng.event == MMU_NOTIFY_MIGRATE
                and rng.owner is svmm.drm
            ):
                svmm.stats.migrate_skipped += 1
                return 0
            svmm.cli.stats.invalidations += 1
            start, limit = rng.start, rng.end
            hole_start, hole_limit = svmm.unmanaged
            if limit > hole_start and start < hole_limit:
                if start < hole_start:
                    svmm.invalidate(start, hole_limit)
                start = hole_limit
            svmm.invalidate(start, limit)
        return 0


class _TransientOps:
    """``nouveau_svm_mni_ops``: the per-fault interval notifier only bumps the sequence."""

    def __init__(self, svmm: NouveauSvmm) -> None:
        self.svmm = svmm

    def invalidate(self, sub: IntervalNotifier, rng: NotifierRange, cur_seq: int) -> bool:
        svmm = self.svmm
        if (
            svmm.drm.era == "mainline"
            and rng.event == MMU_NOTIFY_EXCLUSIVE
            and (rng.owner is svmm.drm)
        ):
            return True
        if rng.blockable:
            svmm.mutex.acquire()
        elif not svmm.mutex.try_acquire():
            return False
        mmu_interval_set_seq(sub, cur_seq)
        svmm.mutex.release()
        return True


class SvmmStats:
    """What a svmm counts (tests assert on them)."""

    def __init__(self) -> None:
        self.migrate_skipped = 0
        self.pfnclr = 0


class NouveauSvmm:
    """``struct nouveau_svmm``: one client's SVM state."""

    def __init__(self, cli: NouveauCli, unmanaged_addr: int, unmanaged_size: int) -> None:
        self.cli = cli
        self.drm = cli.drm
        self.mm: AddressSpace = cli.process.mm
        self.unmanaged = (unmanaged_addr, unmanaged_addr + unmanaged_size)
        self.mutex = sched.Mutex(f"nouveau{self.drm.owner_id}.svmm")
        self.vmm: GpuVmm | None = GpuVmm(self.drm, cli.stats)
        self.notifier = SvmmNotifier(self)
        self.stats = SvmmStats()

    def transient_ops(self) -> _TransientOps:
        """The ops of a per-fault interval notifier on this svmm (``nouveau_svm_mni_ops``)."""
        return _TransientOps(self)

    def invalidate(self, start: int, limit: int) -> None:
        """``nouveau_svmm_invalidate``: PFNCLR [start, limit) (nothing if empty)."""
        if limit > start and self.vmm is not None:
            self.stats.pfnclr += 1
            self.vmm.pfnclr(start, limit - start)

    def pfns_map(self, addr: int, words: list[int]) -> None:
        """``nouveau_pfns_map``: one PFNMAP of 4 KiB entries under ``svmm->mutex``."""
        with self.mutex:
            if self.vmm is not None:
                self.vmm.pfnmap(addr, PAGE_SHIFT, words)
                self.cli.stats.pages_mapped += sum(1 for w in words if w)

    def fini(self) -> None:
        """``nouveau_svmm_fini``: no VMM any more, then drop the whole-mm notifier."""
        with self.mutex:
            vmm, self.vmm = self.vmm, None
        if vmm is not None:
            vmm.clear_all()
        mmu_notifier_unregister(self.notifier, self.mm)


class PfnmapArgs:
    """The ``nvif_vmm_pfnmap_v0`` argument block of one fault (window and words)."""

    def __init__(self, addr: int, npages: int) -> None:
        self.addr = addr
        self.page = PAGE_SHIFT
        self.size = npages << PAGE_SHIFT
        self.phys = [0] * npages


def nouveau_hmm_convert_pfn(drm: NouveauDrm, rng: HmmRange, args: PfnmapArgs) -> None:
    """``nouveau_hmm_convert_pfn``: one HMM pfn into one PFNMAP word.

    A CPU mapping of order > 0 grows the GPU mapping to exactly that size
    (window aligned down, page moved back to the head of the CPU mapping),
    never larger than the CPU maps.
    """
    e = int(rng.hmm_pfns[0])
    if not e & HMM_PFN_VALID:
        args.phys[0] = 0
        return
    pfn = hmm_pfn_to_page(e)
    order = hmm_pfn_to_map_order(e)
    if order:
        args.page = order + PAGE_SHIFT
        args.size = 1 << args.page
        base = args.addr & ~(args.size - 1)
        pfn -= (args.addr - base) >> PAGE_SHIFT
        args.addr = base
    if drm.is_own_vram(pfn):
        word = drm.dmem.page_addr(pfn) | NVIF_VMM_PFNMAP_V0_V | NVIF_VMM_PFNMAP_V0_VRAM
    else:
        word = (pfn << PAGE_SHIFT) | NVIF_VMM_PFNMAP_V0_V | NVIF_VMM_PFNMAP_V0_HOST
    if e & HMM_PFN_WRITE:
        word |= NVIF_VMM_PFNMAP_V0_W
    args.phys[0] = word


def _deadline(drm: NouveauDrm) -> int:
    return drm.machine.clock.now_ns + HMM_RANGE_DEFAULT_TIMEOUT * 1_000_000


def nouveau_range_fault(svmm: NouveauSvmm, args: PfnmapArgs, hmm_flags: int) -> None:
    """``nouveau_range_fault``: fault one window and PFNMAP it (mainline).

    Raises:
        Busy: the 1000 ms deadline passed (-EBUSY: the fault is cancelled).
        HmmsimError: ``hmm_range_fault`` failed.
    """
    drm = svmm.drm
    clock = drm.machine.clock
    deadline = _deadline(drm)
    notifier = mmu_interval_notifier_insert(svmm.mm, args.addr, args.size, _TransientOps(svmm))
    try:
        rng = HmmRange(
            notifier,
            notifier.start,
            notifier.last + 1,
            np.zeros(1, dtype=np.uint64),
            default_flags=hmm_flags,
            dev_private_owner=drm,
        )
        while True:
            if clock.now_ns > deadline:
                raise Busy(f"nouveau: fault at {args.addr:#x} timed out")
            svmm.cli.stats.fault_rounds += 1  # the hmm_range_fault call below
            rng.notifier_seq = mmu_interval_read_begin(notifier)
            try:
                with svmm.mm.mmap_lock.read():
                    hmm_range_fault(rng)
            except Busy:
                svmm.cli.stats.retries += 1
                continue
            sched.point("nouveau:after_range_fault")
            svmm.mutex.acquire()
            if mmu_interval_read_retry(notifier, rng.notifier_seq):
                svmm.mutex.release()
                svmm.cli.stats.retries += 1
                continue
            break
        try:
            nouveau_hmm_convert_pfn(drm, rng, args)
            _pfnmap(svmm, args)
        finally:
            svmm.mutex.release()
    finally:
        mmu_interval_notifier_remove(notifier)


def _pfnmap(svmm: NouveauSvmm, args: PfnmapArgs) -> None:
    assert svmm.vmm is not None
    svmm.vmm.pfnmap(args.addr, args.page, args.phys)
    svmm.cli.stats.pages_mapped += sum((1 << (args.page - PAGE_SHIFT)) for w in args.phys if w)
    if sched.active() is not None:
        sched.note("dpte", f"nouveau maps {args.size:#x} at {args.addr:#x}")


def nouveau_atomic_range_fault(svmm: NouveauSvmm, args: PfnmapArgs) -> None:
    """``nouveau_atomic_range_fault``: make the page device-exclusive, map V|W|A.

    Raises:
        Busy: the deadline passed.
        InvalidArgument: ``make_device_exclusive`` failed (any error is -EINVAL).
    """
    drm = svmm.drm
    clock = drm.machine.clock
    phys = drm.machine.phys
    deadline = _deadline(drm)
    start = args.addr
    notifier = mmu_interval_notifier_insert(svmm.mm, start, PAGE_SIZE, _TransientOps(svmm))
    try:
        while True:
            if clock.now_ns > deadline:
                raise Busy(f"nouveau: atomic fault at {start:#x} timed out")
            seq = mmu_interval_read_begin(notifier)
            try:
                with svmm.mm.mmap_lock.read():
                    page, folio = make_device_exclusive(svmm.mm, start, drm)
            except HmmsimError as exc:
                raise InvalidArgument(f"nouveau: atomic fault at {start:#x}: {exc}") from exc
            sched.point("nouveau:after_make_exclusive")
            svmm.mutex.acquire()
            if not mmu_interval_read_retry(notifier, seq):
                break
            svmm.mutex.release()
            # The 2025 fix: drop the folio lock and reference before retrying.
            phys.folio_unlock(folio)
            phys.put_page(folio)
            svmm.cli.stats.retries += 1
        try:
            args.page = PAGE_SHIFT
            args.size = PAGE_SIZE
            args.phys[0] = (
                (page << PAGE_SHIFT)
                | NVIF_VMM_PFNMAP_V0_V
                | NVIF_VMM_PFNMAP_V0_W
                | NVIF_VMM_PFNMAP_V0_A
                | NVIF_VMM_PFNMAP_V0_HOST
            )
            _pfnmap(svmm, args)
        finally:
            svmm.mutex.release()
            phys.folio_unlock(folio)
            phys.put_page(folio)
    finally:
        mmu_interval_notifier_remove(notifier)


class NouveauSvm:
    """``struct nouveau_svm``: the device's fault buffer and the fault work item."""

    def __init__(self, drm: NouveauDrm) -> None:
        self.drm = drm
        self.buffer = FaultBuffer()
        self.mutex = sched.Mutex(f"nouveau{drm.owner_id}.svm")
        #: Channel instance -> svmm (``nouveau_ivmm``).
        self.inst: dict[int, NouveauSvmm] = {}
        self.cancelled: list[FaultEntry] = []
        self.replays = 0
        self.batches = 0
        self.dropped_invalid = 0
        #: Fault log lines (the driver's SVM_ERR messages, not kernel WARNs).
        self.warnings: list[str] = []

    # ----- the work item -------------------------------------------------------------------
    def drain(self) -> list[FaultEntry]:
        """Read every entry from GET to PUT; entries without the valid bit are dropped."""
        buf = self.buffer
        out: list[FaultEntry] = []
        while buf.get != buf.put:
            off = buf.get * FAULT_ENTRY_SIZE
            entry, valid = decode_fault(buf.mem[off : off + FAULT_ENTRY_SIZE])
            if not valid:
                self.dropped_invalid += 1
                # nouveau_svm_fault_cache WARNs and drops it: a kernel warning.
                self.drm.machine.warn(
                    "nouveau",
                    "nouveau_svm_fault_cache",
                    "a fault-buffer entry without its valid bit was dropped",
                    f"entry {buf.get}",
                )
            else:
                buf.mem[off + 31] &= 0x7F  # clear the valid bit
                out.append(entry)
            buf.get = (buf.get + 1) % buf.entries
        return out

    def fault(self) -> None:
        """``nouveau_svm_fault``: drain, sort, service, cancel or replay."""
        faults = self.drain()
        if not faults:
            return
        self.batches += 1
        if self.drm.era == "mainline":
            faults.sort(key=lambda f: (f.inst, f.addr, _PRIORITY.get(f.access, -1)))
        else:
            # v5.7/5.8: write and atomic before read and prefetch at one address.
            faults.sort(
                key=lambda f: (
                    f.inst,
                    f.addr,
                    f.access in (FAULT_ACCESS_READ, FAULT_ACCESS_PREFETCH),
                )
            )
        with self.mutex:
            svmms = [self.inst.get(f.inst) for f in faults]
        replay = (self._batch_mainline if self.drm.era == "mainline" else self._batch_window)(
            faults, svmms
        )
        if replay:
            self.replays += 1

    def cancel(self, fault: FaultEntry, cause: Exception | None = None) -> None:
        """``nouveau_svm_fault_cancel_fault``: the engine resets, the channel dies.

        ``cause`` is what made servicing fail (kept for the generic mirror's
        error; the hardware only tells user space that the channel is gone).
        """
        self.cancelled.append(fault)
        self.drm.kill_channel(fault.inst, cause)

    def _batch_mainline(self, faults: list[FaultEntry], svmms: list[Any]) -> int:
        replay = 0
        atomic = False  # quirk: never reset inside the batch
        # One argument block for the whole batch, as in the kernel: each head
        # resets the window, but the word stays from the previous group until
        # a walk writes it, so a failed walk is judged against a stale word.
        args = PfnmapArgs(0, 1)
        i, n = 0, len(faults)
        while i < n:
            fi, svmm = faults[i], svmms[i]
            if svmm is None:
                self.cancel(fi)
                i += 1
                continue
            access = fi.access
            hmm_flags = 0
            if access == FAULT_ACCESS_READ:
                hmm_flags = HMM_PFN_REQ_FAULT
            elif access == FAULT_ACCESS_PREFETCH:
                hmm_flags = 0
            elif access == FAULT_ACCESS_ATOMIC:
                atomic = True
            else:
                hmm_flags = HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE
            args.addr, args.page, args.size = fi.addr & ~(PAGE_SIZE - 1), PAGE_SHIFT, PAGE_SIZE
            ok = svmm.mm.mmget_not_zero()
            if not ok:
                self.cancel(fi)
                i += 1
                continue
            err: Exception | None = None
            try:
                if svmm.vmm is None:
                    raise InvalidArgument("nouveau: the client's SVM is gone")
                if atomic:
                    nouveau_atomic_range_fault(svmm, args)
                else:
                    nouveau_range_fault(svmm, args, hmm_flags)
            except (HmmsimError, NotSupported) as exc:
                err = exc
            finally:
                svmm.mm.mmput()
            limit = args.addr + args.size
            word = args.phys[0]
            j = i + 1
            while j < n:
                fn = faults[j]
                if (
                    svmms[j] is not svmm
                    or fn.addr >= limit
                    or (access == FAULT_ACCESS_READ and not word & NVIF_VMM_PFNMAP_V0_V)
                    or (
                        access not in (FAULT_ACCESS_READ, FAULT_ACCESS_PREFETCH)
                        and not word & NVIF_VMM_PFNMAP_V0_W
                    )
                    or (
                        access not in (FAULT_ACCESS_READ, FAULT_ACCESS_WRITE, FAULT_ACCESS_PREFETCH)
                        and not word & NVIF_VMM_PFNMAP_V0_A
                    )
                ):
                    break
                j += 1
            if err is not None:
                self.warnings.append(f"fault at {fi.addr:#x} failed: {err}")
                for k in range(i, j):
                    self.cancel(faults[k], err)
            else:
                replay += 1
            i = j
        return replay

    def _batch_window(self, faults: list[FaultEntry], svmms: list[Any]) -> int:
        from .history import window_batch

        return window_batch(self, faults, svmms)


def svm_init(cli: NouveauCli, req: uapi.DrmNouveauSvmInit) -> NouveauSvmm:
    """``nouveau_svmm_init`` (``DRM_IOCTL_NOUVEAU_SVM_INIT``).

    Raises:
        NoSys: the GPU has no SVM support (-ENOSYS).
        Busy: SVM is already enabled for this client (-EBUSY).
    """
    drm = cli.drm
    if drm.svm is None:
        raise NoSys("nouveau: SVM is not supported on this GPU")
    with cli.mutex:
        if cli.svm is not None:
            raise Busy("nouveau: SVM is already enabled for this client")
        svmm = NouveauSvmm(cli, req.unmanaged_addr, req.unmanaged_size)
        mm = cli.process.mm
        with mm.mmap_lock.write():
            mmu_notifier_register(svmm.notifier, mm)
        cli.svm = svmm
    return svmm


def svm_bind(cli: NouveauCli, req: uapi.DrmNouveauSvmBind) -> None:
    """``nouveau_svmm_bind`` (``DRM_IOCTL_NOUVEAU_SVM_BIND``): migrate a range to VRAM.

    Raises:
        InvalidArgument: reserved fields set, bits beyond the valid mask, an
            empty range, a command other than MIGRATE, a target other than
            GPU_VRAM, a non-zero stride, no mm, or no SVM on the client.
    """
    va_start = req.va_start & ~(PAGE_SIZE - 1)
    va_end = (req.va_end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    if req.reserved0 or req.reserved1:
        raise InvalidArgument("nouveau: SVM_BIND reserved fields must be 0")
    if req.header & ~uapi.NOUVEAU_SVM_BIND_VALID_MASK:
        raise InvalidArgument("nouveau: SVM_BIND header has bits beyond the valid mask")
    if va_start >= va_end:
        raise InvalidArgument("nouveau: SVM_BIND of an empty range")
    cmd = (req.header >> uapi.NOUVEAU_SVM_BIND_COMMAND_SHIFT) & uapi.NOUVEAU_SVM_BIND_COMMAND_MASK
    if cmd != uapi.NOUVEAU_SVM_BIND_COMMAND__MIGRATE:
        raise InvalidArgument(f"nouveau: SVM_BIND command {cmd} is not MIGRATE")
    target = (req.header >> uapi.NOUVEAU_SVM_BIND_TARGET_SHIFT) & uapi.NOUVEAU_SVM_BIND_TARGET_MASK
    if target != uapi.NOUVEAU_SVM_BIND_TARGET__GPU_VRAM:
        raise InvalidArgument(f"nouveau: SVM_BIND target {target:#x} is not GPU_VRAM")
    if req.stride:
        raise InvalidArgument("nouveau: SVM_BIND stride must be 0")
    svmm = cli.svm
    mm = cli.process.mm
    if svmm is None or not mm.mmget_not_zero():
        raise InvalidArgument("nouveau: SVM_BIND without SVM or without an mm")
    try:
        with mm.mmap_lock.read():
            addr = va_start
            while addr < va_end:
                hits = mm.vmas.intersecting(addr, va_end)  # find_vma_intersection
                if not hits:
                    break
                vma = hits[0]
                addr = max(addr, vma.start)
                nxt = min(vma.end, va_end)
                cli.drm.dmem.migrate_vma(svmm, vma, addr, nxt)
                addr = nxt
    finally:
        mm.mmput()
    req.result = 0  # the UAPI promises a page count; the driver always reports 0


class NoSys(HmmsimError):
    """ENOSYS: the GPU has no SVM support."""

    errno_value = 38


class ChannelKilled(BadAddress):
    """An access from a channel that was killed by a cancelled fault.

    ``cause`` is the error that made the driver cancel the fault, when known.
    """

    def __init__(self, message: str, cause: Exception | None = None) -> None:
        super().__init__(message)
        self.cause = cause
