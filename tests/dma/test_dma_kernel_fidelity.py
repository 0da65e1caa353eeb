"""The DMA API and P2PDMA where a review against Linux 6.18 found the model apart.

Each test names what 6.18 does: ``iommu_sync_map`` flushes only an IOMMU in
caching mode; ``dma_addressing_limited`` looks at System RAM; the checks at the
top of ``dma_map_page_attrs``; P2PDMA pages in ``dma_map_sgtable``;
``dma_map_resource`` of a peer's BAR; ``check_unmap``'s handling of a torn-down
device; ``is_valid_gup_args`` on long-term P2PDMA pins; what
``pci_p2pdma_release`` and ``memunmap_pages`` leave after device removal.
"""

from __future__ import annotations

import pytest
from helpers import PAGE
from hmmsim import (
    MAP_ANONYMOUS,
    MAP_POPULATE,
    MAP_PRIVATE,
    MAP_SHARED,
    PROT_READ,
    PROT_WRITE,
    Busy,
    InvalidArgument,
    Machine,
    MachineConfig,
    NoDevice,
    OutOfMemory,
    RemoteIO,
    mmu_interval_notifier_insert,
    mmu_interval_read_begin,
    mmu_interval_set_seq,
)
from hmmsim.dma import (
    DMA_ATTR_MMIO,
    DMA_BIDIRECTIONAL,
    DMA_MAPPING_ERROR,
    DMA_TO_DEVICE,
    HMM_PFN_DMA_MAPPED,
    HMM_PFN_P2PDMA,
    HMM_PFN_P2PDMA_BUS,
    DmaDevice,
    DmaIovaState,
    DmaViolationKind,
    HmmDmaMap,
    IommuDomain,
    IommuFault,
    dma_addressing_limited,
    dma_debug_device_teardown,
    dma_iova_destroy,
    dma_iova_free,
    dma_iova_link,
    dma_iova_sync,
    dma_iova_try_alloc,
    dma_map_page,
    dma_map_resource,
    dma_map_sgtable,
    dma_read,
    dma_unmap_resource,
    dma_unmap_sgtable,
    dma_write,
    hmm_dma_map_alloc,
    hmm_dma_map_pfn,
    hmm_dma_unmap_pfn,
    machine_violations,
    sg_alloc_table_from_pages,
)
from hmmsim.gup import (
    FOLL_LONGTERM,
    FOLL_PCI_P2PDMA,
    FOLL_WRITE,
    pin_user_pages,
    unpin_user_pages,
)
from hmmsim.hmm import HMM_PFN_REQ_FAULT, HMM_PFN_VALID, HmmRange, hmm_range_fault
from hmmsim.pci import (
    PCI_ACS_RR,
    PciDev,
    default_pci_function,
    pci_alloc_p2pmem,
    pci_p2pdma_add_resource,
    pci_p2pdma_remove,
    pci_p2pmem_allocate_file,
    pci_p2pmem_find,
    pci_p2pmem_publish,
    pci_topology,
)

RW = PROT_READ | PROT_WRITE
BAR = 4 << 20


@pytest.fixture
def machine() -> Machine:
    return Machine(MachineConfig(ram_bytes=64 << 20))


def populated(machine: Machine, n: int) -> list[int]:
    p = machine.spawn()
    a = p.mmap(n * PAGE, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE)
    p.write(a, b"".join(bytes([0x40 + i]) * PAGE for i in range(n)))
    return [e.pfn for e in p.pagemap(a, n)]


def switch_pair(machine: Machine, acs: int = 0) -> tuple[PciDev, PciDev]:
    """A provider and a client below one switch (on the host-bridge whitelist)."""
    topo = pci_topology(machine)
    rp = topo.add_root_port(topo.add_host_bridge(0x8086, 0x2030))
    _, (d0, d1) = topo.add_switch(rp, ports=2, acs=acs)
    gpu = topo.add_endpoint(d0, "gpu", bars={0: BAR})
    pci_p2pdma_add_resource(gpu, 0, 0, 0)
    nic = topo.add_endpoint(d1, "nic")
    return gpu, nic


def p2p_pages(machine: Machine, gpu: PciDev, n: int, fill: bytes) -> list[int]:
    pages = pci_alloc_p2pmem(gpu, n * PAGE)
    assert pages is not None
    for i, pfn in enumerate(pages):
        machine.phys.write(pfn, 0, fill * (i + 1))
    return pages


# ----- IOTLB sync ----------------------------------------------------------------


@pytest.mark.parametrize("caching_mode", [False, True])
def test_dma_iova_sync_flushes_the_iotlb_only_in_caching_mode(machine, caching_mode):
    dom = IommuDomain(machine, caching_mode=caching_mode)
    dev = DmaDevice(machine, "rdma", domain=dom)
    (pfn,) = populated(machine, 1)
    state = DmaIovaState()
    assert dma_iova_try_alloc(dev, state, 0, 4 * PAGE)
    assert dma_iova_link(dev, state, pfn << 12, 0, PAGE, DMA_BIDIRECTIONAL) == 0
    assert dom.iotlb_flushes == 0  # a link never flushes
    assert dma_iova_sync(dev, state, 0, PAGE) == 0
    assert dom.iotlb_flushes == (1 if caching_mode else 0)
    addr = dma_map_page(dev, pfn, 0, PAGE, DMA_TO_DEVICE)  # iommu_map + iotlb_sync_map
    assert dom.iotlb_flushes == (2 if caching_mode else 0)
    assert dma_read(dev, addr, 1) == b"\x40"


# ----- addressing limits -----------------------------------------------------------


def test_addressing_limited_looks_at_system_ram_not_device_memory(machine):
    topo = pci_topology(machine)
    peer = topo.add_endpoint(
        topo.add_root_port(topo.add_host_bridge(0x8086, 1)), "p", bars={0: 1 << 30}
    )
    pci_p2pdma_add_resource(peer, 0, 0, 0)  # 1 GiB of P2P pfns after 64 MiB of RAM
    assert machine.phys.capacity << 12 > 1 << 30
    dev = DmaDevice(machine, "old", dma_mask=(1 << 30) - 1)
    assert not dma_addressing_limited(dev)  # all of RAM is below 1 GiB


# ----- dma_map_page_attrs ----------------------------------------------------------


def test_dma_map_page_refuses_dma_attr_mmio_and_zone_device_pages(machine):
    gpu, nic = switch_pair(machine)
    (pfn,) = p2p_pages(machine, gpu, 1, b"p")
    assert nic.dma is not None
    assert dma_map_page(nic.dma, pfn, 0, PAGE, DMA_BIDIRECTIONAL) == DMA_MAPPING_ERROR
    assert [w.where for w in machine.kernel_warnings] == ["dma_map_page_attrs"]
    (ram,) = populated(machine, 1)
    assert (
        dma_map_page(nic.dma, ram, 0, PAGE, DMA_BIDIRECTIONAL, DMA_ATTR_MMIO) == DMA_MAPPING_ERROR
    )
    assert nic.dma.nr_live == 0


# ----- scatterlists with P2PDMA pages ---------------------------------------------


def test_map_sgtable_gives_a_switch_peer_its_bus_address_as_a_segment_of_its_own(machine):
    gpu, nic = switch_pair(machine)
    assert nic.dma is not None and nic.dma.domain is not None
    ram = populated(machine, 2)
    (p2p,) = p2p_pages(machine, gpu, 1, b"b")
    sgt = sg_alloc_table_from_pages([ram[0], p2p, ram[1]], 0, 3 * PAGE)
    dma_map_sgtable(nic.dma, sgt, DMA_BIDIRECTIONAL)
    bus = gpu.bars[0].bus_addr + (p2p - gpu.p2pdma.pgmaps[0].range.start) * PAGE  # type: ignore[union-attr]
    assert [a for a, _ in sgt.dma_segments][1] == bus
    assert sgt.nents_mapped == 3  # the bus address breaks the IOVA run in two
    assert nic.dma.domain.iova_allocated() == 2  # only the RAM pages use IOVA
    reads = [dma_read(nic.dma, a, 1) for a, _ in sgt.dma_segments]
    assert reads == [b"\x40", b"b", b"\x41"]
    dma_unmap_sgtable(nic.dma, sgt, DMA_BIDIRECTIONAL)
    assert nic.dma.domain.iova_allocated() == 0 and nic.dma.nr_live == 0
    assert machine_violations(machine) == []


def test_map_sgtable_maps_a_peer_behind_acs_through_the_host_bridge(machine):
    gpu, nic = switch_pair(machine, acs=PCI_ACS_RR)
    assert nic.dma is not None and nic.dma.domain is not None
    (p2p,) = p2p_pages(machine, gpu, 1, b"h")
    sgt = sg_alloc_table_from_pages([p2p], 0, PAGE)
    dma_map_sgtable(nic.dma, sgt, DMA_BIDIRECTIONAL)
    ((addr, _),) = sgt.dma_segments
    assert nic.dma.domain.iova_allocated() == 1
    assert dma_read(nic.dma, addr, 1) == b"h"  # through the IOMMU, as MMIO
    dma_unmap_sgtable(nic.dma, sgt, DMA_BIDIRECTIONAL)


def test_map_sgtable_of_a_peer_the_topology_cannot_reach_is_eremoteio(machine):
    topo = pci_topology(machine)
    gpu = topo.add_endpoint(
        topo.add_root_port(topo.add_host_bridge(0x8086, 0x1234)), "g", bars={0: BAR}
    )
    pci_p2pdma_add_resource(gpu, 0, 0, 0)
    nic = default_pci_function(machine, "nic")  # another host bridge, not whitelisted
    assert nic.dma is not None
    (p2p,) = p2p_pages(machine, gpu, 1, b"x")
    sgt = sg_alloc_table_from_pages([p2p], 0, PAGE)
    with pytest.raises(RemoteIO):
        dma_map_sgtable(nic.dma, sgt, DMA_BIDIRECTIONAL)
    assert nic.dma.nr_live == 0 and sgt.dma_segments == []


def test_map_sgtable_out_of_iova_space_is_enomem(machine):
    dom = IommuDomain(machine, aperture_pages=4)
    dev = DmaDevice(machine, "small", domain=dom)
    sgt = sg_alloc_table_from_pages(populated(machine, 8), 0, 8 * PAGE)
    with pytest.raises(OutOfMemory):
        dma_map_sgtable(dev, sgt, DMA_BIDIRECTIONAL)


# ----- dma_map_resource of a peer's BAR --------------------------------------------


@pytest.mark.parametrize("iommu", [True, False])
def test_dma_map_resource_of_a_p2p_bar_reaches_the_bytes_of_its_pages(machine, iommu):
    gpu, _ = switch_pair(machine)
    pages = p2p_pages(machine, gpu, 2, b"r")
    first = gpu.p2pdma.pgmaps[0].range.start  # type: ignore[union-attr]
    cpu = gpu.bars[0].cpu_addr + (pages[1] - first) * PAGE
    dev = DmaDevice(
        machine, "dma", domain=IommuDomain(machine) if iommu else None, bus_offset=0x1000_0000
    )
    addr = dma_map_resource(dev, cpu, PAGE, DMA_BIDIRECTIONAL)
    if not iommu:
        assert addr == cpu  # dma_direct_map_phys does not translate MMIO
    assert dma_read(dev, addr, 2) == b"rr"
    dma_write(dev, addr, b"W")
    assert machine.phys.read(pages[1], 0, 2) == b"Wr"
    dma_unmap_resource(dev, addr, PAGE, DMA_BIDIRECTIONAL)
    with pytest.raises(IommuFault):
        dma_read(dev, addr, 1)
    assert [v.kind for v in machine_violations(machine)] == [DmaViolationKind.UNMAPPED]


# ----- teardown -------------------------------------------------------------------


def test_device_teardown_unmaps_leaked_iova_links(machine):
    dom = IommuDomain(machine)
    dev = DmaDevice(machine, "rdma", domain=dom)
    (pfn,) = populated(machine, 1)
    state = DmaIovaState()
    assert dma_iova_try_alloc(dev, state, 0, 2 * PAGE)
    assert dma_iova_link(dev, state, pfn << 12, 0, PAGE, DMA_BIDIRECTIONAL) == 0
    (leak,) = dma_debug_device_teardown(dev)
    assert leak.kind == DmaViolationKind.LEAK
    with pytest.raises(IommuFault):
        dma_read(dev, state.addr, 1)  # the link's IOMMU entry went with the domain
    assert dom.ptes == 1 and not any(dom.entries[o] for o in dom.entries)
    dma_iova_free(dev, state)
    assert dom.iova_allocated() == 0


# ----- GUP ------------------------------------------------------------------------


def test_longterm_pin_with_pci_p2pdma_is_einval_with_a_warning(machine):
    gpu, _ = switch_pair(machine)
    p = machine.spawn()
    a = p.mmap(PAGE, RW, MAP_SHARED, file=pci_p2pmem_allocate_file(gpu))
    p.write(a, b"x")
    with p.mm.mmap_lock.read(), pytest.raises(InvalidArgument):
        pin_user_pages(p.mm, a, 1, FOLL_WRITE | FOLL_LONGTERM | FOLL_PCI_P2PDMA)
    assert [w.where for w in machine.kernel_warnings] == ["is_valid_gup_args"]


# ----- device removal -------------------------------------------------------------


def test_p2pdma_removal_ends_allocate_find_and_peer_routing(machine):
    gpu, nic = switch_pair(machine)
    pci_p2pmem_publish(gpu, True)
    assert pci_p2pmem_find(nic) is gpu
    f = pci_p2pmem_allocate_file(gpu)
    p = machine.spawn()
    a = p.mmap(PAGE, RW, MAP_SHARED, file=f)
    p.write(a, b"x")
    first = gpu.p2pdma.pgmaps[0].range.start  # type: ignore[union-attr]
    pci_p2pdma_remove(gpu)
    assert gpu.p2pdma is None
    assert pci_p2pmem_find(nic) is None
    with pytest.raises(NoDevice):
        p.mmap(PAGE, RW, MAP_SHARED, file=f)
    assert machine.phys.pgmap_of(first) is None  # memunmap_pages
    assert nic.dma is not None
    with pytest.raises(IommuFault):
        dma_read(nic.dma, gpu.bars[0].bus_addr, 1)  # no P2P memory to route to
    pci_p2pmem_publish(gpu, True)  # a device without P2PDMA memory: nothing happens
    pci_p2pdma_add_resource(gpu, 0, 0, 0)  # the BAR can be given again
    assert gpu.p2pdma is not None and gpu.p2pdma.available == BAR


def test_p2pdma_removal_waits_for_a_pinned_page(machine):
    gpu, _ = switch_pair(machine)
    p = machine.spawn()
    a = p.mmap(PAGE, RW, MAP_SHARED, file=pci_p2pmem_allocate_file(gpu))
    p.write(a, b"x")
    with p.mm.mmap_lock.read():
        pinned = pin_user_pages(p.mm, a, 1, FOLL_WRITE | FOLL_PCI_P2PDMA)
    with pytest.raises(Busy, match="still referenced"):
        pci_p2pdma_remove(gpu)
    assert gpu.p2pdma is not None and not gpu.p2pdma.published
    assert not p.pagemap(a, 1)[0].present  # the user mapping is zapped already
    unpin_user_pages(machine, pinned)
    pci_p2pdma_remove(gpu)
    assert gpu.p2pdma is None


# ----- IOVA API edge cases and costs ------------------------------------------------


def test_dma_iova_try_alloc_of_no_bytes_warns_and_returns_false(machine):
    dev = DmaDevice(machine, "rdma", domain=IommuDomain(machine))
    state = DmaIovaState()
    assert dma_iova_try_alloc(dev, state, 0, 0) is False
    assert [w.where for w in machine.kernel_warnings] == ["dma_iova_try_alloc"]
    assert state.size == 0


def test_an_iommu_entry_costs_the_same_for_a_4k_and_a_2m_page(machine):
    dom = IommuDomain(machine)
    t0 = machine.clock.now_ns
    dom.map(512, 512, 512, 3)  # one 2 MiB entry
    one_huge = machine.clock.now_ns - t0
    t0 = machine.clock.now_ns
    dom.map(1 << 20, 7, 1, 3)  # one 4 KiB entry
    assert one_huge == machine.clock.now_ns - t0
    assert dom.ptes == 2


# ----- sticky DMA bits across a re-fault --------------------------------------------


class _SeqOps:
    def invalidate(self, sub, rng, cur_seq):  # type: ignore[no-untyped-def]
        mmu_interval_set_seq(sub, cur_seq)
        return True


@pytest.mark.parametrize("acs", [0, PCI_ACS_RR])
def test_p2pdma_bits_survive_a_second_hmm_range_fault_of_the_same_array(machine, acs):
    gpu, nic = switch_pair(machine, acs=acs)
    assert nic.dma is not None
    p = machine.spawn()
    a = p.mmap(PAGE, RW, MAP_SHARED, file=pci_p2pmem_allocate_file(gpu))
    p.write(a, b"s")
    sub = mmu_interval_notifier_insert(p.mm, a, PAGE, _SeqOps())
    m = HmmDmaMap()
    hmm_dma_map_alloc(nic.dma, m, 1, PAGE)

    def fault() -> None:
        rng = HmmRange(sub, a, a + PAGE, m.pfn_list, default_flags=HMM_PFN_REQ_FAULT)
        rng.notifier_seq = mmu_interval_read_begin(sub)
        with p.mm.mmap_lock.read():
            hmm_range_fault(rng)

    fault()
    addr = hmm_dma_map_pfn(nic.dma, m, 0)
    sticky = HMM_PFN_DMA_MAPPED | (HMM_PFN_P2PDMA if acs else HMM_PFN_P2PDMA_BUS)
    assert int(m.pfn_list[0]) & sticky == sticky
    fault()  # the array is handed to hmm_range_fault again
    e = int(m.pfn_list[0])
    assert e & HMM_PFN_VALID and e & sticky == sticky
    assert hmm_dma_map_pfn(nic.dma, m, 0) == addr  # the same address, no second mapping
    assert dma_read(nic.dma, addr, 1) == b"s"
    assert hmm_dma_unmap_pfn(nic.dma, m, 0)
    assert not int(m.pfn_list[0]) & sticky
    assert machine_violations(machine) == []


# ----- where IOVAs come from ---------------------------------------------------------


def test_a_pci_function_gets_iovas_below_4g_until_that_space_fails_once(machine):
    topo = pci_topology(machine)
    fn = topo.add_endpoint(topo.add_root_port(topo.add_host_bridge(0x8086, 1)), "nic")
    dev = fn.dma
    assert dev is not None and dev.domain is not None
    (pfn,) = populated(machine, 1)
    low = dma_map_page(dev, pfn, 0, PAGE, DMA_TO_DEVICE)
    assert low < 1 << 32
    state = DmaIovaState()
    assert dma_iova_try_alloc(dev, state, 0, 1 << 32)  # cannot fit below 4 GiB
    assert state.addr >= 1 << 32 and not dev.pci_32bit_workaround
    high = dma_map_page(dev, pfn, 0, PAGE, DMA_BIDIRECTIONAL)
    assert high >= 1 << 32  # from now on the whole mask is used
    plain = DmaDevice(machine, "platform", domain=IommuDomain(machine))
    assert dma_map_page(plain, pfn, 0, PAGE, DMA_TO_DEVICE) >= 1 << 32  # not PCI: top-down


def test_an_iova_link_of_a_p2p_bar_address_reaches_the_bytes_of_its_pages(machine):
    gpu, _ = switch_pair(machine)
    (page,) = p2p_pages(machine, gpu, 1, b"L")
    first = gpu.p2pdma.pgmaps[0].range.start  # type: ignore[union-attr]
    cpu = gpu.bars[0].cpu_addr + (page - first) * PAGE
    dev = DmaDevice(machine, "dma", domain=IommuDomain(machine))
    state = DmaIovaState()
    assert dma_iova_try_alloc(dev, state, cpu, PAGE)
    assert dma_iova_link(dev, state, cpu, 0, PAGE, DMA_BIDIRECTIONAL, DMA_ATTR_MMIO) == 0
    assert dma_read(dev, state.addr, 1) == b"L"
    dma_iova_destroy(dev, state, PAGE, DMA_BIDIRECTIONAL)
    assert machine_violations(machine) == []
