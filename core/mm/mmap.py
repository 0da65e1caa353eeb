"""Creating, splitting, merging, removing and moving VMAs: mmap, munmap, mremap.

Kernel counterpart: mm/mmap.c and mm/vma.c (``do_mmap``, ``mmap_region``,
``get_unmapped_area``, ``__split_vma``, ``vma_merge``, ``do_vmi_munmap``),
mm/mremap.c (``mremap``, ``move_vma``, ``move_page_tables``).

Every function here expects the caller (``Process``) to hold ``mmap_lock``
for write and to have validated the arguments' basic shape; each one checks
everything that can fail before it changes anything, so that a failed call
leaves no VMA, page or event behind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import AlreadyExists, BadAddress, InvalidArgument, OutOfMemory
from ..notifier import MMU_NOTIFY_UNMAP, invalidation
from .fault import populate_range
from .hugetlb import ResvMap
from .pagetable import (
    LEVEL_PMD,
    LEVEL_PTE,
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_ORDER,
    PMD_PAGES,
    PMD_SIZE,
    is_table_pointer,
    pfn_of,
)
from .rmap import anon_vma_clone, unlink_anon_vmas
from .thp import split_huge_pmd
from .uapi import (
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_HUGE_MASK,
    MAP_HUGE_SHIFT,
    MAP_HUGETLB,
    MAP_KNOWN_FLAGS,
    MAP_NORESERVE,
    MAP_POPULATE,
    MAP_PRIVATE,
    MAP_SHARED,
    MAP_SHARED_VALIDATE,
    MAP_TYPE,
    MMAP_BASE,
    MMAP_MIN_ADDR,
    MREMAP_DONTUNMAP,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PROT_EXEC,
    PROT_MASK,
    PROT_READ,
    PROT_WRITE,
    TASK_SIZE,
)
from .vma import (
    VM_ACCOUNT,
    VM_DONTEXPAND,
    VM_EXEC,
    VM_HUGETLB,
    VM_MAYEXEC,
    VM_MAYREAD,
    VM_MAYSHARE,
    VM_MAYWRITE,
    VM_NORESERVE,
    VM_PFNMAP,
    VM_READ,
    VM_SHARED,
    VM_SPECIAL,
    VM_WRITE,
    Vma,
)
from .zap import zap_range

if TYPE_CHECKING:
    from .address_space import AddressSpace

HUGE_SIZE_ORDERS = {21: PMD_ORDER, 30: 18}


def page_align(n: int) -> int:
    return (n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def prot_to_vm_flags(prot: int) -> int:
    flags = 0
    if prot & PROT_READ:
        flags |= VM_READ
    if prot & PROT_WRITE:
        flags |= VM_WRITE
    if prot & PROT_EXEC:
        flags |= VM_EXEC
    return flags


def check_range(addr: int, length: int, what: str) -> None:
    if addr % PAGE_SIZE:
        raise InvalidArgument(f"{what}: address {addr:#x} is not page aligned")
    if length < 0 or addr < 0:
        raise InvalidArgument(f"{what}: negative address or length")
    if addr + page_align(length) > TASK_SIZE or page_align(length) < length:
        raise InvalidArgument(f"{what}: [{addr:#x}, +{length:#x}) overflows the address space")


def hugetlb_order_from_flags(flags: int) -> int:
    code = (flags >> MAP_HUGE_SHIFT) & MAP_HUGE_MASK
    if code == 0:
        return PMD_ORDER
    if code not in HUGE_SIZE_ORDERS:
        raise InvalidArgument(f"MAP_HUGETLB page size 2^{code} is not supported")
    return HUGE_SIZE_ORDERS[code]


# ----- address space layout -------------------------------------------------------


def get_unmapped_area(mm: AddressSpace, hint: int, length: int, align: int) -> int:
    """A free, ``align``-aligned range of ``length`` bytes: the hint, else top-down."""
    if hint:
        hint = (hint + align - 1) & ~(align - 1)
        if (
            hint >= MMAP_MIN_ADDR
            and hint + length <= TASK_SIZE
            and not mm.vmas.intersecting(hint, hint + length)
        ):
            return hint
    for lo, hi in mm.vmas.gaps(MMAP_MIN_ADDR, MMAP_BASE):
        cand = (hi - length) & ~(align - 1)
        if hi - length >= lo and cand >= lo:
            return cand
    raise OutOfMemory(f"no free area of {length:#x} bytes in the address space")


# ----- VMA set manipulation ------------------------------------------------------


def split_vma(vma: Vma, addr: int) -> Vma:
    """``__split_vma``: ``vma`` keeps [start, addr); the returned VMA gets [addr, end).

    A THP straddling ``addr`` has its PMD split first (``CLEAR``).
    """
    if not vma.start < addr < vma.end:
        raise AssertionError("split outside the VMA")
    if vma.is_hugetlb and addr % vma.huge_page_size:
        raise InvalidArgument(f"{addr:#x} splits a hugetlb page of {vma}")
    vpn = addr >> PAGE_SHIFT
    if vpn & (PMD_PAGES - 1) and not vma.is_hugetlb:
        split_huge_pmd(vma, vpn)
    mm = vma.mm
    new = vma.copy(addr, vma.end, vma.pgoff + ((addr - vma.start) >> PAGE_SHIFT))
    anon_vma_clone(new, vma)
    new.link_file()
    mm.vmas.remove(vma)
    vma.end = addr
    mm.vmas.insert(vma)
    mm.vmas.insert(new)
    return new


def isolate_range(mm: AddressSpace, start: int, end: int) -> list[Vma]:
    """Split VMAs so that [start, end) is covered by whole VMAs; return them."""
    out = []
    for vma in mm.vmas.intersecting(start, end):
        if vma.start < start:
            vma = split_vma(vma, start)
        if vma.end > end:
            split_vma(vma, end)
        out.append(vma)
    return out


def check_hugetlb_boundaries(mm: AddressSpace, start: int, end: int) -> None:
    """Fail with EINVAL (before any change) if [start, end) cuts a huge page."""
    for vma in mm.vmas.intersecting(start, end):
        if vma.is_hugetlb:
            for edge in (start, end):
                if vma.start < edge < vma.end and edge % vma.huge_page_size:
                    raise InvalidArgument(f"{edge:#x} is not aligned to the huge pages of {vma}")


def _anon_compatible(a: Vma, b: Vma) -> bool:
    return (
        a.anon_vma is None
        or b.anon_vma is None
        or (a.anon_vma is b.anon_vma and a.anon_chain == b.anon_chain)
    )


def can_merge(a: Vma, b: Vma) -> bool:
    """``a`` ends where ``b`` starts and the two could be one VMA."""
    return (
        a.end == b.start
        and a.flags == b.flags
        and not a.flags & VM_SPECIAL
        and a.file is b.file
        and a.vm_ops is b.vm_ops
        and a.hugetlb_order == b.hugetlb_order
        and a.hugetlb_resv is b.hugetlb_resv
        and a.pgoff + a.npages == b.pgoff
        and _anon_compatible(a, b)
    )


def _absorb(a: Vma, b: Vma) -> None:
    """Merge ``b`` into ``a`` (``a`` precedes ``b``)."""
    mm = a.mm
    if a.anon_vma is None and b.anon_vma is not None:
        anon_vma_clone(a, b)
    mm.vmas.remove(b)
    unlink_anon_vmas(b)
    b.unlink_file()
    mm.vmas.remove(a)
    a.end = b.end
    mm.vmas.insert(a)


def try_merge(vma: Vma) -> Vma:
    """Merge ``vma`` with compatible neighbours (``vma_merge``); returns the survivor."""
    mm = vma.mm
    prev, nxt = mm.vmas.neighbours(vma)
    left = prev if prev is not None and can_merge(prev, vma) else None
    right = nxt if nxt is not None and can_merge(vma, nxt) else None
    if left is not None and right is not None and not _anon_compatible(left, right):
        right = None  # Linux merges with the previous VMA when not with both
    if right is not None:
        _absorb(vma, right)
    if left is not None:
        _absorb(left, vma)
        return left
    return vma


def remove_vma(vma: Vma) -> None:
    """Drop a VMA whose entries are already gone."""
    mm = vma.mm
    mm.vmas.remove(vma)
    unlink_anon_vmas(vma)
    vma.unlink_file()
    if vma.hugetlb_resv is not None:
        lo = vma.pgoff >> vma.hugetlb_order
        vma.hugetlb_resv.release(lo, lo + (vma.npages >> vma.hugetlb_order))


def unmap_vma(vma: Vma) -> None:
    """UNMAP-invalidate, zap and remove one whole VMA."""
    with invalidation(vma.mm, MMU_NOTIFY_UNMAP, vma.start, vma.end):
        zap_range(vma, vma.start_vpn, vma.npages)
    remove_vma(vma)


def free_page_tables(mm: AddressSpace, start: int, end: int) -> None:
    """``free_pgtables``: drop PTE tables of 2 MiB regions no VMA uses any more."""
    lo = start & ~(PMD_SIZE - 1)
    hi = (end + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    for chunk in range(lo, hi, PMD_SIZE):
        if not mm.vmas.intersecting(chunk, chunk + PMD_SIZE):
            mm.pt.free_empty_pte_tables(chunk >> PAGE_SHIFT, PMD_PAGES)


# ----- mmap / munmap ---------------------------------------------------------------


def do_munmap(mm: AddressSpace, addr: int, length: int) -> None:
    check_range(addr, length, "munmap")
    if length == 0:
        raise InvalidArgument("munmap: zero length")
    end = addr + page_align(length)
    check_hugetlb_boundaries(mm, addr, end)
    for vma in isolate_range(mm, addr, end):
        unmap_vma(vma)
    free_page_tables(mm, addr, end)


def do_mmap(
    mm: AddressSpace,
    addr: int,
    length: int,
    prot: int,
    flags: int,
    file: Any,
    offset: int,
) -> int:
    """``do_mmap``: create a mapping and return its address."""
    if length <= 0:
        raise InvalidArgument(f"mmap: length {length} must be positive")
    if prot & ~PROT_MASK:
        raise InvalidArgument(f"mmap: unknown prot bits {prot & ~PROT_MASK:#x}")
    if flags & ~MAP_KNOWN_FLAGS:
        raise InvalidArgument(f"mmap: unknown flags {flags & ~MAP_KNOWN_FLAGS:#x}")
    maptype = flags & MAP_TYPE
    if maptype not in (MAP_SHARED, MAP_PRIVATE, MAP_SHARED_VALIDATE):
        raise InvalidArgument("mmap: exactly one of MAP_SHARED and MAP_PRIVATE is required")
    shared = maptype != MAP_PRIVATE
    if offset % PAGE_SIZE or offset < 0:
        raise InvalidArgument(f"mmap: offset {offset:#x} is not page aligned")
    anonymous = file is None
    if not anonymous and flags & 0x20:
        raise InvalidArgument("mmap: MAP_ANONYMOUS with a file")
    hugetlb_order = 0
    if flags & MAP_HUGETLB:
        if not anonymous:
            raise InvalidArgument("mmap: MAP_HUGETLB is for anonymous mappings")
        hugetlb_order = hugetlb_order_from_flags(flags)
    elif (flags >> MAP_HUGE_SHIFT) & MAP_HUGE_MASK:
        raise InvalidArgument("mmap: a MAP_HUGE_* size without MAP_HUGETLB")
    align = PAGE_SIZE << hugetlb_order
    size = (length + align - 1) & ~(align - 1)
    if size > TASK_SIZE - MMAP_MIN_ADDR:
        raise OutOfMemory(f"mmap: length {length:#x} is larger than the address space")
    if flags & (MAP_FIXED | MAP_FIXED_NOREPLACE):
        if addr % align:
            raise InvalidArgument(f"mmap: fixed address {addr:#x} is not aligned to {align:#x}")
        if addr < MMAP_MIN_ADDR or addr + size > TASK_SIZE:
            raise OutOfMemory(f"mmap: fixed range [{addr:#x}, +{size:#x}) is outside user space")
        if (
            flags & MAP_FIXED_NOREPLACE
            and not flags & MAP_FIXED
            and mm.vmas.intersecting(addr, addr + size)
        ):
            raise AlreadyExists(f"mmap: [{addr:#x}, +{size:#x}) is already mapped")
        check_hugetlb_boundaries(mm, addr, addr + size)
        start = addr
    else:
        if anonymous and not shared and not hugetlb_order and size % PMD_SIZE == 0 and not addr:
            align = PMD_SIZE  # THP-friendly placement of anonymous memory
        start = get_unmapped_area(mm, addr & ~(PAGE_SIZE - 1), size, align)

    vm_flags = prot_to_vm_flags(prot) | VM_MAYREAD | VM_MAYWRITE | VM_MAYEXEC
    if shared:
        vm_flags |= VM_SHARED | VM_MAYSHARE
    if flags & MAP_NORESERVE:
        vm_flags |= VM_NORESERVE
    if not hugetlb_order and (vm_flags & (VM_NORESERVE | VM_SHARED | VM_WRITE)) == VM_WRITE:
        vm_flags |= VM_ACCOUNT  # accountable_mapping: committed private writable memory
    machine = mm.machine
    resv = None
    backing = file
    pgoff = offset >> PAGE_SHIFT
    if hugetlb_order:
        vm_flags |= VM_HUGETLB | VM_DONTEXPAND
        pool = machine.hugetlb[hugetlb_order]
        nhuge = size >> (PAGE_SHIFT + hugetlb_order)
        resv = ResvMap(pool)
        if not flags & MAP_NORESERVE:
            resv.reserve(list(range(nhuge)))  # ENOMEM before anything is created
        if shared:
            backing = machine.create_hugetlbfs_file(size, hugetlb_order)
            backing.hugetlb_resv = resv
            resv = None
        pgoff = 0
    elif anonymous and shared:
        backing = machine.create_shmem(size)
        pgoff = 0
    elif anonymous:
        pgoff = start >> PAGE_SHIFT

    if flags & MAP_FIXED:
        replaced = isolate_range(mm, start, start + size)
        for old in replaced:
            unmap_vma(old)
        if replaced:
            # As munmap: page tables no VMA uses any more go (free_pgtables).
            free_page_tables(mm, start, start + size)
    vma = Vma(
        mm,
        start,
        start + size,
        vm_flags,
        pgoff,
        file=backing,
        hugetlb_order=hugetlb_order,
        hugetlb_resv=resv,
    )
    mm.vmas.insert(vma)
    if backing is not None:
        try:
            backing.mmap(vma)
        except BaseException:
            mm.vmas.remove(vma)
            vma.unlink_file()
            raise
    if flags & MAP_POPULATE:
        # mm_populate: errors are ignored, as in Linux.
        write = (vma.flags & (VM_WRITE | VM_SHARED)) == VM_WRITE
        populate_range(vma, vma.start_vpn, vma.npages, write)
    try_merge(vma)
    return start


# ----- mremap --------------------------------------------------------------------


def move_page_tables(old: Vma, new: Vma, npages: int) -> None:
    """Move the entries of ``old``'s first ``npages`` pages to ``new.start``.

    PMD leaves move whole when source and destination are congruent modulo
    2 MiB; otherwise they are split first. Mapcounts do not change: the same
    pages are mapped, at a new address.
    """
    mm = old.mm
    pt = mm.pt
    src = old.start_vpn
    dst = new.start_vpn
    hugetlb = old.is_hugetlb
    congruent = (src - dst) % PMD_PAGES == 0
    if not hugetlb and not congruent:
        for first, _level, _loc, _e in pt.walk(src, npages).leaves():
            split_huge_pmd(old, max(first, src))
    walk = pt.walk(src, npages)
    # Huge leaves move whole (their destination is congruent, or hugetlb-aligned).
    for first, level, loc, e in walk.leaves():
        dvpn = dst + first - src
        dloc = pt.pmd_loc(dvpn, alloc=True) if level == LEVEL_PMD else pt.pud_loc(dvpn, alloc=True)
        existing = pt.get(dloc)
        if existing and is_table_pointer(existing):
            pt.set(dloc, 0)
            pt.free_table(pfn_of(existing))
        pt.set(dloc, e)
        pt.set(loc, 0)
    levels = walk.level
    entries = walk.entries
    locs = walk.loc
    small = (levels == LEVEL_PTE) & (entries != 0)
    if small.any():
        idx = np.flatnonzero(small)
        dlocs = pt.ensure_ptes(dst, npages)[idx]
        pt.flat[dlocs] = entries[idx]
        pt.flat[locs[idx]] = 0
    mm.machine.costs.pte_writes += int((entries != 0).sum())


def move_vma(vma: Vma, new_addr: int, new_len: int, dontunmap: bool) -> Vma:
    """Move the whole of ``vma`` to ``new_addr`` (growing it to ``new_len``)."""
    mm = vma.mm
    new = vma.copy(new_addr, new_addr + new_len, vma.pgoff)
    anon_vma_clone(new, vma)
    new.link_file()
    mm.vmas.insert(new)
    with invalidation(mm, MMU_NOTIFY_UNMAP, vma.start, vma.end):
        move_page_tables(vma, new, vma.npages)
    # With MREMAP_DONTUNMAP the old VMA stays, empty: later faults fill it afresh.
    if not dontunmap:
        mm.vmas.remove(vma)
        unlink_anon_vmas(vma)
        vma.unlink_file()
        free_page_tables(mm, vma.start, vma.end)
    return try_merge(new)


def do_mremap(
    mm: AddressSpace, old: int, old_len: int, new_len: int, flags: int, new_addr: int | None
) -> int:
    """``mremap(2)``: shrink, grow in place, or move a mapping."""
    if old % PAGE_SIZE:
        raise InvalidArgument(f"mremap: address {old:#x} is not page aligned")
    if flags & ~(MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP):
        raise InvalidArgument(f"mremap: unknown flags {flags:#x}")
    if flags & (MREMAP_FIXED | MREMAP_DONTUNMAP) and not flags & MREMAP_MAYMOVE:
        raise InvalidArgument("mremap: MREMAP_FIXED/DONTUNMAP need MREMAP_MAYMOVE")
    if flags & MREMAP_DONTUNMAP and old_len != new_len:
        raise InvalidArgument("mremap: MREMAP_DONTUNMAP needs old_len == new_len")
    if new_len <= 0 or old_len < 0:
        raise InvalidArgument("mremap: new_len must be positive")
    old_len = page_align(old_len)
    new_len = page_align(new_len)
    if old + old_len > TASK_SIZE or new_len > TASK_SIZE:
        raise InvalidArgument("mremap: range overflows the address space")
    if flags & MREMAP_FIXED:
        if new_addr is None or new_addr % PAGE_SIZE:
            raise InvalidArgument("mremap: MREMAP_FIXED needs a page-aligned new_addr")
        if new_addr < old + max(old_len, 1) and old < new_addr + new_len:
            raise InvalidArgument("mremap: old and new ranges overlap")
        if new_addr < MMAP_MIN_ADDR or new_addr + new_len > TASK_SIZE:
            raise InvalidArgument("mremap: new range is outside user space")
    vma = mm.vmas.find(old)
    if vma is None or old + old_len > vma.end:
        raise BadAddress(f"mremap: [{old:#x}, +{old_len:#x}) is not within one mapping")
    if old_len == 0:
        if not vma.is_shared:
            raise InvalidArgument("mremap: old_len 0 duplicates only shared mappings")
        if not flags & MREMAP_MAYMOVE:
            raise OutOfMemory("mremap: duplicating a mapping needs MREMAP_MAYMOVE")
    if vma.is_hugetlb and (
        old_len != new_len or old % vma.huge_page_size or (new_addr or 0) % vma.huge_page_size
    ):
        raise InvalidArgument("mremap: hugetlb mappings only move, huge-page aligned")
    if new_len > old_len and vma.flags & (VM_DONTEXPAND | VM_PFNMAP):
        raise BadAddress(f"mremap: {vma} cannot be expanded")
    dontunmap = bool(flags & MREMAP_DONTUNMAP)
    if dontunmap and (vma.flags & (VM_DONTEXPAND | VM_PFNMAP) or vma.is_hugetlb):
        raise InvalidArgument("mremap: MREMAP_DONTUNMAP of a special or hugetlb mapping")

    if old_len == 0:
        start = get_unmapped_area(mm, new_addr or 0, new_len, PAGE_SIZE)
        dup = Vma(
            mm,
            start,
            start + new_len,
            vma.flags,
            vma.pgoff + ((old - vma.start) >> PAGE_SHIFT),
            file=vma.file,
            vm_ops=vma.vm_ops,
        )
        mm.vmas.insert(dup)
        dup.link_file()
        return start

    if flags & MREMAP_FIXED:
        assert new_addr is not None
        check_hugetlb_boundaries(mm, new_addr, new_addr + new_len)
        for victim in isolate_range(mm, new_addr, new_addr + new_len):
            unmap_vma(victim)
        if new_len < old_len:
            do_munmap(mm, old + new_len, old_len - new_len)
            old_len = new_len
        piece = isolate_range(mm, old, old + old_len)[0]
        moved = move_vma(piece, new_addr, new_len, dontunmap)
        return moved.start if moved.start == new_addr else new_addr

    if new_len < old_len:
        do_munmap(mm, old + new_len, old_len - new_len)
        return old
    if new_len == old_len and not dontunmap:
        return old
    if (
        not dontunmap
        and old + old_len == vma.end
        and not mm.vmas.intersecting(vma.end, old + new_len)
        and old + new_len <= TASK_SIZE
    ):
        mm.vmas.remove(vma)
        vma.end = old + new_len
        mm.vmas.insert(vma)
        try_merge(vma)
        return old
    if not flags & MREMAP_MAYMOVE:
        raise OutOfMemory(f"mremap: cannot grow {vma} in place")
    align = vma.huge_page_size if vma.is_hugetlb else PAGE_SIZE
    if vma.is_anonymous and not vma.is_shared and new_len % PMD_SIZE == 0:
        align = PMD_SIZE
    dest = get_unmapped_area(mm, 0, new_len, align)
    piece = isolate_range(mm, old, old + old_len)[0]
    move_vma(piece, dest, new_len, dontunmap)
    return dest


def change_flags(vma: Vma, new_flags: int) -> Vma:
    """Set ``vma.flags`` and merge with neighbours if that makes them equal."""
    vma.flags = new_flags
    return try_merge(vma)


def check_fully_mapped(mm: AddressSpace, start: int, end: int, what: str) -> list[Vma]:
    vmas = mm.vmas.intersecting(start, end)
    pos = start
    for vma in vmas:
        if vma.start > pos:
            break
        pos = vma.end
    if pos < end:
        raise OutOfMemory(f"{what}: [{start:#x}, {end:#x}) is not fully mapped")
    return vmas
