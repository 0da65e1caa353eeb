"""What backs a page: the one vocabulary of pagemap's ``kind`` and ``DevicePte.memory``.

Kernel counterpart: none as a type; the names follow what ``/proc/pid/pagemap``
and ``/proc/kpageflags`` tell apart (anonymous, file, shmem, hugetlb, swap and
migration entries, ZONE_DEVICE types, ...) and what a device page table can
point at (system memory or a ``MEMORY_DEVICE_*`` page).

``MemoryKind`` is an ``enum.StrEnum``: each member *is* its string, so code
that compares a kind with ``"anon"`` or uses it as a dict key keeps working.
"""

from __future__ import annotations

import enum


class MemoryKind(enum.StrEnum):
    """What backs a page (pagemap) or what a device entry points at (``DevicePte``)."""

    #: No entry.
    NONE = "none"
    #: The shared zero page (or huge zero folio).
    ZERO = "zero"
    #: Anonymous memory.
    ANON = "anon"
    #: Page cache of a file.
    FILE = "file"
    #: Page cache of shmem (swap-backed).
    SHMEM = "shmem"
    #: A hugetlb folio.
    HUGETLB = "hugetlb"
    #: A raw pfn mapping (VM_PFNMAP / VM_MIXEDMAP special entry).
    PFNMAP = "pfnmap"
    #: A swap entry.
    SWAP = "swap"
    #: A migration entry.
    MIGRATION = "migration"
    #: A hardware-poison entry.
    HWPOISON = "hwpoison"
    #: A PTE marker (e.g. a guard region).
    MARKER = "marker"
    #: System RAM, as a device page table sees it.
    SYSTEM = "system"
    #: ``MEMORY_DEVICE_PRIVATE`` memory (CPU: a device-private swap-type entry).
    DEVICE_PRIVATE = "device_private"
    #: A device-exclusive entry.
    DEVICE_EXCLUSIVE = "device_exclusive"
    #: ``MEMORY_DEVICE_COHERENT`` memory.
    DEVICE_COHERENT = "device_coherent"
    #: ``MEMORY_DEVICE_PCI_P2PDMA`` memory (a PCI BAR).
    P2P = "p2p"
    #: ``MEMORY_DEVICE_FS_DAX`` memory.
    FSDAX = "fsdax"
    #: ``MEMORY_DEVICE_GENERIC`` memory.
    DEVICE_GENERIC = "device_generic"
    #: A ZONE_DEVICE page of no type the model names.
    DEVICE = "device"


__all__ = ["MemoryKind"]
