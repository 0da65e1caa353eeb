"""Moving pages to new frames through migration entries (``move_pages(2)``).

Kernel counterpart: mm/migrate.c (``migrate_pages``, ``migrate_folio``,
``try_to_migrate``, ``remove_migration_ptes``, ``folio_migrate_mapping``).

A folio is locked and every mapping of it is replaced by a migration entry
(one ``CLEAR`` invalidation per mapping: ordinary migration never sends
``MIGRATE``, which is reserved for device migration). Anyone faulting on a
migration entry waits until the entry changes. Contents and metadata move to
a new folio of the same order, and the migration entries become ordinary
entries pointing at it. A folio with references beyond its mappings and
caches (a GUP pin) cannot move: ``-EBUSY``, and it stays where it was.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import numpy as np

from .. import sched
from ..errors import OutOfMemory
from .physmem import PG_anon, PG_hugetlb, PG_locked, PG_swapcache
from .reclaim import expected_refs
from .rmap import migration_entry_for, remove_migration_ptes, try_to_unmap

if TYPE_CHECKING:
    from ..machine import Machine

_I64 = np.int64


def migrate_folio(machine: Machine, head: int) -> int:
    """Move one folio to a new frame; 0 or a negative errno."""
    phys = machine.phys
    flags = int(phys.flags[head])
    if flags & PG_locked:
        return -errno.EBUSY
    if phys.refcount[head] != expected_refs(machine, head):
        return -errno.EBUSY
    order = int(phys.order[head])
    nr = 1 << order
    try:
        if flags & PG_hugetlb:
            got = machine.hugetlb[order].alloc(reserved=False)
            if got is None:
                return -errno.ENOMEM
            new = got
        else:
            new = phys.alloc_one(order)
    except OutOfMemory:
        return -errno.ENOMEM
    phys.flags[head] |= np.uint16(PG_locked)
    phys.refcount[head] += 1  # the isolation reference
    _unmap_to_migration_entries(machine, head)
    sched.point("migrate:unmapped")
    # Copy contents and metadata; the new folio takes the old one's place.
    src = np.arange(head, head + nr, dtype=_I64)
    dst = np.arange(new, new + nr, dtype=_I64)
    phys.copy_pages(dst, src)
    phys.flags[dst] = phys.flags[src] & np.uint16(~PG_locked & 0xFFFF)
    phys.mapping[new] = phys.mapping[head]
    phys.index[new] = phys.index[head]
    if flags & PG_swapcache:
        swap = machine.swap
        slot = swap.slot_of.pop(head)
        swap.slot_of[new] = slot
        swap.cache[slot] = new
        phys.refcount[new] += 1
        phys.refcount[head] -= 1
    if not flags & PG_anon and phys.mapping[head]:
        f = machine.mappings[int(phys.mapping[head])]
        # Every slot of a large folio (a shmem THP) points at the new pages.
        f.cache.set(int(phys.index[head]) + np.arange(nr, dtype=_I64), dst)
        phys.refcount[new] += 1  # the page cache's reference moves over
        phys.refcount[head] -= 1
    remove_migration_ptes(machine, head, new)
    phys.flags[head] &= np.uint16(~PG_locked & 0xFFFF)
    phys.mapping[head] = 0
    phys.put_one(head)  # the isolation reference: frees the old folio
    phys.put_one(new)  # the allocation reference: the mappings hold it now
    return 0


def _unmap_to_migration_entries(machine: Machine, head: int) -> None:
    phys = machine.phys
    try_to_unmap(machine, head, lambda e: migration_entry_for(phys, e))
