"""Memory regions of an mlx5 HCA: MTTs written by UMR, the ODP fault and invalidation paths.

Kernel counterpart: ``drivers/infiniband/hw/mlx5/odp.c`` (``pagefault_real_mr``,
``pagefault_implicit_mr``, ``mlx5_ib_invalidate_range``, ``populate_mtt``,
``implicit_get_child_mr``, ``destroy_unused_implicit_child_mr``) and ``umr.c``
(``mlx5r_umr_update_xlt``), v6.16, with the v5.10 and v5.3 variants the
``hmm`` and ``gup`` eras need.

* An explicit ODP MR has one MTT entry per umem page (8 bytes: bus address |
  ``MLX5_IB_MTT_READ`` | ``MLX5_IB_MTT_WRITE``); the table is sized to a
  multiple of 8 entries, as the mkey's translation is.
* A UMR copies entries in 64-byte units, so ``umr_update_xlt`` widens every
  request to 8-entry-aligned runs. A ZAP writes zeros over the whole widened
  run; a populate writes every entry of it from the umem's state (entries
  with nothing valid are written as 0, from the zeroed staging buffer).
* An implicit MR spans the whole address space; its KSM table points at 1 GiB
  children created on the first fault and destroyed from a work item once an
  invalidation leaves them empty.
* A pinned MR (no ``IB_ACCESS_ON_DEMAND``) pins its pages with
  ``pin_user_pages(FOLL_LONGTERM)`` at registration, DMA-maps them and never
  hears of an invalidation: it keeps the pages it pinned.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import numpy as np
from hmmsim import sched
from hmmsim.dma import DMA_BIDIRECTIONAL, dma_map_page, dma_mapping_error, dma_unmap_page
from hmmsim.errors import Again, BadAddress, InvalidArgument, OutOfMemory
from hmmsim.gup import FOLL_LONGTERM, FOLL_WRITE, pin_user_pages, unpin_user_pages
from hmmsim.hmm import HMM_PFN_DMA_MAPPED, HMM_PFN_VALID, HMM_PFN_WRITE, hmm_dma_map_pfn
from hmmsim.notifier import mmu_interval_set_seq

from .uapi import (
    IB_ACCESS_WRITABLE,
    MLX5_IB_MTT_READ,
    MLX5_IB_MTT_WRITE,
    MLX5_IB_UPD_XLT_DOWNGRADE,
    MLX5_IB_UPD_XLT_INDIRECT,
    MLX5_IB_UPD_XLT_ZAP,
    MLX5_IMR_MTT_SHIFT,
    MLX5_IMR_MTT_SIZE,
    MLX5_PF_FLAGS_DOWNGRADE,
    MLX5_PF_FLAGS_ENABLE,
    MLX5_PF_FLAGS_SNAPSHOT,
    MLX5_UMR_MTT_NUM_ENTRIES_ALIGNMENT,
    ODP_DMA_ADDR_MASK,
    ODP_READ_ALLOWED_BIT,
    ODP_WRITE_ALLOWED_BIT,
)
from .umem import PAGE_SHIFT, PAGE_SIZE, IbUmemOdp, ib_umem_odp_alloc_child

if TYPE_CHECKING:
    from hmmsim.notifier import IntervalNotifier, NotifierRange

    from .device import OdpHca, Pd

_ALIGN: Final = MLX5_UMR_MTT_NUM_ENTRIES_ALIGNMENT
_U64: Final = np.uint64
_PFN_FIELD: Final = (1 << 53) - 1
_MTT_BITS: Final = MLX5_IB_MTT_READ | MLX5_IB_MTT_WRITE


def _align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


class OdpMr:
    """``struct mlx5_ib_mr``: a memory key, its translation table, its umem."""

    def __init__(
        self,
        pd: Pd,
        iova: int,
        length: int,
        access: int,
        umem: IbUmemOdp | None,
        *,
        implicit: bool = False,
        parent: OdpMr | None = None,
    ) -> None:
        self.pd = pd
        self.hca: OdpHca = pd.hca
        self.iova = iova
        self.length = length
        self.access = access
        self.umem = umem
        self.implicit = implicit
        self.parent = parent
        self.key = self.hca.new_mkey()
        #: The mkey is live in the HCA (``MLX5_IB_UPD_XLT_ENABLE`` was written).
        self.enabled = False
        self.destroyed = False
        self.page_shift = umem.page_shift if umem is not None else PAGE_SHIFT
        n = umem.num_pages if umem is not None and not implicit else 0
        self.mtt = np.zeros(_align_up(n, _ALIGN), _U64)
        #: Implicit parent: ``imr->implicit_children`` (the driver's xarray) ...
        self.children: dict[int, OdpMr] = {}
        #: ... and the KSM table the HCA walks (what the last UMR wrote).
        self.ksm: dict[int, OdpMr] = {}
        #: Pinned MR: the pinned pfns (umem pages of 4 KiB) and their bus addresses.
        self.pinned: list[int] = []
        #: Prefetch work items queued against this MR (``num_deferred_work``).
        self.num_deferred_work = 0
        if umem is not None:
            umem.mr = self

    def __repr__(self) -> str:
        kind = "implicit" if self.implicit else ("odp" if self.umem is not None else "pinned")
        return f"OdpMr({kind}, key {self.key:#x}, [{self.iova:#x}, +{self.length:#x}))"

    @property
    def is_odp(self) -> bool:
        return self.umem is not None

    # ----- UMR ------------------------------------------------------------------------------

    def umr_update_xlt(self, idx: int, npages: int, flags: int) -> None:
        """``mlx5r_umr_update_xlt``: rewrite entries [idx, idx + npages) in aligned runs.

        ``MLX5_IB_UPD_XLT_INDIRECT`` rewrites KSM entries of an implicit parent
        from its children; otherwise MTT entries, zero for a ZAP, else from the
        umem (``populate_mtt``).

        Raises:
            BadAddress: an entry could not be DMA-mapped (-EFAULT).
        """
        hca = self.hca
        hca.stats.umrs += 1
        if flags & MLX5_IB_UPD_XLT_INDIRECT:
            for i in range(idx, idx + npages):
                child = self.children.get(i)
                if child is None:
                    self.ksm.pop(i, None)
                else:
                    self.ksm[i] = child
            return
        if idx % _ALIGN:
            npages += idx % _ALIGN
            idx -= idx % _ALIGN
        end = min(idx + _align_up(npages, _ALIGN), len(self.mtt))
        hca.stats.mtt_entries_written += end - idx
        stats = self.pd.ctx.stats
        if sched.active() is not None:
            what = "zaps" if flags & MLX5_IB_UPD_XLT_ZAP else "writes"
            sched.note("dpte", f"odp mkey {self.key:#x} {what} MTT [{idx}, {end})")
        if flags & MLX5_IB_UPD_XLT_ZAP:
            stats.pages_unmapped += self._pages_in(self.mtt[idx:end])
            self.mtt[idx:end] = 0
            return
        self._populate_mtt(idx, end, bool(flags & MLX5_IB_UPD_XLT_DOWNGRADE))
        stats.pages_mapped += self._pages_in(self.mtt[idx:end])

    def _pages_in(self, words: np.ndarray) -> int:
        """The 4 KiB pages the valid MTT entries ``words`` translate."""
        live = int(np.count_nonzero(words & _U64(MLX5_IB_MTT_READ)))
        return live << (self.page_shift - PAGE_SHIFT)

    def _populate_mtt(self, idx: int, end: int, downgrade: bool) -> None:
        umem = self.umem
        assert umem is not None
        n = min(end, umem.num_pages)
        if umem.era == "mainline":
            # 6.16+: pfn_list[idx] with idx in umem pages (see OdpMr docs: the
            # hugetlb indexing of the hmm_dma_map era, modelled as read).
            out = np.zeros(end - idx, _U64)
            pfns = umem.pfn_list
            for i in np.flatnonzero(pfns[idx:n] & _U64(HMM_PFN_VALID)).tolist():
                j = idx + i
                entry = int(pfns[j])
                addr = hmm_dma_map_pfn(self.hca.dma, umem.map, j)
                if dma_mapping_error(self.hca.dma, addr):
                    raise BadAddress(f"odp: cannot DMA-map entry {j} of {self!r}")
                word = addr | MLX5_IB_MTT_READ
                if entry & HMM_PFN_WRITE and not downgrade:
                    word |= MLX5_IB_MTT_WRITE
                out[i] = word
                if not entry & HMM_PFN_DMA_MAPPED:
                    self.hca.stats.dma_maps += 1
                    self.pd.ctx.stats.dma_maps += 1
                # 6.16+ counts every VALID entry it writes, mapped before or
                # not, while the unmap takes one off per entry it unmaps: an
                # entry written twice keeps npages above zero for good (so an
                # emptied implicit child is not destroyed). Modelled as read.
                umem.npages += 1
            self.mtt[idx:end] = out
            return
        # v5.3 .. v6.15: umem_dma_to_mtt() of dma_list entries.
        dma = np.zeros(end - idx, _U64)
        dma[: n - idx] = umem.dma_list[idx:n]
        words = dma & _U64(ODP_DMA_ADDR_MASK & ((1 << 64) - 1))
        words |= np.where(dma & _U64(ODP_READ_ALLOWED_BIT), _U64(MLX5_IB_MTT_READ), _U64(0))
        words |= np.where(dma & _U64(ODP_WRITE_ALLOWED_BIT), _U64(MLX5_IB_MTT_WRITE), _U64(0))
        self.mtt[idx:end] = words

    # ----- the fault path --------------------------------------------------------------------

    def pagefault_real_mr(self, user_va: int, bcnt: int, flags: int) -> int:
        """``pagefault_real_mr``: map the span, write the MTTs, unlock; pages in 4 KiB.

        Raises what ``ib_umem_odp_map_dma_and_lock`` or the UMR raise.
        """
        umem = self.umem
        assert umem is not None
        downgrade = bool(flags & MLX5_PF_FLAGS_DOWNGRADE)
        fault = not flags & MLX5_PF_FLAGS_SNAPSHOT
        write = umem.writable and not downgrade
        shift = umem.page_shift
        start_idx = (user_va - umem.start) >> shift
        xlt = MLX5_IB_UPD_XLT_DOWNGRADE if downgrade else 0
        try:
            np_ = umem.map_dma_and_lock(user_va, bcnt, write, fault)
        except Again:
            if umem.era == "gup" and umem.notifiers_count > 0:
                # v5.3 pagefault_mr: wait (up to MMU_NOTIFIER_TIMEOUT) for the
                # running invalidation to end before the -EAGAIN goes back.
                umem.notifier_completion.wait_event(lambda: umem.notifiers_count <= 0)
            raise
        try:
            self.umr_update_xlt(start_idx, np_, xlt)
            if flags & MLX5_PF_FLAGS_ENABLE:
                self.enabled = True
        finally:
            umem.umem_mutex.release()
        return np_ << (shift - PAGE_SHIFT)

    def pagefault(self, io_virt: int, bcnt: int, flags: int) -> int:
        """``pagefault_mr``: bytes of [io_virt, io_virt + bcnt) now mapped.

        Raises:
            BadAddress: the span leaves the MR (-EFAULT), or the fault failed.
        """
        if self.implicit:
            return self._pagefault_implicit(io_virt, bcnt, flags)
        umem = self.umem
        assert umem is not None
        if io_virt < self.iova:
            raise BadAddress(f"odp: {io_virt:#x} is below {self!r}")
        user_va = io_virt
        if user_va >= umem.end or umem.end - user_va < bcnt:
            raise BadAddress(f"odp: [{io_virt:#x}, +{bcnt:#x}) leaves {self!r}")
        pages = self.pagefault_real_mr(user_va, bcnt, flags)
        shift = umem.page_shift
        new = (pages << PAGE_SHIFT) - (user_va - (user_va & ~((1 << shift) - 1)))
        return min(new, bcnt)

    def _pagefault_implicit(self, user_va: int, bcnt: int, flags: int) -> int:
        """``pagefault_implicit_mr``: fault through the 1 GiB children, then fix the KSM."""
        limit = self.hca.imr_ksm_entries * MLX5_IMR_MTT_SIZE
        if user_va >= limit or limit - user_va < bcnt:
            raise BadAddress(f"odp: [{user_va:#x}, +{bcnt:#x}) leaves the implicit MR")
        start_idx = user_va >> MLX5_IMR_MTT_SHIFT
        end_idx = (user_va + bcnt - 1) >> MLX5_IMR_MTT_SHIFT
        upd_xlt = False
        mapped = 0
        try:
            while bcnt:
                idx = user_va >> MLX5_IMR_MTT_SHIFT
                child = self.children.get(idx)
                if child is None:
                    child = self._implicit_get_child_mr(idx)
                    upd_xlt = True
                assert child.umem is not None
                n = min(user_va + bcnt, child.umem.end) - user_va
                mapped += min(child.pagefault_real_mr(user_va, n, flags) << PAGE_SHIFT, n)
                user_va += n
                bcnt -= n
        finally:
            if upd_xlt:
                assert self.umem is not None
                with self.umem.umem_mutex:
                    self.umr_update_xlt(
                        start_idx, end_idx - start_idx + 1, MLX5_IB_UPD_XLT_INDIRECT
                    )
        return mapped

    def _implicit_get_child_mr(self, idx: int) -> OdpMr:
        """``implicit_get_child_mr``: a 1 GiB child, zapped and enabled, in the xarray."""
        assert self.umem is not None
        umem = ib_umem_odp_alloc_child(self.umem, idx * MLX5_IMR_MTT_SIZE, MLX5_IMR_MTT_SIZE)
        child = OdpMr(self.pd, umem.start, MLX5_IMR_MTT_SIZE, self.access, umem, parent=self)
        child.umr_update_xlt(0, len(child.mtt), MLX5_IB_UPD_XLT_ZAP)
        child.enabled = True
        self.children[idx] = child
        self.hca.stats.implicit_children_created += 1
        return child

    # ----- invalidation -----------------------------------------------------------------------

    def invalidate(self, sub: IntervalNotifier, rng: NotifierRange, cur_seq: int) -> bool:
        """``mlx5_ib_invalidate_range`` (the interval-notifier eras)."""
        assert self.umem is not None
        return invalidate_umem(self.umem, self, sub, rng, cur_seq)

    def invalidate_span(self, start: int, end: int) -> None:
        """The zap-and-unmap body of ``mlx5_ib_invalidate_range`` (``umem_mutex`` taken)."""
        umem = self.umem
        assert umem is not None
        with umem.umem_mutex:
            self.pd.ctx.stats.invalidations += 1
            if umem.npages:
                self.hca.stats.invalidations += 1
            self._zap(start, end)

    def _valid(self, idx: np.ndarray) -> np.ndarray:
        umem = self.umem
        assert umem is not None
        if umem.era == "mainline":
            # pfn_list[idx] & HMM_PFN_VALID with idx in umem pages (as read).
            valid: np.ndarray = (umem.pfn_list[idx] & _U64(HMM_PFN_VALID)) != 0
            return valid
        allowed: np.ndarray = (
            umem.dma_list[idx] & _U64(ODP_READ_ALLOWED_BIT | ODP_WRITE_ALLOWED_BIT)
        ) != 0
        return allowed

    def _zap(self, start: int, end: int) -> None:
        """ZAP runs of valid entries, closing a run only at an 8-aligned invalid entry;
        count the invalidations (one too many per run, as mlx5 does); DMA-unmap
        and dirty; queue an emptied implicit child for destruction."""
        umem = self.umem
        assert umem is not None
        if not umem.npages:
            return
        start = max(umem.start, start)
        end = min(umem.end, end)
        if end <= start:
            return
        shift = umem.page_shift
        i0 = (start - umem.start) >> shift
        i1 = (end - umem.start + (1 << shift) - 1) >> shift
        valid = self._valid(np.arange(i0, i1))
        invalidations = 0
        if valid.any():
            # The kernel walks entry by entry; a run opens at a valid entry and
            # closes only at an invalid entry whose index is 8-aligned (that
            # entry is counted too: the statistics over-count each run by
            # one). Segments between such closers hold at most one run each.
            idxs = np.arange(i0, i1)
            closer = ~valid & ((idxs % _ALIGN) == 0)
            seg = np.cumsum(closer)
            closers = idxs[closer]
            seg_ids, first = np.unique(seg[valid], return_index=True)
            first_valid = idxs[valid][first]
            for sid, blk in zip(seg_ids.tolist(), first_valid.tolist(), strict=True):
                if sid < len(closers):
                    stop = int(closers[sid])
                    self.umr_update_xlt(blk, stop - blk, MLX5_IB_UPD_XLT_ZAP)
                    invalidations += stop - blk + 1
                else:
                    last = i1 - 1
                    self.umr_update_xlt(blk, last - blk + 1, MLX5_IB_UPD_XLT_ZAP)
                    invalidations += last - blk + 1
        self.hca.stats.page_invalidations += invalidations
        umem.unmap_dma_pages(start, end)
        if not umem.npages and umem.is_implicit_odp_child:
            self._destroy_unused_implicit_child()

    def _destroy_unused_implicit_child(self) -> None:
        """``destroy_unused_implicit_child_mr``: out of the xarray now, freed from a work item."""
        imr = self.parent
        assert imr is not None and self.umem is not None
        idx = self.umem.start >> MLX5_IMR_MTT_SHIFT
        if imr.children.get(idx) is not self or imr.destroyed:
            return
        del imr.children[idx]
        self.hca.queue_work(lambda: self._free_implicit_child(imr, idx))

    def _free_implicit_child(self, imr: OdpMr, idx: int) -> None:
        """``free_implicit_child_mr_work``: fix the parent's KSM entry, then dereg the child."""
        assert imr.umem is not None
        if not imr.destroyed:
            with imr.umem.umem_mutex:
                imr.umr_update_xlt(idx, 1, MLX5_IB_UPD_XLT_INDIRECT)
        self.release()
        self.hca.stats.implicit_children_destroyed += 1

    # ----- teardown ---------------------------------------------------------------------------

    def release(self) -> None:
        """``mlx5_ib_dereg_mr``: revoke the mkey, release the umem (or the pins)."""
        if self.destroyed:
            return
        self.destroyed = True
        self.enabled = False
        self.hca.mkeys.pop(self.key, None)
        if self.implicit:
            for child in list(self.children.values()):
                child.release()
            self.children.clear()
            self.ksm.clear()
            return
        if self.umem is not None:
            self.umem.release()
            self.pd.ctx.stats.pages_unmapped += self._pages_in(self.mtt)
            self.mtt[:] = 0
            return
        dev = self.hca.dma
        for i, addr in enumerate(self.mtt.tolist()):
            if addr:
                dma_unmap_page(dev, addr & ~_MTT_BITS, PAGE_SIZE, DMA_BIDIRECTIONAL)
                self.mtt[i] = 0
        unpin_user_pages(self.hca.machine, self.pinned)
        self.pinned = []


def invalidate_umem(
    umem: IbUmemOdp,
    mr: OdpMr | None,
    sub: IntervalNotifier,
    rng: NotifierRange,
    cur_seq: int,
) -> bool:
    """``mlx5_ib_invalidate_range``: non-blockable → False; else under ``umem_mutex``:
    set_seq, and if anything was ever mapped and the MR exists, zap. No event
    or owner filtering: RELEASE is a zap like any other."""
    if not rng.blockable:
        return False
    with umem.umem_mutex:
        mmu_interval_set_seq(sub, cur_seq)
        if mr is None:
            return True
        mr.pd.ctx.stats.invalidations += 1  # acted on, even with nothing to zap
        if not umem.npages:
            return True
        mr.hca.stats.invalidations += 1
        mr._zap(rng.start, rng.end)
    return True


def reg_pinned(pd: Pd, addr: int, length: int, access: int) -> OdpMr:
    """``ib_umem_get`` + ``mlx5_ib_reg_user_mr`` without ON_DEMAND: pin, map, write MTTs.

    Raises:
        InvalidArgument: the span (or its page alignment) wraps, or is empty.
        BadAddress / NotPermitted: the pages cannot be pinned.
        OutOfMemory: a page could not be DMA-mapped.
    """
    hca = pd.hca
    start = addr & ~(PAGE_SIZE - 1)
    end = (addr + length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    if end > (1 << 64) - 1:
        # ib_umem_get: addr + size, or its PAGE_ALIGN, wraps.
        raise InvalidArgument(f"odp: [{addr:#x}, +{length:#x}) wraps")
    if end <= start:
        raise InvalidArgument(f"odp: [{addr:#x}, +{length:#x}) holds no page")
    writable = bool(access & IB_ACCESS_WRITABLE)
    mm = pd.process.mm
    with mm.mmap_lock.read():
        pfns = pin_user_pages(
            mm, start, (end - start) >> PAGE_SHIFT, FOLL_LONGTERM | (FOLL_WRITE if writable else 0)
        )
    if len(pfns) != (end - start) >> PAGE_SHIFT:
        unpin_user_pages(hca.machine, pfns)
        raise BadAddress(f"odp: could only pin {len(pfns)} pages of [{start:#x}, {end:#x})")
    umemless = OdpMr(pd, start, end - start, access, None)
    umemless.mtt = np.zeros(_align_up(len(pfns), _ALIGN), _U64)
    umemless.pinned = pfns
    perm = MLX5_IB_MTT_READ | (MLX5_IB_MTT_WRITE if writable else 0)
    for i, pfn in enumerate(pfns):
        bus = dma_map_page(hca.dma, pfn, 0, PAGE_SIZE, DMA_BIDIRECTIONAL)
        if dma_mapping_error(hca.dma, bus):
            umemless.release()
            raise OutOfMemory(f"odp: cannot DMA-map pinned pfn {pfn:#x}")
        umemless.mtt[i] = _U64(bus | perm)
    umemless.enabled = True
    return umemless


def mtt_bus(word: int) -> int:
    return word & ~_MTT_BITS


__all__ = ["OdpMr", "invalidate_umem", "mtt_bus", "reg_pinned"]
