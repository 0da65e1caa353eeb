"""The DMA API and DMA-API debugging.

Kernel counterparts: ``include/linux/dma-mapping.h`` and ``kernel/dma/``
(``mapping.c``, ``direct.c``, ``debug.c``), ``drivers/iommu/dma-iommu.c``
(streaming mappings and the two-step IOVA API over an IOMMU domain, whose
page table and IOVA allocator are ``hmmsim.iommu``). ``hmmsim.dma`` is the
public face of this module, ``hmmsim.iommu`` and the HMM DMA helpers.

A DMA-capable device reaches system memory only through the bus addresses it
obtained here, and every device access is checked the way an IOMMU and
``CONFIG_DMA_API_DEBUG`` check it:

- a ``DmaDevice`` is attached either to an ``IommuDomain`` (bus addresses are
  IOVAs translated by the domain's page table, which maps a huge page as one
  entry when both addresses are aligned, and caches translations in an IOTLB
  that an unmap flushes) or directly (bus address = physical address + the
  device's ``bus_offset``);
- ``dma_read``/``dma_write`` are the device's loads and stores. An access to a
  bus address nothing maps (never, or no longer) raises ``IommuFault``; a store
  through a ``DMA_TO_DEVICE`` mapping or a load through a ``DMA_FROM_DEVICE``
  one does too. Under an IOMMU that is the hardware's permission fault;
  without one, it is what DMA-API debugging would report;
- every such fault, an unmap that matches no mapping, a page freed while a
  mapping of it is alive, and every mapping still alive at
  ``dma_debug_device_teardown`` (a leak, with where it was made) is recorded
  as a ``DmaViolation`` in ``machine_violations(machine)``, which the
  conformance suite fails on.

Departures from the kernel: there is no SWIOTLB bouncing. A device whose DMA
mask cannot reach all of RAM without an IOMMU is "addressing limited", and the
calls that would bounce refuse instead (``dma_map_page`` returns
``DMA_MAPPING_ERROR``, ``hmm_dma_map_alloc`` returns ``NotSupported`` as the
kernel does). Streaming mappings are coherent (no cache maintenance), so
``dma_iova_sync`` and ``dma_sync_*`` only count.
"""

from __future__ import annotations

import enum
import errno
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

import attrs
import numpy as np
from numpy.typing import NDArray

from .errors import BadAddress, InvalidArgument, IoFailure, NotSupported, OutOfMemory, RemoteIO
from .iommu import IOMMU_MMIO, IOMMU_READ, IOMMU_WRITE, IommuDomain
from .mm.memremap import MEMORY_DEVICE_PCI_P2PDMA
from .mm.pagetable import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from .machine import Machine


class DmaDataDirection(enum.IntEnum):
    """``enum dma_data_direction``."""

    DMA_BIDIRECTIONAL = 0
    DMA_TO_DEVICE = 1
    DMA_FROM_DEVICE = 2
    DMA_NONE = 3


DMA_BIDIRECTIONAL: Final = DmaDataDirection.DMA_BIDIRECTIONAL
DMA_TO_DEVICE: Final = DmaDataDirection.DMA_TO_DEVICE
DMA_FROM_DEVICE: Final = DmaDataDirection.DMA_FROM_DEVICE
DMA_NONE: Final = DmaDataDirection.DMA_NONE

#: ``DMA_MAPPING_ERROR``: the all-ones bus address no mapping ever returns.
DMA_MAPPING_ERROR: Final = (1 << 64) - 1

#: ``DMA_ATTR_*`` bits (the values of include/linux/dma-mapping.h).
DMA_ATTR_WEAK_ORDERING: Final = 1 << 1
DMA_ATTR_WRITE_COMBINE: Final = 1 << 2
DMA_ATTR_NO_KERNEL_MAPPING: Final = 1 << 4
DMA_ATTR_SKIP_CPU_SYNC: Final = 1 << 5
DMA_ATTR_FORCE_CONTIGUOUS: Final = 1 << 6
DMA_ATTR_ALLOC_SINGLE_PAGES: Final = 1 << 7
DMA_ATTR_NO_WARN: Final = 1 << 8
DMA_ATTR_PRIVILEGED: Final = 1 << 9
DMA_ATTR_MMIO: Final = 1 << 10

#: Modelled costs in virtual nanoseconds.
COST_DMA_MAP_NS: Final = 150
COST_DMA_BYTE_NS_PER_KB: Final = 40


class IommuFault(BadAddress):
    """A device access the IOMMU (or DMA-API debugging) refuses.

    ``errno`` is EFAULT; the violation is also recorded for the machine.
    """


class DmaViolationKind(enum.StrEnum):
    """The classes of DMA misuse the model catches."""

    #: A device access to a bus address no live mapping covers.
    UNMAPPED = "unmapped"
    #: A store through a ``DMA_TO_DEVICE`` mapping, or a load through ``DMA_FROM_DEVICE``.
    DIRECTION = "direction"
    #: A page freed while a DMA mapping of it is alive.
    FREED_WHILE_MAPPED = "freed_while_mapped"
    #: A mapping still alive when the device is torn down.
    LEAK = "leak"
    #: An unmap that matches no live mapping (double unmap, wrong size or direction).
    BAD_UNMAP = "bad_unmap"


@attrs.frozen
class DmaViolation:
    """One DMA-API rule broken, with where the mapping involved was made."""

    kind: DmaViolationKind
    device: str
    addr: int
    size: int
    message: str
    origin: str = ""

    def __str__(self) -> str:
        where = f" (mapped at {self.origin})" if self.origin else ""
        return f"{self.device}: {self.kind}: {self.message}{where}"


@attrs.define(eq=False)
class DmaMapping:
    """One live streaming mapping, as DMA-API debugging records it."""

    #: "single" (dma_map_page/phys/resource), "sg" (dma_map_sgtable) or "iova" (a link).
    type: str
    addr: int
    size: int
    direction: DmaDataDirection
    #: The physical pages it covers (empty for MMIO outside modelled memory).
    pfns: NDArray[np.int64]
    #: Where it was made: (file, line, function), formatted only when reported.
    where: tuple[str, int, str]

    @property
    def origin(self) -> str:
        """``file:line in function`` of the driver code that made the mapping."""
        file, line, func = self.where
        return f"{file.rsplit('/', 1)[-1]}:{line} in {func}"


#: Modules whose frames are the DMA layer itself, not the code that asked for a mapping.
_DMA_LAYER: Final = frozenset(
    __name__.rsplit(".", 1)[0] + "." + m for m in ("dma_mapping", "iommu", "dma", "hmm")
)


def _caller_frame(depth: int) -> tuple[str, int, str]:
    """(file, line, function) of the first caller outside the DMA layer.

    Kept raw: a mapping records it on every map call, and only a violation
    report formats it.
    """
    f = sys._getframe(depth)
    while f.f_back is not None and f.f_globals.get("__name__") in _DMA_LAYER:
        f = f.f_back
    return f.f_code.co_filename, f.f_lineno, f.f_code.co_name


def _caller(depth: int = 2) -> str:
    """``file:line in function`` of the first caller outside the DMA layer."""
    file, line, func = _caller_frame(depth + 1)
    return f"{file.rsplit('/', 1)[-1]}:{line} in {func}"


# ----- machine-wide registry ----------------------------------------------------


@attrs.define(eq=False)
class DmaDebug:
    """What DMA-API debugging keeps per machine: devices, violations."""

    machine: Machine
    devices: list[DmaDevice] = attrs.field(factory=list)
    violations: list[DmaViolation] = attrs.field(factory=list)

    def report(self, violation: DmaViolation) -> None:
        self.violations.append(violation)
        self.machine.trace.log("dma", "violation", violation=str(violation))

    def folios_freed(self, heads: NDArray[np.int64], orders: NDArray[np.int64]) -> None:
        """``PhysMem`` hook: a freed page that a live mapping still covers is a violation.

        One vectorised look-up per device with live mappings (this runs on every
        free); one violation per folio, naming its first mapped page.
        """
        live = [dev for dev in self.devices if dev.nr_live]
        if not live or len(heads) == 0:
            return
        if orders.any():
            sizes = np.left_shift(1, orders).astype(np.int64)
            starts = np.cumsum(sizes) - sizes
            folio = np.repeat(np.arange(len(heads)), sizes)
            pages = heads[folio] + (np.arange(int(sizes.sum()), dtype=np.int64) - starts[folio])
        else:
            folio = np.arange(len(heads))
            pages = heads
        for dev in live:
            dev._grow()
            hit = (dev._rd[pages] > 0) | (dev._wr[pages] > 0)
            if not hit.any():
                continue
            first = np.flatnonzero(hit)
            _, at = np.unique(folio[first], return_index=True)  # first hit of each folio
            for pfn in pages[first[at]].tolist():
                m = dev.mapping_of_pfn(pfn)
                self.report(
                    DmaViolation(
                        DmaViolationKind.FREED_WHILE_MAPPED,
                        dev.name,
                        m.addr if m else 0,
                        m.size if m else PAGE_SIZE,
                        f"pfn {pfn:#x} freed while DMA-mapped",
                        m.origin if m else "",
                    )
                )


def dma_debug(machine: Machine) -> DmaDebug:
    """The machine's DMA-API debugging state, made on first use."""
    dbg = machine.dma_debug
    if dbg is None:
        dbg = machine.dma_debug = DmaDebug(machine)
        machine.phys.free_watchers.append(dbg.folios_freed)
    assert isinstance(dbg, DmaDebug)
    return dbg


def machine_violations(machine: Machine) -> list[DmaViolation]:
    """Every DMA violation recorded on ``machine`` so far (empty if DMA was never used)."""
    dbg = machine.dma_debug
    return list(dbg.violations) if dbg is not None else []


# ----- devices -------------------------------------------------------------------


def _prot(direction: DmaDataDirection) -> int:
    if direction == DMA_TO_DEVICE:
        return IOMMU_READ
    if direction == DMA_FROM_DEVICE:
        return IOMMU_WRITE
    return IOMMU_READ | IOMMU_WRITE


@attrs.define(eq=False, repr=False)
class DmaDevice:
    """``struct device`` as the DMA API sees it: mask, IOMMU domain or direct.

    Args:
        machine: the machine whose memory the device reaches.
        name: how violations name the device.
        domain: the IOMMU domain it sits behind, or None for direct mapping.
        dma_mask: ``dma_set_mask``; bus addresses above it are unreachable.
        bus_offset: direct mapping only: bus address = physical + offset.
        coherent: no cache maintenance needed (``dma_need_sync`` is False).
    """

    machine: Machine
    name: str = "dma-device"
    domain: IommuDomain | None = None
    dma_mask: int = (1 << 64) - 1
    bus_offset: int = 0
    coherent: bool = True
    #: Live mappings by bus address (direct mapping may map one address twice).
    live: dict[int, list[DmaMapping]] = attrs.field(factory=dict)
    nr_live: int = 0
    #: Bytes the device moved by DMA.
    bytes_read: int = 0
    bytes_written: int = 0
    #: The PCI function this device is (``hmmsim.pci.PciDev``), if any.
    pci: Any = None
    #: ``dev->iommu->pci_32bit_workaround``: a PCI function's IOVAs come from
    #: below 4 GiB until that space runs out once.
    pci_32bit_workaround: bool = True
    #: Live MMIO mappings of a direct-mapped device: their bus address is the
    #: CPU physical address (no ``bus_offset``), so they are looked up first.
    _direct_mmio: list[DmaMapping] = attrs.field(init=False, factory=list)
    #: Per physical pfn: live mappings that let the device read / write it.
    _rd: NDArray[np.int32] = attrs.field(init=False)
    _wr: NDArray[np.int32] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._rd = np.zeros(0, np.int32)
        self._wr = np.zeros(0, np.int32)
        self._grow()
        dma_debug(self.machine).devices.append(self)

    def __repr__(self) -> str:
        how = self.domain.name if self.domain is not None else "direct"
        return f"DmaDevice({self.name}, {how}, {self.nr_live} live mappings)"

    def _grow(self) -> None:
        n = self.machine.phys.capacity
        if len(self._rd) < n:  # device memory was added since
            self._rd = np.concatenate([self._rd, np.zeros(n - len(self._rd), np.int32)])
            self._wr = np.concatenate([self._wr, np.zeros(n - len(self._wr), np.int32)])

    def _account(self, m: DmaMapping, sign: int) -> None:
        if len(m.pfns) == 0:
            return
        if len(self._rd) < self.machine.phys.capacity:
            self._grow()
        d = m.direction
        if len(m.pfns) == 1:
            # One page (the per-page mappings of a large MR): plain item
            # reads and writes, several times cheaper than NumPy's in-place add.
            one = m.pfns.item(0)
            if d != DMA_FROM_DEVICE:
                self._rd[one] = self._rd.item(one) + sign
            if d != DMA_TO_DEVICE:
                self._wr[one] = self._wr.item(one) + sign
            return
        for counts, skip in ((self._rd, DMA_FROM_DEVICE), (self._wr, DMA_TO_DEVICE)):
            if d != skip:  # the pfns of one mapping are distinct
                counts[m.pfns] += sign

    def mapped_span(self, pfn: int, n: int) -> NDArray[np.bool_]:
        """Which of ``n`` pfns from ``pfn`` a live mapping of this device covers."""
        self._grow()
        return (self._rd[pfn : pfn + n] > 0) | (self._wr[pfn : pfn + n] > 0)

    def mapping_of_pfn(self, pfn: int) -> DmaMapping | None:
        """A live mapping that covers ``pfn`` (for reports)."""
        for ms in self.live.values():
            for m in ms:
                if len(m.pfns) and bool((m.pfns == pfn).any()):
                    return m
        return None

    def mappings(self) -> list[DmaMapping]:
        """Every live mapping, oldest first per address."""
        return [m for ms in self.live.values() for m in ms]

    def addressing_limited(self) -> bool:
        """``dma_addressing_limited``: direct DMA cannot reach all of memory."""
        if self.domain is not None:
            return False
        # max_pfn: the top of System RAM; device memory (ZONE_DEVICE pfns
        # placed after RAM, a peer's BAR) does not make a device limited.
        top = (self.machine.phys.ram_pages << PAGE_SHIFT) + self.bus_offset - 1
        return top > self.dma_mask

    def need_sync(self) -> bool:
        """``dma_dev_need_sync``: cache maintenance or bouncing could be needed."""
        return not self.coherent or self.addressing_limited()

    def record(
        self,
        type_: str,
        addr: int,
        size: int,
        direction: DmaDataDirection,
        pfns: NDArray[np.int64],
        direct_mmio: bool = False,
    ) -> DmaMapping:
        m = DmaMapping(type_, addr, size, direction, pfns, _caller_frame(3))
        self.live.setdefault(addr, []).append(m)
        if direct_mmio:
            self._direct_mmio.append(m)
        self.nr_live += 1
        self._account(m, +1)
        self.machine.costs.dma_maps += 1
        self.machine.clock.advance(COST_DMA_MAP_NS)
        return m

    def forget(
        self, type_: str, addr: int, size: int | None, direction: DmaDataDirection, what: str
    ) -> DmaMapping | None:
        """Drop the live mapping an unmap names; report what does not match.

        As DMA-API debugging's ``check_unmap``: the mapping is found by its
        bus address. None there is a ``BAD_UNMAP`` ("memory it has not
        allocated") and nothing happens. One made with another size or
        direction is a ``BAD_UNMAP`` too, and is still dropped: the kernel
        reports the mismatch, deletes its entry and goes on with the unmap.
        The caller then tears the mapping down as it was made (its recorded
        size), which keeps the IOMMU consistent where the kernel would unmap
        whatever the wrong size covered. ``size=None`` matches any size. One
        of another type (a scatterlist unmapped as a page) is reported and
        kept: the model cannot tear a mapping down through the wrong API.
        """
        ms = self.live.get(addr, [])
        pick = None
        for i in range(len(ms) - 1, -1, -1):
            m = ms[i]
            if m.type == type_ and m.direction == direction and size in (None, m.size):
                pick = i
                break
        if pick is None:
            same_type = [i for i in range(len(ms)) if ms[i].type == type_]
            if ms:
                m = ms[same_type[-1]] if same_type else ms[-1]
                why = (
                    f"mapped as {m.size:#x} bytes {m.direction.name} ({m.type}), unmapped as "
                    f"{size if size is not None else m.size:#x} bytes {direction.name} ({type_})"
                )
            else:
                why = "no live mapping at that address"
            dma_debug(self.machine).report(
                DmaViolation(
                    DmaViolationKind.BAD_UNMAP,
                    self.name,
                    addr,
                    size or 0,
                    f"{what} of {addr:#x}: {why}",
                    ms[-1].origin if ms else _caller(3),
                )
            )
            if not same_type:
                return None
            pick = same_type[-1]
        m = ms.pop(pick)
        if not ms:
            del self.live[addr]
        if self._direct_mmio and m in self._direct_mmio:
            self._direct_mmio.remove(m)
        self.nr_live -= 1
        self.machine.costs.dma_unmaps += 1
        self.machine.clock.advance(COST_DMA_MAP_NS)
        self._account(m, -1)
        return m

    # The device's own loads and stores, through its bus addresses.
    def _translate(self, addr: int, length: int, write: bool) -> NDArray[np.int64]:
        first, n = _page_span(addr, length)
        need = IOMMU_WRITE if write else IOMMU_READ
        verb = "store to" if write else "load from"
        if self.pci is not None:
            # Peer-to-peer by bus address: routed by the switches, not the IOMMU.
            peer = self.pci.topology.peer_pfns(self.pci, addr, length)
            if peer is not None:
                peer_pfns: NDArray[np.int64] = peer
                return peer_pfns
        if self.domain is not None:
            pfns = np.empty(n, np.int64)
            for i in range(n):
                hit = self.domain.translate(first + i)
                if hit is None:
                    self._fault(
                        DmaViolationKind.UNMAPPED,
                        addr,
                        length,
                        f"{verb} IOVA {(first + i) << PAGE_SHIFT:#x}: not mapped",
                    )
                elif not hit[1] & need:
                    self._fault(
                        DmaViolationKind.DIRECTION,
                        addr,
                        length,
                        f"{verb} IOVA {(first + i) << PAGE_SHIFT:#x}: mapped "
                        f"{'read-only' if write else 'write-only'} by its direction",
                    )
                else:
                    pfns[i] = hit[0]
            return _backed(self, pfns, addr, n)
        for m in self._direct_mmio:
            if m.addr <= addr and addr + length <= m.addr + m.size:
                if m.direction == (DMA_TO_DEVICE if write else DMA_FROM_DEVICE):
                    self._fault(
                        DmaViolationKind.DIRECTION,
                        addr,
                        length,
                        f"{verb} bus address {addr:#x}: MMIO mapped for the other direction",
                    )
                at = first - (m.addr >> PAGE_SHIFT)
                return _backed(self, m.pfns[at : at + n], addr, n)
        phys = addr - self.bus_offset
        pfns = np.arange(phys >> PAGE_SHIFT, (phys >> PAGE_SHIFT) + n, dtype=np.int64)
        self._grow()
        if phys < 0 or pfns[-1] >= len(self._rd):
            self._fault(
                DmaViolationKind.UNMAPPED, addr, length, f"{verb} bus address {addr:#x}: not memory"
            )
        allowed = (self._wr if write else self._rd)[pfns] > 0
        if not allowed.all():
            bad = int(pfns[np.argmin(allowed)])
            other = (self._rd if write else self._wr)[bad] > 0
            kind = DmaViolationKind.DIRECTION if other else DmaViolationKind.UNMAPPED
            why = "mapped for the other direction only" if other else "not mapped"
            self._fault(
                kind,
                addr,
                length,
                f"{verb} bus address {(bad << PAGE_SHIFT) + self.bus_offset:#x}: {why}",
            )
        return pfns

    def _fault(self, kind: DmaViolationKind, addr: int, length: int, message: str) -> None:
        v = DmaViolation(kind, self.name, addr, length, message, _caller(4))
        dma_debug(self.machine).report(v)
        raise IommuFault(f"{self.name}: {message}")


def _backed(dev: DmaDevice, pfns: NDArray[np.int64], addr: int, n: int) -> NDArray[np.int64]:
    """``pfns`` if they are all modelled memory.

    An MMIO mapping of a peer's BAR reaches the BAR's P2PDMA pages; the rest
    of a BAR (registers, a doorbell) is not memory the model holds.

    Raises:
        NotSupported: the access reaches MMIO outside P2PDMA memory.
    """
    if len(pfns) < n or (n and int(pfns.max()) >= dev.machine.phys.capacity):
        raise NotSupported(
            f"{dev.name}: DMA at {addr:#x} reaches MMIO that is not P2PDMA memory "
            "(device registers are not modelled)"
        )
    return pfns


def dma_read(dev: DmaDevice, addr: int, length: int) -> bytes:
    """A device load of ``length`` bytes from bus address ``addr``.

    Raises:
        IommuFault: part of the range is not mapped, or mapped ``DMA_FROM_DEVICE``.
    """
    if length <= 0:
        return b""
    pfns = dev._translate(addr, length, write=False)
    phys = dev.machine.phys
    out = bytearray()
    off = addr & (PAGE_SIZE - 1)
    left = length
    for pfn in pfns.tolist():
        n = min(PAGE_SIZE - off, left)
        out += phys.read(pfn, off, n)
        left -= n
        off = 0
    dev.bytes_read += length
    dev.machine.costs.dma_bytes += length
    dev.machine.clock.advance(COST_DMA_BYTE_NS_PER_KB * ((length + 1023) >> 10))
    return bytes(out)


def dma_write(dev: DmaDevice, addr: int, data: bytes | bytearray | memoryview) -> None:
    """A device store of ``data`` at bus address ``addr`` (only those bytes change).

    Raises:
        IommuFault: part of the range is not mapped, or mapped ``DMA_TO_DEVICE``.
    """
    if not data:
        return
    mv = memoryview(data).cast("B")
    pfns = dev._translate(addr, len(mv), write=True)
    phys = dev.machine.phys
    off = addr & (PAGE_SIZE - 1)
    at = 0
    for pfn in pfns.tolist():
        n = min(PAGE_SIZE - off, len(mv) - at)
        phys.write(pfn, off, mv[at : at + n])
        at += n
        off = 0
    dev.bytes_written += len(mv)
    dev.machine.costs.dma_bytes += len(mv)
    dev.machine.clock.advance(COST_DMA_BYTE_NS_PER_KB * ((len(mv) + 1023) >> 10))


def dma_debug_device_teardown(dev: DmaDevice) -> list[DmaViolation]:
    """Report every mapping still alive as a leak (the device is going away).

    The mappings are then dropped and their IOMMU entries unmapped, as the
    IOMMU domain of a removed device is torn down: a streaming mapping's IOVA
    is freed; an IOVA link's range stays with its ``dma_iova_state`` (whose
    ``dma_iova_free`` gives it back). Returns the leaks reported.
    """
    leaks = []
    dbg = dma_debug(dev.machine)
    for m in dev.mappings():
        v = DmaViolation(
            DmaViolationKind.LEAK,
            dev.name,
            m.addr,
            m.size,
            f"{m.type} mapping of {m.size:#x} bytes {m.direction.name} at {m.addr:#x} "
            "still alive at teardown",
            m.origin,
        )
        dbg.report(v)
        leaks.append(v)
        dev.forget(m.type, m.addr, m.size, m.direction, "teardown")
        if dev.domain is None:
            continue
        if m.type == "iova":
            # The link's pages go with the domain; its IOVA range belongs to
            # the caller's dma_iova_state, whose dma_iova_free gives it back.
            _unlink_iommu(dev.domain, m)
        else:
            _iommu_unmap(dev, m.addr, m.size)
    return leaks


# ----- streaming mappings ---------------------------------------------------------


_MAP_DIRECTIONS: Final = {int(d): d for d in DmaDataDirection if d != DMA_NONE}


def _check_dir(direction: int) -> DmaDataDirection:
    d = _MAP_DIRECTIONS.get(direction)
    if d is None:
        raise InvalidArgument(f"{direction!r} is not a DMA direction to map for")
    return d


def _page_span(addr: int, size: int) -> tuple[int, int]:
    """The first page of [addr, addr + size) and how many pages it touches."""
    first = addr >> PAGE_SHIFT
    return first, ((addr + size - 1) >> PAGE_SHIFT) - first + 1


def _first_pfn(pfns: NDArray[np.int64], phys: int) -> int:
    """The frame an IOMMU entry for ``phys`` points at: its page, or for a peer's
    BAR the P2PDMA page ``_pfn_span`` resolved it to."""
    return int(pfns[0]) if len(pfns) else phys >> PAGE_SHIFT


def _pfn_span(dev: DmaDevice, phys: int, size: int, mmio: bool) -> NDArray[np.int64]:
    first = phys >> PAGE_SHIFT
    last = (phys + size - 1) >> PAGE_SHIFT
    inside = first >= 0 and last < dev.machine.phys.capacity
    if not inside:
        if not mmio:
            raise InvalidArgument(f"DMA map of physical {phys:#x}: not memory of this machine")
        # A peer's BAR: the part given to P2PDMA is that provider's pages.
        topo = dev.machine.pci
        pages = topo.mmio_pfns(phys, size) if topo is not None else None
        return pages if pages is not None else np.empty(0, np.int64)
    return np.arange(first, last + 1, dtype=np.int64)


#: The first page above 4 GiB of IOVA space.
_IOVA_32BIT_LIMIT: Final = 1 << (32 - PAGE_SHIFT)


def _alloc_iova(dev: DmaDevice, npages: int) -> int | None:
    """``iommu_dma_alloc_iova``: IOVA pages below the device's DMA mask.

    A PCI function first tries below 4 GiB, however wide its mask (old
    hardware and firmware mishandle 64-bit addresses); the first time that
    fails it stops trying (``pci_32bit_workaround``) and uses its whole mask.
    """
    assert dev.domain is not None
    limit = (dev.dma_mask >> PAGE_SHIFT) + 1
    if dev.pci is not None and dev.pci_32bit_workaround and limit > _IOVA_32BIT_LIMIT:
        iova = dev.domain.alloc_iova(npages, _IOVA_32BIT_LIMIT)
        if iova is not None:
            return iova
        dev.pci_32bit_workaround = False
    return dev.domain.alloc_iova(npages, limit)


def _iommu_map(dev: DmaDevice, first_pfn: int, n: int, prot: int) -> int | None:
    """A new IOVA range of ``n`` pages mapped to the frames from ``first_pfn``."""
    assert dev.domain is not None
    iova = _alloc_iova(dev, n)
    if iova is not None:
        dev.domain.map(iova, first_pfn, n, prot)
        dev.domain.sync_map()  # iommu_map ends with iotlb_sync_map
    return iova


def dma_map_phys(dev: DmaDevice, phys: int, size: int, direction: int, attrs_: int = 0) -> int:
    """``dma_map_phys`` (6.18; ``dma_map_page`` wraps it): map for streaming DMA.

    Returns the bus address, or ``DMA_MAPPING_ERROR`` (test it with
    ``dma_mapping_error``) when the device cannot reach the memory.
    ``DMA_ATTR_MMIO`` maps a physical address that is not RAM (a peer's BAR).

    Raises:
        InvalidArgument: a bad direction or size, or RAM outside the machine.
    """
    d = _check_dir(direction)
    if size <= 0:
        raise InvalidArgument(f"DMA map of {size} bytes")
    mmio = bool(attrs_ & DMA_ATTR_MMIO)
    pfns = _pfn_span(dev, phys, size, mmio)
    if dev.domain is None:
        # dma_direct_map_phys: MMIO is not translated by phys_to_dma.
        addr = phys if mmio else phys + dev.bus_offset
        if addr + size - 1 > dev.dma_mask:
            return DMA_MAPPING_ERROR  # would need SWIOTLB, which the model lacks
    else:
        prot = _prot(d) | (IOMMU_MMIO if mmio else 0)
        iova = _iommu_map(dev, _first_pfn(pfns, phys), _page_span(phys, size)[1], prot)
        if iova is None:
            return DMA_MAPPING_ERROR
        addr = (iova << PAGE_SHIFT) | (phys & (PAGE_SIZE - 1))
    dev.record("single", addr, size, d, pfns, direct_mmio=mmio and dev.domain is None)
    return addr


def _iommu_unmap(dev: DmaDevice, addr: int, size: int) -> None:
    if dev.domain is None:
        return
    first, n = _page_span(addr, size)
    dev.domain.unmap(first, n)
    dev.domain.free_iova(first)


def dma_unmap_phys(dev: DmaDevice, addr: int, size: int, direction: int, attrs_: int = 0) -> None:
    """``dma_unmap_phys``: end a streaming mapping made by ``dma_map_phys``."""
    m = dev.forget("single", addr, size, _check_dir(direction), "dma_unmap_phys")
    if m is not None:
        _iommu_unmap(dev, m.addr, m.size)


def dma_map_page(
    dev: DmaDevice, pfn: int, offset: int, size: int, direction: int, attrs_: int = 0
) -> int:
    """``dma_map_page_attrs``: map ``size`` bytes at ``offset`` into page ``pfn``.

    As 6.18 does before it hands over to ``dma_map_phys``: ``DMA_ATTR_MMIO``
    is refused (MMIO has no ``struct page`` to map; use ``dma_map_resource``),
    and so, with DMA-API debugging (always on in the model), is a ZONE_DEVICE
    page, with a ``WARN``: device-private pages are not addressable, and a
    P2PDMA page must go through ``pci_p2pdma_state``. Both return
    ``DMA_MAPPING_ERROR``.
    """
    if attrs_ & DMA_ATTR_MMIO:
        return DMA_MAPPING_ERROR
    phys = dev.machine.phys
    if 0 <= pfn < phys.capacity and pfn >= phys.ram_pages:
        dev.machine.warn(
            "dma",
            "dma_map_page_attrs",
            "a ZONE_DEVICE page is not mapped with dma_map_page",
            f"{dev.name}: pfn {pfn:#x}",
        )
        return DMA_MAPPING_ERROR
    return dma_map_phys(dev, (pfn << PAGE_SHIFT) + offset, size, direction, attrs_)


def dma_unmap_page(dev: DmaDevice, addr: int, size: int, direction: int, attrs_: int = 0) -> None:
    """``dma_unmap_page_attrs``."""
    dma_unmap_phys(dev, addr, size, direction, attrs_)


def dma_map_resource(
    dev: DmaDevice, phys_addr: int, size: int, direction: int, attrs_: int = 0
) -> int:
    """``dma_map_resource``: map MMIO (a peer device's BAR) for this device."""
    return dma_map_phys(dev, phys_addr, size, direction, attrs_ | DMA_ATTR_MMIO)


def dma_unmap_resource(
    dev: DmaDevice, addr: int, size: int, direction: int, attrs_: int = 0
) -> None:
    """``dma_unmap_resource``."""
    dma_unmap_phys(dev, addr, size, direction, attrs_)


def dma_mapping_error(dev: DmaDevice, addr: int) -> bool:
    """``dma_mapping_error``: True for ``DMA_MAPPING_ERROR``."""
    return addr == DMA_MAPPING_ERROR


def dma_set_mask(dev: DmaDevice, mask: int) -> None:
    """``dma_set_mask``.

    Raises:
        IoFailure: a mask below 24 bits, which no platform supports (-EIO).
    """
    if mask < (1 << 24) - 1:
        raise IoFailure(f"dma_set_mask: {mask:#x} is too small")
    dev.dma_mask = mask


def dma_need_sync(dev: DmaDevice, addr: int) -> bool:
    """``dma_need_sync``: whether a sync call would do anything for this mapping."""
    return dev.need_sync()


def dma_addressing_limited(dev: DmaDevice) -> bool:
    """``dma_addressing_limited``."""
    return dev.addressing_limited()


# ----- scatterlists ----------------------------------------------------------------


@attrs.define(eq=False)
class SgTable:
    """``struct sg_table``: CPU segments and, once mapped, DMA segments.

    ``sgl`` holds (pfn, offset, length) per CPU segment; physically contiguous
    pages are coalesced into one segment (``sg_alloc_table_from_pages``).
    ``dma_segments`` holds (bus address, length) after ``dma_map_sgtable``:
    under an IOMMU the whole table is one IOVA range and one segment (a P2P
    page reached by its bus address is a segment of its own).
    """

    sgl: list[tuple[int, int, int]]
    dma_segments: list[tuple[int, int]] = attrs.field(factory=list)
    #: Under an IOMMU: the IOVA range (first page, pages) the table is linked into.
    iova_pages: tuple[int, int] | None = None

    @property
    def nents(self) -> int:
        return len(self.sgl)

    @property
    def nents_mapped(self) -> int:
        return len(self.dma_segments)

    def pfns(self) -> NDArray[np.int64]:
        return np.concatenate(
            [
                np.arange(p, p + ((o + n + PAGE_SIZE - 1) >> PAGE_SHIFT), dtype=np.int64)
                for p, o, n in self.sgl
            ]
        )


def sg_alloc_table_from_pages(pfns: Iterable[int], offset: int, size: int) -> SgTable:
    """``sg_alloc_table_from_pages``: one segment per run of contiguous pfns.

    Raises:
        InvalidArgument: no pages, or an offset/size that does not fit them.
    """
    arr = np.fromiter(pfns, dtype=np.int64) if not isinstance(pfns, np.ndarray) else pfns
    arr = arr.astype(np.int64, copy=False)
    if len(arr) == 0 or size <= 0:
        raise InvalidArgument("sg table of no pages")
    if not 0 <= offset < PAGE_SIZE or offset + size > len(arr) * PAGE_SIZE:
        raise InvalidArgument("sg table offset/size do not fit the pages")
    breaks = np.flatnonzero(np.diff(arr) != 1) + 1
    starts = np.concatenate([[0], breaks]).tolist()
    ends = np.concatenate([breaks, [len(arr)]]).tolist()
    sgl = []
    end_byte = offset + size
    for s, e in zip(starts, ends, strict=True):
        lo = max(s * PAGE_SIZE, offset)
        hi = min(e * PAGE_SIZE, end_byte)
        if hi > lo:
            sgl.append(
                (
                    int(arr[s]) + (lo - s * PAGE_SIZE) // PAGE_SIZE,
                    (lo - s * PAGE_SIZE) % PAGE_SIZE,
                    hi - lo,
                )
            )
    return SgTable(sgl)


def dma_map_sgtable(dev: DmaDevice, sgt: SgTable, direction: int, attrs_: int = 0) -> None:
    """``dma_map_sgtable``: map every segment of ``sgt`` for the device.

    Each segment is first classified as 6.18's ``dma_direct_map_sg`` and
    ``iommu_dma_map_sg`` do (``pci_p2pdma_state`` of its first page): a P2PDMA
    page the switches route to the peer gets its PCI bus address (its own DMA
    segment, never the IOMMU); one that must go through the host bridge is
    mapped as MMIO; one the topology cannot reach fails the whole call with
    ``-EREMOTEIO``. Under an IOMMU the other segments are linked into one
    contiguous IOVA range, so consecutive ones make one DMA segment and a
    2 MiB-aligned run of pages becomes one IOMMU entry. Direct mapping gives
    one DMA segment per CPU segment.

    Raises:
        InvalidArgument: a bad direction, or a table that is already mapped.
        RemoteIO: a P2PDMA page this device cannot reach (-EREMOTEIO).
        IoFailure: direct mapping beyond the device's DMA mask (-EIO).
        OutOfMemory: no IOVA space is left (-ENOMEM).
    """
    d = _check_dir(direction)
    if sgt.dma_segments:
        raise InvalidArgument("dma_map_sgtable: the table is already mapped")
    pfns = sgt.pfns()
    if len(np.unique(pfns)) != len(pfns):
        raise InvalidArgument("dma_map_sgtable: a page appears twice in the table")
    p2p = PciP2PDmaMapState()
    kinds: list[tuple[PciP2PDmaMapType, int]] = []
    for p, _, _ in sgt.sgl:
        kind = pci_p2pdma_state(p2p, dev, p)
        if kind == PCI_P2PDMA_MAP_NOT_SUPPORTED:
            raise RemoteIO(f"dma_map_sgtable: {dev.name} cannot reach P2PDMA page {p:#x}")
        kinds.append((kind, p2p.bus_off))
    segs: list[tuple[int, int]] = []
    if dev.domain is None:
        for (p, o, n), (kind, bus_off) in zip(sgt.sgl, kinds, strict=True):
            phys = (p << PAGE_SHIFT) + o
            if kind == PCI_P2PDMA_MAP_BUS_ADDR:
                addr = phys + bus_off
            elif kind == PCI_P2PDMA_MAP_THRU_HOST_BRIDGE:
                addr = phys  # MMIO: not translated
            else:
                addr = phys + dev.bus_offset
            if addr + n - 1 > dev.dma_mask:
                raise IoFailure(f"dma_map_sgtable: {addr:#x} is beyond the DMA mask")
            segs.append((addr, n))
    else:
        domain = dev.domain
        npages = sum(
            _page_span(o, n)[1]
            for (_, o, n), (kind, _) in zip(sgt.sgl, kinds, strict=True)
            if kind != PCI_P2PDMA_MAP_BUS_ADDR
        )
        iova = _alloc_iova(dev, npages) if npages else 0
        if iova is None:
            raise OutOfMemory("dma_map_sgtable: IOVA space exhausted")
        # Link each segment in turn; __finalise_sg merges consecutive IOVA
        # segments into one DMA segment, and a bus address breaks the run.
        at, in_run = iova, False
        for (p, o, n), (kind, bus_off) in zip(sgt.sgl, kinds, strict=True):
            if kind == PCI_P2PDMA_MAP_BUS_ADDR:
                segs.append(((p << PAGE_SHIFT) + o + bus_off, n))
                in_run = False
                continue
            npg = _page_span(o, n)[1]
            mmio = IOMMU_MMIO if kind == PCI_P2PDMA_MAP_THRU_HOST_BRIDGE else 0
            domain.map(at, p, npg, _prot(d) | mmio)
            addr = (at << PAGE_SHIFT) + o
            at += npg
            if in_run and segs[-1][0] + segs[-1][1] == addr:
                segs[-1] = (segs[-1][0], segs[-1][1] + n)
            else:
                segs.append((addr, n))
            in_run = True
        if npages:
            domain.sync_map()
        sgt.iova_pages = (iova, npages) if npages else None
    dev.record("sg", segs[0][0], sum(n for _, n in segs), d, pfns)
    sgt.dma_segments = segs


def dma_unmap_sgtable(dev: DmaDevice, sgt: SgTable, direction: int, attrs_: int = 0) -> None:
    """``dma_unmap_sgtable``: end the mapping made by ``dma_map_sgtable``."""
    d = _check_dir(direction)
    addr = sgt.dma_segments[0][0] if sgt.dma_segments else 0
    size = sum(n for _, n in sgt.dma_segments)
    m = dev.forget("sg", addr, size, d, "dma_unmap_sgtable")
    if m is None:
        return
    if dev.domain is not None and sgt.iova_pages is not None:
        first, npages = sgt.iova_pages
        dev.domain.unmap(first, npages)
        dev.domain.free_iova(first)
    sgt.dma_segments = []
    sgt.iova_pages = None


# ----- the two-step IOVA API (6.17+) -------------------------------------------------


@attrs.define(eq=False)
class DmaIovaState:
    """``struct dma_iova_state``: one IOVA range that pages are linked into."""

    addr: int = 0
    size: int = 0
    #: Linked byte ranges: offset -> size.
    links: dict[int, int] = attrs.field(factory=dict)


def dma_use_iova(state: DmaIovaState) -> bool:
    """``dma_use_iova``: True once ``dma_iova_try_alloc`` succeeded."""
    return state.size != 0


def dma_iova_try_alloc(dev: DmaDevice, state: DmaIovaState, phys: int, size: int) -> bool:
    """``dma_iova_try_alloc``: reserve ``size`` bytes of IOVA for later links.

    Only a device behind an IOMMU can; a direct-mapped one gets False and the
    caller falls back to per-page ``dma_map_phys``. ``phys`` only sets the
    offset within the first page, as in the kernel.

    A size of 0 is refused with a ``WARN`` (False), as in the kernel.

    Raises:
        InvalidArgument: a negative size, or a state that already holds an
            IOVA range. The kernel clears such a state and leaks its range;
            the model refuses, so the leak cannot pass unnoticed.
    """
    if state.size:
        raise InvalidArgument("dma_iova_try_alloc: the state already holds an IOVA range")
    if size < 0:
        raise InvalidArgument(f"dma_iova_try_alloc of {size} bytes")
    if size == 0:
        dev.machine.warn("dma", "dma_iova_try_alloc", "an IOVA range of no bytes", dev.name)
        return False
    if dev.domain is None:
        return False
    offset = phys & (PAGE_SIZE - 1)
    npages = (offset + size + PAGE_SIZE - 1) >> PAGE_SHIFT
    iova = _alloc_iova(dev, npages)
    if iova is None:
        return False
    state.addr = (iova << PAGE_SHIFT) + offset
    state.size = size
    return True


def dma_iova_link(
    dev: DmaDevice,
    state: DmaIovaState,
    phys: int,
    offset: int,
    size: int,
    direction: int,
    attrs_: int = 0,
) -> int:
    """``dma_iova_link``: map ``size`` bytes at ``phys`` at ``state.addr + offset``.

    Returns 0, or ``-EINVAL`` for a link outside the range, unaligned, or over
    a slot already linked. The IOTLB is not flushed until ``dma_iova_sync``.
    """
    d = _check_dir(direction)
    if not dma_use_iova(state) or dev.domain is None:
        return -errno.EINVAL
    if offset < 0 or size <= 0 or offset + size > state.size:
        return -errno.EINVAL
    if (state.addr + offset) % PAGE_SIZE != phys % PAGE_SIZE:
        return -errno.EINVAL
    mmio = bool(attrs_ & DMA_ATTR_MMIO)
    try:
        pfns = _pfn_span(dev, phys, size, mmio)
    except InvalidArgument:
        return -errno.EINVAL
    first, n = _page_span(state.addr + offset, size)
    try:
        dev.domain.map(first, _first_pfn(pfns, phys), n, _prot(d) | (IOMMU_MMIO if mmio else 0))
    except InvalidArgument:
        return -errno.EINVAL
    state.links[offset] = size
    dev.record("iova", state.addr + offset, size, d, pfns)
    return 0


def dma_iova_sync(dev: DmaDevice, state: DmaIovaState, offset: int, size: int) -> int:
    """``dma_iova_sync``: make the links of [offset, offset + size) visible.

    That is ``iommu_sync_map``, which flushes only an IOMMU in caching mode
    (``IommuDomain.caching_mode``); on bare metal it does nothing.
    """
    if dev.domain is None or not dma_use_iova(state):
        return -errno.EINVAL
    dev.domain.sync_map()
    return 0


def dma_iova_unlink(
    dev: DmaDevice,
    state: DmaIovaState,
    offset: int,
    size: int,
    direction: int,
    attrs_: int = 0,
) -> None:
    """``dma_iova_unlink``: unmap [offset, offset + size) and flush the IOTLB."""
    d = _check_dir(direction)
    m = dev.forget("iova", state.addr + offset, size, d, "dma_iova_unlink")
    if m is None:
        return
    state.links.pop(offset, None)
    assert dev.domain is not None
    _unlink_iommu(dev.domain, m)


def _unlink_iommu(domain: IommuDomain, m: DmaMapping) -> None:
    """Unmap an IOVA link's pages (its IOVA stays reserved for the state)."""
    domain.unmap(*_page_span(m.addr, m.size))


def dma_iova_free(dev: DmaDevice, state: DmaIovaState) -> None:
    """``dma_iova_free``: give the IOVA range back; links still alive are leaks."""
    if not dma_use_iova(state):
        return
    for offset, size in sorted(state.links.items()):
        addr = state.addr + offset
        for m in list(dev.live.get(addr, [])):
            if m.type == "iova":
                dma_debug(dev.machine).report(
                    DmaViolation(
                        DmaViolationKind.LEAK,
                        dev.name,
                        addr,
                        size,
                        f"IOVA link at {addr:#x} still alive at dma_iova_free",
                        m.origin,
                    )
                )
                dma_iova_unlink(dev, state, offset, size, m.direction)
    assert dev.domain is not None
    dev.domain.free_iova(state.addr >> PAGE_SHIFT)
    state.addr = state.size = 0
    state.links.clear()


def dma_iova_destroy(
    dev: DmaDevice, state: DmaIovaState, mapped_len: int, direction: int, attrs_: int = 0
) -> None:
    """``dma_iova_destroy``: unlink every link in [0, mapped_len), then free."""
    d = _check_dir(direction)
    for offset, size in sorted(state.links.items()):
        if offset < mapped_len:
            dma_iova_unlink(dev, state, offset, size, d)
    dma_iova_free(dev, state)


# ----- P2PDMA map state (the part the DMA layer needs) -------------------------------


class PciP2PDmaMapType(enum.IntEnum):
    """``enum pci_p2pdma_map_type``."""

    PCI_P2PDMA_MAP_UNKNOWN = 0
    PCI_P2PDMA_MAP_NONE = 1
    PCI_P2PDMA_MAP_NOT_SUPPORTED = 2
    PCI_P2PDMA_MAP_BUS_ADDR = 3
    PCI_P2PDMA_MAP_THRU_HOST_BRIDGE = 4


PCI_P2PDMA_MAP_UNKNOWN: Final = PciP2PDmaMapType.PCI_P2PDMA_MAP_UNKNOWN
PCI_P2PDMA_MAP_NONE: Final = PciP2PDmaMapType.PCI_P2PDMA_MAP_NONE
PCI_P2PDMA_MAP_NOT_SUPPORTED: Final = PciP2PDmaMapType.PCI_P2PDMA_MAP_NOT_SUPPORTED
PCI_P2PDMA_MAP_BUS_ADDR: Final = PciP2PDmaMapType.PCI_P2PDMA_MAP_BUS_ADDR
PCI_P2PDMA_MAP_THRU_HOST_BRIDGE: Final = PciP2PDmaMapType.PCI_P2PDMA_MAP_THRU_HOST_BRIDGE


@attrs.define(eq=False)
class PciP2PDmaMapState:
    """``struct pci_p2pdma_map_state``: the last provider looked up and its map type.

    ``bus_off`` is the offset from CPU physical to PCI bus address of the
    provider's BAR (used for ``PCI_P2PDMA_MAP_BUS_ADDR``).
    """

    pgmap: object = None
    map: PciP2PDmaMapType = PCI_P2PDMA_MAP_UNKNOWN
    bus_off: int = 0


def pci_p2pdma_state(state: PciP2PDmaMapState, dev: DmaDevice, pfn: int) -> PciP2PDmaMapType:
    """``pci_p2pdma_state``: how ``dev`` must reach page ``pfn``.

    Ordinary memory (RAM, device-coherent) is ``PCI_P2PDMA_MAP_NONE``. A PCI
    P2PDMA page is classified by the PCI topology: its pagemap's
    ``ops.p2p_map_type(dev)`` (set by the P2PDMA provider) gives the map type and
    bus offset for this client, cached in ``state`` per pagemap. A P2PDMA page
    whose provider cannot say is ``PCI_P2PDMA_MAP_NOT_SUPPORTED``.
    """
    pgmap = dev.machine.phys.pgmap_of(pfn)
    if pgmap is None or pgmap.type != MEMORY_DEVICE_PCI_P2PDMA:
        return PCI_P2PDMA_MAP_NONE
    if state.pgmap is not pgmap:
        state.pgmap = pgmap
        how = getattr(pgmap.ops, "p2p_map_type", None)
        if how is None:
            state.map, state.bus_off = PCI_P2PDMA_MAP_NOT_SUPPORTED, 0
        else:
            state.map, state.bus_off = how(dev)
    return state.map
