"""DMA hot paths: hmm_dma_map_pfn per entry, dma_map_sgtable of a whole range.

Issue "DMA API, IOMMU and PCI P2PDMA": ``hmm_dma_map_pfn`` over 1 GiB of
populated 4 KiB pages in IOVA mode (behind an IOMMU) and in ``dma_list`` mode
(direct), and ``dma_map_sgtable`` of 1 GiB backed by 4 KiB pages vs 2 MiB THPs,
in ns per page, with the IOMMU entries and flushes as counters.
"""

from __future__ import annotations

import os
from typing import Any

import hmmsim
import numpy as np
import pytest
from hmmsim import MAP_ANONYMOUS, MAP_POPULATE, MAP_PRIVATE, PROT_READ, PROT_WRITE
from hmmsim.dma import (
    DMA_BIDIRECTIONAL,
    DmaDevice,
    IommuDomain,
    dma_map_sgtable,
    dma_unmap_sgtable,
    machine_violations,
    sg_alloc_table_from_pages,
)
from hmmsim.hmm import (
    HMM_PFN_DMA_MAPPED,
    HmmDmaMap,
    HmmRange,
    hmm_dma_map_alloc,
    hmm_dma_map_free,
    hmm_dma_map_pfn,
    hmm_dma_unmap_pfn,
    hmm_range_fault,
)
from hmmsim.machine import ThpMode

from .conftest import costs_of

GIB = 1 << 30
PAGE = 4096
SMOKE = os.environ.get("HMMSIM_BENCH_SMALL") == "1"


def _size() -> int:
    return (64 << 20) if SMOKE else GIB


class Nop:
    def invalidate(self, sub: Any, rng: Any, cur_seq: int) -> bool:
        hmmsim.mmu_interval_set_seq(sub, cur_seq)
        return True


def _populated(thp: ThpMode) -> tuple[hmmsim.Machine, hmmsim.Process, int]:
    m = hmmsim.Machine(hmmsim.MachineConfig(ram_bytes=2 * GIB, thp=thp, store_data=False))
    p = m.spawn()
    a = p.mmap(_size(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE)
    return m, p, a


@pytest.mark.benchmark(group="dma")
@pytest.mark.parametrize("mode", ["iova", "dma_list"])
def test_hmm_dma_map_pfn_over_populated_4k_pages(benchmark: Any, mode: str) -> None:
    npages = _size() // PAGE
    state: dict[str, Any] = {}

    def setup() -> tuple[tuple[()], dict[str, Any]]:
        m, p, a = _populated("never")
        dom = IommuDomain(m) if mode == "iova" else None
        dev = DmaDevice(m, "rdma", domain=dom)
        map_ = HmmDmaMap()
        hmm_dma_map_alloc(dev, map_, npages, PAGE)
        sub = hmmsim.mmu_interval_notifier_insert(p.mm, a, _size(), Nop())
        rng = HmmRange(sub, a, a + _size(), map_.pfn_list)
        rng.notifier_seq = hmmsim.mmu_interval_read_begin(sub)
        with p.mm.mmap_lock.read():
            hmm_range_fault(rng)
        state.update(m=m, dev=dev, map=map_, before=m.costs.snapshot())
        return (), {}

    def run() -> None:
        dev, map_ = state["dev"], state["map"]
        for i in range(npages):
            hmm_dma_map_pfn(dev, map_, i)

    benchmark.pedantic(run, setup=setup, rounds=1, iterations=1)
    m, dev, map_ = state["m"], state["dev"], state["map"]
    assert (map_.pfn_list & np.uint64(HMM_PFN_DMA_MAPPED)).all()
    costs_of(m, state["before"], benchmark, npages)
    benchmark.extra_info["live_mappings"] = dev.nr_live
    if dev.domain is not None:
        benchmark.extra_info["iommu_ptes"] = dev.domain.ptes
    for i in range(npages):
        hmm_dma_unmap_pfn(dev, map_, i)
    hmm_dma_map_free(dev, map_)
    assert dev.nr_live == 0 and machine_violations(m) == []


@pytest.mark.benchmark(group="dma")
@pytest.mark.parametrize("backing", ["4k", "2m"])
def test_dma_map_sgtable_of_a_range(benchmark: Any, backing: str) -> None:
    npages = _size() // PAGE
    state: dict[str, Any] = {}

    def setup() -> tuple[tuple[()], dict[str, Any]]:
        m, p, a = _populated("always" if backing == "2m" else "never")
        pfns = np.array([e.pfn for e in p.pagemap(a, npages)], dtype=np.int64)
        if backing == "4k":
            # Interleave so no two neighbours are physically contiguous: 4 KiB
            # segments, the worst case for coalescing and for the IOMMU.
            pfns = np.concatenate([pfns[0::2], pfns[1::2]])
        dom = IommuDomain(m)
        dev = DmaDevice(m, "gpu", domain=dom)
        state.update(m=m, dev=dev, dom=dom, pfns=pfns, before=m.costs.snapshot())
        return (), {}

    def run() -> None:
        sgt = sg_alloc_table_from_pages(state["pfns"], 0, npages * PAGE)
        dma_map_sgtable(state["dev"], sgt, DMA_BIDIRECTIONAL)
        state["sgt"] = sgt

    benchmark.pedantic(run, setup=setup, rounds=1, iterations=1)
    sgt, dev, dom, m = state["sgt"], state["dev"], state["dom"], state["m"]
    assert sgt.nents_mapped == 1
    costs_of(m, state["before"], benchmark, npages)
    benchmark.extra_info["sg_segments"] = sgt.nents
    benchmark.extra_info["iommu_ptes"] = dom.ptes
    dma_unmap_sgtable(dev, sgt, DMA_BIDIRECTIONAL)
    assert dom.iova_allocated() == 0 and machine_violations(m) == []
