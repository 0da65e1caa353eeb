"""hmm_range_fault keeps the sticky DMA bits and reports the map order on
every path: the vectorised PTE and PMD fast paths and the slow walk."""

from __future__ import annotations

import hmmsim
import numpy as np
import pytest
from hmmsim import MADV_HUGEPAGE, MAP_ANONYMOUS, MAP_PRIVATE, PROT_READ, PROT_WRITE
from hmmsim.hmm import (
    HMM_PFN_DMA_MAPPED,
    HMM_PFN_ERROR,
    HMM_PFN_P2PDMA,
    HMM_PFN_P2PDMA_BUS,
    HMM_PFN_REQ_FAULT,
    HMM_PFN_REQ_WRITE,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    HmmRange,
    hmm_range_fault,
)
from hmmsim.mm.physmem import HUGE_ZERO_PFN

PAGE = 4096
MB2 = 2 << 20
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS
V, W, E = HMM_PFN_VALID, HMM_PFN_WRITE, HMM_PFN_ERROR
O9 = 9 << 53
STICKY = HMM_PFN_DMA_MAPPED | HMM_PFN_P2PDMA | HMM_PFN_P2PDMA_BUS


class _Ops:
    def invalidate(self, sub, rng, cur_seq):  # type: ignore[no-untyped-def]
        hmmsim.mmu_interval_set_seq(sub, cur_seq)
        return True


@pytest.fixture
def p() -> hmmsim.Process:
    m = hmmsim.Machine(hmmsim.MachineConfig(ram_bytes=64 << 20, thp="madvise"))
    return m.spawn()


def _fault(p: hmmsim.Process, a: int, arr: np.ndarray, flags: int) -> np.ndarray:
    n = len(arr)
    sub = hmmsim.mmu_interval_notifier_insert(p.mm, a, n * PAGE, _Ops())
    try:
        while True:  # the caller pattern: the same array across Busy retries
            rng = HmmRange(sub, a, a + n * PAGE, arr, default_flags=flags)
            rng.notifier_seq = hmmsim.mmu_interval_read_begin(sub)
            try:
                with p.mm.mmap_lock.read():
                    hmm_range_fault(rng)
            except hmmsim.Busy:
                continue
            return arr
    finally:
        hmmsim.mmu_interval_notifier_remove(sub)


def _pfn(p: hmmsim.Process, a: int) -> int:
    pfn = p.pagemap(a, 1)[0].pfn
    assert pfn is not None
    return pfn


def _thp(p: hmmsim.Process, write: bool = True) -> int:
    a = p.mmap(MB2, RW, ANON)
    p.madvise(a, MB2, MADV_HUGEPAGE)
    if write:
        p.write(a, b"t")
    else:
        p.read(a, 1)
    assert p.pagemap(a, 1)[0].order == 9
    return a


@pytest.mark.parametrize("sticky", [HMM_PFN_DMA_MAPPED, HMM_PFN_P2PDMA, STICKY])
def test_pte_fast_path_keeps_sticky_dma_bits(p: hmmsim.Process, sticky: int) -> None:
    a = p.mmap(4 * PAGE, RW, ANON)
    p.write(a, b"x" * (4 * PAGE))  # every page present: the vectorised path
    arr = np.full(4, sticky, np.uint64)
    _fault(p, a, arr, HMM_PFN_REQ_FAULT)
    want = [sticky | V | W | _pfn(p, a + i * PAGE) for i in range(4)]
    assert arr.tolist() == want


@pytest.mark.parametrize("sticky", [HMM_PFN_DMA_MAPPED, HMM_PFN_P2PDMA_BUS, STICKY])
def test_pmd_fast_path_keeps_sticky_dma_bits(p: hmmsim.Process, sticky: int) -> None:
    a = _thp(p)
    head = _pfn(p, a)
    arr = np.full(3, sticky, np.uint64)
    _fault(p, a + 7 * PAGE, arr, HMM_PFN_REQ_FAULT)
    assert arr.tolist() == [sticky | V | W | O9 | (head + 7 + i) for i in range(3)]


def test_pmd_fast_path_clears_stale_output_bits(p: hmmsim.Process) -> None:
    a = _thp(p)
    head = _pfn(p, a)
    # A previous output (another pfn, ERROR) must not leak into the new one.
    arr = np.full(2, E | V | W | 0x77, np.uint64)
    _fault(p, a, arr, 0)
    assert arr.tolist() == [V | W | O9 | head, V | W | O9 | (head + 1)]


def test_pte_fast_path_clears_stale_output_bits(p: hmmsim.Process) -> None:
    a = p.mmap(2 * PAGE, RW, ANON)
    p.write(a, b"x" * (2 * PAGE))
    arr = np.full(2, E | O9 | 0x77, np.uint64)
    _fault(p, a, arr, 0)
    assert arr.tolist() == [V | W | _pfn(p, a), V | W | _pfn(p, a + PAGE)]


def test_slow_path_reports_pmd_order_and_keeps_sticky_bits(p: hmmsim.Process) -> None:
    a = p.mmap(2 * MB2, RW, ANON)
    assert a % MB2 == 0
    p.madvise(a, 2 * MB2, MADV_HUGEPAGE)
    p.write(a, b"t")  # the first 2 MiB is a THP, the second never touched
    assert p.pagemap(a, 1)[0].order == 9
    head = _pfn(p, a)
    # The range runs past the THP into the empty half: not all PMD leaves,
    # so the walk takes the slow path.
    arr = np.full(3, HMM_PFN_DMA_MAPPED, np.uint64)
    _fault(p, a + MB2 - 2 * PAGE, arr, 0)
    assert arr.tolist() == [
        HMM_PFN_DMA_MAPPED | V | W | O9 | (head + 510),
        HMM_PFN_DMA_MAPPED | V | W | O9 | (head + 511),
        HMM_PFN_DMA_MAPPED,
    ]


def test_huge_zero_pmd_reports_read_only_order_9(p: hmmsim.Process) -> None:
    a = _thp(p, write=False)
    arr = np.full(2, HMM_PFN_P2PDMA, np.uint64)
    _fault(p, a + PAGE, arr, HMM_PFN_REQ_FAULT)
    assert arr.tolist() == [
        HMM_PFN_P2PDMA | V | O9 | (HUGE_ZERO_PFN + 1),
        HMM_PFN_P2PDMA | V | O9 | (HUGE_ZERO_PFN + 2),
    ]


def test_write_request_on_pte_range_sets_write_and_keeps_sticky(p: hmmsim.Process) -> None:
    a = p.mmap(2 * PAGE, RW, ANON)
    p.read(a, 2 * PAGE)  # zero page, read-only: the write request must fault
    arr = np.full(2, HMM_PFN_DMA_MAPPED, np.uint64)
    _fault(p, a, arr, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE)
    want = [HMM_PFN_DMA_MAPPED | V | W | _pfn(p, a + i * PAGE) for i in range(2)]
    assert arr.tolist() == want
