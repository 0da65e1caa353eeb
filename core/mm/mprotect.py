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

``mprotect`` half-applies where Linux does (a hole or a refused VMA after
changed ones): the changed VMAs stay changed and the error is returned. This
is the one place the model's "nothing half-applied" rule yields to the ABI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import numpy as np

from ..errors import InvalidArgument, OutOfMemory, PermissionDenied
from ..notifier import MMU_NOTIFY_PROTECTION_VMA, invalidation
from .mmap import mprotect_account, page_align, prot_to_vm_flags, split_vma, try_merge
from .pagetable import (
    CHUNK_NONE,
    KIND_PRESENT,
    KIND_PROTNONE,
    PMD_ORDER,
    PTE_DIRTY,
    PTE_PRESENT,
    PTE_PROTNONE,
    PTE_SPECIAL,
    PTE_WRITE,
    U64,
    PageTable,
    softleaf_entries_readonly,
)
from .physmem import PG_anon_exclusive
from .uapi import PAGE_SIZE, PROT_GROWSDOWN, PROT_GROWSUP, PROT_MASK, PROT_SEM
from .vma import (
    VM_ACCESS_FLAGS,
    VM_WRITE,
    Vma,
    vm_flags_str,
)

if TYPE_CHECKING:
    from .address_space import AddressSpace


#: Addresses and lengths are C ``unsigned long``/``size_t``: a negative Python
#: int stands for its two's-complement value, as it would reach the kernel.
ULONG_MASK: Final = (1 << 64) - 1


def do_mprotect(mm: AddressSpace, addr: int, length: int, prot: int) -> None:
    """``mprotect(2)`` (``do_mprotect_pkey``), with its checks in the kernel's order.

    A misaligned start fails with EINVAL, then a zero length returns 0 before
    anything else is looked at, a wrapping range fails with ENOMEM, unknown
    prot bits with EINVAL (``PROT_SEM`` is accepted and ignored). The VMAs are
    then changed one by one: a hole fails with ENOMEM, a VMA that may never
    get a requested permission with EACCES, a split through a hugetlb page
    with EINVAL. Linux half-applies here and so does the model: the VMAs
    before the failing one keep their new protection. A VMA whose flags would
    not change is left alone (not split, no invalidation).
    """
    addr &= ULONG_MASK
    length &= ULONG_MASK
    prot &= 0xFFFFFFFF
    grows = prot & (PROT_GROWSDOWN | PROT_GROWSUP)
    prot &= ~grows
    if grows == PROT_GROWSDOWN | PROT_GROWSUP:
        raise InvalidArgument("mprotect: PROT_GROWSDOWN and PROT_GROWSUP together")
    if addr % PAGE_SIZE:
        raise InvalidArgument(f"mprotect: address {addr:#x} is not page aligned")
    if length == 0:
        return
    end = addr + page_align(length)
    if end > ULONG_MASK:
        raise OutOfMemory(f"mprotect: [{addr:#x}, +{length:#x}) wraps around")
    if prot & ~(PROT_MASK | PROT_SEM):
        raise InvalidArgument(f"mprotect: unknown prot bits {prot & ~(PROT_MASK | PROT_SEM):#x}")
    first = mm.vmas.find_next(addr)
    if first is None or first.start >= end:
        raise OutOfMemory(f"mprotect: [{addr:#x}, {end:#x}) is not mapped")
    if grows & PROT_GROWSDOWN:
        # No VMA of the model grows down (MAP_GROWSDOWN is not modelled).
        raise InvalidArgument(f"mprotect(PROT_GROWSDOWN): {first} does not grow down")
    if first.start > addr:
        raise OutOfMemory(f"mprotect: {addr:#x} is not mapped")
    if grows & PROT_GROWSUP:
        raise InvalidArgument("mprotect(PROT_GROWSUP): no VMA grows up on x86-64")
    access = prot_to_vm_flags(prot)
    pos = addr
    while pos < end:
        vma = mm.vmas.find(pos)
        if vma is None:
            raise OutOfMemory(f"mprotect: {pos:#x} is not mapped")
        new_flags = (vma.flags & ~VM_ACCESS_FLAGS) | access
        if (new_flags & ~(new_flags >> 4)) & VM_ACCESS_FLAGS:
            raise PermissionDenied(f"mprotect: {vma} may never get {vm_flags_str(access)}")
        hi = min(end, vma.end)
        if new_flags != vma.flags:
            mprotect_fixup(vma, pos, hi, mprotect_account(vma, new_flags))
        pos = hi


def mprotect_fixup(vma: Vma, start: int, end: int, new_flags: int) -> Vma:
    """Give [start, end) of ``vma`` the flags ``new_flags``: split, protect, merge.

    A split through a hugetlb page fails with EINVAL; the split at ``start``
    stays done if the one at ``end`` fails, as in ``vma_modify``.
    """
    if vma.start < start:
        vma = split_vma(vma, start)
    if vma.end > end:
        split_vma(vma, end)
    vma.flags = new_flags
    change_protection(vma)
    return try_merge(vma)


def change_protection(vma: Vma) -> None:
    """Bring every entry of ``vma`` in line with its (new) ``flags``.

    Only the 2 MiB chunks that have a page table or a huge leaf are walked
    page by page (found through the 1 GiB regions that hold tables), so the
    cost follows the populated page tables, not the VMA's length, as
    ``change_pmd_range`` skips empty PMDs.
    """
    mm = vma.mm
    pt = mm.pt
    runs = populated_runs(pt, vma.start_vpn, vma.end_vpn)
    if not runs:
        return  # change_pmd_range finds no page table: no invalidation
    with invalidation(mm, MMU_NOTIFY_PROTECTION_VMA, vma.start, vma.end):
        for lo, hi in runs:
            slots = pt.walk(lo, hi - lo).slots()
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


def populated_runs(pt: PageTable, start_vpn: int, end_vpn: int) -> list[tuple[int, int]]:
    """The maximal runs [lo, hi) of [start_vpn, end_vpn) whose 2 MiB chunks
    hold a page table or a huge leaf, in address order."""
    runs: list[tuple[int, int]] = []
    for lo, hi in pt.spans(start_vpn, end_vpn):
        kinds = pt.walk(lo, hi - lo, per_page=False).chunk_kind
        live = np.flatnonzero(kinds != CHUNK_NONE)
        if not len(live):
            continue
        c0 = lo >> PMD_ORDER
        breaks = np.flatnonzero(np.diff(live) != 1)
        firsts = np.concatenate([live[:1], live[breaks + 1]]).tolist()
        lasts = np.concatenate([live[breaks], live[-1:]]).tolist()
        for a, b in zip(firsts, lasts, strict=True):
            runs.append((max(lo, (c0 + a) << PMD_ORDER), min(hi, (c0 + b + 1) << PMD_ORDER)))
    return runs


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
