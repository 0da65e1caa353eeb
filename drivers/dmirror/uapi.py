"""The dmirror user API (lib/test_hmm_uapi.h): commands, protection codes, flags.

Every name has the kernel's value: the ioctl numbers use the generic
``_IOWR('H', nr, struct hmm_dmirror_cmd)`` encoding (0xC0284800 | nr).
"""

from __future__ import annotations

from typing import Final

import attrs


def _iowr(nr: int) -> int:
    return 0xC0284800 | nr


HMM_DMIRROR_READ: Final = _iowr(0x00)
HMM_DMIRROR_WRITE: Final = _iowr(0x01)
HMM_DMIRROR_MIGRATE_TO_DEV: Final = _iowr(0x02)
HMM_DMIRROR_MIGRATE_TO_SYS: Final = _iowr(0x03)
HMM_DMIRROR_SNAPSHOT: Final = _iowr(0x04)
HMM_DMIRROR_EXCLUSIVE: Final = _iowr(0x05)
HMM_DMIRROR_CHECK_EXCLUSIVE: Final = _iowr(0x06)
HMM_DMIRROR_RELEASE: Final = _iowr(0x07)
HMM_DMIRROR_FLAGS: Final = _iowr(0x08)

HMM_DMIRROR_FLAG_FAIL_ALLOC: Final = 1 << 0

HMM_DMIRROR_PROT_ERROR: Final = 0xFF
HMM_DMIRROR_PROT_NONE: Final = 0x00
HMM_DMIRROR_PROT_READ: Final = 0x01
HMM_DMIRROR_PROT_WRITE: Final = 0x02
HMM_DMIRROR_PROT_PMD: Final = 0x04
HMM_DMIRROR_PROT_PUD: Final = 0x08
HMM_DMIRROR_PROT_ZERO: Final = 0x10
HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL: Final = 0x20
HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE: Final = 0x30
HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL: Final = 0x40
HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE: Final = 0x50

HMM_DMIRROR_MEMORY_DEVICE_PRIVATE: Final = 1
HMM_DMIRROR_MEMORY_DEVICE_COHERENT: Final = 2

COMMAND_NAMES: Final = {
    HMM_DMIRROR_READ: "READ",
    HMM_DMIRROR_WRITE: "WRITE",
    HMM_DMIRROR_MIGRATE_TO_DEV: "MIGRATE_TO_DEV",
    HMM_DMIRROR_MIGRATE_TO_SYS: "MIGRATE_TO_SYS",
    HMM_DMIRROR_SNAPSHOT: "SNAPSHOT",
    HMM_DMIRROR_EXCLUSIVE: "EXCLUSIVE",
    HMM_DMIRROR_CHECK_EXCLUSIVE: "CHECK_EXCLUSIVE",
    HMM_DMIRROR_RELEASE: "RELEASE",
    HMM_DMIRROR_FLAGS: "FLAGS",
}


@attrs.define
class DmirrorCmd:
    """``struct hmm_dmirror_cmd``: ``buf`` plays the part of the ``ptr`` field."""

    addr: int
    npages: int
    buf: bytearray | None = None
    cpages: int = 0
    faults: int = 0
