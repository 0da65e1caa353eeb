"""``madvise(2)``: every advice value of Linux 6.18 on x86-64.

Kernel counterpart: mm/madvise.c (``madvise_walk_vmas``,
``madvise_vma_behavior``, ``madvise_free_pte_range``,
``madvise_cold_or_pageout_pte_range``, ``madvise_populate``), mm/khugepaged.c
(``madvise_collapse``), mm/ksm.c (``ksm_madvise``) and mm/vmscan.c
(``reclaim_pages`` for MADV_PAGEOUT).

The arguments are checked in the kernel's order: an unknown advice value, a
misaligned start and a wrapping range fail with EINVAL, then a zero length
returns 0. The VMAs of the range are then visited one by one, as
``madvise_walk_vmas`` does: an advice a VMA refuses fails with that error at
once, leaving the VMAs before it advised (Linux half-applies, and so does the
model); a hole is skipped and reported as ENOMEM at the end.

What each advice does to the model:

* NORMAL, RANDOM, SEQUENTIAL, DONTFORK, DOFORK, WIPEONFORK, KEEPONFORK,
  DONTDUMP, DODUMP, MERGEABLE, UNMERGEABLE, HUGEPAGE, NOHUGEPAGE change VMA
  flags (splitting VMAs, which splits a THP straddling the cut). A VMA whose
  flags would not change is left whole. The read-ahead hints, the dump flags
  and KSM's ``VM_MERGEABLE`` change nothing else (the model has no
  read-ahead, core dumps or KSM scanner); DONTFORK and WIPEONFORK are honoured
  by ``fork``.
* WILLNEED changes no page table (it only starts read-ahead or swap-in I/O).
* DONTNEED, DONTNEED_LOCKED zap; FREE marks pages lazily freeable; COLD
  clears accessed bits; PAGEOUT reclaims; COLLAPSE builds THPs;
  POPULATE_READ/WRITE fault the range in like a read/write access.
* REMOVE punches a hole in the shared file or shmem behind the range.
* GUARD_INSTALL/GUARD_REMOVE (guard regions) are valid values the model does
  not implement: they fail with EOPNOTSUPP (``NotSupported``) rather than
  pretend to succeed; so does REMOVE on hugetlbfs and device files.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import numpy as np

from ..errors import (
    BadAddress,
    HardwarePoison,
    InvalidArgument,
    NotSupported,
    OutOfMemory,
    PermissionDenied,
)
from ..notifier import MMU_NOTIFY_CLEAR, invalidation
from .khugepaged import madvise_collapse
from .mmap import page_align, split_vma, try_merge
from .pagetable import (
    CHUNK_PMD,
    KIND_PRESENT,
    KIND_PROTNONE,
    KIND_SWAP,
    PAGE_SHIFT,
    PMD_PAGES,
    PTE_DIRTY,
    PTE_SPECIAL,
    PTE_YOUNG,
    U64,
    pte_kind,
    pte_pfn,
)
from .physmem import (
    PG_anon,
    PG_dirty,
    PG_locked,
    PG_reserved,
    PG_swapbacked,
    PG_swapcache,
    PG_zone_device,
)
from .reclaim import reclaim_folio, split_folio
from .rmap import rmap_walk
from .swap import swapcache_del
from .uapi import (
    MADV_COLD,
    MADV_COLLAPSE,
    MADV_DODUMP,
    MADV_DOFORK,
    MADV_DONTDUMP,
    MADV_DONTFORK,
    MADV_DONTNEED,
    MADV_DONTNEED_LOCKED,
    MADV_FREE,
    MADV_GUARD_INSTALL,
    MADV_GUARD_REMOVE,
    MADV_HUGEPAGE,
    MADV_KEEPONFORK,
    MADV_MERGEABLE,
    MADV_NOHUGEPAGE,
    MADV_NORMAL,
    MADV_PAGEOUT,
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
    MADV_RANDOM,
    MADV_REMOVE,
    MADV_SEQUENTIAL,
    MADV_UNMERGEABLE,
    MADV_WILLNEED,
    MADV_WIPEONFORK,
    PAGE_SIZE,
)
from .vma import (
    VM_DONTCOPY,
    VM_DONTDUMP,
    VM_DONTEXPAND,
    VM_HUGEPAGE,
    VM_IO,
    VM_LOCKED,
    VM_MAYSHARE,
    VM_MAYWRITE,
    VM_MERGEABLE,
    VM_MIXEDMAP,
    VM_NOHUGEPAGE,
    VM_PFNMAP,
    VM_RAND_READ,
    VM_READ,
    VM_SEQ_READ,
    VM_SHARED,
    VM_SPECIAL,
    VM_WIPEONFORK,
    VM_WRITE,
    Vma,
)
from .zap import zap_range

if TYPE_CHECKING:
    from .address_space import AddressSpace

#: Advice that changes VMA flags and so needs ``mmap_lock`` for write.
WRITE_LOCKED_ADVICE: Final = frozenset(
    {
        MADV_NORMAL,
        MADV_RANDOM,
        MADV_SEQUENTIAL,
        MADV_DONTFORK,
        MADV_DOFORK,
        MADV_WIPEONFORK,
        MADV_KEEPONFORK,
        MADV_DONTDUMP,
        MADV_DODUMP,
        MADV_MERGEABLE,
        MADV_UNMERGEABLE,
        MADV_HUGEPAGE,
        MADV_NOHUGEPAGE,
    }
)
#: Every advice value Linux 6.18 accepts on x86-64 (MADV_HWPOISON and
#: MADV_SOFT_OFFLINE need CONFIG_MEMORY_FAILURE and are not among them).
VALID_ADVICE: Final = WRITE_LOCKED_ADVICE | {
    MADV_WILLNEED,
    MADV_DONTNEED,
    MADV_DONTNEED_LOCKED,
    MADV_FREE,
    MADV_REMOVE,
    MADV_COLD,
    MADV_PAGEOUT,
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
    MADV_COLLAPSE,
    MADV_GUARD_INSTALL,
    MADV_GUARD_REMOVE,
}
#: Valid advice the model does not implement (EOPNOTSUPP, never a fake success).
UNMODELLED_ADVICE: Final = frozenset({MADV_GUARD_INSTALL, MADV_GUARD_REMOVE})
#: Kept for callers that list what the model implements.
SUPPORTED_ADVICE: Final = tuple(sorted(VALID_ADVICE - UNMODELLED_ADVICE))

ULONG_MASK: Final = (1 << 64) - 1


def check_advice(advice: int) -> None:
    """EINVAL for a value that is no advice at all (``madvise_behavior_valid``)."""
    if advice not in VALID_ADVICE:
        raise InvalidArgument(f"madvise: advice {advice} is not valid")


def do_madvise(mm: AddressSpace, addr: int, length: int, advice: int) -> None:
    """``madvise(2)`` over [addr, addr + length); see the module docstring."""
    addr &= ULONG_MASK
    length &= ULONG_MASK
    check_advice(advice)
    if addr % PAGE_SIZE:
        raise InvalidArgument(f"madvise: address {addr:#x} is not page aligned")
    aligned = page_align(length)
    end = addr + aligned
    if aligned > ULONG_MASK or end > ULONG_MASK:
        raise InvalidArgument(f"madvise: [{addr:#x}, +{length:#x}) wraps around")
    if end == addr:
        return
    if advice in UNMODELLED_ADVICE:
        raise NotSupported(f"madvise: advice {advice} (GUARD_INSTALL/REMOVE) is not modelled")
    if advice in (MADV_POPULATE_READ, MADV_POPULATE_WRITE):
        madvise_populate(mm, addr, end, write=advice == MADV_POPULATE_WRITE)
        return
    unmapped = False
    pos = addr
    while True:
        vma = mm.vmas.find_next(pos)
        if vma is None:
            raise OutOfMemory(f"madvise: [{pos:#x}, {end:#x}) is not mapped")
        if pos < vma.start:
            unmapped = True
            pos = vma.start
            if pos >= end:
                break
        hi = min(end, vma.end)
        _visit(vma, advice, pos, hi)
        pos = hi
        if pos >= end:
            break
    if unmapped:
        raise OutOfMemory(f"madvise: [{addr:#x}, {end:#x}) has unmapped holes")


def _visit(vma: Vma, advice: int, start: int, end: int) -> None:
    """``madvise_vma_behavior`` for [start, end) inside ``vma``."""
    if advice in WRITE_LOCKED_ADVICE:
        new_flags = _new_flags(vma, advice)
        if new_flags != vma.flags:
            if vma.start < start:
                vma = split_vma(vma, start)
            if vma.end > end:
                split_vma(vma, end)
            vma.flags = new_flags
            try_merge(vma)
        return
    lo, hi = start >> PAGE_SHIFT, end >> PAGE_SHIFT
    if advice == MADV_WILLNEED:
        return  # read-ahead / swap-in I/O only: no page table changes
    if advice in (MADV_DONTNEED, MADV_DONTNEED_LOCKED, MADV_FREE):
        forbidden = VM_PFNMAP | (0 if advice == MADV_DONTNEED_LOCKED else VM_LOCKED)
        if vma.is_hugetlb:
            if advice == MADV_FREE or start % vma.huge_page_size:
                raise InvalidArgument(f"madvise({advice}) on hugetlb {vma} at {start:#x}")
            # Round down so a caller unaware of huge pages loses no data.
            hi &= ~((1 << vma.hugetlb_order) - 1)
            if hi <= lo:
                return
        elif vma.flags & forbidden:
            raise InvalidArgument(f"madvise({advice}) on locked or PFNMAP {vma}")
        if advice == MADV_FREE:
            if not _vma_is_anonymous(vma):
                raise InvalidArgument(f"madvise(FREE) needs private anonymous memory, not {vma}")
            madvise_free(vma, lo, hi)
        else:
            with invalidation(vma.mm, MMU_NOTIFY_CLEAR, lo << PAGE_SHIFT, hi << PAGE_SHIFT):
                zap_range(vma, lo, hi - lo)
                if not vma.is_hugetlb:
                    # CONFIG_PT_RECLAIM (6.14+): a PTE table this zap covered
                    # whole and left empty is freed, so a THP can fault there.
                    vma.mm.pt.free_empty_pte_tables(lo, hi - lo)
    elif advice in (MADV_COLD, MADV_PAGEOUT):
        if vma.flags & (VM_LOCKED | VM_PFNMAP) or vma.is_hugetlb:
            raise InvalidArgument(f"madvise(COLD/PAGEOUT) on locked, PFNMAP or hugetlb {vma}")
        madvise_cold_or_pageout(vma, lo, hi, pageout=advice == MADV_PAGEOUT)
    elif advice == MADV_COLLAPSE:
        madvise_collapse(vma, lo, hi)
    elif advice == MADV_REMOVE:
        madvise_remove(vma, start, end)


def madvise_remove(vma: Vma, start: int, end: int) -> None:
    """``madvise_remove``: punch a hole in the file behind [start, end).

    EINVAL for a locked VMA or one with no file (private anonymous memory),
    EACCES unless the mapping is shared and may be written; then the file's
    pages go from the page cache and from every mapping (a later read sees
    zeros), as ``fallocate(PUNCH_HOLE | KEEP_SIZE)`` does.
    """
    if vma.flags & VM_LOCKED:
        raise InvalidArgument(f"madvise(REMOVE) on locked {vma}")
    if vma.file is None and not vma.is_hugetlb:
        raise InvalidArgument(f"madvise(REMOVE) needs a file behind {vma}")
    if not (vma.flags & VM_SHARED and vma.flags & VM_MAYWRITE):
        raise PermissionDenied(f"madvise(REMOVE) needs a shared writable mapping: {vma}")
    f = vma.page_cache
    if f is None or f.hugetlb_order:
        raise NotSupported(f"madvise(REMOVE): hole punching is not modelled for {vma}")
    f.punch_hole((start - vma.start) + (vma.pgoff << PAGE_SHIFT), end - start)


def _vma_is_anonymous(vma: Vma) -> bool:
    """``vma_is_anonymous``: private hugetlb mappings have hugetlbfs ops in Linux."""
    return vma.is_anonymous and not vma.is_hugetlb and not vma.is_shared


def _new_flags(vma: Vma, advice: int) -> int:
    """The VMA flags ``advice`` asks for; EINVAL where the VMA refuses it."""
    flags = vma.flags
    if advice == MADV_NORMAL:
        return flags & ~(VM_RAND_READ | VM_SEQ_READ)
    if advice == MADV_SEQUENTIAL:
        return (flags & ~VM_RAND_READ) | VM_SEQ_READ
    if advice == MADV_RANDOM:
        return (flags & ~VM_SEQ_READ) | VM_RAND_READ
    if advice == MADV_DONTFORK:
        return flags | VM_DONTCOPY
    if advice == MADV_DOFORK:
        if flags & VM_IO:
            raise InvalidArgument(f"madvise(DOFORK) on VM_IO {vma}")
        return flags & ~VM_DONTCOPY
    if advice == MADV_WIPEONFORK:
        if not vma.is_anonymous or vma.is_hugetlb or vma.is_shared:
            raise InvalidArgument(f"madvise(WIPEONFORK) needs private anonymous memory: {vma}")
        return flags | VM_WIPEONFORK
    if advice == MADV_KEEPONFORK:
        return flags & ~VM_WIPEONFORK
    if advice == MADV_DONTDUMP:
        return flags | VM_DONTDUMP
    if advice == MADV_DODUMP:
        if not vma.is_hugetlb and flags & VM_SPECIAL:
            raise InvalidArgument(f"madvise(DODUMP) on special {vma}")
        return flags & ~VM_DONTDUMP
    if advice == MADV_MERGEABLE:
        # ksm_madvise: VMAs KSM cannot scan are left as they are, without error.
        incompatible = VM_SHARED | VM_MAYSHARE | VM_PFNMAP | VM_IO | VM_DONTEXPAND | VM_MIXEDMAP
        if flags & incompatible or vma.is_hugetlb:
            return flags
        return flags | VM_MERGEABLE
    if advice == MADV_UNMERGEABLE:
        return flags & ~VM_MERGEABLE  # the model has no KSM pages to unmerge
    if advice == MADV_HUGEPAGE:
        return (flags & ~VM_NOHUGEPAGE) | VM_HUGEPAGE
    assert advice == MADV_NOHUGEPAGE
    return (flags & ~VM_HUGEPAGE) | VM_NOHUGEPAGE


# ----- POPULATE_READ / POPULATE_WRITE -------------------------------------------------


def madvise_populate(mm: AddressSpace, start: int, end: int, *, write: bool) -> None:
    """``madvise_populate``: fault [start, end) in as a read or write access would.

    Goes VMA by VMA, so the pages before a failure stay populated: a hole
    fails with ENOMEM, a VMA the access is not allowed on (PROT_NONE, a write
    to a read-only mapping, VM_IO/VM_PFNMAP) with EINVAL, a fault that would
    raise SIGBUS or SIGSEGV (beyond the end of a file, an empty hugetlb pool)
    with EFAULT, a poisoned page with EHWPOISON, out of memory with ENOMEM.
    """
    from .fault import (
        VM_FAULT_ERROR,
        VM_FAULT_HWPOISON,
        VM_FAULT_HWPOISON_LARGE,
        VM_FAULT_OOM,
        populate_range,
    )

    pos = start
    while pos < end:
        vma = mm.vmas.find(pos)
        if vma is None:
            raise OutOfMemory(f"madvise(POPULATE): {pos:#x} is not mapped")
        if vma.flags & (VM_IO | VM_PFNMAP):
            raise InvalidArgument(f"madvise(POPULATE) on VM_IO/VM_PFNMAP {vma}")
        if not vma.flags & (VM_WRITE if write else VM_READ):
            raise InvalidArgument(f"madvise(POPULATE): {vma} does not allow the access")
        hi = min(end, vma.end)
        ret = populate_range(vma, pos >> PAGE_SHIFT, (hi - pos) >> PAGE_SHIFT, write)
        if ret & VM_FAULT_ERROR:
            if ret & (VM_FAULT_HWPOISON | VM_FAULT_HWPOISON_LARGE):
                raise HardwarePoison(f"madvise(POPULATE): poisoned page in {vma}")
            if ret & VM_FAULT_OOM:
                raise OutOfMemory(f"madvise(POPULATE): out of memory in {vma}")
            raise BadAddress(f"madvise(POPULATE): fault in {vma} failed ({ret:#x})")
        pos = hi


# ----- FREE / COLD / PAGEOUT: the THP handling they share -------------------------------


def _pmd_leaves(vma: Vma, lo: int, hi: int, advice: int) -> list[tuple[int, int]]:
    """Deal with the PMD-mapped THPs of [lo, hi) as ``*_huge_pmd`` do.

    A huge zero PMD, a non-present PMD and a THP other processes map too are
    left alone. A THP the range covers only partly is split (folio and
    mappings; zero-filled subpages go to the shared zero page) and its pages
    then go through the PTE path; a shmem THP's split unmaps all of it. A
    THP the range covers whole is advised at the PMD level: FREE cleans it
    and makes it lazy-free, COLD ages it, PAGEOUT reclaims it. Returns the
    [lo, hi) spans the PTE path must skip.
    """
    walk = vma.mm.pt.walk(lo, hi - lo, per_page=False)
    leaves = np.flatnonzero(walk.chunk_kind == CHUNK_PMD)
    if not len(leaves):
        return []
    machine = vma.mm.machine
    phys = machine.phys
    first = lo & ~(PMD_PAGES - 1)
    skip = []
    pageout = []
    for c in leaves.tolist():
        haddr = first + c * PMD_PAGES
        clo, chi = max(lo, haddr), min(hi, haddr + PMD_PAGES)
        e = int(walk.chunk_entry[c])
        kind = pte_kind(e)
        if kind not in (KIND_PRESENT, KIND_PROTNONE) or phys.is_zero_pfn(pte_pfn(e)):
            skip.append((clo, chi))
            continue
        head = phys.head(pte_pfn(e))
        if _mapped_by_another_mm(vma, head):
            skip.append((clo, chi))
            continue
        if chi - clo < PMD_PAGES:
            if not phys.flags[head] & PG_anon:
                # A page-cache THP: split_folio unmaps it everywhere and the
                # pages fault back in small; if it cannot be split, the
                # kernel leaves the PMD as it is.
                split_folio(machine, head)
                skip.append((clo, chi))
            elif not split_folio(machine, head):
                skip.append((clo, chi))
            continue
        skip.append((clo, chi))
        loc = int(walk.chunk_loc[c])
        if advice == MADV_FREE:
            vma.mm.pt.set(loc, e & ~(PTE_DIRTY | PTE_YOUNG))
            _mark_lazyfree(phys, np.array([head], dtype=np.int64))
        elif advice == MADV_COLD:
            vma.mm.pt.set(loc, e & ~PTE_YOUNG)
        else:
            pageout.append(head)
    for head in pageout:
        reclaim_folio(machine, head, pageout=True)
    return skip


def _split_partial_large(vma: Vma, lo: int, hi: int, skip: np.ndarray) -> np.ndarray:
    """Split the large folios [lo, hi) maps only some pages of; ``skip`` widened.

    As ``madvise_folio_pte_batch`` callers do: a partly covered folio that
    other mappings share is skipped, an exclusive one is split (zero-filled
    subpages go to the shared zero page) so the advice applies to just the
    covered pages. Splitting a shmem THP unmaps all of it (``split_folio``),
    so none of its pages is left mapped for the advice.
    """
    phys = vma.mm.machine.phys
    walk = vma.mm.pt.walk(lo, hi - lo)
    kinds = walk.kinds
    normal = ((kinds == KIND_PRESENT) | (kinds == KIND_PROTNONE)) & (
        (walk.entries & U64(PTE_SPECIAL)) == 0
    )
    normal &= ~skip & (walk.level == 0)
    skip = skip.copy()
    if not normal.any():
        return skip
    idx = np.flatnonzero(normal)
    pfns = walk.pfns()[idx]
    heads = phys.head_of(pfns)
    large = phys.order[heads] > 0
    if not large.any():
        return skip
    uheads, counts = np.unique(heads[large], return_counts=True)
    nr = np.left_shift(1, phys.order[uheads].astype(np.int64))
    for head, count, n in zip(uheads.tolist(), counts.tolist(), nr.tolist(), strict=True):
        if count >= n:
            continue  # the range covers the whole folio
        if _mapped_by_another_mm(vma, head) or not split_folio(vma.mm.machine, head):
            skip[idx[heads == head]] = True
    return skip


def _mapped_by_another_mm(vma: Vma, head: int) -> bool:
    """``folio_maybe_mapped_shared``: another process maps the folio too."""
    return any(hit.vma.mm is not vma.mm for hit in rmap_walk(vma.mm.machine, head))


def _range_mask(lo: int, hi: int, spans: list[tuple[int, int]]) -> np.ndarray:
    skip = np.zeros(hi - lo, dtype=np.bool_)
    for a, b in spans:
        skip[a - lo : b - lo] = True
    return skip


def _mark_lazyfree(phys: object, heads: np.ndarray) -> None:
    """``folio_mark_lazyfree``: clean swap-backed anonymous folios stop being swap-backed."""
    flags = phys.flags  # type: ignore[attr-defined]
    ok = (flags[heads] & (PG_swapbacked | PG_swapcache)) == PG_swapbacked
    flags[heads[ok]] &= np.uint16(~PG_swapbacked & 0xFFFF)
    flags[heads] &= np.uint16(~PG_dirty & 0xFFFF)


def _normal_pages(vma: Vma, lo: int, hi: int, skip: np.ndarray):  # type: ignore[no-untyped-def]
    """Present (or PROT_NONE) PTEs of ordinary pages in [lo, hi) not in ``skip``."""
    walk = vma.mm.pt.walk(lo, hi - lo)
    kinds = walk.kinds
    sel = (kinds == KIND_PRESENT) | (kinds == KIND_PROTNONE)
    sel &= (walk.entries & U64(PTE_SPECIAL)) == 0
    sel &= ~skip
    sel &= walk.level == 0
    return walk, sel


def madvise_free(vma: Vma, lo: int, hi: int) -> None:
    """Mark anonymous pages lazily freeable; drop swap entries (``madvise_free_single_vma``).

    A lazy-free page that is still clean when reclaim finds it is discarded
    (the next read sees zeros); writing to it first keeps it. PROT_NONE pages
    are advised like accessible ones. A folio that is dirty or in the swap
    cache is only advised when this range maps all of it and nothing else
    maps it; a clean one is made lazy-free even if another process maps it
    (reclaim then discards it only where every mapping is still clean).
    """
    mm = vma.mm
    machine = mm.machine
    phys = machine.phys
    with invalidation(mm, MMU_NOTIFY_CLEAR, lo << PAGE_SHIFT, hi << PAGE_SHIFT):
        skip = _range_mask(lo, hi, _pmd_leaves(vma, lo, hi, MADV_FREE))
        walk = mm.pt.walk(lo, hi - lo)
        swapped = np.flatnonzero((walk.kinds == KIND_SWAP) & ~skip)
        for i in swapped.tolist():
            zap_range(vma, lo + i, 1)
        skip = _split_partial_large(vma, lo, hi, skip)
        walk, sel = _normal_pages(vma, lo, hi, skip)
        if not sel.any():
            return
        pfns = walk.pfns()[sel]
        locs = walk.loc[sel]
        heads = phys.head_of(pfns)
        uheads, inverse, nmaps = np.unique(heads, return_inverse=True, return_counts=True)
        fflags = phys.flags[uheads]
        ok = (fflags & PG_anon) != 0
        ok &= (fflags & (PG_locked | PG_zone_device | PG_reserved)) == 0
        busy = (fflags & (PG_dirty | PG_swapcache)) != 0
        nr = np.left_shift(1, phys.order[uheads].astype(np.int64))
        exclusive = (phys.mapcount[uheads] == nr) & (nmaps == nr)
        ok &= ~busy | exclusive
        swap = machine.swap
        for j in np.flatnonzero(ok & ((fflags & PG_swapcache) != 0)).tolist():
            # folio_free_swap: only when no swap entry still refers to the slot.
            head = int(uheads[j])
            slot = swap.slot_of.get(head)
            if slot is None or swap.count[slot] != 1:
                ok[j] = False
            else:
                swapcache_del(swap, phys, head)
        if not ok.any():
            return
        chosen = ok[inverse]
        mm.pt.flat[locs[chosen]] &= ~U64(PTE_DIRTY | PTE_YOUNG)
        machine.costs.pte_writes += int(chosen.sum())
        _mark_lazyfree(phys, uheads[ok])


def madvise_cold_or_pageout(vma: Vma, lo: int, hi: int, *, pageout: bool) -> int:
    """MADV_COLD (age) / MADV_PAGEOUT (reclaim) the exclusive folios of [lo, hi).

    Folios other mappings share are left alone, as are the zero page and
    device pages; PROT_NONE pages are advised like accessible ones. A reclaim
    that cannot free a folio (no swap, pinned) leaves it as it is and the call
    still succeeds. Returns the number of base pages freed.
    """
    machine = vma.mm.machine
    phys = machine.phys
    skip = _range_mask(lo, hi, _pmd_leaves(vma, lo, hi, MADV_PAGEOUT if pageout else MADV_COLD))
    skip = _split_partial_large(vma, lo, hi, skip)
    walk, sel = _normal_pages(vma, lo, hi, skip)
    if not sel.any():
        return 0
    pfns = walk.pfns()[sel]
    locs = walk.loc[sel]
    heads = phys.head_of(pfns)
    uheads, inverse = np.unique(heads, return_inverse=True)
    nr = np.left_shift(1, phys.order[uheads].astype(np.int64))
    ok = phys.mapcount[uheads] == nr
    ok &= (phys.flags[uheads] & (PG_zone_device | PG_reserved)) == 0
    if not pageout:
        chosen = ok[inverse]
        vma.mm.pt.flat[locs[chosen]] &= ~U64(PTE_YOUNG)
        return 0
    freed = 0
    for head in uheads[ok].tolist():
        if phys.refcount[head] > 0:
            freed += reclaim_folio(machine, head, pageout=True)
    return freed
