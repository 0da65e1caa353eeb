"""Creating, splitting, merging, removing and moving VMAs: mmap, munmap, mremap.

Kernel counterpart: mm/mmap.c and mm/vma.c (``do_mmap``, ``mmap_region``,
``get_unmapped_area``, ``__split_vma``, ``vma_merge``, ``do_vmi_munmap``),
mm/mremap.c (``mremap``, ``move_vma``, ``move_page_tables``).

Every function here expects the caller (``Process``) to hold ``mmap_lock``
for write and to have validated the arguments' basic shape; each one checks
everything that can fail before it changes anything, so that a failed call
leaves no VMA, page or event behind. The exceptions are Linux's own: a
``MAP_FIXED`` mmap whose backing object refuses the mapping has already
unmapped the old range, and an ``MREMAP_FIXED`` move to a target below
``vm.mmap_min_addr`` has already unmapped the target and shrunk the source.

Unmapping a range (munmap, the ``MAP_FIXED`` and ``MREMAP_FIXED`` targets, the
source of a move) always ends with ``free_page_tables``, so that no page
table of a range without VMAs outlives it: a later huge mapping there finds
empty PMD/PUD slots, as in Linux.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import (
    AlreadyExists,
    BadAddress,
    BadFileDescriptor,
    InvalidArgument,
    KernelBug,
    NotPermitted,
    NotSupported,
    OutOfMemory,
    Overflow,
)
from ..notifier import MMU_NOTIFY_UNMAP, invalidation
from .fault import populate_range
from .hugetlb import ResvMap, clear_vma_resv_huge_pages, hold_hugetlbfs_objects
from .pagetable import (
    LEVEL_PMD,
    LEVEL_PTE,
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_ORDER,
    PMD_PAGES,
    PMD_SIZE,
    is_table_pointer,
    pte_pfn,
)
from .rmap import anon_vma_clone, unlink_anon_vmas
from .thp import split_huge_pmd
from .uapi import (
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_GROWSDOWN,
    MAP_HUGE_MASK,
    MAP_HUGE_SHIFT,
    MAP_HUGETLB,
    MAP_LOCKED,
    MAP_NONBLOCK,
    MAP_NORESERVE,
    MAP_POPULATE,
    MAP_PRIVATE,
    MAP_SHARED,
    MAP_SHARED_VALIDATE,
    MAP_SYNC,
    MAP_TYPE,
    MMAP_BASE,
    MREMAP_DONTUNMAP,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
    TASK_SIZE,
)
from .vma import (
    VM_ACCESS_FLAGS,
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
    from .pagetable import PageTable

HUGE_SIZE_ORDERS = {21: PMD_ORDER, 30: 18}
#: Top of what the page tables can map (48 bits): the ``ceiling`` of
#: ``free_pgtables`` when no VMA lies above.
USER_PGTABLES_CEILING = 1 << 48
#: ``MAX_LFS_FILESIZE``: no file offset reaches 2^63 (EOVERFLOW).
MAX_LFS_FILESIZE = (1 << 63) - 1
#: ``LEGACY_MAP_MASK``: the flags ``MAP_SHARED_VALIDATE`` accepts (others: EOPNOTSUPP).
LEGACY_MAP_MASK = (
    MAP_SHARED
    | MAP_PRIVATE
    | MAP_FIXED
    | MAP_ANONYMOUS
    | 0x40  # MAP_32BIT
    | 0x80  # MAP_ABOVE4G
    | MAP_GROWSDOWN
    | 0x800  # MAP_DENYWRITE
    | 0x1000  # MAP_EXECUTABLE
    | MAP_LOCKED
    | MAP_NORESERVE
    | MAP_POPULATE
    | MAP_NONBLOCK
    | 0x20000  # MAP_STACK
    | MAP_HUGETLB
    | MAP_SYNC
    | MAP_FIXED_NOREPLACE
    | 0x4000000  # MAP_UNINITIALIZED
    # MAP_HUGE_2MB | MAP_HUGE_1GB: the size bits 26-30 (bit 31 is not in the mask).
    | (21 << 26)
    | (30 << 26)
)


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
            hint >= mm.machine.config.mmap_min_addr
            and hint + length <= TASK_SIZE
            and not mm.vmas.intersecting(hint, hint + length)
        ):
            return hint
    for lo, hi in mm.vmas.gaps(mm.machine.config.mmap_min_addr, MMAP_BASE):
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
        raise KernelBug("split outside the VMA")
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


def check_unmap_splits(mm: AddressSpace, start: int, end: int) -> None:
    """Fail with EINVAL where unmapping [start, end) would cut a huge page.

    As ``vms_gather_munmap_vmas``: the VMA at ``start`` is split first, so
    when only the end cuts a huge page, that first split has happened when
    the call fails (Linux does not undo it).
    """
    first = mm.vmas.find(start)
    cut_first = first is not None and first.start < start
    if cut_first and first is not None and first.is_hugetlb and start % first.huge_page_size:
        raise InvalidArgument(f"{start:#x} is not aligned to the huge pages of {first}")
    last = mm.vmas.find(end - 1)
    if last is not None and last.end > end and last.is_hugetlb and end % last.huge_page_size:
        if cut_first and first is not None:
            split_vma(first, start)
        raise InvalidArgument(f"{end:#x} is not aligned to the huge pages of {last}")


def _anon_compatible(a: Vma, b: Vma) -> bool:
    """``is_mergeable_anon_vma``: a VMA without an anon_vma joins one only if
    that one's chain is a single link (``vma_had_uncowed_parents``: a chain
    inherited through fork is never widened by a merge)."""
    if a.anon_vma is None:
        return b.anon_vma is None or len(b.anon_chain) == 1
    if b.anon_vma is None:
        return len(a.anon_chain) == 1
    return a.anon_vma is b.anon_vma and a.anon_chain == b.anon_chain


def can_merge(a: Vma, b: Vma, *, extending: bool = False) -> bool:
    """``a`` ends where ``b`` starts and the two could be one VMA.

    ``extending``: ``a`` has just grown in place up to ``b`` (``mremap``
    expanding, ``vma_merge_extend``). The kernel merges that as a new range
    with no source VMA and nothing copied from, so an anon_vma ``a`` brings
    to a ``b`` without one is always acceptable (``is_mergeable_anon_vma``
    case 1 checks only a source's or copied-from VMA's fork chain), even if
    ``a`` was inherited through fork.
    """
    if extending and a.anon_vma is not None and b.anon_vma is None:
        anon_ok = True
    else:
        anon_ok = _anon_compatible(a, b)
    return (
        a.end == b.start
        and a.flags == b.flags
        and not a.flags & VM_SPECIAL
        and a.file is b.file
        and a.vm_ops is b.vm_ops
        and a.hugetlb_order == b.hugetlb_order
        and a.hugetlb_resv is b.hugetlb_resv
        and a.pgoff + a.npages == b.pgoff
        and anon_ok
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
    """``free_pgtables`` after [start, end) lost its VMAs.

    Frees the page tables that served only the gap between the VMAs left
    around the range (``floor``: the end of the one below, ``ceiling``: the
    start of the one above), as ``free_pgd_range`` does: a later mapping there
    starts from empty upper levels, so a huge page can be mapped at the PMD or
    PUD level. Only tables that exist are visited.
    """
    floor, ceiling = mm.vmas.bounds_around(start, end)
    top = USER_PGTABLES_CEILING if ceiling is None else max(ceiling, end)
    mm.pt.free_tables(
        start >> PAGE_SHIFT, end >> PAGE_SHIFT, floor >> PAGE_SHIFT, top >> PAGE_SHIFT
    )


def unmap_range(mm: AddressSpace, start: int, end: int) -> None:
    """``do_vmi_munmap``: remove every VMA piece of [start, end) and its page tables.

    Only the splits can fail (EINVAL where a boundary cuts a huge page), and
    they all happen before anything is unmapped.
    """
    for vma in isolate_range(mm, start, end):
        unmap_vma(vma)
    free_page_tables(mm, start, end)


# ----- mmap / munmap ---------------------------------------------------------------


def do_munmap(mm: AddressSpace, addr: int, length: int) -> None:
    """``munmap(2)``: unmap [addr, addr + length) and free the page tables it used.

    The cost follows the VMAs and page tables that exist in the range, not
    its length (an empty 1 TiB range is one short walk of the upper tables).
    An end that cuts a huge page is EINVAL after the VMA at ``addr`` has been
    split there, as in Linux (``vms_gather_munmap_vmas`` splits the first VMA
    before it reaches the last): nothing is unmapped, the split stays.
    """
    check_range(addr, length, "munmap")
    if length == 0:
        raise InvalidArgument("munmap: zero length")
    end = addr + page_align(length)
    unmap_range(mm, addr, end)


def accountable(flags: int) -> int:
    """``flags`` with ``VM_ACCOUNT`` added if the mapping is charged as private
    writable memory (``accountable_mapping``): private, writable, not
    ``VM_NORESERVE``, not hugetlb (which has its own reservations).

    The flag stays when write permission is later removed from memory that
    has faulted (``mprotect_account``), so such a mapping does not merge with
    a never-writable neighbour, as in Linux.
    """
    if (flags & (VM_NORESERVE | VM_SHARED | VM_WRITE | VM_HUGETLB)) == VM_WRITE:
        return flags | VM_ACCOUNT
    return flags


def mprotect_account(vma: Vma, new_flags: int) -> int:
    """``VM_ACCOUNT`` across an mprotect to ``new_flags`` (``mprotect_fixup``).

    Becoming writable charges the mapping (``accountable``); becoming
    read-only drops the charge only for anonymous memory that never faulted
    (no anon_vma): otherwise the flag stays.
    """
    if new_flags & VM_WRITE:
        return accountable(new_flags)
    if new_flags & VM_ACCOUNT and vma.is_anonymous and vma.anon_vma is None:
        return new_flags & ~VM_ACCOUNT
    return new_flags


def _check_mmap_flags(flags: int, anonymous: bool, offset: int, size: int) -> bool:
    """Validate the mapping type and flags as ``do_mmap``; returns ``shared``.

    Unknown legacy flags are ignored, as Linux ignores them. The model also
    ignores ``MAP_32BIT``, ``MAP_GROWSDOWN`` of anonymous memory and
    ``MAP_STACK`` (placement and stack growth, which it does not model);
    ``MAP_LOCKED`` populates the mapping as Linux does, without an mlock
    count. ``MAP_SHARED_VALIDATE`` is the exception: there an unknown flag is
    ``EOPNOTSUPP``.
    """
    maptype = flags & MAP_TYPE
    if anonymous:
        if maptype not in (MAP_SHARED, MAP_PRIVATE):
            raise InvalidArgument(f"mmap: mapping type {maptype:#x} for anonymous memory")
        return maptype == MAP_SHARED
    if offset < 0 or offset + size > MAX_LFS_FILESIZE:
        raise Overflow(f"mmap: offset {offset:#x} + {size:#x} is past the largest file")
    if maptype not in (MAP_SHARED, MAP_PRIVATE, MAP_SHARED_VALIDATE):
        raise InvalidArgument(f"mmap: mapping type {maptype:#x}")
    if maptype == MAP_SHARED_VALIDATE and flags & (~LEGACY_MAP_MASK | MAP_SYNC):
        raise NotSupported(f"mmap: flags {flags:#x} are not supported for this file")
    if flags & MAP_GROWSDOWN:
        raise InvalidArgument("mmap: MAP_GROWSDOWN of a file mapping")
    return maptype != MAP_PRIVATE


def do_mmap(
    mm: AddressSpace,
    addr: int,
    length: int,
    prot: int,
    flags: int,
    file: Any,
    offset: int,
) -> int:
    """``do_mmap``: create a mapping and return its address.

    ``file=None`` needs ``MAP_ANONYMOUS`` (else ``EBADF``: no file
    descriptor). Only the read/write/exec bits of ``prot`` count; the others
    are ignored, as Linux ignores them. ``MAP_FIXED`` first unmaps whatever
    was in the range, page tables included (``mmap_region``); if the backing
    object's ``mmap`` then fails (a hugetlb mapping's reservation included:
    ENOMEM), the old mapping stays gone, as in Linux. ``MAP_POPULATE``
    (without ``MAP_NONBLOCK``) or ``MAP_LOCKED`` faults the new range in
    after the VMA has merged with its neighbours, and populates nothing in a
    ``PROT_NONE`` mapping (``populate_vma_page_range`` skips inaccessible
    VMAs).
    """
    if offset % PAGE_SIZE:
        raise InvalidArgument(f"mmap: offset {offset:#x} is not page aligned")
    anonymous = bool(flags & MAP_ANONYMOUS)
    if file is None and not anonymous:
        raise BadFileDescriptor("mmap: neither a file nor MAP_ANONYMOUS")
    if anonymous and file is not None:
        raise InvalidArgument("mmap: MAP_ANONYMOUS with a file")
    if length <= 0:
        raise InvalidArgument(f"mmap: length {length} must be positive")
    hugetlb_order = 0
    if flags & MAP_HUGETLB:
        if not anonymous:
            raise InvalidArgument("mmap: MAP_HUGETLB is for anonymous mappings")
        hugetlb_order = hugetlb_order_from_flags(flags)
    align = PAGE_SIZE << hugetlb_order
    size = (length + align - 1) & ~(align - 1)
    if size > TASK_SIZE - mm.machine.config.mmap_min_addr:
        raise OutOfMemory(f"mmap: length {length:#x} is larger than the address space")
    shared = _check_mmap_flags(flags, anonymous, offset, size)
    if flags & (MAP_FIXED | MAP_FIXED_NOREPLACE):
        if addr < 0 or addr + size > TASK_SIZE:
            raise OutOfMemory(f"mmap: fixed range [{addr:#x}, +{size:#x}) is outside user space")
        if addr % align:
            raise InvalidArgument(f"mmap: fixed address {addr:#x} is not aligned to {align:#x}")
        if addr < mm.machine.config.mmap_min_addr:
            raise NotPermitted(f"mmap: {addr:#x} is below vm.mmap_min_addr")
        if (
            flags & MAP_FIXED_NOREPLACE
            and not flags & MAP_FIXED
            and mm.vmas.intersecting(addr, addr + size)
        ):
            raise AlreadyExists(f"mmap: [{addr:#x}, +{size:#x}) is already mapped")
        check_unmap_splits(mm, addr, addr + size)
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
        # hugetlb_reserve_pages runs after MAP_FIXED has cleared and closed the
        # old mappings (their private pages and reservations count as free
        # again) but before it drops their files: on ENOMEM the old mappings
        # are gone, as in Linux.
        old = mm.vmas.intersecting(start, start + size) if flags & MAP_FIXED else []
        with hold_hugetlbfs_objects(old):
            if flags & MAP_FIXED:
                unmap_range(mm, start, start + size)
            if not flags & MAP_NORESERVE:
                resv.reserve(list(range(nhuge)))
        if shared:
            backing = machine.create_hugetlbfs_file(size, hugetlb_order)
            backing.hugetlb_resv = resv
            resv = None
        elif flags & MAP_NORESERVE:
            resv = None  # no reservation, so not its owner (no HPAGE_RESV_OWNER)
        pgoff = 0
    elif anonymous and shared:
        backing = machine.create_shmem(size)
        pgoff = 0
    elif anonymous:
        pgoff = start >> PAGE_SHIFT
    vm_flags = accountable(vm_flags)

    if flags & MAP_FIXED and not hugetlb_order:
        unmap_range(mm, start, start + size)
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
            # unmap_region: undo a partial mapping the driver made (pages it
            # installed with vm_insert_page/remap_pfn_range) before the VMA goes.
            with invalidation(mm, MMU_NOTIFY_UNMAP, vma.start, vma.end):
                zap_range(vma, vma.start_vpn, vma.npages)
            mm.vmas.remove(vma)
            vma.unlink_file()
            free_page_tables(mm, vma.start, vma.end)
            raise
    vma = try_merge(vma)
    populate = (flags & (MAP_POPULATE | MAP_NONBLOCK)) == MAP_POPULATE or flags & MAP_LOCKED
    if populate and vma.flags & VM_ACCESS_FLAGS:
        # mm_populate: errors are ignored, as in Linux.
        write = (vma.flags & (VM_WRITE | VM_SHARED)) == VM_WRITE
        populate_range(vma, start >> PAGE_SHIFT, size >> PAGE_SHIFT, write)
    return start


# ----- mremap --------------------------------------------------------------------


def move_page_tables(old: Vma, new: Vma, npages: int) -> None:
    """Move the entries of ``old``'s first ``npages`` pages to ``new.start``.

    PMD leaves move whole when source and destination are congruent modulo
    2 MiB; otherwise they are split first. A whole 2 MiB extent whose source
    and destination are both aligned moves its PTE table itself when the
    destination has none (``move_normal_pmd``): the source PMD is left empty,
    not pointing at an empty table, so after ``MREMAP_DONTUNMAP`` a fault in
    the VMA left behind may map a THP there again. Mapcounts do not change:
    the same pages are mapped, at a new address. Only the destination PTE
    tables of chunks that receive PTEs are allocated, so a range holding both
    PMD-mapped THPs and PTE-mapped pages moves in one pass.

    An unaligned start is realigned down to 2 MiB first when the move
    reaches the next boundary and nothing is mapped between the boundary and
    the start on either side (``try_realign_addr``): the first table then
    moves whole too, and the VMA left behind has no table below that
    boundary (a mapping later made in front of it can take a THP there).
    """
    mm = old.mm
    pt = mm.pt
    src = old.start_vpn
    dst = new.start_vpn
    hugetlb = old.is_hugetlb
    congruent = (src - dst) % PMD_PAGES == 0
    if not hugetlb and congruent:
        start = src
        if src % PMD_PAGES and _can_realign(mm, src, dst, npages):
            start = src & ~(PMD_PAGES - 1)
        _move_pte_tables(pt, start, dst - src, src + npages)
    for lo, hi in pt.spans(src, src + npages):
        if not hugetlb and not congruent:
            for first, _level, _loc, _e in pt.walk(lo, hi - lo, per_page=False).leaves():
                split_huge_pmd(old, max(first, lo))
        walk = pt.walk(lo, hi - lo)
        # Huge leaves move whole (their destination is congruent, or hugetlb-aligned).
        for first, level, loc, e in walk.leaves():
            dvpn = dst + first - src
            if level == LEVEL_PMD:
                dloc = pt.pmd_loc(dvpn, alloc=True)
            else:
                dloc = pt.pud_loc(dvpn, alloc=True)
            existing = pt.get(dloc)
            if existing and is_table_pointer(existing):
                pt.set(dloc, 0)
                pt.free_table(pte_pfn(existing))
            pt.set(dloc, e)
            pt.set(loc, 0)
        small = np.flatnonzero((walk.level == LEVEL_PTE) & (walk.entries != 0))
        if len(small):
            dlocs = pt.ensure_pte_locs(dst + (lo - src) + small.astype(np.int64))
            pt.flat[dlocs] = walk.entries[small]
            pt.flat[walk.loc[small]] = 0
        mm.machine.costs.pte_writes += int((walk.entries != 0).sum())


def _can_realign(mm: AddressSpace, src: int, dst: int, npages: int) -> bool:
    """``can_realign_addr`` at PMD level for a move from ``src`` to congruent ``dst``.

    The moved range must reach the next 2 MiB boundary, and no VMA may lie
    between the boundary below and the start, at the source or at the
    destination (the old VMA starts at ``src``: a piece of a VMA split there
    has its other part just below, which counts as such a VMA).
    """
    if npages < PMD_PAGES - src % PMD_PAGES:
        return False
    for start in (src, dst):
        below = start & ~(PMD_PAGES - 1)
        if mm.vmas.intersecting(below << PAGE_SHIFT, start << PAGE_SHIFT):
            return False
    return True


def _move_pte_tables(pt: PageTable, first: int, delta: int, end: int) -> None:
    """``move_normal_pmd`` over the whole aligned 2 MiB extents of a move.

    The extents start at ``first`` (rounded up to 2 MiB) and end by ``end``;
    each moves by ``delta`` pages, a multiple of 2 MiB. A source PMD pointing
    at a PTE table moves to an empty destination PMD as is (an occupied one
    makes the kernel fall back to moving PTEs, as the caller then does).
    """
    lo = (first + PMD_PAGES - 1) & ~(PMD_PAGES - 1)
    hi = end & ~(PMD_PAGES - 1)
    for a, b in pt.spans(lo, hi):
        _move_pte_tables_in(pt, a, b, delta)


def _move_pte_tables_in(pt: PageTable, lo: int, hi: int, delta: int) -> None:
    """The tables of the aligned extents [lo, hi) move by ``delta`` pages."""
    for vpn in range(lo, hi, PMD_PAGES):
        loc = pt.pmd_loc(vpn)
        if loc < 0:
            continue
        e = pt.get(loc)
        if not e or not is_table_pointer(e):
            continue
        dloc = pt.pmd_loc(vpn + delta, alloc=True)
        if pt.get(dloc):
            continue
        pt.set(dloc, e)
        pt.set(loc, 0)


def move_vma(
    vma: Vma,
    new_addr: int,
    new_len: int,
    dontunmap: bool,
    *,
    whole: bool = False,
    cut_from: tuple[int, int] | None = None,
) -> Vma:
    """Move the whole of ``vma`` to ``new_addr`` (growing it to ``new_len``).

    An anonymous VMA that never faulted (no anon_vma) takes the linear page
    offset of its new address, as ``copy_vma`` does, so that it can merge
    with anonymous neighbours there. With ``MREMAP_DONTUNMAP``, when the
    moved range was a whole VMA (``whole``, decided before the range was cut
    out), the VMA left behind loses its anon_vma links, as
    ``dontunmap_complete`` unlinks them: its page tables went with the move,
    so a later read fault maps the zero page without an anon_vma and fork
    copies nothing of it. ``cut_from`` is the extent of the VMA the moved
    range was cut out of: what is left behind joins only that VMA's rest.
    """
    mm = vma.mm
    pgoff = vma.pgoff
    if vma.is_anonymous and not vma.is_shared and not vma.is_hugetlb and vma.anon_vma is None:
        # (A private hugetlb VMA keeps its offset: in Linux it has a hugetlbfs
        # file, and its reservations are indexed by that offset.)
        pgoff = new_addr >> PAGE_SHIFT
    new = vma.copy(new_addr, new_addr + new_len, pgoff)
    anon_vma_clone(new, vma)
    new.link_file()
    mm.vmas.insert(new)
    with invalidation(mm, MMU_NOTIFY_UNMAP, vma.start, vma.end):
        move_page_tables(vma, new, vma.npages)
    # With MREMAP_DONTUNMAP the old VMA stays, empty: later faults fill it
    # afresh. Linux never splits it (only the final unmap would), so a
    # piece cut out of a VMA joins its remainder again; a whole VMA was not
    # cut and merges with nothing (dontunmap_complete merges nothing, even
    # where losing its anon_vma made it compatible with a neighbour).
    if dontunmap:
        if whole:
            unlink_anon_vmas(vma)
        elif cut_from is not None:
            _rejoin(vma, *cut_from)
    else:
        mm.vmas.remove(vma)
        unlink_anon_vmas(vma)
        vma.unlink_file()
        free_page_tables(mm, vma.start, vma.end)
    return try_merge(new)


def _move_range(
    mm: AddressSpace, lo: int, hi: int, target: int, new_len: int, dontunmap: bool
) -> Vma:
    """Move [lo, hi), which one VMA maps, to ``target`` as ``new_len`` bytes.

    The VMA is looked up now: unmapping the target may have split it. What
    is left of it around the moved piece loses its hugetlb reservations
    (``clear_vma_resv_huge_pages``).
    """
    cur = mm.vmas.intersecting(lo, lo + 1)[0]
    cut_from = (cur.start, cur.end)
    piece = isolate_range(mm, lo, hi)[0]
    rest = [v for v in mm.vmas.intersecting(*cut_from) if v is not piece]
    whole = cut_from == (lo, hi)
    new = move_vma(piece, target, new_len, dontunmap, whole=whole, cut_from=cut_from)
    clear_vma_resv_huge_pages(rest)
    return new


def _rejoin(piece: Vma, start: int, end: int) -> None:
    """Merge ``piece`` back with the rest of the VMA [start, end) it was cut from."""
    prev, nxt = piece.mm.vmas.neighbours(piece)
    if nxt is not None and nxt.end <= end and can_merge(piece, nxt):
        _absorb(piece, nxt)
    if prev is not None and prev.start >= start and can_merge(prev, piece):
        _absorb(prev, piece)


def _check_mremap_params(
    old: int, old_len: int, new_len: int, flags: int, new_addr: int | None
) -> tuple[int, int, int]:
    """``check_mremap_params``: the argument checks; returns the page-aligned
    lengths and the new address (0 when none was given)."""
    if flags & ~(MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP):
        raise InvalidArgument(f"mremap: unknown flags {flags:#x}")
    if old % PAGE_SIZE:
        raise InvalidArgument(f"mremap: address {old:#x} is not page aligned")
    if flags & (MREMAP_FIXED | MREMAP_DONTUNMAP) and not flags & MREMAP_MAYMOVE:
        raise InvalidArgument("mremap: MREMAP_FIXED/DONTUNMAP need MREMAP_MAYMOVE")
    if old_len < 0 or new_len < 0 or old < 0:
        raise InvalidArgument("mremap: negative address or length")
    old_len = page_align(old_len)
    new_len = page_align(new_len)
    if new_len == 0 or new_len >= 1 << 64 or old_len >= 1 << 64:
        raise InvalidArgument("mremap: new_len must be positive")
    if old + old_len >= 1 << 64:
        raise InvalidArgument("mremap: old range wraps around")
    addr = 0 if new_addr is None else new_addr
    if flags & (MREMAP_FIXED | MREMAP_DONTUNMAP):
        if new_len > TASK_SIZE or addr < 0 or addr > TASK_SIZE - new_len:
            raise InvalidArgument("mremap: new range is outside user space")
        if addr % PAGE_SIZE:
            raise InvalidArgument(f"mremap: new address {addr:#x} is not page aligned")
        if addr < old + old_len and old < addr + new_len:
            raise InvalidArgument("mremap: old and new ranges overlap")
        if flags & MREMAP_DONTUNMAP and old_len != new_len:
            raise InvalidArgument("mremap: MREMAP_DONTUNMAP needs old_len == new_len")
    return old_len, new_len, addr


def _hugetlb_lengths(
    vma: Vma, old: int, old_len: int, new_len: int, addr: int, flags: int
) -> tuple[int, int]:
    """A hugetlb mapping's lengths round up to its page size; it only shrinks or moves."""
    size = vma.huge_page_size
    if old % size or (flags & MREMAP_FIXED and addr % size):
        raise InvalidArgument(f"mremap: {old:#x} or {addr:#x} is not aligned to {vma}'s pages")
    old_len = (old_len + size - 1) & ~(size - 1)
    new_len = (new_len + size - 1) & ~(size - 1)
    if new_len > old_len:
        raise InvalidArgument(f"mremap: {vma} cannot grow")
    if flags & MREMAP_DONTUNMAP:
        raise InvalidArgument("mremap: MREMAP_DONTUNMAP of a hugetlb mapping")
    return old_len, new_len


def _remap_move(mm: AddressSpace, old: int, length: int, addr: int, dontunmap: bool) -> int:
    """``remap_move`` (Linux 6.17+): ``MREMAP_FIXED`` without resizing moves
    every VMA piece of [old, old + length) to the same offset from ``addr``.

    Holes in the source stay holes (what the target has there is kept). The
    first page must be mapped (EFAULT, checked by the caller). Piece by
    piece, as Linux does: check the piece, unmap its target, move it. A piece
    that fails (EINVAL for a huge-page cut, EPERM below ``vm.mmap_min_addr``)
    leaves the pieces before it moved, as in Linux.
    """
    for vma in mm.vmas.intersecting(old, old + length):
        lo, hi = max(vma.start, old), min(vma.end, old + length)
        if vma.is_hugetlb and (lo % vma.huge_page_size or hi % vma.huge_page_size):
            raise InvalidArgument(f"mremap: [{lo:#x}, {hi:#x}) cuts the huge pages of {vma}")
        if dontunmap and vma.flags & (VM_DONTEXPAND | VM_PFNMAP):
            raise InvalidArgument(f"mremap: MREMAP_DONTUNMAP of {vma}")
        target = addr + lo - old
        check_unmap_splits(mm, target, target + hi - lo)
        unmap_range(mm, target, target + hi - lo)
        if target < mm.machine.config.mmap_min_addr:
            raise NotPermitted(f"mremap: {target:#x} is below vm.mmap_min_addr")
        _move_range(mm, lo, hi, target, hi - lo, dontunmap)
    return addr


def do_mremap(
    mm: AddressSpace, old: int, old_len: int, new_len: int, flags: int, new_addr: int | None
) -> int:
    """``mremap(2)``: shrink, grow in place, move, or duplicate a mapping.

    As in Linux 6.18: a shrink in place unmaps the tail whatever VMAs or
    holes it spans; ``MREMAP_FIXED`` without resizing moves every VMA of the
    range (6.17+); any other move or growth needs the range inside one VMA
    (EFAULT). Hugetlb lengths round up to the huge page size. With
    ``MREMAP_FIXED`` the target is unmapped (page tables included) before
    the move; Linux also shrinks the source first, so a target below
    ``vm.mmap_min_addr`` fails with EPERM after those two steps, and the model
    does the same.
    """
    old_len, new_len, addr = _check_mremap_params(old, old_len, new_len, flags, new_addr)
    fixed = bool(flags & MREMAP_FIXED)
    dontunmap = bool(flags & MREMAP_DONTUNMAP)
    if fixed and old_len == new_len:
        vma = mm.vmas.find(old)
        if vma is None:
            raise BadAddress(f"mremap: {old:#x} is not mapped")
        if vma.is_hugetlb:
            old_len, new_len = _hugetlb_lengths(vma, old, old_len, new_len, addr, flags)
            if addr < old + old_len and old < addr + new_len:
                raise InvalidArgument("mremap: old and new ranges overlap")
        if old_len:
            return _remap_move(mm, old, old_len, addr, dontunmap)
    vma = mm.vmas.find(old)
    if vma is None:
        raise BadAddress(f"mremap: {old:#x} is not mapped")
    if vma.is_hugetlb:
        old_len, new_len = _hugetlb_lengths(vma, old, old_len, new_len, addr, flags)
    if new_len < old_len and not (fixed or dontunmap):
        do_munmap(mm, old + new_len, old_len - new_len)
        return old
    if new_len == old_len and not (fixed or dontunmap):
        return old
    # check_prep_vma / resize_is_valid: one VMA from here on.
    if old_len == 0:
        if not vma.flags & (VM_SHARED | VM_MAYSHARE):
            raise InvalidArgument("mremap: old_len 0 duplicates only shared mappings")
        if not flags & MREMAP_MAYMOVE:
            raise OutOfMemory("mremap: duplicating a mapping needs MREMAP_MAYMOVE")
    # What stays mapped must lie in one VMA; a shrink's tail may cross VMAs.
    if old + min(old_len, new_len) > vma.end:
        raise BadAddress(f"mremap: [{old:#x}, +{old_len:#x}) is not within one mapping")
    if new_len > old_len and vma.flags & (VM_DONTEXPAND | VM_PFNMAP):
        raise BadAddress(f"mremap: {vma} cannot be expanded")
    if dontunmap and vma.flags & (VM_DONTEXPAND | VM_PFNMAP):
        raise InvalidArgument("mremap: MREMAP_DONTUNMAP of a special mapping")

    if fixed:
        unmap_range(mm, addr, addr + new_len)
        if new_len < old_len:
            do_munmap(mm, old + new_len, old_len - new_len)
            old_len = new_len
        if addr < mm.machine.config.mmap_min_addr:
            raise NotPermitted(f"mremap: {addr:#x} is below vm.mmap_min_addr")
        dest = addr
    elif dontunmap or new_len > old_len:
        if (
            not dontunmap
            and old + old_len == vma.end
            and not mm.vmas.intersecting(vma.end, old + new_len)
            and old + new_len <= TASK_SIZE
        ):
            mm.vmas.remove(vma)
            vma.end = old + new_len
            mm.vmas.insert(vma)
            # vma_merge_extend: only the VMA that now follows can join.
            nxt = mm.vmas.neighbours(vma)[1]
            if nxt is not None and can_merge(vma, nxt, extending=True):
                _absorb(vma, nxt)
            return old
        if not flags & MREMAP_MAYMOVE:
            raise OutOfMemory(f"mremap: cannot grow {vma} in place")
        align = vma.huge_page_size if vma.is_hugetlb else PAGE_SIZE
        if vma.is_anonymous and not vma.is_shared and new_len % PMD_SIZE == 0:
            align = PMD_SIZE
        dest = get_unmapped_area(mm, addr if dontunmap else 0, new_len, align)
    else:
        raise KernelBug("unreachable mremap case")

    if old_len == 0:
        dup = Vma(
            mm,
            dest,
            dest + new_len,
            vma.flags,
            vma.pgoff + ((old - vma.start) >> PAGE_SHIFT),
            file=vma.file,
            vm_ops=vma.vm_ops,
        )
        mm.vmas.insert(dup)
        dup.link_file()
        try_merge(dup)
        return dest
    _move_range(mm, old, old + old_len, dest, new_len, dontunmap)
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
