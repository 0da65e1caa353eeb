"""``hmm_range_fault``: snapshot (and fault in) a range of a CPU page table.

Kernel counterpart: include/linux/hmm.h and mm/hmm.c, mainline 6.19+ (the
6.16+ bit layout with sticky DMA bits and ``HMM_PFN_ORDER_SHIFT = 53``,
device-private THP reported at order 9, faults run from the walk callbacks).

The algorithm is the kernel's, pass for pass (docs/hmm-protocol.md §1):

* before every pass, ``mmu_interval_check_retry`` → ``Busy``;
* a pass walks [last, end) in address order, VMA by VMA; it stops at the
  first place that needs action: a fault (``hmm_vma_fault`` faults the rest of
  the walk chunk, then the walk restarts at ``last``), a migration entry
  (wait, restart), or an error (raise, leaving earlier entries as outputs and
  the rest as inputs);
* every non-fault outcome stores ``(in & HMM_PFN_INOUT_FLAGS) | out``.

Nothing here takes a page reference. Inside one pass the model computes the
outputs of a whole window with NumPy (the walk has no preemption point inside
a pass, so this is the same as the kernel's entry-by-entry walk); windows grow
geometrically while nothing needs action, so a fully populated range is one
gather and one vectorised decode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import attrs
import numpy as np
from numpy.typing import NDArray

from . import sched
from .dma_mapping import (
    DMA_ATTR_MMIO,
    DMA_BIDIRECTIONAL,
    DMA_MAPPING_ERROR,
    PCI_P2PDMA_MAP_BUS_ADDR,
    PCI_P2PDMA_MAP_NONE,
    PCI_P2PDMA_MAP_THRU_HOST_BRIDGE,
    DmaDevice,
    DmaIovaState,
    PciP2PDmaMapState,
    dma_iova_free,
    dma_iova_link,
    dma_iova_sync,
    dma_iova_try_alloc,
    dma_iova_unlink,
    dma_map_phys,
    dma_mapping_error,
    dma_unmap_phys,
    dma_use_iova,
    pci_p2pdma_state,
)
from .errors import (
    BadAddress,
    Busy,
    HmmsimError,
    InvalidArgument,
    KernelBug,
    NotPermitted,
    NotSupported,
)
from .mm.fault import VM_FAULT_ERROR, VM_FAULT_OOM, populate_range, wait_on_migration
from .mm.pagetable import (
    CHUNK_PMD,
    KIND_DEVICE_PRIVATE,
    KIND_HWPOISON,
    KIND_MARKER,
    KIND_MIGRATION,
    KIND_PRESENT,
    KIND_PROTNONE,
    KIND_SWAP,
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_ORDER,
    PMD_PAGES,
    PTE_PFN_MASK,
    PTE_PRESENT,
    PTE_SPECIAL,
    PTE_WRITE,
    PUD_PAGES,
    SOFTLEAF_TYPE_MASK,
    SOFTLEAF_TYPE_SHIFT,
    SWP_DEVICE_PRIVATE_WRITE,
    U64,
    Walk,
    pte_kind_array,
)
from .mm.physmem import HUGE_ZERO_PFN, ZERO_PFN
from .mm.reclaim import direct_reclaim
from .mm.vma import VM_IO, VM_PFNMAP, VM_READ, VM_WRITE
from .notifier import IntervalNotifier, mmu_interval_check_retry
from .trace import COST_HMM_PAGE_NS, COST_HMM_PASS_NS

if TYPE_CHECKING:
    from .mm.address_space import AddressSpace
    from .mm.vma import Vma

BITS_PER_LONG: Final = 64
HMM_PFN_VALID: Final = 1 << (BITS_PER_LONG - 1)
HMM_PFN_WRITE: Final = 1 << (BITS_PER_LONG - 2)
HMM_PFN_ERROR: Final = 1 << (BITS_PER_LONG - 3)
HMM_PFN_DMA_MAPPED: Final = 1 << (BITS_PER_LONG - 4)
HMM_PFN_P2PDMA: Final = 1 << (BITS_PER_LONG - 5)
HMM_PFN_P2PDMA_BUS: Final = 1 << (BITS_PER_LONG - 6)
HMM_PFN_ORDER_SHIFT: Final = BITS_PER_LONG - 11
HMM_PFN_REQ_FAULT: Final = HMM_PFN_VALID
HMM_PFN_REQ_WRITE: Final = HMM_PFN_WRITE
HMM_PFN_FLAGS: Final = ~((1 << HMM_PFN_ORDER_SHIFT) - 1) & ((1 << BITS_PER_LONG) - 1)
#: Bits preserved across ``hmm_range_fault`` (private to mm/hmm.c in the kernel).
HMM_PFN_INOUT_FLAGS: Final = HMM_PFN_DMA_MAPPED | HMM_PFN_P2PDMA | HMM_PFN_P2PDMA_BUS
#: Milliseconds; callers bound their -EBUSY retry loops with it (HMM never does).
HMM_RANGE_DEFAULT_TIMEOUT: Final = 1000

_VALID = U64(HMM_PFN_VALID)
_WRITE = U64(HMM_PFN_WRITE)
_ERROR = U64(HMM_PFN_ERROR)
_INOUT = U64(HMM_PFN_INOUT_FLAGS)
_REQ = U64(HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE)
_PFN_FIELD = U64((1 << HMM_PFN_ORDER_SHIFT) - 1)
_ORDER9 = U64(PMD_ORDER << HMM_PFN_ORDER_SHIFT)

# What a window asks of the walk at its first position that needs action.
_ACT_NONE: Final = 0
_ACT_FAULT: Final = 1
_ACT_WRITE_FAULT: Final = 2
_ACT_EFAULT: Final = 3
_ACT_WAIT: Final = 4

#: First window of a pass, in pages; it doubles while nothing needs action.
FIRST_WINDOW: Final = PMD_PAGES


def hmm_pfn_to_page(entry: int) -> int:
    """The pfn of an HMM pfn entry (``hmm_pfn_to_page`` names a page by pfn)."""
    return int(entry) & ((1 << HMM_PFN_ORDER_SHIFT) - 1)


def hmm_pfn_to_phys(entry: int) -> int:
    return hmm_pfn_to_page(entry) << PAGE_SHIFT


def hmm_pfn_to_map_order(entry: int) -> int:
    """Order of the CPU mapping (0, 9, 18 …), not of the folio."""
    return (int(entry) >> HMM_PFN_ORDER_SHIFT) & 0x1F


@attrs.define(eq=False)
class HmmRange:
    """``struct hmm_range``: what to walk, the in/out pfn array, the request."""

    notifier: IntervalNotifier
    start: int
    end: int
    hmm_pfns: NDArray[np.uint64]
    default_flags: int = 0
    pfn_flags_mask: int = 0
    dev_private_owner: object | None = None
    notifier_seq: int = 0

    @property
    def npages(self) -> int:
        return (self.end - self.start) >> PAGE_SHIFT


class _Fault(Exception):
    """Internal -EBUSY of a pass: work was done at ``last``; rewalk from there."""

    def __init__(self, last: int) -> None:
        self.last = last


def hmm_range_fault(rng: HmmRange) -> None:
    """Fill ``rng.hmm_pfns`` for [start, end), faulting what the request asks.

    Raises ``Busy`` (the notifier sequence moved: read_begin again and retry),
    ``BadAddress`` (a fault was needed and cannot happen), ``NotPermitted`` (a
    write fault on a VMA without VM_WRITE) or ``InvalidArgument`` (empty
    range, or an array that does not match it). The caller must hold the
    mm's ``mmap_lock`` for read.
    """
    if sched.active() is None:
        _hmm_range_fault(rng)
        return
    what = f"hmm_range_fault [{rng.start:#x}, {rng.end:#x}) seq {rng.notifier_seq}"
    try:
        _hmm_range_fault(rng)
    except HmmsimError as exc:
        sched.note("hmm", f"{what}: {type(exc).__name__}")
        raise
    sched.note("hmm", f"{what}: ok, {rng.npages} page(s)")


def _hmm_range_fault(rng: HmmRange) -> None:
    mm = rng.notifier.mm
    mm.mmap_lock.assert_held()
    if rng.start >= rng.end:
        raise InvalidArgument(f"hmm_range_fault: empty range [{rng.start:#x}, {rng.end:#x})")
    if rng.start % 4096 or rng.end % 4096:
        raise InvalidArgument("hmm_range_fault: start and end must be page aligned")
    pfns = rng.hmm_pfns
    if not isinstance(pfns, np.ndarray) or pfns.dtype != np.uint64 or pfns.ndim != 1:
        raise InvalidArgument("hmm_pfns must be a one-dimensional numpy.uint64 array")
    if len(pfns) != rng.npages:
        raise InvalidArgument(f"hmm_pfns has {len(pfns)} entries for {rng.npages} pages")
    if not pfns.flags.writeable:
        raise InvalidArgument("hmm_pfns is read-only: hmm_range_fault writes its output there")
    last = rng.start
    clock = mm.machine.clock
    while True:
        clock.advance(COST_HMM_PASS_NS + COST_HMM_PAGE_NS * ((rng.end - last) >> PAGE_SHIFT))
        if mmu_interval_check_retry(rng.notifier, rng.notifier_seq):
            raise Busy(
                f"hmm_range_fault: invalidation of [{rng.start:#x}, {rng.end:#x}) since read_begin"
            )
        try:
            _walk_pass(mm, rng, last)
            return
        except _Fault as again:
            last = again.last
            sched.point("hmm_range_fault:pass")


# ----- one pass ------------------------------------------------------------------


def _walk_pass(mm: AddressSpace, rng: HmmRange, last: int) -> None:
    """Walk [last, end); returns when done, raises ``_Fault`` to rewalk."""
    end = rng.end
    pos = last
    for vma in mm.vmas.intersecting(last, end):
        if vma.start > pos:
            _hole(rng, pos, vma.start)
        lo = max(pos, vma.start)
        hi = min(end, vma.end)
        _walk_vma(mm, rng, vma, lo, hi)
        pos = hi
    if pos < end:
        _hole(rng, pos, end)


def _index(rng: HmmRange, addr: int) -> int:
    return (addr - rng.start) >> PAGE_SHIFT


def _fill(rng: HmmRange, lo: int, hi: int, value: int) -> None:
    """``hmm_pfns_fill``: (old & INOUT) | value over [lo, hi)."""
    s = slice(_index(rng, lo), _index(rng, hi))
    rng.hmm_pfns[s] = (rng.hmm_pfns[s] & _INOUT) | U64(value)


def _requests(rng: HmmRange, lo: int, hi: int) -> NDArray[np.uint64] | None:
    """Effective request bits per entry (REQ_FAULT/REQ_WRITE), None if none can fault."""
    if not (rng.default_flags | rng.pfn_flags_mask) & HMM_PFN_REQ_FAULT:
        return None
    s = slice(_index(rng, lo), _index(rng, hi))
    req = (rng.hmm_pfns[s] & U64(rng.pfn_flags_mask & ((1 << 64) - 1))) | U64(
        rng.default_flags & ((1 << 64) - 1)
    )
    return req & _REQ


def _span_need(req: NDArray[np.uint64] | None) -> int:
    """OR of the needs of a span whose CPU state is "nothing" (cpu = 0)."""
    if req is None or not (req & _VALID).any():
        return _ACT_NONE
    return (
        _ACT_WRITE_FAULT if bool(((req & _VALID != 0) & (req & _WRITE != 0)).any()) else _ACT_FAULT
    )


def _hole(rng: HmmRange, lo: int, hi: int) -> None:
    """No VMA at all: a needed fault is -EFAULT, otherwise ERROR."""
    if _span_need(_requests(rng, lo, hi)):
        raise BadAddress(f"hmm_range_fault: no VMA at {lo:#x}")
    _fill(rng, lo, hi, HMM_PFN_ERROR)


def _walk_vma(mm: AddressSpace, rng: HmmRange, vma: Vma, lo: int, hi: int) -> None:
    # test_walk: VM_IO/VM_PFNMAP or unreadable VMAs are refused.
    if vma.flags & (VM_IO | VM_PFNMAP) or not vma.flags & VM_READ:
        if _span_need(_requests(rng, lo, hi)):
            raise BadAddress(f"hmm_range_fault: {vma} cannot be faulted (VM_IO/PFNMAP/!READ)")
        _fill(rng, lo, hi, HMM_PFN_ERROR)
        return
    if vma.is_hugetlb:
        _walk_hugetlb(mm, rng, vma, lo, hi)
        return
    window = FIRST_WINDOW
    pos = lo
    while pos < hi:
        whi = min(hi, (pos & ~((window << PAGE_SHIFT) - 1)) + (window << PAGE_SHIFT))
        if whi <= pos:
            whi = hi
        _walk_window(mm, rng, vma, pos, whi)
        pos = whi
        window *= 2


def _hmm_vma_fault(rng: HmmRange, vma: Vma, addr: int, end: int, act: int) -> None:
    """``hmm_vma_fault``: fault every page of [addr, end), then rewalk from ``addr``."""
    write = act == _ACT_WRITE_FAULT
    if write and not vma.flags & VM_WRITE:
        raise NotPermitted(f"hmm_range_fault: write fault at {addr:#x} in read-only {vma}")
    failures = vma.mm.machine.phys.order0_failures
    npages = (end - addr) >> PAGE_SHIFT
    ret = populate_range(vma, addr >> PAGE_SHIFT, npages, write)
    # Where RAM ran out and reclaim freed some, the walk starts again from addr
    # (reclaim of the range's own pages shows up as an invalidation: -EBUSY).
    if ret & VM_FAULT_ERROR and not (
        ret & VM_FAULT_OOM and direct_reclaim(vma.mm.machine, npages, since=failures)
    ):
        raise BadAddress(f"hmm_range_fault: fault at {addr:#x} failed ({ret:#x})")
    raise _Fault(addr)


def _owner_mask(mm: AddressSpace, rng: HmmRange, pfns: NDArray[np.int64]) -> NDArray[np.bool_]:
    """Device pfns whose pgmap owner is the range's ``dev_private_owner``."""
    if rng.dev_private_owner is None or len(pfns) == 0:
        return np.zeros(len(pfns), dtype=np.bool_)
    owners = mm.machine.phys.pgmap_owners(pfns)
    return np.array([o is rng.dev_private_owner for o in owners], dtype=np.bool_)


def _walk_window(mm: AddressSpace, rng: HmmRange, vma: Vma, lo: int, hi: int) -> None:
    """Decide every entry of [lo, hi); do the first action, or write all outputs."""
    pt = mm.pt
    vpn0 = lo >> PAGE_SHIFT
    n = (hi - lo) >> PAGE_SHIFT
    mm.machine.costs.pages_walked += n
    req = _requests(rng, lo, hi)
    s = slice(_index(rng, lo), _index(rng, hi))
    chunks = pt.walk(vpn0, n, per_page=False)
    if _huge_fast_path(rng, chunks, req, s, vpn0, n):
        return
    walk = pt.walk(vpn0, n)
    e = walk.entries
    if _fast_path(rng, walk, req, s):
        return
    kinds = pte_kind_array(e)
    # CPU state and output of every page, as the PTE/PMD handlers compute them.
    pfn = e & U64(PTE_PFN_MASK)
    huge = walk.huge
    if huge:
        vpns = np.arange(vpn0, vpn0 + n, dtype=np.int64)
        level = walk.level
        pfn = pfn + (vpns & np.where(level > 0, PMD_PAGES - 1, 0)).astype(U64)
    present = kinds == KIND_PRESENT
    writable = (e & U64(PTE_WRITE)) != 0
    cpu_valid = present.copy()
    cpu_write = present & writable
    out = np.zeros(n, dtype=U64)
    out[present] = pfn[present] | _VALID
    out[cpu_write] |= _WRITE
    special = present & ((e & U64(PTE_SPECIAL)) != 0)
    if special.any():
        zero = special & (
            (pfn == ZERO_PFN) | ((pfn >= HUGE_ZERO_PFN) & (pfn < HUGE_ZERO_PFN + PMD_PAGES))
        )
        bad = special & ~zero  # vm_normal_page() == NULL and not the zero page
        out[bad] = _ERROR
        cpu_valid[bad] = False
    else:
        bad = np.zeros(n, dtype=np.bool_)
    protnone = kinds == KIND_PROTNONE
    if protnone.any():
        out[protnone] = pfn[protnone]  # bare pfn bits, not VALID
    devpriv = kinds == KIND_DEVICE_PRIVATE
    owned = np.zeros(n, dtype=np.bool_)
    if devpriv.any():
        idx = np.flatnonzero(devpriv)
        owned[idx] = _owner_mask(mm, rng, pfn[idx].astype(np.int64))
        if owned.any():
            dp_write = ((e & U64(SOFTLEAF_TYPE_MASK)) >> U64(SOFTLEAF_TYPE_SHIFT)) == U64(
                SWP_DEVICE_PRIVATE_WRITE
            )
            out[owned] = pfn[owned] | _VALID
            out[owned & dp_write] |= _WRITE
            cpu_valid[owned] = True  # reported, never faulted
            cpu_write[owned] = True
    if huge:
        leafish = level > 0
        out[leafish & (cpu_valid | owned)] |= _ORDER9
        # Non-present PMD entries (other than migration and owned
        # device-private) report ERROR where a PTE would report 0.
        absent_pmd = leafish & ~present & ~protnone & ~owned & (kinds != KIND_MIGRATION)
        out[absent_pmd] = _ERROR
    # ---- what action, if any, the walk must take, and where ----
    act = np.zeros(n, dtype=np.int8)
    if req is not None:
        rf = (req & _VALID) != 0
        rw = rf & ((req & _WRITE) != 0)
        need_w = rw & ~cpu_write
        need = (rf & ~cpu_valid) | need_w
        need &= ~owned
        act[need] = _ACT_FAULT
        act[need_w] = _ACT_WRITE_FAULT
        efault = need & (bad | (kinds == KIND_HWPOISON) | (kinds == KIND_MARKER))
        if huge:
            # absent PMDs: foreign device-private faults back, anything else -EFAULT
            efault |= need & absent_pmd & (kinds != KIND_DEVICE_PRIVATE)
        act[efault] = _ACT_EFAULT
        act[need & (kinds == KIND_MIGRATION)] = _ACT_WAIT
    if huge:
        act = _huge_spans(walk, act, vpn0, n)
    first = int(np.argmax(act != _ACT_NONE)) if act.any() else n
    keep = slice(s.start, s.start + first)
    rng.hmm_pfns[keep] = (rng.hmm_pfns[keep] & _INOUT) | out[:first]
    if first == n:
        return
    addr = lo + (first << PAGE_SHIFT)
    a = int(act[first])
    if a == _ACT_EFAULT:
        raise BadAddress(
            f"hmm_range_fault: cannot fault {addr:#x} "
            f"({_KIND_WORDS.get(int(kinds[first]), 'special mapping')})"
        )
    if a == _ACT_WAIT:
        loc, entry, _level = mm.pt.lookup(addr >> PAGE_SHIFT)
        wait_on_migration(vma, loc, entry)
        raise _Fault(addr)
    end = _chunk_end(mm, vma, rng, addr)
    if a in (_ACT_FAULT, _ACT_WRITE_FAULT):
        addr, a = _pte_hole(mm, lo, addr, end, rng, a)
    _hmm_vma_fault(rng, vma, addr, end, a)


def _pte_hole(
    mm: AddressSpace, lo: int, addr: int, end: int, rng: HmmRange, act: int
) -> tuple[int, int]:
    """Where the fault at ``addr`` starts and what it asks, when no PTE table is there.

    A missing table is one ``pte_hole`` call for the whole span the walk
    reaches in it, [max(walk start, span start), end): the need is the OR of
    every entry of the span (one entry asking for a write makes every page a
    write fault), and every page of the span is faulted, asked for or not.
    Where the table exists, each PTE decides alone and the fault runs from the
    first PTE that needs one (``hmm_vma_handle_pte``).
    """
    vpn = addr >> PAGE_SHIFT
    pt = mm.pt
    pmdloc = pt.pmd_loc(vpn)
    if pmdloc >= 0 and int(pt.flat[pmdloc]) != 0:
        return addr, act  # a table (or a leaf) is there: not a hole
    span = PMD_PAGES
    if pmdloc < 0:
        span = PUD_PAGES if pt.pud_loc(vpn) >= 0 else PUD_PAGES * 512
    start = max(lo, (vpn & ~(span - 1)) << PAGE_SHIFT)
    return start, max(act, _span_need(_requests(rng, start, end)))


#: PRESENT, WRITE and pfn: with the model's entry layout this *is* the HMM pfn.
_PTE_TO_HMM = U64(PTE_PRESENT | PTE_WRITE | PTE_PFN_MASK)
_OFFSETS = np.arange(PMD_PAGES, dtype=np.uint64)


def _fast_path(rng: HmmRange, walk: Walk, req: NDArray[np.uint64] | None, s: slice) -> bool:
    """Every page mapped by a normal present PTE (a writable one where a write
    is requested), so no request can fault: with the model's entry layout the
    output is one mask away."""
    if walk.huge:
        return False
    e = walk.entries
    if req is not None and bool((req & _WRITE).any()):
        # Writes requested: every PTE writable too (an ODP MR's faults).
        if not bool(((e & _PRESENT_SPECIAL_WRITE) == _PRESENT_WRITE).all()):
            return False
    elif not bool(((e & _PRESENT_SPECIAL) == U64(PTE_PRESENT)).all()):
        return False
    np.bitwise_and(e, _PTE_TO_HMM, out=e)
    out = rng.hmm_pfns[s]
    out &= _INOUT
    out |= e
    return True


def _huge_fast_path(
    rng: HmmRange, walk: Walk, req: NDArray[np.uint64] | None, s: slice, vpn0: int, n: int
) -> bool:
    """Every page under present PMD leaves (THP, huge zero page) and no request
    that could fault: computed from the 2 MiB chunks, never page by page."""
    ck = walk.chunk_kind
    if not bool((ck == CHUNK_PMD).all()):
        return False
    leaves = walk.chunk_entry
    if not bool(((leaves & U64(PTE_PRESENT)) != 0).all()):
        return False
    if (
        req is not None
        and bool((req & _WRITE).any())
        and not bool(((leaves & U64(PTE_WRITE)) != 0).all())
    ):
        return False
    base = (leaves & _PTE_TO_HMM) | _ORDER9
    out2d = base[:, None] + _OFFSETS[None, :]
    off = vpn0 & (PMD_PAGES - 1)
    out = rng.hmm_pfns[s]
    out &= _INOUT
    out |= out2d.reshape(-1)[off : off + n]
    return True


_PRESENT_SPECIAL = U64(PTE_PRESENT | PTE_SPECIAL)
_PRESENT_SPECIAL_WRITE = U64(PTE_PRESENT | PTE_SPECIAL | PTE_WRITE)
_PRESENT_WRITE = U64(PTE_PRESENT | PTE_WRITE)

_KIND_WORDS = {
    KIND_HWPOISON: "hwpoison entry",
    KIND_MARKER: "marker entry",
    KIND_SWAP: "swap entry",
    KIND_PRESENT: "special mapping",
}


def _huge_spans(walk: Walk, act: NDArray[np.int8], vpn0: int, n: int) -> NDArray[np.int8]:
    """Within a PMD leaf the need is the OR of its span, decided at the span start."""
    c0 = vpn0 >> PMD_ORDER
    for i in np.flatnonzero(walk.chunk_kind >= CHUNK_PMD).tolist():
        lo = max(vpn0, (c0 + i) << PMD_ORDER) - vpn0
        hi = min(vpn0 + n, (c0 + i + 1) << PMD_ORDER) - vpn0
        span = act[lo:hi]
        if span.any():
            worst = (
                _ACT_EFAULT
                if (span == _ACT_EFAULT).any()
                else (_ACT_WAIT if (span == _ACT_WAIT).any() else int(span.max()))
            )
            act[lo:hi] = 0
            act[lo] = worst
    return act


def _chunk_end(mm: AddressSpace, vma: Vma, rng: HmmRange, addr: int) -> int:
    """End of the walk chunk holding ``addr``: its PMD range, or a whole missing level."""
    vpn = addr >> PAGE_SHIFT
    pt = mm.pt
    span = PMD_PAGES
    if pt.pmd_loc(vpn) < 0:
        # The PMD table (or higher) is missing: pte_hole covers that whole level.
        span = PUD_PAGES if pt.pud_loc(vpn) >= 0 else PUD_PAGES * 512
    end = ((vpn & ~(span - 1)) + span) << PAGE_SHIFT
    return min(end, vma.end, rng.end)


# ----- hugetlb -------------------------------------------------------------------


def _walk_hugetlb(mm: AddressSpace, rng: HmmRange, vma: Vma, lo: int, hi: int) -> None:
    """``hugetlb_entry``: one decision per huge page, request from its first entry."""
    pt = mm.pt
    order = vma.hugetlb_order
    size = (1 << order) << PAGE_SHIFT
    pos = lo
    while pos < hi:
        chunk_end = min(hi, (pos & ~(size - 1)) + size)
        vpn = pos >> PAGE_SHIFT
        loc = pt.pmd_loc(vpn) if order == PMD_ORDER else pt.pud_loc(vpn)
        req = _requests(rng, pos, chunk_end)
        if loc < 0:
            # No table at that level: hole handling (fill 0 or fault).
            need = _span_need(req)
            if need:
                _hmm_vma_fault(rng, vma, pos, chunk_end, need)
            _fill(rng, pos, chunk_end, 0)
            pos = chunk_end
            continue
        e = pt.get(loc)
        present = e != 0 and pte_kind_array(np.array([e], dtype=U64))[0] == KIND_PRESENT
        cpu = HMM_PFN_VALID | (HMM_PFN_WRITE if e & PTE_WRITE else 0) if present else 0
        cpu |= order << HMM_PFN_ORDER_SHIFT
        first = int(req[0]) if req is not None else 0
        need = _ACT_NONE
        if first & HMM_PFN_REQ_FAULT:
            if first & HMM_PFN_REQ_WRITE and not cpu & HMM_PFN_WRITE:
                need = _ACT_WRITE_FAULT
            elif not cpu & HMM_PFN_VALID:
                need = _ACT_FAULT
        if need:
            _hmm_vma_fault(rng, vma, pos, chunk_end, need)
        base = e & PTE_PFN_MASK
        off = (pos >> PAGE_SHIFT) & ((1 << order) - 1)
        count = (chunk_end - pos) >> PAGE_SHIFT
        s = slice(_index(rng, pos), _index(rng, chunk_end))
        values = np.arange(base + off, base + off + count, dtype=np.uint64) & _PFN_FIELD
        values |= U64(cpu)
        rng.hmm_pfns[s] = (rng.hmm_pfns[s] & _INOUT) | values
        pos = chunk_end


# ----- DMA mapping of an HMM pfn array (include/linux/hmm-dma.h, 6.16+) -------------


@attrs.define(eq=False)
class HmmDmaMap:
    """``struct hmm_dma_map``: a pfn array and the DMA addresses of its entries.

    ``pfn_list`` is handed to ``hmm_range_fault`` as ``hmm_pfns``; that is why
    ``HMM_PFN_DMA_MAPPED``, ``HMM_PFN_P2PDMA`` and ``HMM_PFN_P2PDMA_BUS`` are
    sticky across faults: the array keeps its DMA bookkeeping. With an IOVA
    range (``state``) entry ``idx`` lives at ``state.addr + idx *
    dma_entry_size``; without one, ``dma_list[idx]`` holds its address.
    """

    state: DmaIovaState = attrs.field(factory=DmaIovaState)
    pfn_list: NDArray[np.uint64] = attrs.field(factory=lambda: np.zeros(0, np.uint64))
    dma_list: NDArray[np.uint64] | None = None
    dma_entry_size: int = 0


def hmm_dma_map_alloc(dev: DmaDevice, map: HmmDmaMap, nr_entries: int, dma_entry_size: int) -> None:
    """``hmm_dma_map_alloc``: set up ``map`` for ``nr_entries`` pfns.

    Reserves one IOVA range of ``nr_entries * PAGE_SIZE`` bytes when the device
    sits behind an IOMMU; otherwise keeps a ``dma_list`` (DMA-API debugging
    always needs the addresses to unmap).

    Raises:
        KernelBug: ``nr_entries * PAGE_SIZE / dma_entry_size`` is 0 (the
            kernel WARNs).
        InvalidArgument: a non-positive count or entry size.
        NotSupported: the device needs DMA syncs or is addressing limited
            (SWIOTLB could bounce, and HMM cannot hand buffer ownership over).
    """
    if nr_entries <= 0 or dma_entry_size <= 0:
        raise InvalidArgument(
            f"hmm_dma_map_alloc: {nr_entries} entries of {dma_entry_size:#x} bytes"
        )
    if not nr_entries * PAGE_SIZE // dma_entry_size:
        raise KernelBug(
            f"hmm_dma_map_alloc: {nr_entries} pages hold no {dma_entry_size:#x}-byte entry"
        )
    if dev.need_sync():
        raise NotSupported(f"hmm_dma_map_alloc: {dev.name} needs DMA syncs or bouncing")
    map.pfn_list = np.zeros(nr_entries, np.uint64)
    map.dma_entry_size = dma_entry_size
    map.state = DmaIovaState()
    map.dma_list = None
    if not dma_iova_try_alloc(dev, map.state, 0, nr_entries * PAGE_SIZE):
        map.dma_list = np.zeros(nr_entries, np.uint64)


def hmm_dma_map_free(dev: DmaDevice, map: HmmDmaMap) -> None:
    """``hmm_dma_map_free``: free the IOVA range (if any) and both arrays."""
    if dma_use_iova(map.state):
        dma_iova_free(dev, map.state)
    map.pfn_list = np.zeros(0, np.uint64)
    map.dma_list = None


def hmm_dma_map_pfn(
    dev: DmaDevice, map: HmmDmaMap, idx: int, p2pdma_state: PciP2PDmaMapState | None = None
) -> int:
    """``hmm_dma_map_pfn``: DMA-map entry ``idx`` of ``map.pfn_list``; its bus address.

    An entry already ``HMM_PFN_DMA_MAPPED`` (and not a P2P bus address) is a
    flag resync, e.g. a read mapping upgraded to write: its existing address is
    returned. Otherwise the page is classified (``pci_p2pdma_state``): ordinary
    memory is linked into the IOVA range (or mapped with ``dma_map_phys``); a
    P2P page reachable by bus address returns that address with
    ``HMM_PFN_P2PDMA_BUS``; one that goes through the host bridge is mapped
    with ``DMA_ATTR_MMIO`` and gets ``HMM_PFN_P2PDMA``. Returns
    ``DMA_MAPPING_ERROR`` on failure (``HMM_PFN_P2PDMA`` cleared).
    """
    pfns = map.pfn_list
    entry = int(pfns[idx])
    offset = idx * map.dma_entry_size
    state = map.state
    if entry & HMM_PFN_DMA_MAPPED and not entry & HMM_PFN_P2PDMA_BUS:
        if dma_use_iova(state):
            return state.addr + offset
        if map.dma_list is not None:
            return int(map.dma_list[idx])
    pfn = entry & int(_PFN_FIELD)
    paddr = pfn << PAGE_SHIFT
    attrs_ = 0
    p2p = p2pdma_state if p2pdma_state is not None else PciP2PDmaMapState()
    kind = pci_p2pdma_state(p2p, dev, pfn)
    if kind == PCI_P2PDMA_MAP_THRU_HOST_BRIDGE:
        entry |= HMM_PFN_P2PDMA
        attrs_ |= DMA_ATTR_MMIO
    elif kind == PCI_P2PDMA_MAP_BUS_ADDR:
        pfns[idx] = U64(entry | HMM_PFN_P2PDMA_BUS | HMM_PFN_DMA_MAPPED)
        return paddr + p2p.bus_off
    elif kind != PCI_P2PDMA_MAP_NONE:
        return DMA_MAPPING_ERROR
    if dma_use_iova(state):
        ret = dma_iova_link(
            dev, state, paddr, offset, map.dma_entry_size, DMA_BIDIRECTIONAL, attrs_
        )
        if ret == 0:
            ret = dma_iova_sync(dev, state, offset, map.dma_entry_size)
            if ret:
                dma_iova_unlink(dev, state, offset, map.dma_entry_size, DMA_BIDIRECTIONAL)
        if ret:
            pfns[idx] = U64(entry & ~HMM_PFN_P2PDMA)
            return DMA_MAPPING_ERROR
        addr = state.addr + offset
    else:
        addr = dma_map_phys(dev, paddr, map.dma_entry_size, DMA_BIDIRECTIONAL, attrs_)
        if dma_mapping_error(dev, addr):
            pfns[idx] = U64(entry & ~HMM_PFN_P2PDMA)
            return DMA_MAPPING_ERROR
        if map.dma_list is not None:
            map.dma_list[idx] = addr
    pfns[idx] = U64(entry | HMM_PFN_DMA_MAPPED)
    return addr


def hmm_dma_unmap_pfn(dev: DmaDevice, map: HmmDmaMap, idx: int) -> bool:
    """``hmm_dma_unmap_pfn``: undo ``hmm_dma_map_pfn`` for entry ``idx``.

    Returns False (and does nothing) unless the entry is both ``VALID`` and
    ``DMA_MAPPED``. A P2P bus address needs no unmap. Clears the three DMA
    bits and returns True. Drivers call it from ``invalidate()`` for each index
    of the invalidated range.
    """
    pfns = map.pfn_list
    entry = int(pfns[idx])
    if not (entry & HMM_PFN_VALID and entry & HMM_PFN_DMA_MAPPED):
        return False
    offset = idx * map.dma_entry_size
    attrs_ = DMA_ATTR_MMIO if entry & HMM_PFN_P2PDMA else 0
    if entry & HMM_PFN_P2PDMA_BUS:
        pass
    elif dma_use_iova(map.state):
        dma_iova_unlink(dev, map.state, offset, map.dma_entry_size, DMA_BIDIRECTIONAL, attrs_)
    elif map.dma_list is not None:
        dma_unmap_phys(dev, int(map.dma_list[idx]), map.dma_entry_size, DMA_BIDIRECTIONAL, attrs_)
    pfns[idx] = U64(entry & ~HMM_PFN_INOUT_FLAGS)
    return True


__all__ = [
    "HMM_PFN_DMA_MAPPED",
    "HMM_PFN_ERROR",
    "HMM_PFN_FLAGS",
    "HMM_PFN_INOUT_FLAGS",
    "HMM_PFN_ORDER_SHIFT",
    "HMM_PFN_P2PDMA",
    "HMM_PFN_P2PDMA_BUS",
    "HMM_PFN_REQ_FAULT",
    "HMM_PFN_REQ_WRITE",
    "HMM_PFN_VALID",
    "HMM_PFN_WRITE",
    "HMM_RANGE_DEFAULT_TIMEOUT",
    "HmmDmaMap",
    "HmmRange",
    "hmm_dma_map_alloc",
    "hmm_dma_map_free",
    "hmm_dma_map_pfn",
    "hmm_dma_unmap_pfn",
    "hmm_pfn_to_map_order",
    "hmm_pfn_to_page",
    "hmm_pfn_to_phys",
    "hmm_range_fault",
]
