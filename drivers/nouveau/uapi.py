"""nouveau's native interface: the SVM ioctls, PFNMAP words, fault-buffer entries.

Kernel counterparts: ``include/uapi/drm/nouveau_drm.h`` (``drm_nouveau_svm_init``,
``drm_nouveau_svm_bind``), ``include/nvif/if000c.h`` (``NVIF_VMM_PFNMAP_V0_*``)
and the replayable fault-buffer entry layout decoded by
``drivers/gpu/drm/nouveau/nouveau_svm.c`` (``nouveau_svm_fault_cache``).
"""

from __future__ import annotations

import struct
from typing import Final

import attrs

#: Ioctl numbers (``DRM_NOUVEAU_SVM_INIT``, ``DRM_NOUVEAU_SVM_BIND``).
DRM_NOUVEAU_SVM_INIT: Final = 0x08
DRM_NOUVEAU_SVM_BIND: Final = 0x09

#: ``drm_nouveau_svm_bind.header`` fields.
NOUVEAU_SVM_BIND_COMMAND_SHIFT: Final = 0
NOUVEAU_SVM_BIND_COMMAND_BITS: Final = 8
NOUVEAU_SVM_BIND_COMMAND_MASK: Final = (1 << 8) - 1
NOUVEAU_SVM_BIND_PRIORITY_SHIFT: Final = 8
NOUVEAU_SVM_BIND_PRIORITY_BITS: Final = 8
NOUVEAU_SVM_BIND_PRIORITY_MASK: Final = (1 << 8) - 1
NOUVEAU_SVM_BIND_TARGET_SHIFT: Final = 16
NOUVEAU_SVM_BIND_TARGET_BITS: Final = 32
NOUVEAU_SVM_BIND_TARGET_MASK: Final = 0xFFFFFFFF
NOUVEAU_SVM_BIND_VALID_BITS: Final = 48
NOUVEAU_SVM_BIND_VALID_MASK: Final = (1 << 48) - 1
NOUVEAU_SVM_BIND_COMMAND__MIGRATE: Final = 0
NOUVEAU_SVM_BIND_TARGET__GPU_VRAM: Final = 1 << 31

#: The words a PFNMAP writes into the GPU page table (``NVIF_VMM_PFNMAP_V0_*``).
NVIF_VMM_PFNMAP_V0_ADDR_SHIFT: Final = 12
NVIF_VMM_PFNMAP_V0_ADDR: Final = ~0xFFF & ((1 << 64) - 1)
NVIF_VMM_PFNMAP_V0_APER: Final = 0xF0
NVIF_VMM_PFNMAP_V0_HOST: Final = 0x00
NVIF_VMM_PFNMAP_V0_VRAM: Final = 0x10
NVIF_VMM_PFNMAP_V0_A: Final = 0x04
NVIF_VMM_PFNMAP_V0_W: Final = 0x02
NVIF_VMM_PFNMAP_V0_V: Final = 0x01
NVIF_VMM_PFNMAP_V0_NONE: Final = 0x00

#: Fault-buffer access types (the ``access`` field of an entry).
FAULT_ACCESS_READ: Final = 0
FAULT_ACCESS_WRITE: Final = 1
FAULT_ACCESS_ATOMIC: Final = 2
FAULT_ACCESS_PREFETCH: Final = 3

#: Names accepted by ``NouveauChannel.access``.
ACCESS_KINDS: Final = {
    "read": FAULT_ACCESS_READ,
    "write": FAULT_ACCESS_WRITE,
    "atomic": FAULT_ACCESS_ATOMIC,
    "prefetch": FAULT_ACCESS_PREFETCH,
}

#: One replayable fault-buffer entry is 32 bytes: eight little-endian words.
FAULT_ENTRY_SIZE: Final = 0x20
FAULT_INFO_VALID: Final = 0x80000000
_ENTRY: Final = struct.Struct("<8I")


@attrs.define
class DrmNouveauSvmInit:
    """``struct drm_nouveau_svm_init``."""

    unmanaged_addr: int = 0
    unmanaged_size: int = 0


@attrs.define
class DrmNouveauSvmBind:
    """``struct drm_nouveau_svm_bind``; ``result`` is always 0 on return."""

    header: int = 0
    va_start: int = 0
    va_end: int = 0
    npages: int = 0
    stride: int = 0
    result: int = 0
    reserved0: int = 0
    reserved1: int = 0


def svm_bind_header(command: int, target: int, priority: int = 0) -> int:
    """Build a ``drm_nouveau_svm_bind.header`` from its fields."""
    return (
        (command & NOUVEAU_SVM_BIND_COMMAND_MASK) << NOUVEAU_SVM_BIND_COMMAND_SHIFT
        | (priority & NOUVEAU_SVM_BIND_PRIORITY_MASK) << NOUVEAU_SVM_BIND_PRIORITY_SHIFT
        | (target & NOUVEAU_SVM_BIND_TARGET_MASK) << NOUVEAU_SVM_BIND_TARGET_SHIFT
    )


@attrs.frozen
class FaultEntry:
    """A decoded fault-buffer entry (``struct nouveau_svm_fault`` as cached)."""

    inst: int
    addr: int
    time: int
    engine: int
    gpc: int
    hub: int
    access: int
    client: int
    fault: int


def encode_fault(entry: FaultEntry, valid: bool = True) -> bytes:
    """The 32 bytes the GPU writes for one replayable fault."""
    info = (
        (FAULT_INFO_VALID if valid else 0)
        | (entry.gpc & 0x1F) << 24
        | (entry.hub & 0x1) << 20
        | (entry.access & 0xF) << 16
        | (entry.client & 0x7F) << 8
        | (entry.fault & 0x1F)
    )
    return _ENTRY.pack(
        entry.inst & 0xFFFFFFFF,
        entry.inst >> 32,
        entry.addr & 0xFFFFFFFF,
        entry.addr >> 32,
        entry.time & 0xFFFFFFFF,
        entry.time >> 32,
        entry.engine,
        info,
    )


def decode_fault(raw: bytes | bytearray | memoryview) -> tuple[FaultEntry, bool]:
    """Decode one 32-byte entry; the bool is the valid bit of its info word."""
    instlo, insthi, addrlo, addrhi, timelo, timehi, engine, info = _ENTRY.unpack(raw)
    entry = FaultEntry(
        inst=insthi << 32 | instlo,
        addr=addrhi << 32 | addrlo,
        time=timehi << 32 | timelo,
        engine=engine,
        gpc=(info & 0x1F000000) >> 24,
        hub=(info & 0x00100000) >> 20,
        access=(info & 0x000F0000) >> 16,
        client=(info & 0x00007F00) >> 8,
        fault=info & 0x0000001F,
    )
    return entry, bool(info & FAULT_INFO_VALID)
