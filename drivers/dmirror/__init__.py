"""dmirror: a model of the kernel's HMM test driver (lib/test_hmm.c), our reference.

``m.probe("dmirror", memory="private" | "coherent")`` gives a device;
``dev.open(process)`` a ``DmirrorFile`` (a mirror) whose ``ioctl`` takes the
``HMM_DMIRROR_*`` commands of the kernel UAPI, so the kernel's hmm-tests port
line by line.

The package is laid out the way every driver package is (copy it):

* ``driver.py``: the ``Driver`` class, its capabilities, parameters and probe;
* ``device.py``: device memory — chunks, free lists, allocation, eviction;
* ``mirror.py``: one open file — the interval notifier, the device page
  table, the fault path, the ioctl table, snapshot and exclusive access;
* ``migrate.py``: migration to the device, to system memory, and the CPU
  fault on a device page (``migrate_to_ram``);
* ``uapi.py``: the native interface under the kernel's names;
* ``mutants.py``: its bug-zoo mutants (entry-point group ``hmmsim.bugzoo``).

Only public faces are imported (``hmmsim``, ``hmmsim.mm``, ``hmmsim.hmm``,
``hmmsim.notifier``, ``hmmsim.migrate``, ``hmmsim.memremap``, …), never a
module of ``hmmsim.mm``.
"""

from __future__ import annotations

from hmmsim import hookimpl

from .device import DmirrorDevice
from .driver import Dmirror
from .mirror import DmirrorFile
from .uapi import (
    HMM_DMIRROR_CHECK_EXCLUSIVE,
    HMM_DMIRROR_EXCLUSIVE,
    HMM_DMIRROR_FLAG_FAIL_ALLOC,
    HMM_DMIRROR_FLAGS,
    HMM_DMIRROR_MEMORY_DEVICE_COHERENT,
    HMM_DMIRROR_MEMORY_DEVICE_PRIVATE,
    HMM_DMIRROR_MIGRATE_TO_DEV,
    HMM_DMIRROR_MIGRATE_TO_SYS,
    HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL,
    HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE,
    HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL,
    HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE,
    HMM_DMIRROR_PROT_ERROR,
    HMM_DMIRROR_PROT_NONE,
    HMM_DMIRROR_PROT_PMD,
    HMM_DMIRROR_PROT_PUD,
    HMM_DMIRROR_PROT_READ,
    HMM_DMIRROR_PROT_WRITE,
    HMM_DMIRROR_PROT_ZERO,
    HMM_DMIRROR_READ,
    HMM_DMIRROR_RELEASE,
    HMM_DMIRROR_SNAPSHOT,
    HMM_DMIRROR_WRITE,
    DmirrorCmd,
)


@hookimpl
def hmmsim_register_drivers() -> list[type[Dmirror]]:
    return [Dmirror]


__all__ = [
    "HMM_DMIRROR_CHECK_EXCLUSIVE",
    "HMM_DMIRROR_EXCLUSIVE",
    "HMM_DMIRROR_FLAGS",
    "HMM_DMIRROR_FLAG_FAIL_ALLOC",
    "HMM_DMIRROR_MEMORY_DEVICE_COHERENT",
    "HMM_DMIRROR_MEMORY_DEVICE_PRIVATE",
    "HMM_DMIRROR_MIGRATE_TO_DEV",
    "HMM_DMIRROR_MIGRATE_TO_SYS",
    "HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL",
    "HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE",
    "HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL",
    "HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE",
    "HMM_DMIRROR_PROT_ERROR",
    "HMM_DMIRROR_PROT_NONE",
    "HMM_DMIRROR_PROT_PMD",
    "HMM_DMIRROR_PROT_PUD",
    "HMM_DMIRROR_PROT_READ",
    "HMM_DMIRROR_PROT_WRITE",
    "HMM_DMIRROR_PROT_ZERO",
    "HMM_DMIRROR_READ",
    "HMM_DMIRROR_RELEASE",
    "HMM_DMIRROR_SNAPSHOT",
    "HMM_DMIRROR_WRITE",
    "Dmirror",
    "DmirrorCmd",
    "DmirrorDevice",
    "DmirrorFile",
    "hmmsim_register_drivers",
]
