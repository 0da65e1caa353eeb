"""The generic ``Mirror`` of the odp driver, built on the verbs paths.

A ``read`` is a peer's RDMA READ served by the HCA's responder through an
rkey; a ``write`` is ``ibv_advise_mr(PREFETCH_WRITE, FLUSH)`` over the span
(so that a write that cannot be mapped stores nothing) followed by a peer's
RDMA WRITE. Faults go through the page-fault EQ and its work items, never
through a side door.

The mirror registers its MRs lazily, on the first access to a 2 MiB-aligned
chunk, so registration errors surface from ``read``/``write``. It registers
two MRs per chunk, one read-only (``REMOTE_READ``) and one writable
(``LOCAL_WRITE|REMOTE_WRITE|REMOTE_READ``), as an application that wants to
read read-only memory must: every fault of a writable ODP MR asks for write
access (``pagefault_real_mr``), so a writable MR cannot map read-only memory.
With ``implicit="1"`` the two MRs are implicit ones over the whole address
space; with ``hugetlb="1"`` they carry ``IB_ACCESS_HUGETLB``.

``device_ptes`` reads the MTTs (as a debug port would) and names the page
behind each entry by translating its bus address through the IOMMU domain,
so it reports what the HCA would really reach.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Final

from hmmsim.dma import IOMMU_PAGE_ORDERS
from hmmsim.driver import (
    DevicePte,
    MemoryKind,
    Mirror,
    check_user_pages,
    check_user_range,
)
from hmmsim.errors import Again, HmmsimError
from hmmsim.memremap import page_memory_kind

from .mr import OdpMr
from .uapi import (
    IB_ACCESS_HUGETLB,
    IB_ACCESS_LOCAL_WRITE,
    IB_ACCESS_ON_DEMAND,
    IB_ACCESS_REMOTE_READ,
    IB_ACCESS_REMOTE_WRITE,
    IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH_WRITE,
    IB_UVERBS_ADVISE_MR_FLAG_FLUSH,
    IMPLICIT_LENGTH,
    MLX5_IB_MTT_READ,
    MLX5_IB_MTT_WRITE,
    MLX5_IMR_MTT_SHIFT,
    IbvSge,
    WorkRequestFailed,
)
from .umem import PAGE_SHIFT

if TYPE_CHECKING:
    from hmmsim import Process

    from .device import OdpHca

#: The span one lazily registered MR covers.
CHUNK_SHIFT: Final = 21
CHUNK: Final = 1 << CHUNK_SHIFT
#: How often ``write`` retries a prefetch that raced an invalidation.
ADVISE_RETRIES: Final = 100
RO_ACCESS: Final = IB_ACCESS_ON_DEMAND | IB_ACCESS_REMOTE_READ
RW_ACCESS: Final = (
    IB_ACCESS_ON_DEMAND | IB_ACCESS_LOCAL_WRITE | IB_ACCESS_REMOTE_WRITE | IB_ACCESS_REMOTE_READ
)


def _raise_cause(exc: WorkRequestFailed) -> None:
    cause = exc.cause
    if isinstance(cause, HmmsimError):
        raise type(cause)(f"odp: {exc.wc.status.name}: {cause.message}") from exc
    raise exc


class OdpMirror(Mirror):
    """A verbs context, a PD, a QP, and MRs registered on first access."""

    def __init__(self, hca: OdpHca, process: Process) -> None:
        self.hca = hca
        self.device = hca
        self.process = process
        self.ctx = hca.alloc_ucontext(process)
        self.pd = self.ctx.alloc_pd()
        self.qp = hca.create_qp(self.pd)
        self.stats = self.ctx.stats
        #: (chunk index or -1 for implicit, writable) -> MR.
        self.mrs: dict[tuple[int, bool], OdpMr] = {}
        self.closed = False

    def __repr__(self) -> str:
        return f"OdpMirror({self.hca!r}, pid {self.process.pid})"

    def _mr(self, chunk: int, writable: bool) -> OdpMr:
        hca = self.hca
        key = (-1 if hca.implicit else chunk, writable)
        mr = self.mrs.get(key)
        if mr is not None and not mr.destroyed:
            return mr
        access = RW_ACCESS if writable else RO_ACCESS
        if hca.implicit:
            mr = hca.reg_mr(self.pd, 0, IMPLICIT_LENGTH, access)
        else:
            if hca.hugetlb:
                access |= IB_ACCESS_HUGETLB
            mr = hca.reg_mr(self.pd, chunk << CHUNK_SHIFT, CHUNK, access)
        self.mrs[key] = mr
        return mr

    def _pieces(self, addr: int, length: int) -> list[tuple[int, int, int]]:
        """(chunk, address, bytes) per chunk the range touches."""
        out = []
        pos, end = addr, addr + length
        while pos < end:
            n = min(end, (pos | (CHUNK - 1)) + 1) - pos
            out.append((pos >> CHUNK_SHIFT, pos, n))
            pos += n
        return out

    def _before(self) -> None:
        if self.closed:
            from hmmsim.errors import InvalidArgument

            raise InvalidArgument("odp: the mirror is closed")
        self.hca.flush_workqueue()

    def read(self, addr: int, length: int) -> bytes:
        check_user_range(addr, length, "odp read")
        self._before()
        out = []
        try:
            for chunk, a, n in self._pieces(addr, length):
                mr = self._mr(chunk, False)
                out.append(self.qp.rdma_read(mr.key, a, n))
        except WorkRequestFailed as exc:
            _raise_cause(exc)
        return b"".join(out)

    def write(self, addr: int, data: bytes) -> None:
        check_user_range(addr, len(data), "odp write")
        self._before()
        pieces = self._pieces(addr, len(data))
        try:
            sges = [IbvSge(a, n, self._mr(chunk, True).key) for chunk, a, n in pieces]
            for attempt in range(ADVISE_RETRIES):
                # A synchronous prefetch reports -EAGAIN when it raced an
                # invalidation (in the gup era even one its own COW break
                # caused); ibv_advise_mr's callers retry.
                try:
                    if sges:
                        self.hca.advise_mr(
                            self.pd,
                            IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH_WRITE,
                            IB_UVERBS_ADVISE_MR_FLAG_FLUSH,
                            sges,
                        )
                    break
                except Again:
                    if attempt == ADVISE_RETRIES - 1:
                        raise
            mv = memoryview(bytes(data))
            for sge in sges:
                off = sge.addr - addr
                self.qp.rdma_write(sge.lkey, sge.addr, bytes(mv[off : off + sge.length]))
        except WorkRequestFailed as exc:
            _raise_cause(exc)

    # ----- the debug port ---------------------------------------------------------------------

    def _entry(self, mr: OdpMr, addr: int) -> tuple[int, int] | None:
        """(MTT word, page shift) translating ``addr`` in ``mr``, if it holds one."""
        if mr.destroyed:
            return None
        if mr.implicit:
            child = mr.ksm.get(addr >> MLX5_IMR_MTT_SHIFT)
            if child is None or child.destroyed:
                return None
            mr = child
        umem = mr.umem
        if umem is None or not umem.start <= addr < umem.end:
            return None
        word = int(mr.mtt[(addr - umem.start) >> umem.page_shift])
        if not word & MLX5_IB_MTT_READ:
            return None
        return word, umem.page_shift

    def _bus_to_pfn(self, bus: int) -> int | None:
        dev = self.hca.dma
        if dev.pci is not None:
            # A P2P bus address is routed by the switches, not the IOMMU.
            peer = dev.pci.topology.peer_pfns(dev.pci, bus, 1)
            if peer is not None:
                return int(peer[0])
        if dev.domain is None:
            return (bus - dev.bus_offset) >> PAGE_SHIFT
        # The IOMMU's page table, read without filling the IOTLB (a debug read).
        iova_pfn = bus >> PAGE_SHIFT
        for order in IOMMU_PAGE_ORDERS:
            hit = dev.domain.entries[order].get(iova_pfn >> order)
            if hit is not None:
                return int(hit[0]) + (iova_pfn & ((1 << order) - 1))
        return None

    def _kind(self, pfn: int) -> MemoryKind:
        return page_memory_kind(self.hca.machine, pfn)

    def _live_mrs(self, addr: int, npages: int) -> list[OdpMr]:
        end = addr + (npages << PAGE_SHIFT)
        out = []
        for (_chunk, writable), mr in sorted(self.mrs.items(), key=lambda kv: not kv[0][1]):
            if mr.destroyed:
                continue
            if mr.implicit or (mr.iova < end and addr < mr.iova + mr.length):
                out.append(mr)
            _ = writable
        return out

    def device_ptes(self, addr: int, npages: int) -> list[DevicePte | None]:
        # Slots are 4 KiB: an unaligned address means the slot it falls in
        # (introspection/device_ptes_slots).
        addr &= ~((1 << PAGE_SHIFT) - 1)
        check_user_pages(addr, npages, "odp device_ptes")
        mrs = self._live_mrs(addr, npages)
        out: list[DevicePte | None] = []
        for i in range(npages):
            a = addr + (i << PAGE_SHIFT)
            best: DevicePte | None = None
            for mr in mrs:
                e = self._entry(mr, a)
                if e is None:
                    continue
                word, shift = e
                off = a & ((1 << shift) - 1)
                pfn = self._bus_to_pfn((word & ~3) + off)
                if pfn is None:
                    pfn = -1
                pte = DevicePte(
                    a,
                    pfn,
                    bool(word & MLX5_IB_MTT_WRITE),
                    False,
                    shift - PAGE_SHIFT,
                    self._kind(pfn) if pfn >= 0 else "system",
                )
                if best is None or (pte.writable and not best.writable):
                    best = pte
            out.append(best)
        return out

    def device_pte_state(self, addr: int, npages: int) -> Hashable | None:
        """The raw MTT words of the range in every live MR (the ptes are a function of them
        and of the IOMMU's translations, which only change with them)."""
        state = []
        for mr in self._live_mrs(addr, npages):
            for i in range(npages):
                e = self._entry(mr, addr + (i << PAGE_SHIFT))
                if e is not None:
                    state.append((mr.key, i, e[0]))
        return tuple(state) or None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.ctx.close()
        self.hca.flush_workqueue()
        self.mrs.clear()
