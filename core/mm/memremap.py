"""Device memory with struct pages: memory types, ``DevPagemap``, ``memremap_pages``.

Kernel counterpart: include/linux/memremap.h and mm/memremap.c (mainline
6.19+: ``folio_free`` and ``folio_split`` ops, device-private THP), and
``zone_device_page_init``/``zone_device_folio_init``.

``memremap_pages(machine, pgmap, nr_pages)`` gives a driver a range of pfns
above RAM whose pages have metadata like any other (refcount, mapcount,
flags) and contents of their own, so the core can map them and migrate them.
A folio is named by its head pfn. Device pages are free at refcount 0: the
core then calls ``pgmap.ops.folio_free(head)`` and the driver takes the page
back into its own pool; ``zone_device_page_init`` hands one out again with
refcount 1.

``MEMORY_DEVICE_PRIVATE`` pages are not CPU-addressable: they are mapped
only through device-private swap-type entries, and a CPU access calls
``pgmap.ops.migrate_to_ram(vmf)``. ``MEMORY_DEVICE_COHERENT`` pages are mapped
by ordinary present PTEs. ``MEMORY_DEVICE_PCI_P2PDMA`` pages are PCI BAR
memory that GUP only hands out with ``FOLL_PCI_P2PDMA``.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Final, Protocol

import attrs
import numpy as np

from ..errors import Busy, InvalidArgument
from .kinds import MemoryKind
from .physmem import PG_zone_device

if TYPE_CHECKING:
    from ..machine import Machine
    from .vma import Vma


class MemoryType(enum.IntEnum):
    """``enum memory_type`` (0 is reserved to catch uninitialised fields)."""

    MEMORY_DEVICE_PRIVATE = 1
    MEMORY_DEVICE_COHERENT = 2
    MEMORY_DEVICE_FS_DAX = 3
    MEMORY_DEVICE_GENERIC = 4
    MEMORY_DEVICE_PCI_P2PDMA = 5


MEMORY_DEVICE_PRIVATE: Final = MemoryType.MEMORY_DEVICE_PRIVATE
MEMORY_DEVICE_COHERENT: Final = MemoryType.MEMORY_DEVICE_COHERENT
MEMORY_DEVICE_FS_DAX: Final = MemoryType.MEMORY_DEVICE_FS_DAX
MEMORY_DEVICE_GENERIC: Final = MemoryType.MEMORY_DEVICE_GENERIC
MEMORY_DEVICE_PCI_P2PDMA: Final = MemoryType.MEMORY_DEVICE_PCI_P2PDMA

PGMAP_ALTMAP_VALID: Final = 1 << 0
PGMAP_VMEMMAP_OPTIMIZATION: Final = 1 << 1

#: What pagemap's ``kind`` calls pages of each type.
KIND_NAMES: Final = {
    MEMORY_DEVICE_PRIVATE: MemoryKind.DEVICE_PRIVATE,
    MEMORY_DEVICE_COHERENT: MemoryKind.DEVICE_COHERENT,
    MEMORY_DEVICE_FS_DAX: MemoryKind.FSDAX,
    MEMORY_DEVICE_GENERIC: MemoryKind.DEVICE_GENERIC,
    MEMORY_DEVICE_PCI_P2PDMA: MemoryKind.P2P,
}


@attrs.define(eq=False)
class VmFault:
    """``struct vm_fault`` as ``migrate_to_ram`` sees it."""

    vma: Vma
    address: int
    flags: int
    #: The faulting device page (pfn), locked and referenced by the core.
    page: int
    pgmap: DevPagemap
    orig_pte: int
    #: The order of the faulting CPU entry: 0 for a PTE, ``PMD_ORDER`` for a
    #: device-private PMD (the kernel's fault path knows which of
    #: ``do_swap_page`` and ``do_huge_pmd_device_private`` it is in), so
    #: ``migrate_to_ram`` never reads the CPU page table for it.
    order: int = 0


class DevPagemapOps(Protocol):
    """``struct dev_pagemap_ops``.

    ``migrate_to_ram(vmf) -> vm_fault_t``: move the faulting device-private page
    back to system RAM (``VM_FAULT_SIGBUS`` when impossible).
    ``folio_free(head)``: the folio's refcount reached zero.
    ``folio_split(head, tail)`` (optional): a device-private THP was split.
    """

    def folio_free(self, head: int) -> None: ...


@attrs.define(eq=False, repr=False)
class DevPagemap:
    """``struct dev_pagemap``: a range of device pages with an owner and ops."""

    type: MemoryType
    owner: Any = None
    ops: Any = None
    flags: int = 0
    vmemmap_shift: int = 0
    #: The pfns handed out by ``memremap_pages`` (None until then).
    range: range | None = None
    machine: Machine | None = None

    def __repr__(self) -> str:
        where = f"[{self.range.start:#x}, {self.range.stop:#x})" if self.range else "unmapped"
        return f"DevPagemap({self.type.name}, owner={self.owner!r}, pfns {where})"

    def contains(self, pfn: int) -> bool:
        return self.range is not None and pfn in self.range


def memremap_pages(machine: Machine, pgmap: DevPagemap, nr_pages: int) -> range:
    """Create struct pages for ``nr_pages`` of device memory; returns their pfns."""
    if pgmap.range is not None:
        raise InvalidArgument(f"{pgmap!r} is already mapped")
    if nr_pages <= 0:
        raise InvalidArgument("memremap_pages needs at least one page")
    if pgmap.type not in MemoryType.__members__.values():
        raise InvalidArgument(f"unknown memory type {pgmap.type!r}")
    if pgmap.type in (MEMORY_DEVICE_PRIVATE, MEMORY_DEVICE_COHERENT):
        if pgmap.ops is None or not hasattr(pgmap.ops, "folio_free"):
            raise InvalidArgument(f"{pgmap.type.name} needs ops.folio_free")
        if pgmap.owner is None:
            raise InvalidArgument(f"{pgmap.type.name} needs an owner")
    if pgmap.type == MEMORY_DEVICE_PRIVATE and not hasattr(pgmap.ops, "migrate_to_ram"):
        raise InvalidArgument("MEMORY_DEVICE_PRIVATE needs ops.migrate_to_ram")
    start = machine.phys.add_device_range(nr_pages, pgmap)
    pgmap.range = range(start, start + nr_pages)
    pgmap.machine = machine
    return pgmap.range


def memunmap_pages(pgmap: DevPagemap) -> None:
    """Remove the range; every page must be free (evict them first)."""
    if pgmap.range is None or pgmap.machine is None:
        raise InvalidArgument(f"{pgmap!r} is not mapped")
    phys = pgmap.machine.phys
    r = pgmap.range
    busy = np.flatnonzero(phys.refcount[r.start : r.stop] > 0)
    if len(busy):
        raise Busy(
            f"memunmap_pages: {len(busy)} page(s) of {pgmap!r} are still in use, "
            f"first at pfn {r.start + int(busy[0]):#x}"
        )
    phys.remove_device_range(pgmap)
    pgmap.range = None


def zone_device_page_init(machine: Machine, pfn: int, order: int = 0) -> None:
    """Hand out a free device page (or 2**order folio) with refcount 1."""
    phys = machine.phys
    pgmap = phys.pgmap_of(pfn)
    if pgmap is None:
        raise InvalidArgument(f"pfn {pfn:#x} is not device memory")
    nr = 1 << order
    if pfn % nr or pfn + nr > pgmap.range.stop:
        raise InvalidArgument(f"order-{order} device folio at {pfn:#x} is misaligned")
    if (phys.refcount[pfn : pfn + nr] != 0).any():
        raise InvalidArgument(f"device page {pfn:#x} is already in use")
    phys.order[pfn : pfn + nr] = order
    phys.flags[pfn : pfn + nr] = PG_zone_device
    phys.mapcount[pfn] = 0
    phys.mapping[pfn] = 0
    phys.index[pfn] = 0
    phys.refcount[pfn] = 1


def zone_device_pages_init(machine: Machine, pfns: np.ndarray) -> None:
    """``zone_device_page_init`` for many free order-0 device pages at once."""
    phys = machine.phys
    if len(pfns) == 0:
        return
    if (pfns < phys.ram_pages).any() or (phys.refcount[pfns] != 0).any():
        raise InvalidArgument("zone_device_pages_init: not free device pages")
    phys.order[pfns] = 0
    phys.flags[pfns] = PG_zone_device
    phys.mapcount[pfns] = 0
    phys.mapping[pfns] = 0
    phys.index[pfns] = 0
    phys.refcount[pfns] = 1


def folio_pgmap(machine: Machine, pfn: int) -> DevPagemap | None:
    """``page_pgmap``: the device pagemap of a page, None for RAM."""
    pgmap: DevPagemap | None = machine.phys.pgmap_of(pfn)
    return pgmap


def is_device_private_page(machine: Machine, pfn: int) -> bool:
    pgmap = machine.phys.pgmap_of(pfn)
    return pgmap is not None and pgmap.type == MEMORY_DEVICE_PRIVATE


def is_device_coherent_page(machine: Machine, pfn: int) -> bool:
    pgmap = machine.phys.pgmap_of(pfn)
    return pgmap is not None and pgmap.type == MEMORY_DEVICE_COHERENT


def page_memory_kind(machine: Machine, pfn: int) -> MemoryKind:
    """What a device entry pointing at ``pfn`` maps, as ``DevicePte.memory``
    names it: ``DEVICE_PRIVATE``, ``DEVICE_COHERENT`` or ``P2P`` for ZONE_DEVICE
    pages of those types, ``SYSTEM`` for everything else (RAM, and FS-DAX or
    generic device memory, which a device reaches as it reaches RAM)."""
    pgmap = machine.phys.pgmap_of(pfn)
    if pgmap is None:
        return MemoryKind.SYSTEM
    return _DEVICE_PTE_KINDS.get(pgmap.type, MemoryKind.SYSTEM)


_DEVICE_PTE_KINDS: Final = {
    MEMORY_DEVICE_PRIVATE: MemoryKind.DEVICE_PRIVATE,
    MEMORY_DEVICE_COHERENT: MemoryKind.DEVICE_COHERENT,
    MEMORY_DEVICE_PCI_P2PDMA: MemoryKind.P2P,
}


def is_pci_p2pdma_page(machine: Machine, pfn: int) -> bool:
    pgmap = machine.phys.pgmap_of(pfn)
    return pgmap is not None and pgmap.type == MEMORY_DEVICE_PCI_P2PDMA
