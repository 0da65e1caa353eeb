"""The DMA API, IOMMU domains and DMA-API debugging (hmmsim.dma)."""

from __future__ import annotations

import errno

import numpy as np
import pytest
from helpers import ANON, PAGE, RW
from hmmsim import InvalidArgument, Machine, MachineConfig
from hmmsim.dma import (
    DMA_ATTR_MMIO,
    DMA_BIDIRECTIONAL,
    DMA_FROM_DEVICE,
    DMA_MAPPING_ERROR,
    DMA_NONE,
    DMA_TO_DEVICE,
    DmaDevice,
    DmaIovaState,
    DmaViolationKind,
    IommuDomain,
    IommuFault,
    dma_addressing_limited,
    dma_debug_device_teardown,
    dma_iova_destroy,
    dma_iova_free,
    dma_iova_link,
    dma_iova_sync,
    dma_iova_try_alloc,
    dma_iova_unlink,
    dma_map_page,
    dma_map_resource,
    dma_map_sgtable,
    dma_mapping_error,
    dma_need_sync,
    dma_read,
    dma_unmap_page,
    dma_unmap_sgtable,
    dma_use_iova,
    dma_write,
    machine_violations,
    sg_alloc_table_from_pages,
)
from hmmsim.errors import NotSupported
from hmmsim.testing.invariants import check_dma_contract, check_no_leaks


@pytest.fixture
def machine() -> Machine:
    return Machine(MachineConfig(ram_bytes=64 << 20, thp="always"))


@pytest.fixture(params=["iommu", "direct"])
def dev(request, machine) -> DmaDevice:
    if request.param == "iommu":
        return DmaDevice(machine, "gpu0", domain=IommuDomain(machine))
    return DmaDevice(machine, "gpu0", bus_offset=0x1_0000_0000)


def populated(machine: Machine, npages: int) -> tuple[object, int, list[int]]:
    p = machine.spawn()
    a = p.mmap(npages * PAGE, RW, ANON)
    p.write(a, bytes(range(256)) * (npages * PAGE // 256))
    return p, a, [e.pfn for e in p.pagemap(a, npages)]


def kinds(machine: Machine) -> list[str]:
    return [str(v.kind) for v in machine_violations(machine)]


def test_map_page_gives_a_bus_address_the_device_reads_and_writes_through(machine, dev):
    p, a, pfns = populated(machine, 2)
    addr = dma_map_page(dev, pfns[1], 16, 100, DMA_BIDIRECTIONAL)
    assert not dma_mapping_error(dev, addr)
    assert dma_read(dev, addr, 4) == bytes([16, 17, 18, 19])
    dma_write(dev, addr + 1, b"\xaa\xbb")
    assert p.read(a + PAGE + 16, 4) == bytes([16, 0xAA, 0xBB, 19])
    dma_unmap_page(dev, addr, 100, DMA_BIDIRECTIONAL)
    assert machine_violations(machine) == []
    assert dev.nr_live == 0


def test_direct_mapping_bus_address_is_physical_plus_offset(machine):
    dev = DmaDevice(machine, "nic", bus_offset=0x8000_0000)
    _, _, pfns = populated(machine, 1)
    addr = dma_map_page(dev, pfns[0], 8, 8, DMA_TO_DEVICE)
    assert addr == (pfns[0] << 12) + 8 + 0x8000_0000


def test_access_after_unmap_is_an_iommu_fault_and_a_recorded_violation(machine, dev):
    _, _, pfns = populated(machine, 1)
    addr = dma_map_page(dev, pfns[0], 0, PAGE, DMA_BIDIRECTIONAL)
    dma_unmap_page(dev, addr, PAGE, DMA_BIDIRECTIONAL)
    with pytest.raises(IommuFault) as info:
        dma_read(dev, addr, 8)
    assert info.value.errno == errno.EFAULT
    assert kinds(machine) == ["unmapped"]


def test_access_to_an_address_never_mapped_is_a_violation(machine, dev):
    with pytest.raises(IommuFault):
        dma_write(dev, 0x7000, b"x")
    assert kinds(machine) == ["unmapped"]


def test_store_through_a_to_device_mapping_is_a_direction_violation(machine, dev):
    p, a, pfns = populated(machine, 1)
    addr = dma_map_page(dev, pfns[0], 0, PAGE, DMA_TO_DEVICE)
    assert dma_read(dev, addr, 1) == b"\x00"
    with pytest.raises(IommuFault, match=r"direction|read-only"):
        dma_write(dev, addr, b"\xff")
    assert kinds(machine) == ["direction"]
    assert p.read(a, 1) == b"\x00"  # the store did not land


def test_load_through_a_from_device_mapping_is_a_direction_violation(machine, dev):
    _, _, pfns = populated(machine, 1)
    addr = dma_map_page(dev, pfns[0], 0, PAGE, DMA_FROM_DEVICE)
    dma_write(dev, addr, b"ok")
    with pytest.raises(IommuFault):
        dma_read(dev, addr, 2)
    assert kinds(machine) == ["direction"]


def test_page_freed_while_mapped_is_reported_with_where_it_was_mapped(machine, dev):
    p, a, pfns = populated(machine, 1)
    dma_map_page(dev, pfns[0], 0, PAGE, DMA_BIDIRECTIONAL)  # no reference taken
    p.munmap(a, PAGE)  # the page is freed under the live mapping
    (v,) = machine_violations(machine)
    assert v.kind == DmaViolationKind.FREED_WHILE_MAPPED
    assert "test_dma.py" in v.origin
    assert f"{pfns[0]:#x}" in v.message


def test_mapping_left_at_teardown_is_a_leak_and_is_dropped(machine, dev):
    _, _, pfns = populated(machine, 2)
    dma_map_page(dev, pfns[0], 0, PAGE, DMA_TO_DEVICE)
    leaks = dma_debug_device_teardown(dev)
    assert [str(v.kind) for v in leaks] == ["leak"]
    assert "test_dma.py" in leaks[0].origin
    assert dev.nr_live == 0
    if dev.domain is not None:
        assert dev.domain.iova_allocated() == 0


def test_unmap_with_wrong_direction_is_reported_and_still_unmaps_as_check_unmap_does(machine, dev):
    _, _, pfns = populated(machine, 1)
    addr = dma_map_page(dev, pfns[0], 0, PAGE, DMA_TO_DEVICE)
    dma_unmap_page(dev, addr, PAGE, DMA_FROM_DEVICE)
    assert kinds(machine) == ["bad_unmap"]
    assert dev.nr_live == 0  # the entry is deleted and the unmap goes ahead
    if dev.domain is not None:
        assert dev.domain.iova_allocated() == 0
    with pytest.raises(IommuFault):
        dma_read(dev, addr, 1)


def test_unmap_with_wrong_size_is_reported_and_unmaps_what_was_mapped(machine, dev):
    _, _, pfns = populated(machine, 1)
    addr = dma_map_page(dev, pfns[0], 0, PAGE, DMA_TO_DEVICE)
    dma_unmap_page(dev, addr, 2 * PAGE, DMA_TO_DEVICE)
    assert kinds(machine) == ["bad_unmap"]
    assert dev.nr_live == 0
    if dev.domain is not None:
        assert dev.domain.iova_allocated() == 0


def test_unmap_twice_or_of_an_address_never_mapped_is_a_bad_unmap(machine, dev):
    _, _, pfns = populated(machine, 1)
    addr = dma_map_page(dev, pfns[0], 0, PAGE, DMA_TO_DEVICE)
    dma_unmap_page(dev, addr, PAGE, DMA_TO_DEVICE)
    dma_unmap_page(dev, addr, PAGE, DMA_TO_DEVICE)
    dma_unmap_page(dev, addr + 16 * PAGE, PAGE, DMA_TO_DEVICE)
    assert kinds(machine) == ["bad_unmap"] * 2
    assert dev.nr_live == 0


def test_direct_mapping_beyond_the_dma_mask_fails_without_swiotlb(machine):
    dev = DmaDevice(machine, "old", dma_mask=(1 << 24) - 1)
    assert dma_addressing_limited(dev)
    assert dma_need_sync(dev, 0)
    assert dma_map_page(dev, (32 << 20) >> 12, 0, PAGE, DMA_TO_DEVICE) == DMA_MAPPING_ERROR
    low = dma_map_page(dev, (8 << 20) >> 12, 0, PAGE, DMA_TO_DEVICE)
    assert low == 8 << 20


def test_iommu_device_is_not_addressing_limited_and_gets_iovas_below_its_mask(machine):
    dev = DmaDevice(machine, "gpu", domain=IommuDomain(machine), dma_mask=(1 << 32) - 1)
    _, _, pfns = populated(machine, 1)
    assert not dma_addressing_limited(dev)
    addr = dma_map_page(dev, pfns[0], 0, PAGE, DMA_TO_DEVICE)
    assert addr < 1 << 32


def test_bad_directions_are_einval(machine, dev):
    _, _, pfns = populated(machine, 1)
    with pytest.raises(InvalidArgument):
        dma_map_page(dev, pfns[0], 0, PAGE, DMA_NONE)
    with pytest.raises(InvalidArgument):
        dma_map_page(dev, pfns[0], 0, PAGE, 7)
    with pytest.raises(InvalidArgument):
        dma_map_page(dev, 1 << 40, 0, PAGE, DMA_TO_DEVICE)


def test_sg_table_coalesces_contiguous_pages_into_segments():
    sgt = sg_alloc_table_from_pages([10, 11, 12, 40, 41, 7], 0, 6 * PAGE)
    assert sgt.sgl == [(10, 0, 3 * PAGE), (40, 0, 2 * PAGE), (7, 0, PAGE)]
    sgt = sg_alloc_table_from_pages([10, 11, 12], 100, 2 * PAGE)
    assert sgt.sgl == [(10, 100, 2 * PAGE)]


def test_sgtable_under_an_iommu_is_one_segment_and_a_thp_one_iommu_entry(machine):
    dom = IommuDomain(machine)
    dev = DmaDevice(machine, "gpu", domain=dom)
    p = machine.spawn()
    a = p.mmap(4 << 20, RW, ANON)
    a2 = (a + (2 << 20) - 1) & ~((2 << 20) - 1)
    p.write(a2, b"\x01" * PAGE)  # a PMD-mapped THP (thp=always)
    pfns = [e.pfn for e in p.pagemap(a2, 512)]
    assert p.pagemap(a2, 1)[0].order == 9
    sgt = sg_alloc_table_from_pages(pfns, 0, 2 << 20)
    assert sgt.nents == 1
    before = dom.ptes
    dma_map_sgtable(dev, sgt, DMA_BIDIRECTIONAL)
    assert sgt.nents_mapped == 1
    assert dom.ptes - before == 1  # one 2 MiB IOMMU entry
    assert dma_read(dev, sgt.dma_segments[0][0], 1) == b"\x01"
    dma_unmap_sgtable(dev, sgt, DMA_BIDIRECTIONAL)
    assert dom.iova_allocated() == 0
    assert dev.nr_live == 0
    assert machine_violations(machine) == []


def test_sgtable_direct_has_one_dma_segment_per_cpu_segment(machine):
    dev = DmaDevice(machine, "nic")
    _, _, pfns = populated(machine, 3)
    sgt = sg_alloc_table_from_pages([pfns[0], pfns[2]], 0, 2 * PAGE)
    dma_map_sgtable(dev, sgt, DMA_TO_DEVICE)
    assert sgt.nents_mapped == sgt.nents
    dma_unmap_sgtable(dev, sgt, DMA_TO_DEVICE)
    dma_unmap_sgtable(dev, sgt, DMA_TO_DEVICE)  # the second unmap is a violation
    assert kinds(machine) == ["bad_unmap"]


def test_iommu_unmap_flushes_the_iotlb(machine):
    dom = IommuDomain(machine)
    dev = DmaDevice(machine, "gpu", domain=dom)
    _, _, pfns = populated(machine, 1)
    addr = dma_map_page(dev, pfns[0], 0, PAGE, DMA_TO_DEVICE)
    dma_read(dev, addr, 1)
    assert dom.iotlb
    flushes = dom.iotlb_flushes
    dma_unmap_page(dev, addr, PAGE, DMA_TO_DEVICE)
    assert dom.iotlb == set()
    assert dom.iotlb_flushes == flushes + 1


def test_iova_two_step_api_links_pages_into_one_range(machine):
    dom = IommuDomain(machine)
    dev = DmaDevice(machine, "gpu", domain=dom)
    p, a, pfns = populated(machine, 4)
    state = DmaIovaState()
    assert dma_iova_try_alloc(dev, state, 0, 4 * PAGE)
    assert dma_use_iova(state)
    for i, pfn in enumerate(pfns):
        assert dma_iova_link(dev, state, pfn << 12, i * PAGE, PAGE, DMA_BIDIRECTIONAL) == 0
    assert dma_iova_sync(dev, state, 0, 4 * PAGE) == 0
    assert dma_read(dev, state.addr + 3 * PAGE, 2) == p.read(a + 3 * PAGE, 2)
    # A slot linked twice, and a link past the range, are refused.
    assert dma_iova_link(dev, state, pfns[0] << 12, 0, PAGE, DMA_BIDIRECTIONAL) == -errno.EINVAL
    assert dma_iova_link(dev, state, pfns[0] << 12, 4 * PAGE, PAGE, 0) == -errno.EINVAL
    dma_iova_unlink(dev, state, 2 * PAGE, PAGE, DMA_BIDIRECTIONAL)
    with pytest.raises(IommuFault):
        dma_read(dev, state.addr + 2 * PAGE, 1)
    dma_iova_destroy(dev, state, 4 * PAGE, DMA_BIDIRECTIONAL)
    assert not dma_use_iova(state)
    assert dev.nr_live == 0 and dom.iova_allocated() == 0
    assert kinds(machine) == ["unmapped"]


def test_iova_free_with_links_alive_reports_them_as_leaks(machine):
    dev = DmaDevice(machine, "gpu", domain=IommuDomain(machine))
    _, _, pfns = populated(machine, 1)
    state = DmaIovaState()
    assert dma_iova_try_alloc(dev, state, 0, PAGE)
    dma_iova_link(dev, state, pfns[0] << 12, 0, PAGE, DMA_TO_DEVICE)
    dma_iova_free(dev, state)
    assert kinds(machine) == ["leak"]
    assert dev.nr_live == 0


def test_iova_try_alloc_fails_for_a_direct_mapped_device(machine):
    dev = DmaDevice(machine, "nic")
    assert not dma_iova_try_alloc(dev, DmaIovaState(), 0, PAGE)


def test_iova_allocator_is_top_down_size_aligned_and_reuses_freed_space(machine):
    dom = IommuDomain(machine)
    limit = 1 << 20
    a = dom.alloc_iova(3, limit)  # rounded up to 4 pages, 4-page aligned
    assert a == limit - 4
    b = dom.alloc_iova(1, limit)
    assert b == limit - 5
    c = dom.alloc_iova(40, limit)  # not rounded (>= 32 pages) but 64-page aligned
    assert c % 64 == 0 and c + 40 <= limit - 5
    assert dom.iova_allocated() == 4 + 1 + 40
    dom.free_iova(a)
    assert dom.alloc_iova(4, limit) == limit - 4
    with pytest.raises(InvalidArgument):
        dom.free_iova(12345)


def test_mmio_resource_outside_memory_maps_but_has_no_modelled_memory(machine):
    dev = DmaDevice(machine, "gpu", domain=IommuDomain(machine))
    bar = 1 << 44
    addr = dma_map_resource(dev, bar, 2 * PAGE, DMA_BIDIRECTIONAL)
    assert not dma_mapping_error(dev, addr)
    assert dev.mappings()[0].pfns.size == 0
    with pytest.raises(InvalidArgument):
        dma_map_page(dev, bar >> 12, 0, PAGE, DMA_TO_DEVICE)  # not RAM without DMA_ATTR_MMIO
    # dma_map_page refuses DMA_ATTR_MMIO (6.18): MMIO goes through dma_map_resource.
    assert dma_map_page(dev, bar >> 12, 0, PAGE, DMA_TO_DEVICE, DMA_ATTR_MMIO) == DMA_MAPPING_ERROR
    with pytest.raises(NotSupported, match="registers are not modelled"):
        dma_read(dev, addr, 8)
    assert machine_violations(machine) == []  # the mapping is valid: no violation


def test_map_calls_are_counted_in_costs(machine, dev):
    _, _, pfns = populated(machine, 2)
    before = machine.costs.dma_maps
    for pfn in pfns:
        dma_map_page(dev, pfn, 0, PAGE, DMA_TO_DEVICE)
    assert machine.costs.dma_maps == before + 2
    assert np.array_equal(dev.mapped_span(pfns[0], 1), [True])


def test_dma_invariant_fails_on_a_recorded_violation(machine, dev):
    check_dma_contract(machine)  # nothing recorded yet
    with pytest.raises(IommuFault):
        dma_read(dev, 0x5000, 1)
    with pytest.raises(AssertionError, match="1 DMA violation"):
        check_dma_contract(machine)


def test_leak_invariant_fails_on_a_live_mapping_after_close(machine, dev):
    p, _a, pfns = populated(machine, 1)
    addr = dma_map_page(dev, pfns[0], 0, PAGE, DMA_TO_DEVICE)
    p.exit()
    # The page was freed under the mapping, and the mapping is still there.
    with pytest.raises(AssertionError, match="DMA mapping"):
        check_no_leaks(machine)
    assert kinds(machine) == ["freed_while_mapped"]
    dma_unmap_page(dev, addr, PAGE, DMA_TO_DEVICE)
    check_no_leaks(machine)


def test_dma_costs_count_maps_unmaps_iova_ptes_flushes_and_bytes(machine):
    dev = DmaDevice(machine, "gpu", domain=IommuDomain(machine))
    _, _, pfns = populated(machine, 1)
    before = machine.costs.snapshot()
    addr = dma_map_page(dev, pfns[0], 100, 3 * PAGE, DMA_BIDIRECTIONAL)  # spans 4 pages
    dma_write(dev, addr, b"12345")
    dma_read(dev, addr, 3)
    dma_unmap_page(dev, addr, 3 * PAGE, DMA_BIDIRECTIONAL)
    d = machine.costs.since(before)
    assert d["dma_maps"] == 1 and d["dma_unmaps"] == 1
    assert d["iova_bytes"] == 4 * PAGE
    assert d["iommu_ptes"] == 4
    assert d["iotlb_flushes"] == 1
    assert d["dma_bytes"] == 8


def test_a_thp_freed_while_one_of_its_pages_is_mapped_is_one_violation_naming_that_page(machine):
    dev = DmaDevice(machine, "gpu", domain=IommuDomain(machine))
    p = machine.spawn()
    raw = p.mmap(4 << 20, RW, ANON)
    a = (raw + (2 << 20) - 1) & ~((2 << 20) - 1)
    p.write(a, b"t")  # thp="always": a PMD-mapped THP
    assert p.pagemap(a, 1)[0].order == 9
    pfn = p.pagemap(a + 7 * PAGE, 1)[0].pfn
    dma_map_page(dev, pfn, 0, PAGE, DMA_TO_DEVICE)
    p.munmap(raw, 4 << 20)
    (v,) = machine_violations(machine)
    assert v.kind == DmaViolationKind.FREED_WHILE_MAPPED and f"{pfn:#x}" in v.message
