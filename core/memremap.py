"""The ``linux/memremap.h`` face: device memory with struct pages.

The model lives in :mod:`hmmsim.mm.memremap` (mm/memremap.c belongs to mm);
this module is the interface drivers import, so that a driver never reaches
into ``hmmsim.mm.<module>``.
"""

from __future__ import annotations

from .mm.memremap import (
    KIND_NAMES,
    MEMORY_DEVICE_COHERENT,
    MEMORY_DEVICE_FS_DAX,
    MEMORY_DEVICE_GENERIC,
    MEMORY_DEVICE_PCI_P2PDMA,
    MEMORY_DEVICE_PRIVATE,
    PGMAP_ALTMAP_VALID,
    PGMAP_VMEMMAP_OPTIMIZATION,
    DevPagemap,
    DevPagemapOps,
    MemoryType,
    VmFault,
    folio_pgmap,
    is_device_coherent_page,
    is_device_private_page,
    is_pci_p2pdma_page,
    memremap_pages,
    memunmap_pages,
    page_memory_kind,
    zone_device_page_init,
    zone_device_pages_init,
)

__all__ = [
    "KIND_NAMES",
    "MEMORY_DEVICE_COHERENT",
    "MEMORY_DEVICE_FS_DAX",
    "MEMORY_DEVICE_GENERIC",
    "MEMORY_DEVICE_PCI_P2PDMA",
    "MEMORY_DEVICE_PRIVATE",
    "PGMAP_ALTMAP_VALID",
    "PGMAP_VMEMMAP_OPTIMIZATION",
    "DevPagemap",
    "DevPagemapOps",
    "MemoryType",
    "VmFault",
    "folio_pgmap",
    "is_device_coherent_page",
    "is_device_private_page",
    "is_pci_p2pdma_page",
    "memremap_pages",
    "memunmap_pages",
    "page_memory_kind",
    "zone_device_page_init",
    "zone_device_pages_init",
]
