"""PCI topology and PCI peer-to-peer DMA (P2PDMA).

Kernel counterparts: ``drivers/pci/p2pdma.c`` (providers, distances, map
types, the ``p2pmem/allocate`` file), ``include/linux/pci-p2pdma.h``, and the
few parts of ``drivers/pci`` they stand on (upstream bridges, ACS).

A topology is built in a few lines::

    topo = pci_topology(machine)
    hb = topo.add_host_bridge(vendor=0x8086, device=0x2030)
    rp = topo.add_root_port(hb)
    usp, (d0, d1) = topo.add_switch(rp, ports=2)
    gpu = topo.add_endpoint(d0, "gpu", bars={0: 256 << 20})
    nic = topo.add_endpoint(d1, "nic")
    pci_p2pdma_add_resource(gpu, 0, 64 << 20, 0)
    pci_p2pmem_publish(gpu, True)
    pci_p2pdma_distance(gpu, nic)          # 4, through the switch: BUS_ADDR

Each endpoint has a ``DmaDevice`` (``pdev.dma``) behind the IOMMU domain it was
given (a fresh one by default; ``iommu=None`` for direct mapping).
``default_pci_function`` gives a device probed without a topology a function
of its own, on a host bridge of its own, behind its own IOMMU domain.

Map types follow ``calc_map_type_and_dist`` of the kernel before the 2025-26
per-port ACS rework: walk up from the provider; for each of its bridges (itself
included) walk up from the client; the first common one gives the distance
(hops on both sides). With a common bridge and no ACS redirect (RR, CR or EC)
on either path up to it, the peers talk by bus address
(``PCI_P2PDMA_MAP_BUS_ADDR``). Otherwise (ACS redirects upstream, or no common
bridge) the traffic goes through the host bridge: allowed
(``PCI_P2PDMA_MAP_THRU_HOST_BRIDGE``) for an AMD Zen CPU (family 0x17 or
later) or when both host bridges are on the whitelist, else
``PCI_P2PDMA_MAP_NOT_SUPPORTED``. The map type is cached per (provider,
client) for the mapping path.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

import attrs
import numpy as np

from .dma_mapping import (
    PCI_P2PDMA_MAP_BUS_ADDR,
    PCI_P2PDMA_MAP_NOT_SUPPORTED,
    PCI_P2PDMA_MAP_THRU_HOST_BRIDGE,
    DmaDevice,
    PciP2PDmaMapType,
)
from .errors import Busy, InvalidArgument, NoDevice, OutOfMemory
from .iommu import IommuDomain
from .mm.memremap import (
    MEMORY_DEVICE_PCI_P2PDMA,
    DevPagemap,
    memremap_pages,
    memunmap_pages,
    zone_device_page_init,
)
from .mm.pagetable import PAGE_SHIFT, PAGE_SIZE
from .mm.pfnmap import vm_insert_page
from .mm.vma import VM_MAYSHARE
from .mm.zap import zap_range
from .notifier import MMU_NOTIFY_CLEAR, invalidation

if TYPE_CHECKING:
    from .machine import Machine
    from .mm.vma import Vma

#: ACS control bits (``PCI_ACS_*``) that redirect peer traffic upstream.
PCI_ACS_SV: Final = 0x01
PCI_ACS_TB: Final = 0x02
PCI_ACS_RR: Final = 0x04
PCI_ACS_CR: Final = 0x08
PCI_ACS_UF: Final = 0x10
PCI_ACS_EC: Final = 0x20
_ACS_REDIR: Final = PCI_ACS_RR | PCI_ACS_CR | PCI_ACS_EC

PCI_VENDOR_ID_INTEL: Final = 0x8086
PCI_VENDOR_ID_AMD: Final = 0x1022

#: ``pci_p2pdma_whitelist``: (vendor, device, both devices must share the host bridge).
P2PDMA_HOST_BRIDGE_WHITELIST: Final = (
    (PCI_VENDOR_ID_INTEL, 0x3C00, True),
    (PCI_VENDOR_ID_INTEL, 0x3C01, True),
    (PCI_VENDOR_ID_INTEL, 0x2F00, True),
    (PCI_VENDOR_ID_INTEL, 0x2F01, True),
    (PCI_VENDOR_ID_INTEL, 0x2030, False),
    (PCI_VENDOR_ID_INTEL, 0x2031, False),
    (PCI_VENDOR_ID_INTEL, 0x2032, False),
    (PCI_VENDOR_ID_INTEL, 0x2033, False),
    (PCI_VENDOR_ID_INTEL, 0x2020, False),
    (PCI_VENDOR_ID_INTEL, 0x09A2, False),
)

#: Where the model places BARs in CPU physical address space (above any RAM).
_MMIO_BASE: Final = 1 << 44


@attrs.define(eq=False, repr=False)
class PciHostBridge:
    """A root complex: the ``pci_host_bridge`` and the device at 00.0 that names it."""

    name: str
    vendor: int
    device: int
    domain_nr: int
    #: PCI bus address minus CPU physical address of MMIO below this bridge.
    bus_offset: int = 0

    def __repr__(self) -> str:
        return f"PciHostBridge({self.name}, {self.vendor:04x}:{self.device:04x})"


@attrs.define(eq=False, repr=False)
class PciBar:
    """One memory BAR: its size, CPU physical and PCI bus addresses.

    The part of a BAR given to P2PDMA is ZONE_DEVICE pages, whose pfns the
    model places after RAM; ``PciTopology.mmio_pfns`` resolves a CPU physical
    address in that part (``dma_map_resource`` of the BAR) to those pages, so
    both ways of mapping the memory reach the same bytes.
    """

    index: int
    size: int
    cpu_addr: int
    bus_addr: int
    #: Bytes of the BAR already given to P2PDMA (``pci_p2pdma_add_resource``).
    claimed: list[tuple[int, int]] = attrs.field(factory=list)


@attrs.define(eq=False, repr=False)
class P2PDmaProvider:
    """``struct pci_p2pdma``: a provider's pool of P2P pages and its caches."""

    pdev: PciDev
    pgmaps: list[DevPagemap] = attrs.field(factory=list)
    #: Free P2P pfns (the ``gen_pool``), lowest first.
    free: list[int] = attrs.field(factory=list)
    published: bool = False
    #: ``map_types``: client function -> map type (read by the mapping path).
    map_types: dict[int, PciP2PDmaMapType] = attrs.field(factory=dict)

    @property
    def size(self) -> int:
        return sum(len(pg.range or ()) for pg in self.pgmaps) * PAGE_SIZE

    @property
    def available(self) -> int:
        return len(self.free) * PAGE_SIZE


class _P2PPageOps:
    """``dev_pagemap_ops`` of a P2PDMA pagemap.

    A freed page goes back to the pool (``p2pdma_folio_free``), and
    ``p2p_map_type(dev)`` answers ``pci_p2pdma_state`` for a client: the map
    type and the offset from CPU physical to PCI bus address of this range.
    """

    def __init__(
        self, provider: P2PDmaProvider, bus_off: int, bar: PciBar | None = None, offset: int = 0
    ) -> None:
        self.provider = provider
        self.bus_off = bus_off
        #: The BAR and the offset in it where this range starts.
        self.bar = bar
        self.bar_offset = offset

    def folio_free(self, head: int) -> None:
        self.provider.free.append(head)

    def p2p_map_type(self, dev: DmaDevice) -> tuple[PciP2PDmaMapType, int]:
        client = dev.pci
        if not isinstance(client, PciDev):
            return PCI_P2PDMA_MAP_NOT_SUPPORTED, 0
        return pci_p2pdma_map_type(self.provider.pdev, client), self.bus_off


@attrs.define(eq=False, repr=False)
class PciDev:
    """``struct pci_dev``: an endpoint function or a bridge (root or switch port)."""

    topology: PciTopology
    name: str
    vendor: int
    device: int
    host_bridge: PciHostBridge
    bus: int
    devfn: int
    #: ``pci_upstream_bridge``: None for a root port or an integrated endpoint.
    upstream: PciDev | None
    is_bridge: bool = False
    #: ACS control register (bridges).
    acs_ctrl: int = 0
    bars: dict[int, PciBar] = attrs.field(factory=dict)
    #: The DMA side of an endpoint (None for bridges).
    dma: DmaDevice | None = None
    p2pdma: P2PDmaProvider | None = None
    id: int = 0
    #: The bus behind a bridge.
    secondary: int = 0

    def __repr__(self) -> str:
        return f"PciDev({self.name} {self.bdf})"

    @property
    def bdf(self) -> str:
        slot, fn = self.devfn >> 3, self.devfn & 7
        return f"{self.host_bridge.domain_nr:04x}:{self.bus:02x}:{slot:02x}.{fn}"

    def ancestors(self) -> list[PciDev]:
        """This function, then each upstream bridge up to the root port."""
        out: list[PciDev] = []
        d: PciDev | None = self
        while d is not None:
            out.append(d)
            d = d.upstream
        return out


@attrs.define(eq=False, repr=False)
class PciTopology:
    """The machine's PCI hierarchy.

    ``cpu_vendor``/``cpu_family`` decide ``cpu_supports_p2pdma`` (AMD family
    0x17 and later route P2P between host bridges).
    """

    machine: Machine
    cpu_vendor: int = PCI_VENDOR_ID_INTEL
    cpu_family: int = 6
    host_bridges: list[PciHostBridge] = attrs.field(factory=list)
    devices: list[PciDev] = attrs.field(factory=list)
    rng: random.Random = attrs.field(factory=lambda: random.Random(0))
    _next_mmio: int = _MMIO_BASE
    _next_bus: int = 0

    def __repr__(self) -> str:
        return f"PciTopology({len(self.host_bridges)} host bridges, {len(self.devices)} devices)"

    def mmio_pfns(self, phys: int, size: int) -> Any:
        """The P2PDMA pages behind CPU physical [phys, phys + size) of a BAR, or None.

        None unless the whole range lies in one part of a BAR given to P2PDMA
        (the rest of a BAR is registers, which the model does not hold).
        """
        for _prov, r, ops in _p2p_ranges(self):
            if ops.bar is None:
                continue
            lo = ops.bar.cpu_addr + ops.bar_offset
            if lo <= phys and phys + size <= lo + len(r) * PAGE_SIZE:
                first = r.start + ((phys - lo) >> PAGE_SHIFT)
                last = r.start + ((phys + size - 1 - lo) >> PAGE_SHIFT)
                return np.arange(first, last + 1, dtype=np.int64)
        return None

    def peer_pfns(self, client: PciDev, addr: int, length: int) -> Any:
        """P2P pages ``client`` reaches directly at bus address ``addr`` (or None)."""
        return _peer_pfns(self, client, addr, length)

    def add_host_bridge(
        self,
        vendor: int = PCI_VENDOR_ID_INTEL,
        device: int = 0x0000,
        *,
        name: str | None = None,
        bus_offset: int = 0,
    ) -> PciHostBridge:
        """A new root complex (PCI domain) with its naming device at 00.0."""
        hb = PciHostBridge(
            name or f"pci{len(self.host_bridges):04x}",
            vendor,
            device,
            len(self.host_bridges),
            bus_offset,
        )
        self.host_bridges.append(hb)
        return hb

    def _add(
        self,
        name: str,
        hb: PciHostBridge,
        upstream: PciDev | None,
        *,
        bridge: bool,
        vendor: int,
        device: int,
        acs: int = 0,
        devfn: int = 0,
    ) -> PciDev:
        bus = upstream.secondary if upstream is not None else 0
        d = PciDev(
            self, name, vendor, device, hb, bus, devfn, upstream, bridge, acs, id=len(self.devices)
        )
        if bridge:
            self._next_bus += 1
            d.secondary = self._next_bus
        self.devices.append(d)
        return d

    def add_root_port(self, hb: PciHostBridge, *, acs: int = 0, name: str | None = None) -> PciDev:
        """A root port of ``hb``: the top of a hierarchy (no upstream bridge)."""
        return self._add(
            name or f"rp{len(self.devices)}",
            hb,
            None,
            bridge=True,
            vendor=hb.vendor,
            device=hb.device,
            acs=acs,
        )

    def add_switch(
        self, upstream: PciDev, ports: int, *, acs: int = 0, name: str | None = None
    ) -> tuple[PciDev, list[PciDev]]:
        """A PCIe switch below ``upstream``: its upstream port and ``ports`` downstream ports.

        ``acs`` is written to every downstream port's ACS control register.
        """
        if not upstream.is_bridge:
            raise InvalidArgument(f"{upstream!r} is not a bridge")
        base = name or f"sw{len(self.devices)}"
        usp = self._add(
            f"{base}-usp", upstream.host_bridge, upstream, bridge=True, vendor=0x10B5, device=0x8747
        )
        dsps = [
            self._add(
                f"{base}-dsp{i}",
                upstream.host_bridge,
                usp,
                bridge=True,
                vendor=0x10B5,
                device=0x8747,
                acs=acs,
            )
            for i in range(ports)
        ]
        return usp, dsps

    def add_endpoint(
        self,
        parent: PciDev | PciHostBridge,
        name: str,
        *,
        vendor: int = 0x10DE,
        device: int = 0x0001,
        bars: dict[int, int] | None = None,
        iommu: IommuDomain | str | None = "new",
        function_of: PciDev | None = None,
        dma_mask: int = (1 << 64) - 1,
    ) -> PciDev:
        """An endpoint function below a bridge (or integrated in a host bridge).

        Args:
            parent: the downstream or root port it sits behind, or a host bridge
                for a root-complex integrated endpoint.
            name: names the function and its DMA device.
            bars: BAR index -> size (powers of two, at least 4 KiB).
            iommu: "new" for an IOMMU domain of its own, a shared domain, or
                None for direct DMA.
            function_of: another function of the same device (same slot).
            dma_mask: the DMA mask of its ``DmaDevice``.

        Raises:
            InvalidArgument: a parent that is not a bridge, or a bad BAR size.
        """
        if function_of is not None:
            hb, upstream = function_of.host_bridge, function_of.upstream
            fns = [
                d.devfn
                for d in self.devices
                if d.upstream is upstream
                and d.devfn >> 3 == function_of.devfn >> 3
                and d.host_bridge is hb
            ]
            devfn = (function_of.devfn & ~7) | (max(f & 7 for f in fns) + 1)
        elif isinstance(parent, PciHostBridge):
            hb, upstream = parent, None
            devfn = (
                1
                + sum(
                    1
                    for d in self.devices
                    if d.upstream is None and not d.is_bridge and d.host_bridge is hb
                )
            ) << 3
        else:
            if not parent.is_bridge:
                raise InvalidArgument(f"{parent!r} is not a bridge")
            hb, upstream = parent.host_bridge, parent
            devfn = 0
        d = self._add(name, hb, upstream, bridge=False, vendor=vendor, device=device, devfn=devfn)
        for index, size in (bars or {}).items():
            if size < PAGE_SIZE or size & (size - 1) or not 0 <= index < 6:
                raise InvalidArgument(f"BAR{index} of {size:#x} bytes")
            cpu = (self._next_mmio + size - 1) & ~(size - 1)
            self._next_mmio = cpu + size
            d.bars[index] = PciBar(index, size, cpu, cpu + hb.bus_offset)
        domain = IommuDomain(self.machine, f"iommu-{name}") if iommu == "new" else iommu
        assert domain is None or isinstance(domain, IommuDomain)
        d.dma = DmaDevice(self.machine, name, domain=domain, dma_mask=dma_mask)
        d.dma.pci = d
        return d


def _peer_pfns(topo: PciTopology, client: PciDev, addr: int, length: int) -> Any:
    """The P2P pages a client reaches at bus address ``addr`` without the IOMMU.

    Peer traffic that the switches route directly (``PCI_P2PDMA_MAP_BUS_ADDR``)
    never reaches the IOMMU: a bus address inside a provider's P2P range is
    that provider's page. None when no such range holds ``addr`` for this
    client.
    """
    for prov, r, ops in _p2p_ranges(topo):
        first = (addr - ops.bus_off) >> PAGE_SHIFT
        last = (addr + length - 1 - ops.bus_off) >> PAGE_SHIFT
        if r.start <= first and last < r.stop:
            if pci_p2pdma_map_type(prov, client) != PCI_P2PDMA_MAP_BUS_ADDR:
                return None
            return np.arange(first, last + 1, dtype=np.int64)
    return None


def _p2p_ranges(topo: PciTopology) -> Iterator[tuple[PciDev, range, _P2PPageOps]]:
    """Every live P2PDMA pfn range of the topology: provider, pfns, page ops."""
    for prov in topo.devices:
        if prov.p2pdma is None:
            continue
        for pg in prov.p2pdma.pgmaps:
            if pg.range is not None and isinstance(pg.ops, _P2PPageOps):
                yield prov, pg.range, pg.ops


def pci_topology(machine: Machine) -> PciTopology:
    """The machine's PCI topology, made empty on first use."""
    topo = machine.pci
    if topo is None:
        topo = machine.pci = PciTopology(machine)
    assert isinstance(topo, PciTopology)
    return topo


def default_pci_function(machine: Machine, name: str) -> PciDev:
    """A function for a device probed without a topology.

    It gets a host bridge of its own (vendor 0x8086, device 0), a root port,
    and an IOMMU domain of its own. Two such devices share no bridge, so P2P
    between them is ``PCI_P2PDMA_MAP_NOT_SUPPORTED`` on an Intel CPU.
    """
    topo = pci_topology(machine)
    hb = topo.add_host_bridge(name=f"{name}-hb")
    return topo.add_endpoint(topo.add_root_port(hb), name)


# ----- distances and map types -------------------------------------------------------


def pci_bridge_has_acs_redir(pdev: PciDev) -> bool:
    """``pci_bridge_has_acs_redir``: RR, CR or EC set on a bridge."""
    return pdev.is_bridge and bool(pdev.acs_ctrl & _ACS_REDIR)


def cpu_supports_p2pdma(topo: PciTopology) -> bool:
    """AMD Zen (family 0x17 and later) routes P2P between root complexes."""
    return topo.cpu_vendor == PCI_VENDOR_ID_AMD and topo.cpu_family >= 0x17


def host_bridge_whitelist(a: PciDev, b: PciDev) -> bool:
    """``host_bridge_whitelist``: both host bridges listed (and shared where required)."""

    def entry(hb: PciHostBridge) -> tuple[int, int, bool] | None:
        for vendor, device, same in P2PDMA_HOST_BRIDGE_WHITELIST:
            if (hb.vendor, hb.device) == (vendor, device):
                return vendor, device, same
        return None

    ea, eb = entry(a.host_bridge), entry(b.host_bridge)
    if ea is None or eb is None:
        return False
    # Entries flagged "same host bridge" allow P2P only below one root complex.
    return a.host_bridge is b.host_bridge or not (ea[2] or eb[2])


def calc_map_type_and_dist(provider: PciDev, client: PciDev) -> tuple[PciP2PDmaMapType, int]:
    """``calc_map_type_and_dist``: how ``client`` reaches ``provider``'s BAR, and how far.

    Computed afresh on every call, as in the kernel. The map type (not the
    distance) is stored in the provider's cache, which only the mapping path
    reads (``pci_p2pdma_map_type``).
    """
    acs = 0
    common = None
    dist_a = 0
    dist_b = 0
    for a in provider.ancestors():
        if pci_bridge_has_acs_redir(a):
            acs += 1
        client_path = client.ancestors()
        if a in client_path:
            common = a
            dist_b = client_path.index(a)
            for bb in client_path[:dist_b]:
                if pci_bridge_has_acs_redir(bb):
                    acs += 1
            break
        dist_a += 1
    if common is None:
        dist = dist_a + len(client.ancestors())
    else:
        dist = dist_a + dist_b
    if common is not None and not acs:
        kind = PCI_P2PDMA_MAP_BUS_ADDR
    elif cpu_supports_p2pdma(provider.topology) or host_bridge_whitelist(provider, client):
        # No common bridge, or ACS redirects upstream: the traffic goes through
        # the host bridge, which must be able to route it.
        kind = PCI_P2PDMA_MAP_THRU_HOST_BRIDGE
    else:
        kind = PCI_P2PDMA_MAP_NOT_SUPPORTED
    if provider.p2pdma is not None:
        provider.p2pdma.map_types[client.id] = kind
    return kind, dist


def pci_p2pdma_map_type(provider: PciDev, client: PciDev) -> PciP2PDmaMapType:
    """``pci_p2pdma_map_type``: the cached map type, computed on the first look-up."""
    prov = provider.p2pdma
    cached = prov.map_types.get(client.id) if prov is not None else None
    if cached is not None:
        return cached
    return calc_map_type_and_dist(provider, client)[0]


def pci_p2pdma_distance_many(provider: PciDev, clients: list[PciDev]) -> int:
    """``pci_p2pdma_distance_many``: summed distance, or -1 if any client cannot reach it."""
    if provider.p2pdma is None or not clients:
        return -1
    total = 0
    for client in clients:
        kind, dist = calc_map_type_and_dist(provider, client)
        if kind == PCI_P2PDMA_MAP_NOT_SUPPORTED:
            return -1
        total += dist
    return total


def pci_p2pdma_distance(provider: PciDev, client: PciDev) -> int:
    """``pci_p2pdma_distance``: the distance for one client (-1: not supported)."""
    return pci_p2pdma_distance_many(provider, [client])


def pci_p2pmem_find_many(clients: list[PciDev]) -> PciDev | None:
    """``pci_p2pmem_find_many``: the closest published provider (random among ties)."""
    if not clients:
        return None
    topo = clients[0].topology
    best: list[PciDev] = []
    best_dist = -1
    for pdev in topo.devices:
        if pdev.p2pdma is None or not pdev.p2pdma.published:
            continue
        dist = pci_p2pdma_distance_many(pdev, clients)
        if dist < 0 or (best and dist > best_dist):
            continue
        if not best or dist < best_dist:
            best, best_dist = [pdev], dist
        else:
            best.append(pdev)
    return topo.rng.choice(best) if best else None


def pci_p2pmem_find(client: PciDev) -> PciDev | None:
    """``pci_p2pmem_find``."""
    return pci_p2pmem_find_many([client])


# ----- providers ---------------------------------------------------------------------


def pci_p2pdma_add_resource(pdev: PciDev, bar: int, size: int, offset: int) -> range:
    """``pci_p2pdma_add_resource``: turn (part of) a BAR into P2PDMA pages.

    ``size`` 0 means the rest of the BAR. Returns the pfns of the new pages.

    Raises:
        InvalidArgument: no such memory BAR, ``offset`` at or past its end,
            or ``offset + size`` past it.
        OutOfMemory: bytes already given to P2PDMA (``memremap_pages`` finds
            a conflicting pagemap, WARNs and returns -ENOMEM).
    """
    b = pdev.bars.get(bar)
    if b is None:
        raise InvalidArgument(f"{pdev!r}: BAR{bar} is not a memory BAR")
    if offset < 0 or offset >= b.size:
        raise InvalidArgument(f"{pdev!r}: offset {offset:#x} is past BAR{bar}")
    if size == 0:
        size = b.size - offset
    if size < 0 or offset + size > b.size or size % PAGE_SIZE or offset % PAGE_SIZE:
        raise InvalidArgument(f"{pdev!r}: {size:#x} bytes at {offset:#x} do not fit BAR{bar}")
    if any(lo < offset + size and offset < hi for lo, hi in b.claimed):
        pdev.topology.machine.warn(
            "memremap",
            "memremap_pages",
            "Conflicting mapping in same section",
            f"{pdev!r} BAR{bar} {size:#x} bytes at {offset:#x}",
        )
        raise OutOfMemory(f"{pdev!r}: part of BAR{bar} is already P2PDMA memory")
    if pdev.p2pdma is None:
        pdev.p2pdma = P2PDmaProvider(pdev)
    prov = pdev.p2pdma
    ops = _P2PPageOps(prov, 0, b, offset)
    pgmap = DevPagemap(MEMORY_DEVICE_PCI_P2PDMA, owner=pdev, ops=ops)
    pfns = memremap_pages(pdev.topology.machine, pgmap, size >> PAGE_SHIFT)
    # Bus address of a P2P page = the BAR's bus address + its offset in the BAR.
    ops.bus_off = b.bus_addr + offset - (pfns.start << PAGE_SHIFT)
    b.claimed.append((offset, offset + size))
    prov.pgmaps.append(pgmap)
    prov.free.extend(pfns)
    prov.free.sort()
    return pfns


def pci_p2pmem_publish(pdev: PciDev, publish: bool) -> None:
    """``pci_p2pmem_publish``: offer (or withdraw) the memory to ``pci_p2pmem_find``.

    A device without P2PDMA memory is left alone, as in the kernel.
    """
    if pdev.p2pdma is not None:
        pdev.p2pdma.published = publish


def pci_alloc_p2pmem(pdev: PciDev, size: int) -> list[int] | None:
    """``pci_alloc_p2pmem``: ``size`` bytes of the pool as pages (None when exhausted)."""
    prov = pdev.p2pdma
    n = (size + PAGE_SIZE - 1) >> PAGE_SHIFT
    if prov is None or n <= 0 or n > len(prov.free):
        return None
    pages, prov.free = prov.free[:n], prov.free[n:]
    return pages


def pci_free_p2pmem(pdev: PciDev, pfns: list[int]) -> None:
    """``pci_free_p2pmem``: give pages back to the pool."""
    if pdev.p2pdma is None:
        raise InvalidArgument(f"{pdev!r} has no P2PDMA memory")
    pdev.p2pdma.free.extend(pfns)
    pdev.p2pdma.free.sort()


# ----- p2pmem/allocate --------------------------------------------------------------


@attrs.define(eq=False, repr=False)
class P2PMemAllocateFile:
    """``/sys/bus/pci/devices/<bdf>/p2pmem/allocate``: mmap to get P2P memory.

    ``p.mmap(length, prot, MAP_SHARED, file=pci_p2pmem_allocate_file(pdev))``
    takes ``length`` bytes from the pool and ``vm_insert_page``s each page, so
    ``hmm_range_fault`` sees ordinary (ZONE_DEVICE) pages. Each page's only
    reference is its mapping: unmapping frees it back to the pool.
    """

    pdev: PciDev
    #: Fake size the sysfs attribute advertises (1 TiB).
    size: int = 1 << 40

    def __repr__(self) -> str:
        return f"p2pmem/allocate({self.pdev.bdf})"

    def mmap(self, vma: Vma) -> None:
        """``p2pmem_alloc_mmap``.

        Raises:
            InvalidArgument: not ``MAP_SHARED``, or a non-zero offset.
            NoDevice: the device has no P2PDMA memory (-ENODEV).
            OutOfMemory: the pool cannot hold the whole mapping.
        """
        if not vma.flags & VM_MAYSHARE:  # p2pmem_alloc_mmap tests VM_MAYSHARE
            raise InvalidArgument(f"{self!r}: mmap must be MAP_SHARED")
        if vma.pgoff:
            raise InvalidArgument(f"{self!r}: mmap offset must be 0")
        if self.pdev.p2pdma is None:
            raise NoDevice(f"{self!r}: no P2PDMA memory")
        pages = pci_alloc_p2pmem(self.pdev, vma.end - vma.start)
        if pages is None:
            raise OutOfMemory(f"{self!r}: pool exhausted for {vma.end - vma.start:#x} bytes")
        machine = self.pdev.topology.machine
        for i, pfn in enumerate(pages):
            zone_device_page_init(machine, pfn)  # set_page_count(page, 1)
            try:
                vm_insert_page(vma, vma.start + i * PAGE_SIZE, pfn)
            except Exception:
                machine.phys.refcount[pfn] = 0
                pci_free_p2pmem(self.pdev, pages[i:])
                raise
            machine.phys.put_one(pfn)  # the mapping holds the only reference now


def pci_p2pmem_allocate_file(pdev: PciDev) -> P2PMemAllocateFile:
    """The ``p2pmem/allocate`` file of a provider."""
    return P2PMemAllocateFile(pdev)


def pci_p2pdma_remove(pdev: PciDev) -> None:
    """Device removal: the ``allocate`` file, the pool and the P2P pages go.

    In the kernel's order: the ``p2pmem`` sysfs group is removed, which zaps
    every user mapping of the ``allocate`` file (``unmap_mapping_range``,
    which MMU notifiers see as ``MMU_NOTIFY_CLEAR``; the pages return to the
    pool as their last mapping goes); ``pci_p2pdma_release`` clears
    ``pdev->p2pdma`` (no more ``allocate``, ``find`` or peer routing); then
    ``memunmap_pages`` removes each pagemap.

    Raises:
        Busy: a P2P page is still referenced (a pin, a DMA user). The kernel's
            ``memunmap_pages`` waits for the last reference; the model stops
            before ``pdev->p2pdma`` is cleared (the mappings are already
            zapped and the memory unpublished), and removal can be retried
            once the holder lets go.
    """
    machine = pdev.topology.machine
    for proc in list(machine.processes):
        mm = proc.mm
        for vma in list(mm.vmas):
            f = vma.file
            if isinstance(f, P2PMemAllocateFile) and f.pdev is pdev:
                with mm.mmap_lock.write(), invalidation(mm, MMU_NOTIFY_CLEAR, vma.start, vma.end):
                    zap_range(vma, vma.start_vpn, vma.npages, even_cows=True)
    prov = pdev.p2pdma
    if prov is None:
        return
    prov.published = False
    refcount = machine.phys.refcount
    for pg in prov.pgmaps:
        r = pg.range
        if r is not None and (busy := np.flatnonzero(refcount[r.start : r.stop] > 0)).size:
            raise Busy(
                f"{pdev!r}: removal waits for {busy.size} P2P page(s) still referenced, "
                f"first at pfn {r.start + int(busy[0]):#x}"
            )
    pdev.p2pdma = None
    for pg in prov.pgmaps:
        if pg.range is not None:
            memunmap_pages(pg)
    for b in pdev.bars.values():
        b.claimed.clear()
    prov.pgmaps.clear()
    prov.free.clear()
    prov.map_types.clear()


def p2p_pfns(pdev: PciDev) -> np.ndarray:
    """Every P2PDMA pfn of a provider (tests, invariants)."""
    prov = pdev.p2pdma
    if prov is None:
        return np.empty(0, np.int64)
    return np.concatenate(
        [np.arange(pg.range.start, pg.range.stop) for pg in prov.pgmaps if pg.range is not None]
    )
