"""nouveau v5.7 and v5.8: faults serviced in 16-entry windows.

Kernel counterpart: ``nouveau_svm.c`` of v5.7 and v5.8 (the April 2020
source). v5.9 replaced all of this with one page per fault (Ralph Campbell,
"nouveau: fault one page at a time").

Common to both eras:

* Sorting puts write and atomic faults before read and prefetch faults at one
  address. Atomic is treated as write (the source's "XXX: atomic?").
* Window: from the fault address, 16 pages, clipped to the unmanaged hole
  (the clip is live code in these eras) and to the VMA found by
  ``find_vma_intersection``. A fault whose address is not the window start
  after clipping is cancelled.
* Fill: one entry per following fault of the same svmm inside the window.
  Duplicates at the same address are skipped. Gaps are padded with entries
  that request nothing.
* A transient interval notifier covers the window. It only bumps the
  sequence (lock, or trylock when non-blockable), with no EXCLUSIVE or MIGRATE
  filter. The whole-mm notifier has no MIGRATE-owner filter either (added in
  5.9).
* Post-check per fault: cancel if the call failed, or its entry lacks V, or it
  lacks W and the access is neither READ nor PREFETCH. Otherwise it counts
  towards the replay.

v5.8: ``hmm_pfns[16]`` in the fixed format. READ asks ``REQ_FAULT``,
PREFETCH asks nothing, others ``REQ_FAULT|REQ_WRITE``, with ``pfn_flags_mask``
set once to ``REQ_FAULT|REQ_WRITE``. Known defect, kept (the source's FIXME):
after -EBUSY or a stale read_retry the requests are not regenerated. The
outputs written by the failed attempt are taken as the next attempt's input.
Consequence of PREFETCH asking nothing plus the post-check: a prefetch of a
page that is not present is cancelled, which kills the channel.

v5.7: the driver's own pfn format (``hmmsim.hmm_legacy``). HMM writes PFNMAP
words directly through nouveau's flags and values tables with
``pfn_shift = 12``. READ and PREFETCH ask V, so a prefetch does fault the page
in; others ask V|W. Before every attempt ``default_flags = 0`` and
``pfn_flags_mask = ~0``. Device-private entries are then rewritten to VRAM
address | VRAM.

Both eras map 4 KiB entries only: the mapping order did not exist yet.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import numpy as np
from hmmsim import sched
from hmmsim.errors import Busy, HmmsimError
from hmmsim.hmm import (
    HMM_PFN_REQ_FAULT,
    HMM_PFN_REQ_WRITE,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    HMM_RANGE_DEFAULT_TIMEOUT,
    HmmRange,
    hmm_pfn_to_page,
    hmm_range_fault,
)
from hmmsim.hmm_legacy import HmmRangeV57, hmm_range_fault_v57
from hmmsim.notifier import (
    mmu_interval_notifier_insert,
    mmu_interval_notifier_remove,
    mmu_interval_read_begin,
    mmu_interval_read_retry,
)

from .uapi import (
    FAULT_ACCESS_PREFETCH,
    FAULT_ACCESS_READ,
    NVIF_VMM_PFNMAP_V0_ADDR,
    NVIF_VMM_PFNMAP_V0_APER,
    NVIF_VMM_PFNMAP_V0_HOST,
    NVIF_VMM_PFNMAP_V0_NONE,
    NVIF_VMM_PFNMAP_V0_V,
    NVIF_VMM_PFNMAP_V0_VRAM,
    NVIF_VMM_PFNMAP_V0_W,
    FaultEntry,
)
from .vmm import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from .svm import NouveauSvm, NouveauSvmm

WINDOW_PAGES: Final = 16
_MASK64: Final = (1 << 64) - 1
#: v5.7's ``nouveau_svm_pfn_flags`` and ``nouveau_svm_pfn_values``.
PFN_FLAGS_V57: Final = (NVIF_VMM_PFNMAP_V0_V, NVIF_VMM_PFNMAP_V0_W, NVIF_VMM_PFNMAP_V0_VRAM)
PFN_VALUES_V57: Final = (
    ~NVIF_VMM_PFNMAP_V0_V & _MASK64,
    NVIF_VMM_PFNMAP_V0_NONE,
    ~NVIF_VMM_PFNMAP_V0_V & _MASK64,
)


def _request(era: str, access: int) -> int:
    """The per-entry request of one fault, in the era's encoding."""
    if era == "5.7":
        if access in (FAULT_ACCESS_READ, FAULT_ACCESS_PREFETCH):
            return NVIF_VMM_PFNMAP_V0_V
        return NVIF_VMM_PFNMAP_V0_V | NVIF_VMM_PFNMAP_V0_W
    if access == FAULT_ACCESS_READ:
        return HMM_PFN_REQ_FAULT
    if access == FAULT_ACCESS_PREFETCH:
        return 0
    return HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE


def window_batch(svm: NouveauSvm, faults: list[FaultEntry], svmms: list[Any]) -> int:
    """The v5.7/5.8 ``nouveau_svm_fault`` loop over a sorted batch; returns replays."""
    era = svm.drm.era
    replay = 0
    i, n = 0, len(faults)
    while i < n:
        fault, svmm = faults[i], svmms[i]
        if svmm is None:
            svm.cancel(fault)
            i += 1
            continue
        start = fault.addr
        limit = start + WINDOW_PAGES * PAGE_SIZE
        hole_start, hole_limit = svmm.unmanaged
        if start < hole_limit:
            limit = min(limit, hole_start)
        elif limit > hole_start:
            start = max(start, hole_limit)
        mm = svmm.mm
        if not mm.mmget_not_zero():
            svm.cancel(fault)
            i += 1
            continue
        try:
            with mm.mmap_lock.read():
                hits = mm.vmas.intersecting(start, limit) if limit > start else []
            if not hits:
                svm.cancel(fault)
                i += 1
                continue
            start = max(start, hits[0].start)
            limit = min(limit, hits[0].end)
            if fault.addr != start:
                svm.cancel(fault)
                i += 1
                continue
            requests: list[int] = []
            addr = start
            fn = i
            while fn < n:
                if fn > i and svmms[fn] is svmm and faults[fn].addr == faults[fn - 1].addr:
                    fn += 1
                    continue
                if svmms[fn] is not svmm or faults[fn].addr >= limit:
                    break
                while addr < faults[fn].addr:
                    requests.append(0)
                    addr += PAGE_SIZE
                requests.append(_request(era, faults[fn].access))
                addr += PAGE_SIZE
                fn += 1
            words, err = _window_fault(svmm, start, requests)
        finally:
            mm.mmput()
        for k in range(i, fn):
            f = faults[k]
            word = words[(f.addr - start) >> PAGE_SHIFT] if words else 0
            if (
                err is not None
                or not word & NVIF_VMM_PFNMAP_V0_V
                or (
                    not word & NVIF_VMM_PFNMAP_V0_W
                    and f.access not in (FAULT_ACCESS_READ, FAULT_ACCESS_PREFETCH)
                )
            ):
                svm.cancel(f, err)
                continue
            replay += 1
        i = fn
    return replay


def _window_fault(
    svmm: NouveauSvmm, start: int, requests: list[int]
) -> tuple[list[int], Exception | None]:
    """Insert the window's notifier, fault it, PFNMAP it; (words, error)."""
    size = len(requests) * PAGE_SIZE
    try:
        notifier = mmu_interval_notifier_insert(svmm.mm, start, size, svmm.transient_ops())
    except HmmsimError as exc:
        return [], exc
    try:
        if svmm.drm.era == "5.7":
            words = _range_fault_v57(svmm, notifier, start, requests)
        else:
            words = _range_fault_v58(svmm, notifier, start, requests)
        return words, None
    except HmmsimError as exc:
        return [], exc
    finally:
        mmu_interval_notifier_remove(notifier)


def _wait_loop(svmm: NouveauSvmm, attempt: Any, notifier: Any) -> None:
    """The shared retry loop: one deadline; -EBUSY and stale read_retry loop back.

    Returns holding ``svmm->mutex``.
    """
    clock = svmm.drm.machine.clock
    deadline = clock.now_ns + HMM_RANGE_DEFAULT_TIMEOUT * 1_000_000
    while True:
        if clock.now_ns > deadline:
            raise Busy("nouveau: window fault timed out")
        seq = mmu_interval_read_begin(notifier)
        try:
            with svmm.mm.mmap_lock.read():
                attempt(seq)
        except Busy:
            svmm.cli.stats.retries += 1
            continue
        sched.point("nouveau:after_range_fault")
        svmm.mutex.acquire()
        if mmu_interval_read_retry(notifier, seq):
            svmm.mutex.release()
            svmm.cli.stats.retries += 1
            continue
        return


def _range_fault_v58(
    svmm: NouveauSvmm, notifier: Any, start: int, requests: list[int]
) -> list[int]:
    drm = svmm.drm
    hmm_pfns = np.array(requests, dtype=np.uint64)
    rng = HmmRange(
        notifier,
        start,
        start + len(requests) * PAGE_SIZE,
        hmm_pfns,
        pfn_flags_mask=HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE,
        dev_private_owner=drm,
    )

    def attempt(seq: int) -> None:
        # FIXME of v5.8, kept: hmm_pfns is not refilled with the requests, so a
        # retry asks for whatever the failed attempt wrote there.
        rng.notifier_seq = seq
        svmm.cli.stats.fault_rounds += 1
        hmm_range_fault(rng)

    _wait_loop(svmm, attempt, notifier)
    try:
        words = []
        for e in rng.hmm_pfns.tolist():
            if not e & HMM_PFN_VALID:
                words.append(0)
                continue
            pfn = hmm_pfn_to_page(e)
            if drm.is_own_vram(pfn):
                word = drm.dmem.page_addr(pfn) | NVIF_VMM_PFNMAP_V0_V | NVIF_VMM_PFNMAP_V0_VRAM
            else:
                word = (pfn << PAGE_SHIFT) | NVIF_VMM_PFNMAP_V0_V | NVIF_VMM_PFNMAP_V0_HOST
            if e & HMM_PFN_WRITE:
                word |= NVIF_VMM_PFNMAP_V0_W
            words.append(word)
        _map(svmm, start, words)
        return words
    finally:
        svmm.mutex.release()


def _range_fault_v57(
    svmm: NouveauSvmm, notifier: Any, start: int, requests: list[int]
) -> list[int]:
    drm = svmm.drm
    pfns = np.array(requests, dtype=np.uint64)
    rng = HmmRangeV57(
        notifier,
        start,
        start + len(requests) * PAGE_SIZE,
        pfns,
        PFN_FLAGS_V57,
        PFN_VALUES_V57,
        pfn_shift=PAGE_SHIFT,
        dev_private_owner=drm,
    )

    def attempt(seq: int) -> None:
        rng.notifier_seq = seq
        rng.default_flags = 0
        rng.pfn_flags_mask = _MASK64
        svmm.cli.stats.fault_rounds += 1
        hmm_range_fault_v57(rng)

    _wait_loop(svmm, attempt, notifier)
    try:
        words = [int(w) for w in rng.pfns.tolist()]
        # nouveau_dmem_convert_pfn: a VRAM page's struct-page pfn becomes its VRAM address.
        for k, w in enumerate(words):
            if w & NVIF_VMM_PFNMAP_V0_V and (w & NVIF_VMM_PFNMAP_V0_APER) == (
                NVIF_VMM_PFNMAP_V0_VRAM
            ):
                pfn = (w & NVIF_VMM_PFNMAP_V0_ADDR) >> PAGE_SHIFT
                words[k] = (w & ~NVIF_VMM_PFNMAP_V0_ADDR & _MASK64) | drm.dmem.page_addr(pfn)
        _map(svmm, start, words)
        return words
    finally:
        svmm.mutex.release()


def _map(svmm: NouveauSvmm, start: int, words: list[int]) -> None:
    assert svmm.vmm is not None
    # Error words (~V) are not valid: the PFNMAP unmaps those entries.
    svmm.vmm.pfnmap(start, PAGE_SHIFT, [w if w & NVIF_VMM_PFNMAP_V0_V else 0 for w in words])
    svmm.cli.stats.pages_mapped += sum(1 for w in words if w & NVIF_VMM_PFNMAP_V0_V)
