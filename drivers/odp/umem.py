"""``struct ib_umem_odp``: the on-demand-paging view of a user memory range, in three eras.

Kernel counterpart: ``drivers/infiniband/core/umem_odp.c`` and
``include/rdma/ib_umem_odp.h``:

* ``mainline`` (v6.16+, Leon Romanovsky's two-step DMA API series): the umem owns
  a ``struct hmm_dma_map`` (``hmm_dma_map_alloc(dev, map, nr_4k_entries, 1 <<
  page_shift)``). ``ib_umem_odp_map_dma_and_lock`` only faults and locks; the
  MTT writer DMA-maps each entry with ``hmm_dma_map_pfn``. Unmapping walks umem
  pages, ``hmm_dma_unmap_pfn`` and dirties the compound head of what was mapped
  writable, then clears every flag bit of the pfn entry.
* ``hmm`` (v5.10 .. v6.15, Yishai Hadas): a ``pfn_list`` in 4 KiB units handed to
  ``hmm_range_fault`` and a ``dma_list`` in umem pages whose entries carry
  ``ODP_READ_ALLOWED_BIT``/``ODP_WRITE_ALLOWED_BIT`` in their low bits; each
  umem page is DMA-mapped (head page, ``1 << page_shift`` bytes) in the map path.
* ``gup`` (v5.3 .. v5.4, 2019): ``ib_umem_odp_map_dma_pages`` takes pages with
  ``get_user_pages_remote`` in chunks of 512, DMA-maps umem-page heads, checks
  that the other sub-pages are physically contiguous (else -EFAULT), and drops
  every page reference ("avoid pinning the page"). ``page_shift`` of a hugetlb
  MR comes from the VMA's hstate; a VMA that is not hugetlb is -EINVAL at
  registration. Invalidation comes from one classic per-mm notifier over an
  interval tree of umems (``ib_ucontext_per_mm``), with the per-umem
  ``notifiers_seq``/``notifiers_count`` pair as the retry check.

Common to the hmm and mainline eras: one interval notifier per umem, over
[align_down(addr), align_up(addr + len)) in umem pages; a 1000 ms deadline
bounds the -EBUSY retries and, once it passed, the -EBUSY itself is returned;
a stale ``mmu_interval_read_retry`` loops back to the walk without looking at
the deadline; on success the function returns with ``umem_mutex`` held and the
number of umem pages in the span (invalid ones included).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import numpy as np
from hmmsim import sched
from hmmsim.dma import DMA_BIDIRECTIONAL, dma_map_page, dma_mapping_error, dma_unmap_page
from hmmsim.errors import Again, BadAddress, Busy, Deadlock, InvalidArgument, Overflow
from hmmsim.gup import FOLL_WRITE, get_user_pages, put_page
from hmmsim.hmm import (
    HMM_PFN_DMA_MAPPED,
    HMM_PFN_ERROR,
    HMM_PFN_FLAGS,
    HMM_PFN_ORDER_SHIFT,
    HMM_PFN_REQ_FAULT,
    HMM_PFN_REQ_WRITE,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    HMM_RANGE_DEFAULT_TIMEOUT,
    HmmDmaMap,
    HmmRange,
    hmm_dma_map_alloc,
    hmm_dma_map_free,
    hmm_dma_unmap_pfn,
    hmm_range_fault,
)
from hmmsim.notifier import (
    MmuNotifier,
    mmu_interval_notifier_insert,
    mmu_interval_notifier_remove,
    mmu_interval_read_begin,
    mmu_interval_read_retry,
    mmu_interval_set_seq,
    mmu_notifier_register,
    mmu_notifier_unregister,
)

from .uapi import (
    IB_ACCESS_HUGETLB,
    IB_ACCESS_ON_DEMAND,
    IB_ACCESS_WRITABLE,
    ODP_DMA_ADDR_MASK,
    ODP_READ_ALLOWED_BIT,
    ODP_WRITE_ALLOWED_BIT,
)

if TYPE_CHECKING:
    from hmmsim import AddressSpace
    from hmmsim.driver import MirrorStats
    from hmmsim.notifier import IntervalNotifier, NotifierRange

    from .device import OdpHca

PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT
#: ``HPAGE_SHIFT`` on x86-64: what an ``IB_ACCESS_HUGETLB`` umem uses after 2019.
HPAGE_SHIFT: Final = 21
#: ``PAGE_SIZE / sizeof(struct page *)``: pages per ``get_user_pages_remote`` call (2019).
GUP_CHUNK: Final = PAGE_SIZE // 8
_U64: Final = np.uint64
_PFN_FIELD: Final = (1 << HMM_PFN_ORDER_SHIFT) - 1


def _ns_deadline(hca: OdpHca) -> int:
    return hca.machine.clock.now_ns + HMM_RANGE_DEFAULT_TIMEOUT * 1_000_000


class IbUmemOdp:
    """``struct ib_umem_odp`` of one MR (or of one implicit child).

    ``mr`` is the ``umem_odp->private`` back pointer the invalidation callback
    uses; it is None until the MR exists and then the MR object.
    """

    def __init__(
        self,
        hca: OdpHca,
        mm: AddressSpace,
        start: int,
        end: int,
        page_shift: int,
        writable: bool,
        *,
        implicit: bool = False,
        implicit_child: bool = False,
    ) -> None:
        self.hca = hca
        self.era = hca.era
        self.mm = mm
        self.start = start
        self.end = end
        self.page_shift = page_shift
        self.writable = writable
        self.is_implicit_odp = implicit
        self.is_implicit_odp_child = implicit_child
        self.umem_mutex = sched.Mutex(f"odp{hca.owner_id}.umem_mutex")
        #: Umem pages currently DMA-mapped (``umem_odp->npages``).
        self.npages = 0
        self.mr: Any = None
        self.notifier: IntervalNotifier | None = None
        self.released = False
        nr = (end - start) >> PAGE_SHIFT
        ndma = (end - start) >> page_shift
        self.map = HmmDmaMap()
        self.pfn_list = np.zeros(0, _U64)
        self.dma_list = np.zeros(0, _U64)
        self.page_list = np.zeros(0, np.int64)
        if implicit:
            return
        if self.era == "mainline":
            hmm_dma_map_alloc(hca.dma, self.map, nr, 1 << page_shift)
            self.pfn_list = self.map.pfn_list
        elif self.era == "hmm":
            self.pfn_list = np.zeros(nr, _U64)
            self.dma_list = np.zeros(ndma, _U64)
        else:
            self.dma_list = np.zeros(ndma, _U64)
            self.page_list = np.full(ndma, -1, np.int64)
        # gup era: v5.3 ib_umem_notifier_start/end_account.
        self.notifiers_seq = 0
        self.notifiers_count = 0
        #: The ranges whose start this umem saw (see ``PerMm.invalidate_range_end``).
        self.started: list[NotifierRange] = []
        self.notifier_completion = sched.WaitQueue(f"odp{hca.owner_id}.notifier_completion")

    def __repr__(self) -> str:
        return f"IbUmemOdp([{self.start:#x}, {self.end:#x}), shift {self.page_shift}, {self.era})"

    def mirror_stats(self) -> MirrorStats | None:
        """The ``MirrorStats`` of the context owning this umem's MR (None before the MR)."""
        return None if self.mr is None else self.mr.pd.ctx.stats

    def _count_dma_map(self) -> None:
        mstats = self.mirror_stats()
        if mstats is not None:
            mstats.dma_maps += 1

    @property
    def page_size(self) -> int:
        return 1 << self.page_shift

    @property
    def num_pages(self) -> int:
        """``ib_umem_odp_num_pages``: umem pages in the umem."""
        return (self.end - self.start) >> self.page_shift

    # ----- faulting ------------------------------------------------------------------------

    def map_dma_and_lock(self, user_virt: int, bcnt: int, write: bool, fault: bool) -> int:
        """``ib_umem_odp_map_dma_and_lock``: fault (or snapshot) the span and lock.

        Returns the number of umem pages in the aligned span with
        ``umem_mutex`` held; on error the mutex is not held.

        Raises:
            BadAddress: the span leaves the umem (-EFAULT), or a fault failed.
            InvalidArgument: the owning mm is gone, a CPU mapping is smaller
                than the umem page (an ``IB_ACCESS_HUGETLB`` MR over memory
                that is not huge, -EINVAL), or zero bytes at a umem page
                boundary (an empty walk).
            Busy: the 1000 ms deadline passed on -EBUSY.
            Again: (gup era) an invalidation ran concurrently.
        """
        # Only the range is checked: zero bytes at a umem page boundary reach
        # hmm_range_fault as an empty range (-EINVAL); unaligned, they map the
        # page they point into.
        if user_virt < self.start or user_virt + bcnt > self.end or bcnt < 0:
            raise BadAddress(f"odp: [{user_virt:#x}, +{bcnt:#x}) is outside {self!r}")
        if self.era == "gup":
            return self._gup_map_and_lock(user_virt, bcnt, write)
        mm = self.mm
        if not mm.mmget_not_zero():
            raise InvalidArgument("odp: the owning mm is gone")
        try:
            return self._hmm_map_and_lock(user_virt, bcnt, write, fault)
        finally:
            mm.mmput()

    def _hmm_map_and_lock(self, user_virt: int, bcnt: int, write: bool, fault: bool) -> int:
        assert self.notifier is not None
        shift = self.page_shift
        start = user_virt & ~((1 << shift) - 1)
        end = (user_virt + bcnt + (1 << shift) - 1) & ~((1 << shift) - 1)
        first = (start - self.start) >> PAGE_SHIFT
        num_pfns = (end - start) >> PAGE_SHIFT
        pfns = self.pfn_list[first : first + num_pfns]
        flags = 0
        if fault:
            flags = HMM_PFN_REQ_FAULT | (HMM_PFN_REQ_WRITE if write else 0)
        rng = HmmRange(self.notifier, start, end, pfns, default_flags=flags, pfn_flags_mask=0)
        clock = self.hca.machine.clock
        deadline = _ns_deadline(self.hca)
        stats = self.hca.stats
        mstats = self.mirror_stats()
        while True:
            if fault and mstats is not None:
                mstats.fault_rounds += 1  # a snapshot (NO_FAULT) is not a round
            rng.notifier_seq = mmu_interval_read_begin(self.notifier)
            try:
                with self.mm.mmap_lock.read():
                    hmm_range_fault(rng)
            except Busy:
                stats.busy_retries += 1
                if mstats is not None:
                    mstats.retries += 1
                if clock.now_ns <= deadline:
                    continue
                raise
            sched.point("odp:after_range_fault")
            self.umem_mutex.acquire()
            if mmu_interval_read_retry(self.notifier, rng.notifier_seq):
                # Back to the walk with the same deadline, which is not consulted here.
                self.umem_mutex.release()
                stats.stale_retries += 1
                if mstats is not None:
                    mstats.retries += 1
                continue
            break
        try:
            stride = 1 << (shift - PAGE_SHIFT)
            heads = pfns[::stride]
            if self.era == "mainline":
                self._mainline_check(heads, fault)
            else:
                self._hmm_dma_map(heads, (start - self.start) >> shift, write, fault)
        except BaseException:
            self.umem_mutex.release()
            raise
        return len(heads)

    def _first_too_small(self, entries: np.ndarray) -> int:
        """Index of the first entry the CPU maps with pages smaller than the umem
        page (``hmm_pfn_to_map_order() + PAGE_SHIFT < page_shift``), or len."""
        orders = ((entries >> _U64(HMM_PFN_ORDER_SHIFT)) & _U64(0x1F)).astype(np.int64)
        bad = np.flatnonzero(orders + PAGE_SHIFT < self.page_shift)
        return int(bad[0]) if len(bad) else len(entries)

    def _orders_ok(self, entries: np.ndarray) -> None:
        i = self._first_too_small(entries)
        if i < len(entries):
            order = int(entries[i] >> _U64(HMM_PFN_ORDER_SHIFT)) & 0x1F
            raise InvalidArgument(
                f"odp: a umem page of {self.page_size:#x} bytes is mapped by the CPU with "
                f"order {order} pages"
            )

    def _mainline_check(self, heads: np.ndarray, fault: bool) -> None:
        """The 6.16+ step: skip invalid and already DMA-mapped entries, check the order."""
        if fault and bool((heads & _U64(HMM_PFN_ERROR)).any()):
            raise BadAddress("odp: hmm_range_fault returned an error entry on success")
        todo = heads[
            ((heads & _U64(HMM_PFN_VALID)) != 0) & ((heads & _U64(HMM_PFN_DMA_MAPPED)) == 0)
        ]
        self._orders_ok(todo)

    def _hmm_dma_map(self, heads: np.ndarray, dma0: int, write: bool, fault: bool) -> None:
        """The v5.10..6.15 step: check the order and DMA-map each umem page.

        ``ib_umem_odp_map_dma_single_page``: an entry already mapped only has its
        access bits resynced (a read mapping upgraded to write, or downgraded).
        """
        valid = (heads & _U64(HMM_PFN_VALID)) != 0
        if fault:
            access = np.full(len(heads), ODP_READ_ALLOWED_BIT | (ODP_WRITE_ALLOWED_BIT * write))
            todo = np.arange(len(heads))
        else:
            todo = np.flatnonzero(valid)
            access = np.where(
                (heads & _U64(HMM_PFN_WRITE)) != 0,
                ODP_READ_ALLOWED_BIT | ODP_WRITE_ALLOWED_BIT,
                ODP_READ_ALLOWED_BIT,
            )
        # The kernel checks each entry's order right before mapping it; an
        # error stops the walk there, after the earlier entries were mapped.
        stop = self._first_too_small(heads[todo])
        for i in todo[:stop].tolist():
            idx = dma0 + i
            cur = int(self.dma_list[idx])
            mask = int(access[i])
            if cur:
                self.dma_list[idx] = _U64((cur & ODP_DMA_ADDR_MASK) | mask)
                continue
            pfn = int(heads[i]) & _PFN_FIELD
            addr = dma_map_page(self.hca.dma, pfn, 0, self.page_size, DMA_BIDIRECTIONAL)
            if dma_mapping_error(self.hca.dma, addr):
                raise BadAddress(f"odp: cannot DMA-map pfn {pfn:#x}")
            self.hca.stats.dma_maps += 1
            self._count_dma_map()
            self.npages += 1
            self.dma_list[idx] = _U64(addr | mask)
        if stop < len(todo):
            self._orders_ok(heads[todo[stop] : todo[stop] + 1])

    # ----- the 2019 GUP path ---------------------------------------------------------------

    def _gup_map_and_lock(self, user_virt: int, bcnt: int, write: bool) -> int:
        """v5.3 ``ib_umem_odp_map_dma_pages``, then mlx5's lock-and-recheck.

        Returns the umem pages mapped with ``umem_mutex`` held.

        Raises:
            Again: a concurrent invalidation (sequence check), or a different
                page found at an index already mapped (that index is
                invalidated first).
            BadAddress: GUP failed at the first page, or sub-pages of a huge
                umem page are not physically contiguous (the reference of the
                sub-page that failed the check is leaked, as v5.3 leaks it).
            Deadlock: a different page was already stored (see
                ``_gup_map_single``).
        """
        current_seq = self.notifiers_seq
        mm = self.mm
        if not mm.mmget_not_zero():
            raise InvalidArgument("odp: the owning mm is gone")
        shift = self.page_shift
        mask = ~((1 << shift) - 1)
        access = ODP_READ_ALLOWED_BIT | (ODP_WRITE_ALLOWED_BIT if write else 0)
        flags = FOLL_WRITE if write else 0
        start_idx = (user_virt - self.start) >> shift
        k = start_idx
        # "Make sure we map whole umem pages."
        bcnt += user_virt & ~mask
        user_virt &= mask
        p = 0
        err: BaseException | None = None
        gup_failed = False
        try:
            while bcnt > 0:
                n = min((bcnt + (1 << shift) - 1) >> shift, GUP_CHUNK)
                try:
                    with mm.mmap_lock.read():
                        got = get_user_pages(mm, user_virt, n, flags)
                except BaseException as exc:
                    err, gup_failed = exc, True
                    break
                bcnt -= min(len(got) << PAGE_SHIFT, bcnt)
                sched.point("odp:after_gup")
                with self.umem_mutex:
                    j = 0
                    try:
                        while j < len(got):
                            pfn = got[j]
                            j += 1
                            if user_virt & ~mask:
                                p += PAGE_SIZE
                                if pfn << PAGE_SHIFT != p:
                                    # v5.3 breaks out before put_user_page(), and
                                    # the error path releases only the pages after
                                    # this one: its reference leaks (the code went
                                    # away with the hmm_range_fault rework, v5.10).
                                    raise BadAddress(
                                        f"odp: sub-page at {user_virt:#x} is not contiguous "
                                        "with its huge page"
                                    )
                                put_page(self.hca.machine, pfn)
                            else:
                                self._gup_map_single(k, pfn, access, current_seq)
                                p = pfn << PAGE_SHIFT
                                k += 1
                            user_virt += PAGE_SIZE
                    except BaseException as exc:
                        err = exc
                        # "Release left over pages when handling errors."
                        for rest in got[j:]:
                            put_page(self.hca.machine, rest)
                if err is not None:
                    break
        finally:
            mm.mmput()
        if err is not None and (not gup_failed or k == start_idx):
            raise err
        np_ = k - start_idx
        self.umem_mutex.acquire()
        if self.notifiers_count or self.notifiers_seq != current_seq:
            self.umem_mutex.release()
            raise Again("odp: an invalidation raced the fault")
        return np_

    def _gup_map_single(self, idx: int, pfn: int, access: int, current_seq: int) -> None:
        """v5.3 ``ib_umem_odp_map_dma_single_page`` (``umem_mutex`` held; drops the page).

        An entry already mapping another page is the "got different pages"
        branch: it means to invalidate that umem page and return -EAGAIN, but
        ``ib_umem_notifier_start_account`` takes ``umem_mutex``, which
        ``ib_umem_odp_map_dma_pages`` holds around this call, so v5.3 and v5.4
        deadlock there (the page reference is dropped first). Only a fault
        that missed an invalidation gets there: the sequence check before it
        catches every other. v5.5 turned the branch into a WARN and -EAGAIN.

        Raises:
            Again: an invalidation is running or ran since ``current_seq``.
            BadAddress: the page cannot be DMA-mapped.
            Deadlock: a different page is already stored at ``idx``.
        """
        machine = self.hca.machine
        different = False
        try:
            if self.notifiers_count or self.notifiers_seq != current_seq:
                raise Again("odp: an invalidation raced the fault")
            if not int(self.dma_list[idx]):
                addr = dma_map_page(self.hca.dma, pfn, 0, self.page_size, DMA_BIDIRECTIONAL)
                if dma_mapping_error(self.hca.dma, addr):
                    raise BadAddress(f"odp: cannot DMA-map pfn {pfn:#x}")
                self.hca.stats.dma_maps += 1
                self._count_dma_map()
                self.dma_list[idx] = _U64(addr | access)
                self.page_list[idx] = pfn
                self.npages += 1
            elif int(self.page_list[idx]) == pfn:
                self.dma_list[idx] |= _U64(access)
            else:
                different = True
        finally:
            # ODP: the page reference is never kept.
            put_page(machine, pfn)
        if different:
            raise Deadlock(
                f"odp: umem page {idx} maps pfn {int(self.page_list[idx]):#x}, GUP returned "
                f"{pfn:#x}: v5.3 ib_umem_notifier_start_account takes umem_mutex, which "
                "ib_umem_odp_map_dma_pages holds (fixed in v5.5 by WARN and -EAGAIN)"
            )

    # ----- unmapping -----------------------------------------------------------------------

    def unmap_dma_pages(self, virt: int, bound: int) -> None:
        """``ib_umem_odp_unmap_dma_pages`` for [virt, bound) (``umem_mutex`` held).

        DMA-unmaps each mapped umem page and dirties the compound head of
        what was mapped writable.
        """
        virt = max(virt, self.start)
        bound = min(bound, self.end)
        if bound <= virt:
            return
        phys = self.hca.machine.phys
        shift = self.page_shift
        i0 = (virt - self.start) >> shift
        i1 = (bound - self.start + (1 << shift) - 1) >> shift
        dev = self.hca.dma
        if self.era == "mainline":
            # pfn_list[idx] with idx in umem pages (as read; see OdpMr).
            seg = self.pfn_list[i0:i1]
            need = _U64(HMM_PFN_VALID | HMM_PFN_DMA_MAPPED)
            for idx in (np.flatnonzero((seg & need) == need) + i0).tolist():
                pfn_entry = int(self.pfn_list[idx])
                if hmm_dma_unmap_pfn(dev, self.map, idx):
                    if pfn_entry & HMM_PFN_WRITE:
                        phys.folio_mark_dirty(pfn_entry & _PFN_FIELD)
                    self.npages -= 1
            seg &= _U64(~HMM_PFN_FLAGS & ((1 << 64) - 1))
            return
        live = np.flatnonzero(self.dma_list[i0:i1]) + i0
        for idx in live.tolist():
            dma = int(self.dma_list[idx])
            if self.era == "hmm":
                pfn = int(self.pfn_list[(idx << (shift - PAGE_SHIFT))]) & _PFN_FIELD
            else:
                pfn = int(self.page_list[idx])
                self.page_list[idx] = -1
            dma_unmap_page(dev, dma & ODP_DMA_ADDR_MASK, 1 << shift, DMA_BIDIRECTIONAL)
            if dma & ODP_WRITE_ALLOWED_BIT:
                phys.folio_mark_dirty(pfn)
            self.dma_list[idx] = _U64(0)
            self.npages -= 1

    def release(self) -> None:
        """``ib_umem_odp_release``: remove the notifier, unmap all, free the map."""
        if self.released:
            return
        self.released = True
        if self.is_implicit_odp:
            return
        # Unmap first, then stop listening (the mkey is already revoked, so no
        # fault can map anything in between).
        with self.umem_mutex:
            self.unmap_dma_pages(self.start, self.end)
        if self.era == "gup":
            self.hca.per_mm(self.mm).remove(self)
        elif self.notifier is not None:
            mmu_interval_notifier_remove(self.notifier)
        if self.era == "mainline":
            hmm_dma_map_free(self.hca.dma, self.map)


# ----- registration ------------------------------------------------------------------------


class _UmemNotifierOps:
    """``mlx5_mn_ops``: the interval-notifier callback of one umem (v5.10+)."""

    def __init__(self, umem: IbUmemOdp) -> None:
        self.umem = umem

    def invalidate(self, sub: IntervalNotifier, rng: NotifierRange, cur_seq: int) -> bool:
        mr = self.umem.mr
        if mr is not None:
            return bool(mr.invalidate(sub, rng, cur_seq))
        # No MR yet (ib_umem_odp_get has not returned): only record the sequence.
        if not rng.blockable:
            return False
        with self.umem.umem_mutex:
            mmu_interval_set_seq(sub, cur_seq)
        return True


def _umem_bounds(addr: int, size: int, page_shift: int) -> tuple[int, int]:
    if addr + size > (1 << 64) - 1 or addr + size < addr:
        raise Overflow(f"odp: [{addr:#x}, +{size:#x}) overflows")
    page = 1 << page_shift
    start = addr & ~(page - 1)
    end = (addr + size + page - 1) & ~(page - 1)
    if end > (1 << 64) - 1:
        # ALIGN(addr + size, page) wrapped to 0 (``end < page_size``).
        raise Overflow(f"odp: [{addr:#x}, +{size:#x}) rounds up past the address space")
    if end <= start:
        raise InvalidArgument(f"odp: [{addr:#x}, +{size:#x}) holds no umem page")
    return start, end


def ib_umem_odp_get(hca: OdpHca, mm: AddressSpace, addr: int, size: int, access: int) -> IbUmemOdp:
    """``ib_umem_odp_get``: a umem for an explicit ODP MR.

    Raises:
        InvalidArgument: no ``IB_ACCESS_ON_DEMAND`` (the kernel WARNs), a span
            with no umem page, or (gup era) ``IB_ACCESS_HUGETLB`` where the VMA
            at ``addr`` is not hugetlb.
        Overflow: ``addr + size`` wraps (-EOVERFLOW).
        NotSupported: (mainline) ``hmm_dma_map_alloc`` refuses the device.
    """
    if not access & IB_ACCESS_ON_DEMAND:
        raise InvalidArgument("odp: ib_umem_odp_get without IB_ACCESS_ON_DEMAND")
    page_shift = PAGE_SHIFT
    if access & IB_ACCESS_HUGETLB:
        if hca.era == "gup":
            # v5.3: find_vma(umem start) + is_vm_hugetlb_page decides. find_vma
            # gives the first VMA ending above the address, which may start
            # above it: an MR starting in a hole takes the next VMA's hstate.
            with mm.mmap_lock.read():
                vma = mm.vmas.find_next(addr & ~(PAGE_SIZE - 1))
                if vma is None or not vma.is_hugetlb:
                    raise InvalidArgument(f"odp: IB_ACCESS_HUGETLB at {addr:#x}: not a hugetlb VMA")
                page_shift = PAGE_SHIFT + vma.hugetlb_order
        else:
            page_shift = HPAGE_SHIFT
    start, end = _umem_bounds(addr, size, page_shift)
    umem = IbUmemOdp(hca, mm, start, end, page_shift, bool(access & IB_ACCESS_WRITABLE))
    _insert_notifier(umem)
    return umem


def ib_umem_odp_alloc_implicit(hca: OdpHca, mm: AddressSpace, access: int) -> IbUmemOdp:
    """``ib_umem_odp_alloc_implicit``: the parent umem of an implicit MR (no notifier).

    Raises:
        InvalidArgument: implicit ODP with ``IB_ACCESS_HUGETLB``.
    """
    if access & IB_ACCESS_HUGETLB:
        raise InvalidArgument("odp: implicit ODP cannot be IB_ACCESS_HUGETLB")
    return IbUmemOdp(hca, mm, 0, 0, PAGE_SHIFT, bool(access & IB_ACCESS_WRITABLE), implicit=True)


def ib_umem_odp_alloc_child(parent: IbUmemOdp, addr: int, size: int) -> IbUmemOdp:
    """``ib_umem_odp_alloc_child``: one 1 GiB child of an implicit umem.

    Raises:
        BadAddress: the owning mm is gone (``mmget_not_zero`` fails: -EFAULT).
    """
    if not parent.mm.mmget_not_zero():
        raise BadAddress("odp: implicit child for an mm that is gone")
    try:
        umem = IbUmemOdp(
            parent.hca,
            parent.mm,
            addr,
            addr + size,
            PAGE_SHIFT,
            parent.writable,
            implicit_child=True,
        )
        _insert_notifier(umem)
    finally:
        parent.mm.mmput()
    return umem


def _insert_notifier(umem: IbUmemOdp) -> None:
    if umem.era == "gup":
        umem.hca.per_mm(umem.mm).add(umem)
    else:
        umem.notifier = mmu_interval_notifier_insert(
            umem.mm, umem.start, umem.end - umem.start, _UmemNotifierOps(umem)
        )


class PerMm(MmuNotifier):
    """``struct ib_ucontext_per_mm`` (v5.3): one classic notifier, a tree of umems.

    ``invalidate_range_start`` refuses a non-blockable range (-EAGAIN) when the
    tree is write-locked or one umem overlaps it; otherwise every overlapping umem is zapped with
    its ``notifiers_count`` raised until ``invalidate_range_end`` bumps its
    ``notifiers_seq``.
    """

    def __init__(self, hca: OdpHca, mm: AddressSpace) -> None:
        self.hca = hca
        self.mm = mm
        self.umems: list[IbUmemOdp] = []
        self.umem_rwsem = sched.RwSem(f"odp{hca.owner_id}.umem_rwsem")
        self.registered = False
        #: Blockable ranges between invalidate_range_start and _end.
        self.active: list[NotifierRange] = []

    def add(self, umem: IbUmemOdp) -> None:
        """Insert ``umem`` in the tree. One inserted while an overlapping
        invalidation runs counts as invalidated by it until it ends, so its
        faults retry instead of mapping pages about to go (the model's rule;
        v4.x parked such umems on ``no_private_counters`` for the same reason)."""
        with self.umem_rwsem.write():
            self.umems.append(umem)
            for rng in self.active:
                if umem.start < rng.end and rng.start < umem.end:
                    umem.notifiers_count += 1
                    umem.started.append(rng)
        if not self.registered:
            # mmu_notifier_register takes mmap_lock for write (v5.3 get_per_mm).
            with self.mm.mmap_lock.write():
                mmu_notifier_register(self, self.mm)
            self.registered = True

    def remove(self, umem: IbUmemOdp) -> None:
        with self.umem_rwsem.write():
            if umem in self.umems:
                self.umems.remove(umem)
            last = not self.umems
        if last and self.registered:
            self.registered = False
            mmu_notifier_unregister(self, self.mm)
            self.hca.per_mms.pop(id(self.mm), None)

    def _overlapping(self, rng: NotifierRange) -> list[IbUmemOdp]:
        return [u for u in self.umems if u.start < rng.end and rng.start < u.end]

    def invalidate_range_start(self, rng: NotifierRange) -> int:
        if not rng.blockable:
            # down_read_trylock(umem_rwsem) fails while a writer holds it;
            # otherwise any overlapping umem makes the tree walk -EAGAIN.
            if self.umem_rwsem.writer is not None or self._overlapping(rng):
                return -11  # -EAGAIN
            return 0
        with self.umem_rwsem.read():
            self.active.append(rng)
            for umem in self._overlapping(rng):
                umem.notifiers_count += 1
                umem.started.append(rng)
                if umem.mr is not None:
                    umem.mr.invalidate_span(rng.start, rng.end)
        return 0

    def invalidate_range_end(self, rng: NotifierRange) -> None:
        """End the accounting of every umem that saw this range start.

        v5.3 ended it for every umem overlapping the range at the end, so a
        umem inserted in between had its count driven below zero, and every
        later fault on it retried for good. The model ends only what started.
        """
        if not rng.blockable:
            return
        with self.umem_rwsem.read():
            if rng in self.active:
                self.active.remove(rng)
            for umem in self._overlapping(rng):
                if rng in umem.started:
                    umem.started.remove(rng)
                    with umem.umem_mutex:
                        umem.notifiers_seq += 1
                        umem.notifiers_count -= 1
                        if not umem.notifiers_count:
                            umem.notifier_completion.wake_up_all()

    def release(self, mm: AddressSpace) -> None:
        """``ib_umem_notifier_release``: every umem is invalidated for good."""
        with self.umem_rwsem.read():
            for umem in list(self.umems):
                umem.notifiers_count += 1
                if umem.mr is not None:
                    umem.mr.invalidate_span(umem.start, umem.end)
                umem.notifiers_seq += 1
                umem.notifiers_count -= 1
                if not umem.notifiers_count:
                    umem.notifier_completion.wake_up_all()
