"""An mlx5 HCA with on-demand paging: verbs, the page-fault event queue, work items.

Kernel counterparts: ``drivers/infiniband/hw/mlx5`` (``odp.c``: the page-fault
EQ, ``mlx5_ib_eqe_pf_action``, ``mlx5_ib_mr_wqe_pfault_handler``,
``mlx5_ib_mr_rdma_pfault_handler``, ``pagefault_single_data_segment``,
``mlx5_ib_advise_mr_prefetch``; ``mr.c``: ``mlx5_ib_reg_user_mr``) and
``drivers/infiniband/core`` (``ib_check_mr_access``, ``ib_uverbs_advise_mr``).

How a device access goes:

1. The HCA translates (key, address, length) through the mkey: an explicit
   MR's MTT, or an implicit MR's KSM entry and the child's MTT. Every umem
   page must carry ``MLX5_IB_MTT_READ`` (and ``MLX5_IB_MTT_WRITE`` for a
   store). Data moves only through the bus addresses in the MTTs
   (``hmmsim.dma``), so a stale entry is caught as a DMA violation.
2. A miss stalls the QP and writes a page-fault EQE (the queue holds 4096);
   the EQ is parsed into fault records and each is handled by its own work
   item: a WQE fault faults every data segment of the WQE; an RDMA responder
   fault faults the rest of the message (or, when the hardware reports no
   length, the packet and then prefetches as many bytes as the message
   already committed, at most 4 MiB, unless the first attempt raced an
   invalidation).
3. The work item resumes the QP: without error after a success or an
   -EAGAIN (the HCA simply retries and may fault again), with error
   otherwise; a QP resumed with error completes the work request with an
   error completion (``WorkRequestFailed``, carrying the cause).

The model runs the work items in the context of the access that queued them
(one actor), as the nouveau model runs its fault work item; deferred work
(asynchronous prefetch, freeing emptied implicit children) sits on a queue
that ``flush_workqueue`` (and each verb entry) runs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import attrs
import numpy as np
from hmmsim import sched
from hmmsim.dma import dma_debug_device_teardown, dma_read, dma_write
from hmmsim.driver import Device, Driver, MirrorStats
from hmmsim.errors import (
    Again,
    BadAddress,
    Busy,
    HmmsimError,
    InvalidArgument,
    NoEntry,
    NotPermitted,
    NotSupported,
)
from hmmsim.pci import PciDev, default_pci_function

from .mr import OdpMr, reg_pinned
from .uapi import (
    IB_ACCESS_FLUSH,
    IB_ACCESS_LOCAL_WRITE,
    IB_ACCESS_ON_DEMAND,
    IB_ACCESS_REMOTE_ATOMIC,
    IB_ACCESS_REMOTE_READ,
    IB_ACCESS_REMOTE_WRITE,
    IB_ACCESS_SUPPORTED,
    IB_MTU,
    IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH,
    IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH_NO_FAULT,
    IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH_WRITE,
    IB_UVERBS_ADVISE_MR_FLAG_FLUSH,
    IMPLICIT_LENGTH,
    MAX_PREFETCH_LEN,
    MLX5_IB_MTT_READ,
    MLX5_IB_MTT_WRITE,
    MLX5_IB_NUM_PF_EQE,
    MLX5_IB_UPD_XLT_ZAP,
    MLX5_IMR_MTT_BITS,
    MLX5_IMR_MTT_SHIFT,
    MLX5_PF_FLAGS_DOWNGRADE,
    MLX5_PF_FLAGS_ENABLE,
    MLX5_PF_FLAGS_SNAPSHOT,
    ZERO_LENGTH_SGE_BYTES,
    IbvSge,
    PageFaultType,
    WcStatus,
    WorkCompletion,
    WorkRequestFailed,
)
from .umem import (
    PAGE_SHIFT,
    IbUmemOdp,
    PerMm,
    ib_umem_odp_alloc_implicit,
    ib_umem_odp_get,
)

if TYPE_CHECKING:
    from hmmsim import AddressSpace, Machine, Process

    from .mirror import OdpMirror

#: Rounds of fault-and-resume after which an access is declared livelocked.
MAX_RESUME_ROUNDS: Final = 10_000
_TASK_SIZE_BITS: Final = 47


@attrs.define
class OdpStats:
    """What the HCA and its driver count (tests and benchmarks read them)."""

    page_faults: int = 0
    wqe_faults: int = 0
    rdma_faults: int = 0
    prefetches: int = 0
    eq_overflows: int = 0
    again_resumes: int = 0
    error_resumes: int = 0
    busy_retries: int = 0
    stale_retries: int = 0
    invalidations: int = 0
    page_invalidations: int = 0
    umrs: int = 0
    mtt_entries_written: int = 0
    dma_maps: int = 0
    implicit_children_created: int = 0
    implicit_children_destroyed: int = 0


@attrs.define
class PageFaultEqe:
    """One page-fault event (``struct mlx5_pagefault`` once parsed)."""

    type: PageFaultType
    qpn: int
    key: int
    #: RDMA: the message's address (``rdma_va``); WQE: the faulting address.
    va: int
    #: RDMA: bytes of the faulting packet; WQE: unused.
    packet_size: int
    #: RDMA: bytes of the message, 0 when the hardware cannot tell (WRITE).
    rdma_op_len: int
    write: bool
    #: WQE: the data segments of the faulting WQE.
    sges: tuple[IbvSge, ...] = ()
    #: RDMA: bytes of the message already done when the packet faulted.
    bytes_committed: int = 0
    #: Filled by the work item: None (resume) or the error it resumed with.
    error: BaseException | None = None
    handled: bool = False


def _uint(what: str, v: object, bits: int) -> int:
    """``v`` as an unsigned ``bits``-bit verbs field, or InvalidArgument."""
    if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v >> bits:
        raise InvalidArgument(f"odp: {what} {v!r} is not a u{bits}")
    return v


def _sges(sges: object) -> tuple[IbvSge, ...]:
    """A scatter/gather list: ``IbvSge``s of a u64 address, u32 length and u32 key."""
    if not isinstance(sges, (list, tuple)):
        raise InvalidArgument(f"odp: {sges!r} is not a list of IbvSge")
    for sge in sges:
        if not isinstance(sge, IbvSge):
            raise InvalidArgument(f"odp: {sge!r} is not an IbvSge")
        _uint("sge address", sge.addr, 64)
        _uint("sge length", sge.length, 32)
        _uint("sge lkey", sge.lkey, 32)
        if sge.addr + sge.length > 1 << 64:
            raise InvalidArgument(f"odp: {sge!r} wraps")
    return tuple(sges)


def _payload(data: object) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"odp: the payload must be bytes, not {type(data).__name__}")
    return bytes(data)


class Ucontext:
    """``struct mlx5_ib_ucontext``: one process's open of the verbs device."""

    def __init__(self, hca: OdpHca, process: Process) -> None:
        self.hca = hca
        self.process = process
        self.pds: list[Pd] = []
        self.closed = False
        #: The context's ``MirrorStats`` (the generic mirror's): counted where
        #: its QPs stall and its MRs map, retry, zap and DMA-map.
        self.stats = MirrorStats()

    def alloc_pd(self) -> Pd:
        """``ibv_alloc_pd``."""
        if self.closed:
            raise InvalidArgument("odp: ibv_alloc_pd on a closed context")
        pd = Pd(self)
        self.pds.append(pd)
        return pd

    def close(self) -> None:
        """Closing the device file: every MR of every PD is deregistered."""
        if self.closed:
            return
        self.closed = True
        for pd in self.pds:
            for mr in list(pd.mrs):
                self.hca.dereg_mr(mr)
        if self in self.hca.contexts:
            self.hca.contexts.remove(self)


class Pd:
    """``struct ib_pd``: the MRs and QPs of one protection domain."""

    def __init__(self, ctx: Ucontext) -> None:
        self.ctx = ctx
        self.hca = ctx.hca
        self.process = ctx.process
        self.mrs: list[OdpMr] = []


class Qp:
    """A queue pair on a PD: the requester side posts WQEs; the responder side
    serves a remote peer's RDMA READ and WRITE."""

    def __init__(self, pd: Pd, qpn: int) -> None:
        self.pd = pd
        self.hca = pd.hca
        self.qpn = qpn
        self.completions: list[WorkCompletion] = []
        self._next_wr = 0

    def __repr__(self) -> str:
        return f"Qp({self.qpn:#x})"

    def _wr_id(self) -> int:
        self._next_wr += 1
        return self._next_wr

    def post_send(self, sges: list[IbvSge]) -> bytes:
        """A SEND WQE: the requester gathers its data segments (local reads).

        Raises:
            InvalidArgument: ``sges`` is not a list of well-formed ``IbvSge``.
            WorkRequestFailed: the work request completed with an error.
        """
        segs = _sges(sges)
        wr = self._wr_id()
        out = self.hca.wqe_access(self, wr, segs, None)
        self.completions.append(WorkCompletion(wr, WcStatus.SUCCESS, len(out)))
        return out

    def post_recv(self, sges: list[IbvSge], data: bytes) -> None:
        """A receive WQE consumed by an incoming SEND of ``data`` (local writes).

        Raises:
            InvalidArgument: malformed ``sges`` or ``data``, or a message
                larger than the WQE.
            WorkRequestFailed: the work request completed with an error.
        """
        segs = _sges(sges)
        payload = _payload(data)
        if len(payload) > sum(s.length for s in segs):
            raise InvalidArgument("odp: the receive WQE is too small for the message")
        wr = self._wr_id()
        self.hca.wqe_access(self, wr, segs, payload)
        self.completions.append(WorkCompletion(wr, WcStatus.SUCCESS, len(data)))

    def rdma_read(self, rkey: int, addr: int, length: int) -> bytes:
        """The responder serves a peer's RDMA READ of [addr, addr + length).

        Raises:
            InvalidArgument: ``rkey`` is not a u32, ``addr`` not a u64,
                ``length`` not a u32, or the span wraps.
            WorkRequestFailed: the request completed with an error.
        """
        _check_remote(rkey, addr, length)
        return self.hca.responder_access(self, self._wr_id(), rkey, addr, length, None)

    def rdma_write(self, rkey: int, addr: int, data: bytes) -> None:
        """The responder serves a peer's RDMA WRITE of ``data`` at ``addr``.

        Raises:
            InvalidArgument: as ``rdma_read``, or ``data`` is not bytes.
            WorkRequestFailed: the request completed with an error.
        """
        payload = _payload(data)
        _check_remote(rkey, addr, len(payload))
        self.hca.responder_access(self, self._wr_id(), rkey, addr, len(payload), payload)


def _check_remote(rkey: object, addr: object, length: object) -> None:
    _uint("rkey", rkey, 32)
    start = _uint("remote address", addr, 64)
    n = _uint("message length", length, 32)
    if start + n > 1 << 64:
        raise InvalidArgument(f"odp: [{start:#x}, +{n:#x}) wraps")


class _Miss(Exception):
    def __init__(self, va: int) -> None:
        self.va = va


class _ProtErr(Exception):
    def __init__(self, why: str) -> None:
        self.why = why


class OdpHca(Device):
    """An mlx5 ConnectX function with ODP, bound to ``hmmsim.pci``/``hmmsim.dma``."""

    def __init__(
        self,
        driver: Driver,
        machine: Machine,
        era: str,
        hugetlb: bool,
        implicit: bool,
        pci: PciDev | None,
    ) -> None:
        super().__init__(driver, machine)
        self.era = era
        self.hugetlb = hugetlb
        self.implicit = implicit
        self.pci = (
            pci if pci is not None else default_pci_function(machine, f"mlx5_{self.owner_id}")
        )
        if self.pci.dma is None:
            raise InvalidArgument(f"odp: {self.pci!r} is not an endpoint function")
        self.dma = self.pci.dma
        self.stats = OdpStats()
        self.mkeys: dict[int, OdpMr] = {}
        self.contexts: list[Ucontext] = []
        self.per_mms: dict[int, PerMm] = {}
        #: The page-fault event queue (EQEs not yet parsed).
        self.eq: deque[PageFaultEqe] = deque()
        #: ``system_unbound_wq``: deferred work items.
        self.workqueue: deque[Callable[[], None]] = deque()
        self._next_key = 0x100
        self._next_qpn = 0x40
        self.imr_ksm_entries = 1 << (_TASK_SIZE_BITS - MLX5_IMR_MTT_BITS - PAGE_SHIFT)

    def __repr__(self) -> str:
        return f"OdpHca(#{self.owner_id}, era={self.era})"

    # ----- objects -------------------------------------------------------------------------

    def new_mkey(self) -> int:
        self._next_key += 0x100
        return self._next_key

    def per_mm(self, mm: AddressSpace) -> PerMm:
        """The gup era's ``ib_ucontext_per_mm`` of ``mm`` (created on first use)."""
        pm = self.per_mms.get(id(mm))
        if pm is None:
            pm = self.per_mms[id(mm)] = PerMm(self, mm)
        return pm

    def alloc_ucontext(self, process: Process) -> Ucontext:
        """Open the uverbs device for ``process``."""
        ctx = Ucontext(self, process)
        self.contexts.append(ctx)
        return ctx

    def create_qp(self, pd: Pd) -> Qp:
        self._next_qpn += 1
        return Qp(pd, self._next_qpn)

    def open(self, process: Process) -> OdpMirror:
        """The generic mirror: a context, a PD and a QP; MRs registered lazily."""
        from .mirror import OdpMirror

        return OdpMirror(self, process)

    def remove(self) -> None:
        """Driver unload: close every context, run pending work, report DMA leaks."""
        for ctx in list(self.contexts):
            ctx.close()
        self.flush_workqueue()
        dma_debug_device_teardown(self.dma)

    # ----- work ----------------------------------------------------------------------------

    def queue_work(self, fn: Callable[[], None]) -> None:
        self.workqueue.append(fn)

    def flush_workqueue(self) -> None:
        """Run every queued work item (``flush_workqueue``)."""
        while self.workqueue:
            self.workqueue.popleft()()

    # ----- verbs ---------------------------------------------------------------------------

    def reg_mr(self, pd: Pd, addr: int, length: int, access: int) -> OdpMr:
        """``ibv_reg_mr``: an ODP MR with ``IB_ACCESS_ON_DEMAND``, else a pinned one.

        An ODP MR runs a SNAPSHOT|ENABLE pass over its whole span (maps what
        is present, faults nothing); in the gup era the MTT is zapped and
        enabled instead (the snapshot pass came with v5.10). ``addr`` 0 and
        ``length`` ``IMPLICIT_LENGTH`` with ON_DEMAND is the implicit MR.

        ``IB_ACCESS_HUGETLB`` without ON_DEMAND is ignored, as ``ib_umem_get``
        ignores it; bits of ``IB_ACCESS_OPTIONAL`` the model does not know are
        ignored too.

        Raises:
            InvalidArgument: unknown access bits, remote write or atomic
                without local write, an empty span, an implicit hugetlb MR,
                a gup-era hugetlb MR over a VMA that is not hugetlb, a pinned
                MR whose span (or its page alignment) wraps.
            Overflow: ``addr + length`` (or its alignment to the umem page)
                wraps, for an ODP MR.
            NotSupported: ``IB_ACCESS_FLUSH_GLOBAL``/``_PERSISTENT`` (mlx5
                lacks the device capability), or the device cannot back an
                ``hmm_dma_map`` (mainline).
            BadAddress / InvalidArgument: the registration pass failed.
        """
        if pd.ctx.closed:
            raise InvalidArgument("odp: ibv_reg_mr on a closed context")
        _uint("ibv_reg_mr address", addr, 64)
        _uint("ibv_reg_mr length", length, 64)
        _uint("ibv_reg_mr access", access, 32)
        # ib_check_mr_access, in its order.
        if access & (IB_ACCESS_REMOTE_WRITE | IB_ACCESS_REMOTE_ATOMIC) and not (
            access & IB_ACCESS_LOCAL_WRITE
        ):
            raise InvalidArgument("odp: remote write or atomic needs IB_ACCESS_LOCAL_WRITE")
        if access & ~IB_ACCESS_SUPPORTED:
            raise InvalidArgument(f"odp: unknown access bits {access & ~IB_ACCESS_SUPPORTED:#x}")
        if access & IB_ACCESS_FLUSH:
            raise NotSupported("odp: mlx5 has no IB_DEVICE_FLUSH_GLOBAL/PERSISTENT")
        self.flush_workqueue()
        mm = pd.process.mm
        if not access & IB_ACCESS_ON_DEMAND:
            # ib_umem_get: IB_ACCESS_HUGETLB only means something to ODP umems.
            mr = reg_pinned(pd, addr, length, access)
        elif addr == 0 and length == IMPLICIT_LENGTH:
            umem = ib_umem_odp_alloc_implicit(self, mm, access)
            mr = OdpMr(pd, 0, length, access, umem, implicit=True)
            mr.enabled = True
        else:
            umem = ib_umem_odp_get(self, mm, addr, length, access)
            mr = OdpMr(pd, addr, length, access, umem)
            try:
                self._init_odp_mr(mr, umem)
            except BaseException:
                mr.release()
                raise
        self.mkeys[mr.key] = mr
        pd.mrs.append(mr)
        return mr

    def _init_odp_mr(self, mr: OdpMr, umem: IbUmemOdp) -> None:
        if self.era == "gup":
            with umem.umem_mutex:
                mr.umr_update_xlt(0, len(mr.mtt), MLX5_IB_UPD_XLT_ZAP)
                mr.enabled = True
            return
        mr.pagefault_real_mr(
            umem.start, umem.end - umem.start, MLX5_PF_FLAGS_SNAPSHOT | MLX5_PF_FLAGS_ENABLE
        )

    def dereg_mr(self, mr: OdpMr) -> None:
        """``ibv_dereg_mr``: deferred prefetch work is flushed first.

        Raises:
            NoEntry: ``mr`` is not a live MR of this HCA (already
                deregistered: the uobject lookup fails, -ENOENT).
        """
        if not isinstance(mr, OdpMr) or mr.hca is not self or mr not in mr.pd.mrs:
            raise NoEntry(f"odp: {mr!r} is not a registered MR of {self!r}")
        self.flush_workqueue()
        mr.release()
        mr.pd.mrs.remove(mr)
        self.flush_workqueue()

    def advise_mr(self, pd: Pd, advice: int, flags: int, sges: list[IbvSge]) -> None:
        """``ibv_advise_mr``: prefetch the data segments.

        PREFETCH maps read-only even on a writable MR (DOWNGRADE);
        PREFETCH_WRITE needs a writable MR; PREFETCH_NO_FAULT maps what is
        present (SNAPSHOT). With ``IB_UVERBS_ADVISE_MR_FLAG_FLUSH`` it runs now
        (``mlx5_ib_prefetch_sg_list``): each segment's key is looked up right
        before that segment is prefetched, so an error stops the call after
        the earlier segments were mapped, as in Linux. Without it every key is
        taken first (``init_prefetch_work``: all or nothing) and the prefetch
        is queued work whose errors nobody sees.

        Raises:
            InvalidArgument: a flag other than FLUSH (the uverbs flags
                attribute, checked first), an advice or segment that is not
                a well-formed verbs value, no data segments, a zero-length
                segment at a page boundary (an empty ``hmm_range_fault``).
            NotSupported: another advice (-EOPNOTSUPP from mlx5), or
                PREFETCH_NO_FAULT in the gup era (it came with v5.10).
            NoEntry: a key that is not a live ODP MR (-ENOENT).
            NotPermitted: the MR belongs to another PD, or is read-only for
                PREFETCH_WRITE (-EPERM).
            Whatever the synchronous fault raises.
        """
        _uint("advise flags", flags, 32)
        if flags & ~IB_UVERBS_ADVISE_MR_FLAG_FLUSH:
            raise InvalidArgument(f"odp: advise flags {flags:#x}")
        _uint("advice", advice, 32)
        pf = {
            IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH: MLX5_PF_FLAGS_DOWNGRADE,
            IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH_WRITE: 0,
            IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH_NO_FAULT: MLX5_PF_FLAGS_SNAPSHOT,
        }
        if self.era == "gup":
            # PREFETCH_NO_FAULT came with the snapshot mode of v5.10.
            del pf[IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH_NO_FAULT]
        if advice not in pf:
            raise NotSupported(f"odp: advice {advice} is not supported")
        sges = list(_sges(sges))
        if not sges:
            raise InvalidArgument("odp: ibv_advise_mr without data segments")
        if flags & IB_UVERBS_ADVISE_MR_FLAG_FLUSH:
            for sge in sges:
                mr = self._prefetchable(pd, advice, sge.lkey)
                self.stats.prefetches += 1
                mr.pagefault(sge.addr, sge.length, pf[advice])
            return
        mrs = [self._prefetchable(pd, advice, sge.lkey) for sge in sges]
        for mr in mrs:
            mr.num_deferred_work += 1

        def work() -> None:
            for mr, sge in zip(mrs, sges, strict=True):
                try:
                    if not mr.destroyed:
                        self.stats.prefetches += 1
                        mr.pagefault(sge.addr, sge.length, pf[advice])
                except HmmsimError:
                    pass
                finally:
                    mr.num_deferred_work -= 1

        self.queue_work(work)

    def _prefetchable(self, pd: Pd, advice: int, key: int) -> OdpMr:
        """``get_prefetchable_mr``: the live ODP MR of ``key`` (``odp_mkeys`` holds
        only ODP mkeys, stored once their registration pass is done)."""
        mr = self.mkeys.get(key)
        if mr is None or not mr.is_odp or not mr.enabled:
            raise NoEntry(f"odp: key {key:#x} is not a live ODP MR")
        if mr.pd is not pd:
            raise NotPermitted(f"odp: {mr!r} belongs to another PD")
        if advice == IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH_WRITE:
            assert mr.umem is not None
            if not mr.umem.writable:
                raise NotPermitted(f"odp: PREFETCH_WRITE on read-only {mr!r}")
        return mr

    # ----- the hardware --------------------------------------------------------------------

    def _segments(
        self, key: int, addr: int, length: int, write: bool, need: int
    ) -> list[tuple[int, int]]:
        """Translate [addr, addr + length) of mkey ``key``: (bus address, bytes) runs.

        Raises _ProtErr (no fault can help) or _Miss (an entry lacks ``need``).
        """
        mr = self.mkeys.get(key)
        if mr is None or not mr.enabled:
            raise _ProtErr(f"key {key:#x} is not a live mkey")
        if need and not mr.access & need:
            raise _ProtErr(f"{mr!r} does not allow this access")
        if length and (addr < mr.iova or addr + length > mr.iova + mr.length):
            raise _ProtErr(f"[{addr:#x}, +{length:#x}) is outside {mr!r}")
        if not length:
            return []
        bit = MLX5_IB_MTT_WRITE if write else MLX5_IB_MTT_READ
        if not mr.implicit:
            return _mtt_segments(mr, addr, length, bit)
        out: list[tuple[int, int]] = []
        pos, end = addr, addr + length
        while pos < end:
            child = mr.ksm.get(pos >> MLX5_IMR_MTT_SHIFT)
            if child is None or not child.enabled:
                raise _Miss(pos)
            assert child.umem is not None
            n = min(end, child.umem.end) - pos
            out += _mtt_segments(child, pos, n, bit)
            pos += n
        return out

    def _transfer(self, segs: list[tuple[int, int]], data: bytes | None) -> bytes:
        if data is None:
            return b"".join(dma_read(self.dma, bus, n) for bus, n in segs)
        off = 0
        for bus, n in segs:
            dma_write(self.dma, bus, data[off : off + n])
            off += n
        return b""

    def _fault_and_resume(self, eqe: PageFaultEqe) -> None:
        """The QP stalls, the EQE goes on the EQ, the EQ is drained by work items."""
        if len(self.eq) >= MLX5_IB_NUM_PF_EQE:
            self.stats.eq_overflows += 1
            self._drain_eq()
        self.eq.append(eqe)
        self.stats.page_faults += 1
        self._drain_eq()

    def _drain_eq(self) -> None:
        """``mlx5_ib_eq_pf_process``: parse every EQE; each fault is its own work item."""
        while self.eq:
            eqe = self.eq.popleft()
            if eqe.type == PageFaultType.WQE:
                self._wqe_pfault_handler(eqe)
            else:
                self._rdma_pfault_handler(eqe)
            eqe.handled = True

    def _single_data_segment(self, key: int, va: int, bcnt: int, flags: int = 0) -> int:
        """``pagefault_single_data_segment``: bytes mapped; a non-ODP key counts as mapped."""
        mr = self.mkeys.get(key)
        if mr is None or not mr.is_odp:
            return bcnt
        if not mr.enabled:
            raise BadAddress(f"odp: {mr!r} is not live")
        return mr.pagefault(va, bcnt, flags)

    def _wqe_pfault_handler(self, eqe: PageFaultEqe) -> None:
        """``mlx5_ib_mr_wqe_pfault_handler``: fault every data segment of the WQE."""
        self.stats.wqe_faults += 1
        total = mapped = 0
        try:
            for sge in eqe.sges:
                n = sge.length or ZERO_LENGTH_SGE_BYTES
                total += n
                mapped += self._single_data_segment(sge.lkey, sge.addr, n)
        except Again:
            self.stats.again_resumes += 1
            return
        except HmmsimError as exc:
            self._resume_error(eqe, exc)
            return
        if mapped < total:
            self._resume_error(eqe, BadAddress("odp: fewer bytes mapped than the WQE needs"))

    def _rdma_pfault_handler(self, eqe: PageFaultEqe) -> None:
        """``mlx5_ib_mr_rdma_pfault_handler``: fault from the packet to the end of
        the message; when the hardware gave no message length (RDMA WRITE), fault
        the packet, resume, then prefetch ``min(MAX_PREFETCH_LEN,
        bytes_committed)`` bytes from it: as much as the message already moved, at
        most 4 MiB, nothing for its first packet. No prefetch after -EAGAIN (the
        first attempt raced an invalidation); a prefetch's errors are dropped."""
        self.stats.rdma_faults += 1
        committed = eqe.bytes_committed
        address = eqe.va + committed
        length = eqe.rdma_op_len - min(committed, eqe.rdma_op_len)
        prefetch_len = committed
        prefetch = False
        if not length:
            prefetch = True
            length = eqe.packet_size
            prefetch_len = min(MAX_PREFETCH_LEN, prefetch_len)
        try:
            mapped = self._single_data_segment(eqe.key, address, length)
        except Again:
            # Racing an invalidation: resume, do not prefetch.
            self.stats.again_resumes += 1
            return
        except HmmsimError as exc:
            self._resume_error(eqe, exc)
            return
        if mapped < length:
            self._resume_error(eqe, BadAddress("odp: fewer bytes mapped than the packet needs"))
            return
        if prefetch:
            try:
                self.stats.prefetches += 1
                self._single_data_segment(eqe.key, address, prefetch_len)
            except HmmsimError:
                pass

    def _resume_error(self, eqe: PageFaultEqe, exc: BaseException) -> None:
        self.stats.error_resumes += 1
        eqe.error = exc

    def _run(
        self,
        qp: Qp,
        wr_id: int,
        translate: Callable[[], list[tuple[int, int]]],
        make_eqe: Callable[[int], PageFaultEqe],
        data: bytes | None,
        status: WcStatus,
    ) -> bytes:
        rounds = 0
        while True:
            sched.point("odp:hca_access")
            try:
                segs = translate()
            except _ProtErr as exc:
                wc = WorkCompletion(wr_id, status, 0, 14)
                qp.completions.append(wc)
                raise WorkRequestFailed(wc, BadAddress(f"odp: {exc.why}")) from None
            except _Miss as miss:
                rounds += 1
                if rounds > MAX_RESUME_ROUNDS:
                    raise Busy(f"odp: access by {qp!r} never completed") from None
                eqe = make_eqe(miss.va)
                qp.pd.ctx.stats.faults += 1  # the QP stalled: one page-fault event
                self._fault_and_resume(eqe)
                if eqe.error is not None:
                    err = eqe.error
                    wc = WorkCompletion(wr_id, status, 0, getattr(err, "errno", 0) or 14)
                    qp.completions.append(wc)
                    raise WorkRequestFailed(wc, err) from None
                continue
            return self._transfer(segs, data)

    def responder_access(
        self, qp: Qp, wr_id: int, rkey: int, addr: int, length: int, data: bytes | None
    ) -> bytes:
        """A peer's RDMA READ (``data`` None) or WRITE through ``rkey``, packet by packet.

        A READ request carries its length, so a fault maps the rest of the
        message; WRITE packets do not, so a fault maps the packet and
        prefetches as much as the message already moved (at most 4 MiB).
        """
        need = IB_ACCESS_REMOTE_WRITE if data is not None else IB_ACCESS_REMOTE_READ
        out: list[bytes] = []
        pos = addr
        end = addr + length
        while pos < end or (length == 0 and pos == addr and not out):
            n = min(IB_MTU - (pos % IB_MTU), end - pos)
            start = pos

            def eqe(_va: int, start: int = start, n: int = n) -> PageFaultEqe:
                # Packets never cross a 4 KiB page: the packet itself faulted.
                return PageFaultEqe(
                    PageFaultType.RDMA,
                    qp.qpn,
                    rkey,
                    addr,
                    n,
                    length if data is None else 0,
                    data is not None,
                    bytes_committed=start - addr,
                )

            def translate(start: int = start, n: int = n) -> list[tuple[int, int]]:
                return self._segments(rkey, start, n, data is not None, need)

            chunk = None if data is None else data[start - addr : start - addr + n]
            out.append(
                self._run(
                    qp,
                    wr_id,
                    translate,
                    eqe,
                    chunk,
                    WcStatus.REM_ACCESS_ERR,
                )
            )
            if length == 0:
                break
            pos += n
        return b"".join(out)

    def wqe_access(self, qp: Qp, wr_id: int, sges: tuple[IbvSge, ...], data: bytes | None) -> bytes:
        """A WQE's data segments: gathered (``data`` None) or scattered with ``data``."""

        def translate() -> list[tuple[int, int]]:
            segs: list[tuple[int, int]] = []
            left = len(data) if data is not None else None
            for sge in sges:
                n = sge.length if left is None else min(sge.length, left)
                need = IB_ACCESS_LOCAL_WRITE if data is not None else 0
                segs += self._segments(sge.lkey, sge.addr, n, data is not None, need)
                if left is not None:
                    left -= n
            return segs

        def eqe(va: int) -> PageFaultEqe:
            return PageFaultEqe(PageFaultType.WQE, qp.qpn, 0, va, 0, 0, data is not None, sges)

        return self._run(qp, wr_id, translate, eqe, data, WcStatus.LOC_PROT_ERR)


def _mtt_segments(mr: OdpMr, addr: int, length: int, bit: int) -> list[tuple[int, int]]:
    """Bus-address runs of [addr, addr + length) in an explicit MR's MTT, or _Miss."""
    if mr.umem is not None:
        base, shift = mr.umem.start, mr.umem.page_shift
    else:
        base, shift = mr.iova, PAGE_SHIFT
    i0 = (addr - base) >> shift
    i1 = (addr + length - 1 - base) >> shift
    words = mr.mtt[i0 : i1 + 1]
    ok = (words & np.uint64(bit)) != 0
    if not ok.all():
        first = int(np.argmin(ok))
        raise _Miss(max(addr, base + ((i0 + first) << shift)))
    out: list[tuple[int, int]] = []
    size = 1 << shift
    pos, end = addr, addr + length
    for w in words.tolist():
        off = pos & (size - 1)
        n = min(size - off, end - pos)
        out.append(((w & ~3) + off, n))
        pos += n
    return out
