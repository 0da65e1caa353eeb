"""Evicting device memory by pfn: ``migrate_device_range``, ``migrate_device_pfns``.

Kernel counterpart: ``migrate_device_range``, ``migrate_device_pfns`` and
``migrate_device_coherent_folio`` in mm/migrate_device.c: the same
unmap/pages/finalize steps driven by device pfns instead of a virtual range
(a driver evicting its memory, GUP moving a device-coherent folio out before
a long-term pin).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from ..mm.pagetable import (
    PAGE_SIZE,
    U64,
)

if TYPE_CHECKING:
    from ..machine import Machine
from .args import (
    _I64,
    MIGRATE_PFN_COMPOUND,
    MIGRATE_PFN_MIGRATE,
    MigrateVma,
    migrate_pfn,
)
from .collect import _migrate_device_unmap
from .pages import _finalize, _migrate_pages


def migrate_device_range(
    machine: Machine, src: NDArray[np.uint64], start_pfn: int, npages: int
) -> None:
    """``migrate_device_range``: select every in-use device page of a pfn range."""
    phys = machine.phys
    src[:npages] = U64(0)
    in_use = np.flatnonzero(phys.refcount[start_pfn : start_pfn + npages] > 0)
    covered = 0  # pages below this index belong to a folio already taken
    for i in in_use.tolist():
        if i < covered:
            continue
        pfn = start_pfn + i
        head = phys.head(pfn)
        if head != pfn:
            continue
        nr = 1 << int(phys.order[head])
        covered = i + nr
        phys.refcount[head] += 1
        if not phys.folio_trylock(head):
            phys.put_one(head)
            continue
        src[i] = U64(
            migrate_pfn(pfn) | MIGRATE_PFN_MIGRATE | (MIGRATE_PFN_COMPOUND if nr > 1 else 0)
        )
    _migrate_device_unmap(machine, src, npages, None)


def migrate_device_pfns(machine: Machine, src: NDArray[np.uint64], npages: int) -> None:
    """``migrate_device_pfns``: as ``migrate_device_range`` for a list of pfns in ``src``."""
    phys = machine.phys
    for i in range(npages):
        pfn = int(src[i])
        src[i] = U64(0)
        if phys.refcount[pfn] <= 0:
            continue
        phys.refcount[pfn] += 1
        if not phys.folio_trylock(pfn):
            phys.put_one(pfn)
            continue
        src[i] = U64(migrate_pfn(pfn) | MIGRATE_PFN_MIGRATE)
    _migrate_device_unmap(machine, src, npages, None)


def migrate_device_coherent_folio(machine: Machine, head: int) -> None:
    """Move one device-coherent folio to system RAM (GUP long-term pins); ``Busy`` on failure."""
    from ..errors import Busy

    phys = machine.phys
    src = np.zeros(1, dtype=np.uint64)
    dst = np.zeros(1, dtype=np.uint64)
    phys.refcount[head] += 1
    if not phys.folio_trylock(head):
        phys.put_one(head)
        raise Busy(f"device-coherent folio {head:#x} is locked")
    src[0] = U64(migrate_pfn(head) | MIGRATE_PFN_MIGRATE)
    _migrate_device_unmap(machine, src, 1, None)
    if src[0] & U64(MIGRATE_PFN_MIGRATE):
        new = phys.alloc_one(0)
        phys.folio_trylock(new)
        phys.copy_pages(np.array([new], dtype=_I64), np.array([head], dtype=_I64))
        dst[0] = U64(migrate_pfn(new))
    _migrate_pages(machine, MigrateVma(None, 0, PAGE_SIZE, src, dst, npages=1), None)
    ok = bool(src[0] & U64(MIGRATE_PFN_MIGRATE))
    _finalize(machine, src, dst, 1, None)
    if not ok:
        raise Busy(f"device-coherent folio {head:#x} could not be migrated")
