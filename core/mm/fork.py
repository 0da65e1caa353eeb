"""``fork(2)``: duplicating an address space copy-on-write.

Kernel counterpart: kernel/fork.c (``dup_mmap``) and mm/memory.c
(``copy_page_range``, ``copy_pte_range``, ``copy_present_pte``,
``copy_nonpresent_pte``), mm/huge_memory.c (``copy_huge_pmd``),
mm/hugetlb.c (``copy_hugetlb_page_range``).

Only VMAs that need it get their page tables copied (private mappings with
anonymous pages, PFNMAP/MIXEDMAP mappings); shared mappings are refilled by
faults in the child. For COW mappings the parent's entries are
write-protected inside a ``PROTECTION_PAGE`` invalidation of the whole VMA
(``CLEAR`` for hugetlb), and anonymous pages lose ``PG_anon_exclusive``. An
exclusive anonymous page that may be pinned (references beyond its
mappings) is copied for the child at once instead of being shared, which is
what keeps a GUP pin coherent across fork.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import OutOfMemory
from ..notifier import MMU_NOTIFY_CLEAR, MMU_NOTIFY_PROTECTION_PAGE, invalidation
from .address_space import AddressSpace
from .pagetable import (
    KIND_DEVICE_EXCLUSIVE,
    KIND_DEVICE_PRIVATE,
    KIND_PRESENT,
    KIND_PROTNONE,
    KIND_SWAP,
    LEVEL_PMD,
    LEVEL_PTE,
    PMD_ORDER,
    PTE_SPECIAL,
    PTE_WRITE,
    U64,
    make_present,
    softleaf_entries_readonly,
)
from .physmem import PG_anon, PG_anon_exclusive
from .rmap import anon_vma_fork, folio_add_new_anon_rmap
from .vma import VM_DONTCOPY, VM_MIXEDMAP, VM_PFNMAP, VM_WIPEONFORK, Vma

if TYPE_CHECKING:
    from .process import Process

_I64 = np.int64


def dup_mm(parent: Process, child_mm: AddressSpace) -> None:
    """Copy every VMA of ``parent`` (and its entries where needed) into ``child_mm``."""
    machine = parent.machine
    for vma in parent.mm.vmas:
        if vma.flags & VM_DONTCOPY:
            continue
        # The child's private hugetlb mapping holds no reservation of its own.
        cv = vma.copy(vma.start, vma.end, vma.pgoff, mm=child_mm)
        if vma.flags & VM_WIPEONFORK:
            # MADV_WIPEONFORK: the child's VMA starts empty, with no anon_vma.
            child_mm.vmas.insert(cv)
            continue
        anon_vma_fork(machine, cv, vma)
        cv.link_file()
        child_mm.vmas.insert(cv)
        if vma.anon_vma is not None or vma.flags & (VM_PFNMAP | VM_MIXEDMAP):
            copy_page_range(cv, vma)


def copy_page_range(dst: Vma, src: Vma) -> None:
    mm = src.mm
    if not src.is_cow_mapping:
        _copy_entries(dst, src, cow=False)
        return
    event = MMU_NOTIFY_CLEAR if src.is_hugetlb else MMU_NOTIFY_PROTECTION_PAGE
    with invalidation(mm, event, src.start, src.end):
        _copy_entries(dst, src, cow=True)


def _copy_entries(dst: Vma, src: Vma, cow: bool) -> None:
    machine = src.mm.machine
    phys = machine.phys
    spt = src.mm.pt
    dpt = dst.mm.pt
    slots = spt.walk(src.start_vpn, src.npages).slots()
    if not len(slots):
        return
    excl = slots.kinds == KIND_DEVICE_EXCLUSIVE
    if excl.any():
        # Device-exclusive entries are made present again and copied as such
        # (the device learns of it through the fork's own invalidation).
        for loc, pfn in zip(slots.locs[excl].tolist(), slots.pfns[excl].tolist(), strict=True):
            spt.set(loc, make_present(pfn, write=True, dirty=True, young=False))
        slots = spt.walk(src.start_vpn, src.npages).slots()
    entries = slots.entries
    levels = slots.levels
    kinds = slots.kinds
    pfns = slots.pfns  # huge leaves carry their head pfn
    vpns = slots.vpns
    slocs = slots.locs
    child = entries.copy()
    parent = entries.copy()

    present = (kinds == KIND_PRESENT) | (kinds == KIND_PROTNONE)
    mapped = present | (kinds == KIND_DEVICE_PRIVATE)
    normal = mapped & ((entries & U64(PTE_SPECIAL)) == 0) & ~phys.zero_mask(pfns)
    heads = np.zeros(len(pfns), dtype=_I64)
    heads[normal] = phys.head_of(pfns[normal])
    anon = np.zeros(len(pfns), dtype=np.bool_)
    anon[normal] = (phys.flags[heads[normal]] & PG_anon) != 0
    copy_now = np.zeros(len(pfns), dtype=np.bool_)
    if cow and anon.any():
        # An exclusive anon page that may be DMA-pinned gets copied for the
        # child now (folio_try_dup_anon_rmap failing); plain references don't.
        ai = np.flatnonzero(anon & present)
        pinned = np.array([phys.pins.get(int(h), 0) > 0 for h in heads[ai]], dtype=np.bool_)
        excl = (phys.flags[pfns[ai]] & PG_anon_exclusive) != 0
        copy_now[ai] = pinned & excl & (levels[ai] == LEVEL_PTE)
    share = normal & ~copy_now
    if share.any():
        np.add.at(phys.mapcount, heads[share], 1)
        np.add.at(phys.refcount, heads[share], 1)
    if cow:
        wp = anon & ~copy_now
        parent[wp & present] &= ~U64(PTE_WRITE)
        child[wp & present] &= ~U64(PTE_WRITE)
        for i in np.flatnonzero(wp).tolist():
            nr = 1 << (0 if levels[i] == LEVEL_PTE else PMD_ORDER if levels[i] == LEVEL_PMD else 18)
            p = int(pfns[i])
            phys.flags[p : p + nr] &= np.uint16(~PG_anon_exclusive & 0xFFFF)
        parent = softleaf_entries_readonly(parent)
        child = softleaf_entries_readonly(child)
    swapped = kinds == KIND_SWAP
    if swapped.any():
        machine.swap.dup(pfns[swapped])
    for i in np.flatnonzero(copy_now).tolist():
        try:
            new = phys.alloc_one(0)
        except OutOfMemory:
            raise OutOfMemory("fork: no memory to copy a pinned page") from None
        phys.copy_pages(np.array([new], dtype=_I64), np.array([pfns[i]], dtype=_I64))
        folio_add_new_anon_rmap(
            machine, dst, np.array([new], dtype=_I64), np.array([vpns[i]], dtype=_I64), 0
        )
        child[i] = make_present(new, write=bool(entries[i] & U64(PTE_WRITE)), dirty=True)
    changed = parent != entries
    spt.flat[slocs[changed]] = parent[changed]
    # Child page tables: leaves one by one, PTEs in one scatter.
    small = levels == LEVEL_PTE
    if small.any():
        dpt.flat[dpt.ensure_pte_locs(vpns[small])] = child[small]
    for i in np.flatnonzero(~small).tolist():
        vpn = int(vpns[i])
        dloc = (
            dpt.pmd_loc(vpn, alloc=True) if levels[i] == LEVEL_PMD else dpt.pud_loc(vpn, alloc=True)
        )
        dpt.set(dloc, int(child[i]))
    machine.costs.pte_writes += int(changed.sum()) + len(child)
