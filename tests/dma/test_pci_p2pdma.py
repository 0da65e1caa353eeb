"""PCI topology and P2PDMA (hmmsim.pci): distances, map types, p2pmem, HMM and GUP."""

from __future__ import annotations

import pytest
from helpers import PAGE, EventLog
from hmmsim import (
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    PROT_READ,
    PROT_WRITE,
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
    DMA_BIDIRECTIONAL,
    DMA_MAPPING_ERROR,
    PCI_P2PDMA_MAP_BUS_ADDR,
    PCI_P2PDMA_MAP_NOT_SUPPORTED,
    PCI_P2PDMA_MAP_THRU_HOST_BRIDGE,
    IommuFault,
    dma_map_page,
    dma_read,
    dma_write,
    machine_violations,
)
from hmmsim.gup import FOLL_PCI_P2PDMA, FOLL_WRITE, pin_user_pages, unpin_user_pages
from hmmsim.hmm import (
    HMM_PFN_DMA_MAPPED,
    HMM_PFN_P2PDMA,
    HMM_PFN_P2PDMA_BUS,
    HMM_PFN_REQ_FAULT,
    HMM_PFN_VALID,
    HmmDmaMap,
    HmmRange,
    hmm_dma_map_alloc,
    hmm_dma_map_pfn,
    hmm_dma_unmap_pfn,
    hmm_range_fault,
)
from hmmsim.pci import (
    PCI_ACS_RR,
    PCI_VENDOR_ID_AMD,
    calc_map_type_and_dist,
    default_pci_function,
    pci_alloc_p2pmem,
    pci_p2pdma_add_resource,
    pci_p2pdma_distance,
    pci_p2pdma_distance_many,
    pci_p2pdma_map_type,
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


def provider_under(topo, parent, name="gpu", **kw):  # type: ignore[no-untyped-def]
    dev = topo.add_endpoint(parent, name, bars={0: BAR}, **kw)
    pci_p2pdma_add_resource(dev, 0, 0, 0)
    return dev


def test_distance_table_of_the_kernel_cases(machine):
    topo = pci_topology(machine)
    hb = topo.add_host_bridge(0x8086, 0x1234)
    rp = topo.add_root_port(hb)
    _, (d0, d1) = topo.add_switch(rp, ports=2)
    gpu = provider_under(topo, d0)
    fn1 = topo.add_endpoint(d0, "gpu.1", function_of=gpu)
    nic = topo.add_endpoint(d1, "nic")
    rp2 = topo.add_root_port(hb)
    far = topo.add_endpoint(rp2, "far")
    assert fn1.bdf.endswith(".1") and fn1.bdf[:-1] == gpu.bdf[:-1]
    table = {
        "same function": calc_map_type_and_dist(gpu, gpu),
        "two functions": calc_map_type_and_dist(gpu, fn1),
        "one switch": calc_map_type_and_dist(gpu, nic),
        "no common bridge": calc_map_type_and_dist(gpu, far),
    }
    assert table == {
        "same function": (PCI_P2PDMA_MAP_BUS_ADDR, 0),
        "two functions": (PCI_P2PDMA_MAP_BUS_ADDR, 2),
        "one switch": (PCI_P2PDMA_MAP_BUS_ADDR, 4),
        "no common bridge": (PCI_P2PDMA_MAP_NOT_SUPPORTED, 6),
    }
    assert pci_p2pdma_distance(gpu, nic) == 4
    assert pci_p2pdma_distance(gpu, far) == -1
    assert pci_p2pdma_distance_many(gpu, [nic, fn1]) == 6
    assert pci_p2pdma_distance_many(gpu, [nic, far]) == -1


@pytest.mark.parametrize(
    ("hb_device", "expected"),
    [(0x2030, PCI_P2PDMA_MAP_THRU_HOST_BRIDGE), (0x1234, PCI_P2PDMA_MAP_NOT_SUPPORTED)],
)
def test_acs_redirect_routes_through_the_host_bridge_if_it_can(machine, hb_device, expected):
    topo = pci_topology(machine)
    rp = topo.add_root_port(topo.add_host_bridge(0x8086, hb_device))
    _, (d0, d1) = topo.add_switch(rp, ports=2, acs=PCI_ACS_RR)
    gpu = provider_under(topo, d0)
    nic = topo.add_endpoint(d1, "nic")
    assert calc_map_type_and_dist(gpu, nic) == (expected, 4)


@pytest.mark.parametrize(
    ("hb_ids", "same_hb", "cpu", "expected"),
    [
        ((0x2030, 0x2031), False, None, PCI_P2PDMA_MAP_THRU_HOST_BRIDGE),  # Skylake-E
        ((0x3C00, 0x3C00), False, None, PCI_P2PDMA_MAP_NOT_SUPPORTED),  # needs one bridge
        ((0x3C00, 0x3C00), True, None, PCI_P2PDMA_MAP_THRU_HOST_BRIDGE),
        ((0x2030, 0x1234), False, None, PCI_P2PDMA_MAP_NOT_SUPPORTED),  # one is unlisted
        ((0x1234, 0x1234), False, (PCI_VENDOR_ID_AMD, 0x17), PCI_P2PDMA_MAP_THRU_HOST_BRIDGE),
        ((0x1234, 0x1234), False, (PCI_VENDOR_ID_AMD, 0x16), PCI_P2PDMA_MAP_NOT_SUPPORTED),
    ],
)
def test_crossing_host_bridges_needs_a_zen_cpu_or_the_whitelist(
    machine, hb_ids, same_hb, cpu, expected
):
    topo = pci_topology(machine)
    if cpu is not None:
        topo.cpu_vendor, topo.cpu_family = cpu
    hb_a = topo.add_host_bridge(0x8086, hb_ids[0])
    hb_b = hb_a if same_hb else topo.add_host_bridge(0x8086, hb_ids[1])
    gpu = provider_under(topo, topo.add_root_port(hb_a))
    nic = topo.add_endpoint(topo.add_root_port(hb_b), "nic")
    assert calc_map_type_and_dist(gpu, nic)[0] == expected


def test_map_type_is_cached_for_the_mapping_path_only(machine):
    topo = pci_topology(machine)
    rp = topo.add_root_port(topo.add_host_bridge())
    _, (d0, d1) = topo.add_switch(rp, ports=2)
    gpu = provider_under(topo, d0)
    nic = topo.add_endpoint(d1, "nic")
    assert pci_p2pdma_map_type(gpu, nic) == PCI_P2PDMA_MAP_BUS_ADDR
    d1.acs_ctrl = PCI_ACS_RR  # changed after the first look-up
    assert pci_p2pdma_map_type(gpu, nic) == PCI_P2PDMA_MAP_BUS_ADDR  # cached
    # calc_map_type_and_dist (and the distance queries) always recompute, and
    # store what they find for the mapping path.
    assert calc_map_type_and_dist(gpu, nic)[0] == PCI_P2PDMA_MAP_NOT_SUPPORTED
    assert pci_p2pdma_distance(gpu, nic) == -1
    assert pci_p2pdma_map_type(gpu, nic) == PCI_P2PDMA_MAP_NOT_SUPPORTED


def test_add_resource_rules(machine):
    topo = pci_topology(machine)
    dev = topo.add_endpoint(topo.add_root_port(topo.add_host_bridge()), "gpu", bars={0: BAR})
    with pytest.raises(InvalidArgument, match="not a memory BAR"):
        pci_p2pdma_add_resource(dev, 2, PAGE, 0)
    with pytest.raises(InvalidArgument, match="past BAR0"):
        pci_p2pdma_add_resource(dev, 0, PAGE, BAR)
    with pytest.raises(InvalidArgument, match="do not fit"):
        pci_p2pdma_add_resource(dev, 0, BAR, PAGE)
    first = pci_p2pdma_add_resource(dev, 0, 1 << 20, 0)
    assert len(first) == (1 << 20) // PAGE
    rest = pci_p2pdma_add_resource(dev, 0, 0, 1 << 20)  # size 0: the rest of the BAR
    assert len(rest) == (BAR - (1 << 20)) // PAGE
    with pytest.raises(OutOfMemory, match="already"):  # memremap_pages: conflict, -ENOMEM
        pci_p2pdma_add_resource(dev, 0, PAGE, 0)
    assert dev.p2pdma is not None and dev.p2pdma.size == BAR == dev.p2pdma.available


def test_find_picks_the_closest_published_provider(machine):
    topo = pci_topology(machine)
    rp = topo.add_root_port(topo.add_host_bridge())
    _, (d0, d1, _d2) = topo.add_switch(rp, ports=3)
    near = provider_under(topo, d0, "near")
    client = topo.add_endpoint(d0, "client", function_of=near)
    other = provider_under(topo, d1, "other")
    assert pci_p2pmem_find(client) is None  # nothing published yet
    pci_p2pmem_publish(other, True)
    assert pci_p2pmem_find(client) is other
    pci_p2pmem_publish(near, True)
    assert pci_p2pmem_find(client) is near


def allocate_setup(machine, acs=0):  # type: ignore[no-untyped-def]
    topo = pci_topology(machine)
    rp = topo.add_root_port(topo.add_host_bridge(0x8086, 0x2030))  # on the whitelist
    _, (d0, d1) = topo.add_switch(rp, ports=2, acs=acs)
    gpu = provider_under(topo, d0)
    nic = topo.add_endpoint(d1, "nic")
    p = machine.spawn()
    return gpu, nic, p, pci_p2pmem_allocate_file(gpu)


def test_allocate_mmap_must_be_shared_at_offset_zero_and_fit_the_pool(machine):
    gpu, _, p, f = allocate_setup(machine)
    with pytest.raises(InvalidArgument, match="MAP_SHARED"):
        p.mmap(PAGE, RW, MAP_PRIVATE, file=f)
    with pytest.raises(InvalidArgument, match="offset"):
        p.mmap(PAGE, RW, MAP_SHARED, file=f, offset=PAGE)
    with pytest.raises(OutOfMemory, match="exhausted"):
        p.mmap(2 * BAR, RW, MAP_SHARED, file=f)
    assert list(p.mm.vmas) == []  # nothing left behind
    assert gpu.p2pdma is not None and gpu.p2pdma.available == BAR
    topo = pci_topology(machine)
    bare = topo.add_endpoint(topo.add_root_port(topo.add_host_bridge()), "bare")
    with pytest.raises(NoDevice):
        p.mmap(PAGE, RW, MAP_SHARED, file=pci_p2pmem_allocate_file(bare))


def test_allocate_pages_are_p2p_pages_that_return_to_the_pool_on_munmap(machine):
    gpu, _, p, f = allocate_setup(machine)
    a = p.mmap(4 * PAGE, RW, MAP_SHARED, file=f)
    entries = p.pagemap(a, 4)
    assert [e.kind for e in entries] == ["p2p"] * 4
    assert gpu.p2pdma is not None and gpu.p2pdma.available == BAR - 4 * PAGE
    p.write(a, b"peer")
    assert p.read(a, 4) == b"peer"
    p.munmap(a, 4 * PAGE)
    assert gpu.p2pdma.available == BAR


def test_gup_refuses_p2p_pages_without_foll_pci_p2pdma(machine):
    _, _, p, f = allocate_setup(machine)
    a = p.mmap(2 * PAGE, RW, MAP_SHARED, file=f)
    with p.mm.mmap_lock.read(), pytest.raises(RemoteIO):
        pin_user_pages(p.mm, a, 2, FOLL_WRITE)
    with p.mm.mmap_lock.read():
        pfns = pin_user_pages(p.mm, a, 2, FOLL_WRITE | FOLL_PCI_P2PDMA)
    assert pfns == [e.pfn for e in p.pagemap(a, 2)]
    unpin_user_pages(machine, pfns)


def test_device_removal_zaps_user_mappings_with_a_clear_notifier_event(machine):
    gpu, _, p, f = allocate_setup(machine)
    a = p.mmap(2 * PAGE, RW, MAP_SHARED, file=f)
    log = EventLog(machine)
    pci_p2pdma_remove(gpu)
    assert [(e.event, e.start, e.end) for e in log.events] == [("CLEAR", a, a + 2 * PAGE)]
    assert not any(e.present for e in p.pagemap(a, 2))
    assert gpu.p2pdma is None  # pci_p2pdma_release


class Ops:
    def invalidate(self, sub, rng, cur_seq):  # type: ignore[no-untyped-def]
        mmu_interval_set_seq(sub, cur_seq)
        return True


def faulted_map(p, a, n, nic):  # type: ignore[no-untyped-def]
    sub = mmu_interval_notifier_insert(p.mm, a, n * PAGE, Ops())
    m = HmmDmaMap()
    hmm_dma_map_alloc(nic.dma, m, n, PAGE)
    rng = HmmRange(sub, a, a + n * PAGE, m.pfn_list, default_flags=HMM_PFN_REQ_FAULT)
    rng.notifier_seq = mmu_interval_read_begin(sub)
    with p.mm.mmap_lock.read():
        hmm_range_fault(rng)
    return m


def test_hmm_dma_map_pfn_gives_a_peer_bus_address_below_one_switch(machine):
    gpu, nic, p, f = allocate_setup(machine)
    a = p.mmap(2 * PAGE, RW, MAP_SHARED, file=f)
    p.write(a + PAGE, b"bar!")
    m = faulted_map(p, a, 2, nic)
    assert all(int(e) & HMM_PFN_VALID for e in m.pfn_list)
    addr = hmm_dma_map_pfn(nic.dma, m, 1)
    e = int(m.pfn_list[1])
    assert e & HMM_PFN_P2PDMA_BUS and e & HMM_PFN_DMA_MAPPED
    bar = gpu.bars[0]
    pfn = p.pagemap(a + PAGE, 1)[0].pfn
    first = gpu.p2pdma.pgmaps[0].range.start  # type: ignore[union-attr]
    assert addr == bar.bus_addr + (pfn - first) * PAGE
    assert nic.dma is not None and nic.dma.nr_live == 0  # no mapping for a bus address
    assert dma_read(nic.dma, addr, 4) == b"bar!"  # routed by the switch, not the IOMMU
    assert hmm_dma_unmap_pfn(nic.dma, m, 1)
    assert not int(m.pfn_list[1]) & (HMM_PFN_P2PDMA_BUS | HMM_PFN_DMA_MAPPED)
    assert machine_violations(machine) == []


def test_hmm_dma_map_pfn_maps_through_the_host_bridge_when_acs_redirects(machine):
    _, nic, p, f = allocate_setup(machine, acs=PCI_ACS_RR)
    a = p.mmap(PAGE, RW, MAP_SHARED, file=f)
    p.write(a, b"host")
    m = faulted_map(p, a, 1, nic)
    addr = hmm_dma_map_pfn(nic.dma, m, 0)
    e = int(m.pfn_list[0])
    assert e & HMM_PFN_P2PDMA and e & HMM_PFN_DMA_MAPPED and not e & HMM_PFN_P2PDMA_BUS
    assert dma_read(nic.dma, addr, 4) == b"host"  # through the IOMMU
    assert hmm_dma_unmap_pfn(nic.dma, m, 0)
    with pytest.raises(IommuFault):
        dma_read(nic.dma, addr, 4)


def test_hmm_dma_map_pfn_fails_for_a_peer_it_cannot_reach(machine):
    topo = pci_topology(machine)
    gpu = provider_under(topo, topo.add_root_port(topo.add_host_bridge(0x8086, 0x1234)))
    nic = default_pci_function(machine, "nic")
    p = machine.spawn()
    a = p.mmap(PAGE, RW, MAP_SHARED, file=pci_p2pmem_allocate_file(gpu))
    m = faulted_map(p, a, 1, nic)
    assert hmm_dma_map_pfn(nic.dma, m, 0) == DMA_MAPPING_ERROR
    assert not int(m.pfn_list[0]) & (HMM_PFN_DMA_MAPPED | HMM_PFN_P2PDMA)


def test_bus_address_of_a_peer_behind_acs_is_not_reachable_directly(machine):
    gpu, nic, _p, _f = allocate_setup(machine, acs=PCI_ACS_RR)
    bar = gpu.bars[0]
    with pytest.raises(IommuFault):
        dma_write(nic.dma, bar.bus_addr, b"x")


def test_default_function_has_its_own_host_bridge_and_iommu(machine):
    a = default_pci_function(machine, "a")
    b = default_pci_function(machine, "b")
    assert a.host_bridge is not b.host_bridge
    assert a.dma is not None and b.dma is not None
    assert a.dma.domain is not None and a.dma.domain is not b.dma.domain
    p = machine.spawn()
    x = p.mmap(PAGE, RW, MAP_SHARED | MAP_ANONYMOUS)
    p.write(x, b"z")
    pfn = p.pagemap(x, 1)[0].pfn
    addr = dma_map_page(a.dma, pfn, 0, PAGE, DMA_BIDIRECTIONAL)
    assert dma_read(a.dma, addr, 1) == b"z"
    with pytest.raises(IommuFault):
        dma_read(b.dma, addr, 1)  # another domain: not mapped there
    assert pci_alloc_p2pmem(a, PAGE) is None
