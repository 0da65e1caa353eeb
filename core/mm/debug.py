"""Consistency checks of the whole memory model (``CONFIG_DEBUG_VM`` for hmmsim).

Kernel counterpart: the VM_BUG_ON family and ``page_mapcount`` sanity checks.

``verify_machine`` recounts, from every process's page tables, how many
mappings each folio has and compares with the folios' ``mapcount``; checks
that references cover mappings and caches, that no entry maps a free frame,
and that swap slot use counts match the swap entries. Tests call it after
every step of random operation sequences.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from ..errors import KernelBug
from .pagetable import (
    KIND_DEVICE_EXCLUSIVE,
    KIND_DEVICE_PRIVATE,
    KIND_PRESENT,
    KIND_PROTNONE,
    KIND_SWAP,
    PTE_SPECIAL,
    U64,
)
from .physmem import PG_anon, PG_hugetlb, PG_swapcache

if TYPE_CHECKING:
    from ..machine import Machine


def verify_machine(machine: Machine) -> None:
    """Check the whole memory model's accounting.

    Raises:
        KernelBug: describing the first inconsistency found (an
            ``AssertionError``, and raised under ``python -O`` too).
    """
    phys = machine.phys
    maps: Counter[int] = Counter()
    swap_refs: Counter[int] = Counter()
    for proc in machine.processes:
        mm = proc.mm
        prev_end = 0
        for vma in mm.vmas:
            if vma.start < prev_end:
                raise KernelBug(f"overlapping VMAs in mm {mm.id}")
            if not (vma.start < vma.end and vma.start % 4096 == 0 and vma.end % 4096 == 0):
                raise KernelBug(f"{vma} is empty or not page aligned")
            prev_end = vma.end
            slots = mm.pt.walk(vma.start_vpn, vma.npages).slots()
            k = slots.kinds
            e = slots.entries
            pfns = slots.pfns
            mapped = np.isin(
                k, (KIND_PRESENT, KIND_PROTNONE, KIND_DEVICE_PRIVATE, KIND_DEVICE_EXCLUSIVE)
            )
            mapped &= (e & U64(PTE_SPECIAL)) == 0
            mapped &= ~phys.zero_mask(pfns)
            heads = phys.head_of(pfns[mapped])
            maps.update(heads.tolist())
            swap_refs.update(pfns[k == KIND_SWAP].tolist())
    for head, n in maps.items():
        mc = int(phys.mapcount[head])
        if mc != n:
            raise KernelBug(f"folio {head:#x}: mapcount {mc} but {n} mapping(s) found")
        # Each mapping holds a reference: fewer is a use after free to come
        # (such a folio may even read as free, refcount 0, to the loop below).
        rc = int(phys.refcount[head])
        if rc < n:
            raise KernelBug(f"folio {head:#x}: refcount {rc} < {n} mapping(s)")
        if head < phys.ram_pages and not phys.allocator.used[head]:
            raise KernelBug(f"folio {head:#x} is mapped but its frame is free")
    live = np.flatnonzero(phys.refcount[: phys.ram_pages] > 0)
    for head in live.tolist():
        flags = int(phys.flags[head])
        expected = int(phys.mapcount[head])
        if flags & PG_swapcache:
            expected += 1
        if not flags & PG_anon and phys.mapping[head] != 0:
            expected += 1
        if head in (0, 512):  # the zero pages hold a permanent reference
            continue
        rc = int(phys.refcount[head])
        if rc < expected:
            raise KernelBug(f"folio {head:#x}: refcount {rc} < expected {expected}")
        if rc > expected and not flags & PG_hugetlb:
            extra = phys.extra_refs.get(head, 0)
            if rc != expected + extra:
                raise KernelBug(
                    f"folio {head:#x}: refcount {rc} but only {expected} accounted for (leak?)"
                )
        if expected == 0 and phys.extra_refs.get(head, 0) == 0:
            raise KernelBug(f"folio {head:#x} is allocated but nothing holds it (leak)")
    swap = machine.swap
    for slot in np.flatnonzero(swap.count).tolist():
        want = swap_refs.get(slot, 0) + (1 if slot in swap.cache else 0)
        have = int(swap.count[slot])
        if have != want:
            raise KernelBug(f"swap slot {slot}: count {have} but {want} user(s)")
    for slot, n in swap_refs.items():
        if swap.count[slot] < n:
            raise KernelBug(f"swap slot {slot} referenced but free")
