"""hmm_dma_map_*: DMA-mapping an HMM pfn array (mm/hmm.c, 6.16+)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import ANON, PAGE, RW
from hmmsim import (
    InvalidArgument,
    KernelBug,
    Machine,
    MachineConfig,
    NotSupported,
    mmu_interval_notifier_insert,
    mmu_interval_read_begin,
    mmu_interval_set_seq,
)
from hmmsim.dma import (
    DMA_MAPPING_ERROR,
    DmaDevice,
    DmaViolationKind,
    IommuDomain,
    IommuFault,
    dma_read,
    dma_write,
    machine_violations,
)
from hmmsim.hmm import (
    HMM_PFN_DMA_MAPPED,
    HMM_PFN_P2PDMA,
    HMM_PFN_P2PDMA_BUS,
    HMM_PFN_REQ_FAULT,
    HMM_PFN_REQ_WRITE,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    HmmDmaMap,
    HmmRange,
    hmm_dma_map_alloc,
    hmm_dma_map_free,
    hmm_dma_map_pfn,
    hmm_dma_unmap_pfn,
    hmm_range_fault,
)

N = 8


class Ops:
    def invalidate(self, sub, rng, cur_seq):  # type: ignore[no-untyped-def]
        mmu_interval_set_seq(sub, cur_seq)
        return True


@pytest.fixture
def machine() -> Machine:
    return Machine(MachineConfig(ram_bytes=64 << 20))


@pytest.fixture(params=["iova", "dma_list"])
def dev(request, machine) -> DmaDevice:
    if request.param == "iova":
        return DmaDevice(machine, "mlx5", domain=IommuDomain(machine))
    return DmaDevice(machine, "mlx5")


def fault(p, sub, a, map_: HmmDmaMap, flags: int) -> None:
    rng = HmmRange(sub, a, a + N * PAGE, map_.pfn_list, default_flags=flags)
    rng.notifier_seq = mmu_interval_read_begin(sub)
    with p.mm.mmap_lock.read():
        hmm_range_fault(rng)


def setup(machine, dev):
    p = machine.spawn()
    a = p.mmap(N * PAGE, RW, ANON)
    p.write(a, b"".join(bytes([i]) * PAGE for i in range(N)))
    sub = mmu_interval_notifier_insert(p.mm, a, N * PAGE, Ops())
    map_ = HmmDmaMap()
    hmm_dma_map_alloc(dev, map_, N, PAGE)
    return p, a, sub, map_


def test_alloc_picks_iova_mode_behind_an_iommu_and_dma_list_mode_without(machine, dev):
    _, _, _, map_ = setup(machine, dev)
    assert len(map_.pfn_list) == N and not map_.pfn_list.any()
    if dev.domain is not None:
        assert map_.state.size == N * PAGE and map_.dma_list is None
    else:
        assert map_.state.size == 0 and map_.dma_list is not None


def test_alloc_refuses_devices_that_need_syncs_or_bouncing(machine):
    with pytest.raises(NotSupported):
        hmm_dma_map_alloc(DmaDevice(machine, "nc", coherent=False), HmmDmaMap(), N, PAGE)
    limited = DmaDevice(machine, "old", dma_mask=(1 << 24) - 1)
    with pytest.raises(NotSupported):
        hmm_dma_map_alloc(limited, HmmDmaMap(), N, PAGE)
    with pytest.raises(KernelBug):  # the kernel WARNs: no entry fits
        hmm_dma_map_alloc(DmaDevice(machine, "x"), HmmDmaMap(), 1, 2 * PAGE)
    with pytest.raises(InvalidArgument):
        hmm_dma_map_alloc(DmaDevice(machine, "x"), HmmDmaMap(), 0, PAGE)


def test_mapped_entries_reach_the_pages_and_dma_bits_survive_a_refault(machine, dev):
    p, a, sub, map_ = setup(machine, dev)
    fault(p, sub, a, map_, HMM_PFN_REQ_FAULT)
    addrs = [hmm_dma_map_pfn(dev, map_, i) for i in range(N)]
    assert DMA_MAPPING_ERROR not in addrs
    assert all(int(e) & HMM_PFN_DMA_MAPPED for e in map_.pfn_list)
    assert [dma_read(dev, x, 1) for x in addrs] == [bytes([i]) for i in range(N)]
    if dev.domain is not None:
        assert addrs == [map_.state.addr + i * PAGE for i in range(N)]
    # A write fault upgrades the entries; DMA_MAPPED is sticky, so mapping
    # again is a resync that returns the same address and maps nothing.
    maps = machine.costs.dma_maps
    fault(p, sub, a, map_, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE)
    assert all(int(e) & HMM_PFN_DMA_MAPPED for e in map_.pfn_list)
    assert all(int(e) & HMM_PFN_WRITE for e in map_.pfn_list)
    assert [hmm_dma_map_pfn(dev, map_, i) for i in range(N)] == addrs
    assert machine.costs.dma_maps == maps
    dma_write(dev, addrs[3], b"\xee")
    assert p.read(a + 3 * PAGE, 1) == b"\xee"
    assert machine_violations(machine) == []


def test_unmap_clears_the_dma_bits_and_the_device_loses_access(machine, dev):
    p, a, sub, map_ = setup(machine, dev)
    fault(p, sub, a, map_, HMM_PFN_REQ_FAULT)
    addr = hmm_dma_map_pfn(dev, map_, 2)
    assert hmm_dma_unmap_pfn(dev, map_, 2)
    e = int(map_.pfn_list[2])
    assert e & HMM_PFN_VALID
    assert not e & (HMM_PFN_DMA_MAPPED | HMM_PFN_P2PDMA | HMM_PFN_P2PDMA_BUS)
    assert not hmm_dma_unmap_pfn(dev, map_, 2)  # not mapped any more: False
    assert not hmm_dma_unmap_pfn(dev, map_, 5)  # never mapped: False
    with pytest.raises(IommuFault):
        dma_read(dev, addr, 1)
    assert dev.nr_live == 0


def test_a_driver_that_does_not_unmap_on_invalidation_is_caught_when_the_page_is_freed(
    machine, dev
):
    p, a, sub, map_ = setup(machine, dev)
    fault(p, sub, a, map_, HMM_PFN_REQ_FAULT)
    hmm_dma_map_pfn(dev, map_, 0)
    p.munmap(a, PAGE)  # invalidate() does not call hmm_dma_unmap_pfn
    kinds = [v.kind for v in machine_violations(machine)]
    assert kinds == [DmaViolationKind.FREED_WHILE_MAPPED]
    assert "test_hmm_dma.py" in machine_violations(machine)[0].origin


def test_free_with_entries_still_mapped_reports_leaks_in_iova_mode(machine):
    dev = DmaDevice(machine, "mlx5", domain=IommuDomain(machine))
    p, a, sub, map_ = setup(machine, dev)
    fault(p, sub, a, map_, HMM_PFN_REQ_FAULT)
    hmm_dma_map_pfn(dev, map_, 0)
    hmm_dma_map_pfn(dev, map_, 1)
    hmm_dma_map_free(dev, map_)
    assert [v.kind for v in machine_violations(machine)] == [DmaViolationKind.LEAK] * 2
    assert dev.nr_live == 0 and dev.domain is not None and dev.domain.iova_allocated() == 0


def test_entry_size_larger_than_a_page_links_whole_entries(machine):
    dev = DmaDevice(machine, "mlx5", domain=IommuDomain(machine))
    m = HmmDmaMap()
    hmm_dma_map_alloc(dev, m, 1024, 2 << 20)  # 4 MiB of IOVA, 2 MiB entries
    m.pfn_list[:] = np.uint64(HMM_PFN_VALID | 512)  # a 2 MiB-aligned physical page
    assert hmm_dma_map_pfn(dev, m, 1) == m.state.addr + (2 << 20)
    # The kernel indexes the IOVA by idx * dma_entry_size: idx 2 is past the range.
    assert hmm_dma_map_pfn(dev, m, 2) == DMA_MAPPING_ERROR
    assert not int(m.pfn_list[2]) & HMM_PFN_DMA_MAPPED
