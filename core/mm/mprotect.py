"""Changing the protection of a range: ``mprotect(2)``.

Kernel counterpart: mm/mprotect.c (``mprotect_fixup``, ``change_protection``,
``can_change_pte_writable``) and mm/hugetlb.c (``hugetlb_change_protection``).

PROT_NONE turns present entries into PROTNONE entries that keep their pfn
(the page stays mapped and counted; the CPU cannot touch it). Granting write
makes a PTE writable only where no fault is needed to keep COW and dirty
tracking right: exclusive anonymous pages, and pages of shared mappings that
are not write-notified (or already dirty). Removing write downgrades
writable migration entries too. The ``PROTECTION_VMA`` invalidation is sent
only when the range has page tables, as ``change_pmd_range`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import InvalidArgument, PermissionDenied
from ..notifier import MMU_NOTIFY_PROTECTION_VMA, invalidation
from .mmap import (
    check_fully_mapped,
    check_hugetlb_boundaries,
    check_range,
    isolate_range,
    mprotect_account,
    page_align,
    prot_to_vm_flags,
    try_merge,
)
from .pagetable import (
    CHUNK_NONE,
    KIND_PRESENT,
    KIND_PROTNONE,
    PTE_DIRTY,
    PTE_PRESENT,
    PTE_PROTNONE,
    PTE_SPECIAL,
    PTE_WRITE,
    U64,
    softleaf_entries_readonly,
)
from .physmem import PG_anon_exclusive
from .uapi import PROT_MASK, PROT_WRITE
from .vma import VM_ACCESS_FLAGS, VM_MAYWRITE, VM_WRITE, Vma

if TYPE_CHECKING:
    from .address_space import AddressSpace


def do_mprotect(mm: AddressSpace, addr: int, length: int, prot: int) -> None:
    check_range(addr, length, "mprotect")
    if prot & ~PROT_MASK:
        raise InvalidArgument(f"mprotect: unknown prot bits {prot & ~PROT_MASK:#x}")
    if length == 0:
        return
    end = addr + page_align(length)
    vmas = check_fully_mapped(mm, addr, end, "mprotect")
    if prot & PROT_WRITE:
        for vma in vmas:
            if not vma.flags & VM_MAYWRITE:
                raise PermissionDenied(f"mprotect: {vma} may never be writable")
    check_hugetlb_boundaries(mm, addr, end)
    for vma in isolate_range(mm, addr, end):
        new_flags = mprotect_account(vma, (vma.flags & ~VM_ACCESS_FLAGS) | prot_to_vm_flags(prot))
        if new_flags != vma.flags:
            vma.flags = new_flags
            change_protection(vma)
        try_merge(vma)


def change_protection(vma: Vma) -> None:
    """Bring every entry of ``vma`` in line with its (new) ``flags``."""
    mm = vma.mm
    pt = mm.pt
    walk = pt.walk(vma.start_vpn, vma.npages)
    if not (walk.chunk_kind != CHUNK_NONE).any():
        return  # change_pmd_range finds no page table: no invalidation
    with invalidation(mm, MMU_NOTIFY_PROTECTION_VMA, vma.start, vma.end):
        slots = pt.walk(vma.start_vpn, vma.npages).slots()
        entries = slots.entries
        kinds = slots.kinds
        locs = slots.locs
        new = entries.copy()
        mapped = (kinds == KIND_PRESENT) | (kinds == KIND_PROTNONE)  # device-private: below
        if mapped.any():
            new[mapped] = _protect(vma, entries[mapped], slots.pfns[mapped])
        if not vma.flags & VM_WRITE:
            new = softleaf_entries_readonly(new)
        changed = new != entries
        pt.flat[locs[changed]] = new[changed]
        mm.machine.costs.pte_writes += int(changed.sum())


def _protect(vma: Vma, entries: np.ndarray, pfns: np.ndarray) -> np.ndarray:
    phys = vma.mm.machine.phys
    if not vma.flags & VM_ACCESS_FLAGS:
        return (entries & ~U64(PTE_PRESENT | PTE_WRITE)) | U64(PTE_PROTNONE)
    base = (entries & ~U64(PTE_PROTNONE)) | U64(PTE_PRESENT)
    if not vma.flags & VM_WRITE:
        return base & ~U64(PTE_WRITE)
    zero = phys.zero_mask(pfns)
    special = (entries & U64(PTE_SPECIAL)) != 0
    if vma.is_shared:
        notify = vma.page_cache is not None and vma.page_cache.writenotify
        writable = ~zero & (~np.bool_(notify) | ((entries & U64(PTE_DIRTY)) != 0))
        writable |= special & ~zero
    else:
        normal = ~zero & ~special
        writable = np.zeros(len(entries), dtype=np.bool_)
        writable[normal] = (phys.flags[pfns[normal]] & PG_anon_exclusive) != 0
    return np.where(writable, base | U64(PTE_WRITE), base & ~U64(PTE_WRITE))


def change_prot_numa(vma: Vma, start: int, end: int) -> int:
    """NUMA-balancing scan: make present PTEs of [start, end) PROT_NONE hints.

    The pages stay mapped (``PROTECTION_VMA`` invalidation); the next access
    takes a NUMA-hint fault that restores the entry. Returns the number of
    entries changed. (The model has one node: no page ever moves because of it.)
    """
    mm = vma.mm
    pt = mm.pt
    lo, hi = max(start, vma.start) >> 12, min(end, vma.end) >> 12
    if lo >= hi or not vma.flags & VM_ACCESS_FLAGS:
        return 0
    with invalidation(mm, MMU_NOTIFY_PROTECTION_VMA, lo << 12, hi << 12):
        slots = pt.walk(lo, hi - lo).slots()
        sel = slots.kinds == KIND_PRESENT
        sel &= (slots.entries & U64(PTE_SPECIAL)) == 0
        e = slots.entries[sel]
        pt.flat[slots.locs[sel]] = (e & ~U64(PTE_PRESENT)) | U64(PTE_PROTNONE)
        mm.machine.costs.pte_writes += int(sel.sum())
        return int(sel.sum())
