"""Get and pin user pages: ``get_user_pages``, ``pin_user_pages`` and ``FOLL_*``.

Kernel counterpart: mm/gup.c (``__get_user_pages``, ``check_vma_flags``,
``check_and_migrate_movable_pages``) and include/linux/mm_types.h for the flags.

GUP is the opposite of HMM: it faults pages in and takes a reference (FOLL_GET)
or a pin (FOLL_PIN) on each, so the pages can no longer be migrated, swapped
or collapsed. It never hands out device-private pages (the fault migrates
them back first), refuses VM_IO/VM_PFNMAP VMAs, hands out PCI P2PDMA pages
only with FOLL_PCI_P2PDMA, and for FOLL_LONGTERM moves device-coherent pages
to system RAM before pinning. A read-only pin of an anonymous page that is
not exclusive first unshares it (a private copy), so the pin stays coherent
with the process's view across fork.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import numpy as np

from . import sched
from .errors import (
    BadAddress,
    Busy,
    HardwarePoison,
    InvalidArgument,
    KernelBug,
    OutOfMemory,
    RemoteIO,
)
from .migrate import migrate_device_coherent_folio
from .mm.fault import (
    FAULT_FLAG_REMOTE,
    FAULT_FLAG_UNSHARE,
    FAULT_FLAG_WRITE,
    VM_FAULT_ERROR,
    VM_FAULT_HWPOISON,
    VM_FAULT_HWPOISON_LARGE,
    VM_FAULT_OOM,
    handle_mm_fault,
    populate_range,
)
from .mm.memremap import MEMORY_DEVICE_COHERENT, MEMORY_DEVICE_PCI_P2PDMA
from .mm.pagetable import (
    KIND_NONE,
    KIND_PRESENT,
    LEVEL_PTE,
    PAGE_SHIFT,
    PAGE_SIZE,
    PTE_SPECIAL,
    PTE_WRITE,
    U64,
    pte_kind,
    pte_pfn,
)
from .mm.physmem import PG_anon, PG_anon_exclusive
from .mm.reclaim import direct_reclaim
from .mm.thp import split_huge_pmd, thp_vma_allowable
from .mm.vma import VM_IO, VM_PFNMAP, VM_READ, VM_WRITE

if TYPE_CHECKING:
    from .machine import Machine
    from .mm.address_space import AddressSpace

FOLL_WRITE: Final = 1 << 0
FOLL_GET: Final = 1 << 1
FOLL_DUMP: Final = 1 << 2
FOLL_FORCE: Final = 1 << 3
FOLL_NOWAIT: Final = 1 << 4
FOLL_NOFAULT: Final = 1 << 5
FOLL_HWPOISON: Final = 1 << 6
FOLL_ANON: Final = 1 << 7
FOLL_LONGTERM: Final = 1 << 8
FOLL_SPLIT_PMD: Final = 1 << 9
FOLL_PCI_P2PDMA: Final = 1 << 10
FOLL_INTERRUPTIBLE: Final = 1 << 11
FOLL_HONOR_NUMA_FAULT: Final = 1 << 12
# Internal flags (mm/internal.h): callers passing them are refused.
FOLL_TOUCH: Final = 1 << 16
FOLL_TRIED: Final = 1 << 17
FOLL_REMOTE: Final = 1 << 18
FOLL_PIN: Final = 1 << 19
FOLL_FAST_ONLY: Final = 1 << 20
FOLL_UNLOCKABLE: Final = 1 << 21
FOLL_MADV_POPULATE: Final = 1 << 22

_PUBLIC: Final = (1 << 13) - 1
_INTERNAL: Final = (
    FOLL_TOUCH
    | FOLL_TRIED
    | FOLL_REMOTE
    | FOLL_PIN
    | FOLL_FAST_ONLY
    | (FOLL_UNLOCKABLE | FOLL_MADV_POPULATE)
)
#: How often a page may be faulted and found wanting before GUP gives up.
_MAX_TRIES: Final = 16
#: Fewer pages than this go page by page: the vectorised step's fixed cost is
#: that of about ten pages followed one at a time.
_RUN_MIN: Final = 16


def get_user_pages(mm: AddressSpace, start: int, nr_pages: int, gup_flags: int) -> list[int]:
    """Fault in and reference ``nr_pages`` pages from ``start``; returns their pfns.

    Returns fewer pages than asked when a later page fails (as the kernel's
    return count does); raises when the first one fails. Release each page
    with ``put_page``.
    """
    if gup_flags & FOLL_LONGTERM:
        raise InvalidArgument("FOLL_LONGTERM is only valid with pin_user_pages")
    return _gup(mm, start, nr_pages, gup_flags, FOLL_GET)


def pin_user_pages(mm: AddressSpace, start: int, nr_pages: int, gup_flags: int) -> list[int]:
    """As ``get_user_pages`` but pins (FOLL_PIN); release with ``unpin_user_page``."""
    if gup_flags & FOLL_GET:
        raise InvalidArgument("pin_user_pages does not take FOLL_GET")
    if gup_flags & FOLL_LONGTERM and gup_flags & FOLL_PCI_P2PDMA:
        # is_valid_gup_args: a P2PDMA pgmap must stay hot-unpluggable, so it
        # can never be pinned long-term (WARN_ON_ONCE, -EINVAL).
        mm.machine.warn(
            "gup",
            "is_valid_gup_args",
            "FOLL_LONGTERM with FOLL_PCI_P2PDMA",
            f"start {start:#x}, {nr_pages} pages",
        )
        raise InvalidArgument("FOLL_LONGTERM cannot be combined with FOLL_PCI_P2PDMA")
    return _gup(mm, start, nr_pages, gup_flags, FOLL_PIN)


def _gup(mm: AddressSpace, start: int, nr_pages: int, gup_flags: int, mode: int) -> list[int]:
    if gup_flags & _INTERNAL or gup_flags & ~(_PUBLIC | FOLL_GET):
        raise InvalidArgument(f"GUP flags {gup_flags:#x} include internal or unknown bits")
    if nr_pages <= 0 or start % PAGE_SIZE:
        raise InvalidArgument("GUP needs a page-aligned start and nr_pages > 0")
    mm.mmap_lock.assert_held()
    machine = mm.machine
    pages: list[int] = []
    vpn = start >> PAGE_SHIFT
    end = vpn + nr_pages
    while vpn < end:
        # Every page that needs nothing at once; the first that does, page by page.
        if end - vpn >= _RUN_MIN:
            vpn += _follow_run(mm, vpn, end - vpn, gup_flags, mode, pages)
        if vpn >= end:
            break
        try:
            pfn = _follow_and_fault(mm, vpn << PAGE_SHIFT, gup_flags, mode)
        except (BadAddress, OutOfMemory, RemoteIO, HardwarePoison):
            if pages:
                return pages
            raise
        _take(machine, pfn, mode)
        pages.append(pfn)
        vpn += 1
    if mode == FOLL_PIN and gup_flags & FOLL_LONGTERM:
        pages = _longterm_pinnable(mm, start, pages, gup_flags)
    return pages


def _follow_run(
    mm: AddressSpace, vpn: int, nr_pages: int, gup_flags: int, mode: int, pages: list[int]
) -> int:
    """The pages from ``vpn`` that ``_follow_and_fault`` would return at once, taken
    in one vectorised step and appended to ``pages``; returns how many.

    Empty pages at the start of the run in an anonymous VMA that THP does not
    back are first faulted in with ``populate_range`` (what ``__mm_populate``
    does with GUP in the kernel), unless a scheduler explores interleavings
    (each fault is a scheduling point there), ``FOLL_NOFAULT`` forbids it or
    ``FOLL_DUMP`` stops at the first zero page a read fault maps. The
    run stops before the first page that needs anything else (a write fault,
    an unshare, a PMD split, a special or device page, an error): that page
    takes the page-by-page path, so every outcome, error and partial count is
    the one the page-by-page loop gives.
    """
    vma = mm.find_vma(vpn << PAGE_SHIFT)
    if vma is None or vma.start > vpn << PAGE_SHIFT:
        return 0
    try:
        _check_vma(mm, vpn << PAGE_SHIFT, gup_flags)
    except BadAddress:
        return 0
    n = min(nr_pages, vma.end_vpn - vpn)
    if n <= 0:
        return 0
    write = bool(gup_flags & FOLL_WRITE)
    pt = mm.pt
    walk = pt.walk(vpn, n)
    kinds = walk.kinds
    if (
        kinds[0] == KIND_NONE
        and not gup_flags & (FOLL_NOFAULT | FOLL_DUMP)
        and sched.active() is None
        and vma.is_anonymous
        and not vma.is_hugetlb
        and not vma.flags & (VM_IO | VM_PFNMAP)
        and not thp_vma_allowable(vma)
    ):
        filled = np.flatnonzero(kinds != KIND_NONE)
        k = int(filled[0]) if len(filled) else n
        populate_range(vma, vpn, k, write)  # a failure stops it where the slow path will
        walk = pt.walk(vpn, n)
        kinds = walk.kinds
    entries = walk.entries
    phys = mm.machine.phys
    ok = kinds == KIND_PRESENT
    if write:
        ok &= (entries & U64(PTE_WRITE)) != 0
    pfns = walk.pfns()
    pfns = np.where(ok, pfns, 0)
    ok &= pfns < phys.ram_pages  # device memory: the page-by-page checks
    zero = phys.zero_mask(pfns)
    ok &= ((entries & U64(PTE_SPECIAL)) == 0) | zero
    if gup_flags & FOLL_DUMP:
        ok &= ~zero
    if gup_flags & FOLL_SPLIT_PMD and not vma.is_hugetlb:
        ok &= walk.level == LEVEL_PTE
    if mode == FOLL_PIN and not write:
        fl = phys.flags[pfns]
        ok &= ((fl & PG_anon) == 0) | ((fl & PG_anon_exclusive) != 0)
    bad = np.flatnonzero(~ok)
    k = int(bad[0]) if len(bad) else n
    if k == 0:
        return 0
    got = pfns[:k]
    heads = phys.head_of(got[~zero[:k]])
    if len(heads):
        if (phys.refcount[heads] <= 0).any():
            raise KernelBug("GUP: a mapped page with no reference")
        if phys.order[heads].any():  # pages of one large folio share a head
            uniq, counts = np.unique(heads, return_counts=True)
        else:  # order-0 pages: distinct heads, one reference each
            uniq, counts = heads, np.ones(len(heads), dtype=np.int64)
        np.add.at(phys.refcount, uniq, counts.astype(phys.refcount.dtype))
        extra = phys.extra_refs
        for h, c in zip(uniq.tolist(), counts.tolist(), strict=True):
            extra[h] = extra.get(h, 0) + c
        if mode == FOLL_PIN:
            pins = phys.pins
            for h, c in zip(uniq.tolist(), counts.tolist(), strict=True):
                pins[h] = pins.get(h, 0) + c
    pages.extend(got.tolist())
    return k


def _take(machine: Machine, pfn: int, mode: int) -> None:
    phys = machine.phys
    if phys.is_zero_pfn(pfn):
        return  # the zero page is never counted
    head = phys.get_page(pfn)
    if mode == FOLL_PIN:
        phys.pins[head] = phys.pins.get(head, 0) + 1


def put_page(machine: Machine, pfn: int) -> None:
    """Release a page taken with ``get_user_pages``."""
    if not machine.phys.is_zero_pfn(pfn):
        machine.phys.put_page(pfn)


def unpin_user_page(machine: Machine, pfn: int) -> None:
    """Release a page pinned with ``pin_user_pages``.

    Raises:
        InvalidArgument: ``pfn`` is not a frame of this machine, or not pinned.
    """
    phys = machine.phys
    if not phys.valid_pfn(pfn):
        raise InvalidArgument(f"unpin_user_page: pfn {pfn:#x} is not a frame of this machine")
    if phys.is_zero_pfn(pfn):
        return
    head = phys.head(pfn)
    pins = phys.pins.get(head, 0)
    if pins <= 0:
        raise InvalidArgument(f"unpin_user_page: {pfn:#x} is not pinned")
    if pins == 1:
        del phys.pins[head]
    else:
        phys.pins[head] = pins - 1
    phys.put_page(pfn)


def unpin_user_pages(machine: Machine, pfns: list[int]) -> None:
    for pfn in pfns:
        unpin_user_page(machine, pfn)


def folio_maybe_dma_pinned(machine: Machine, pfn: int) -> bool:
    return machine.phys.pins.get(machine.phys.head(pfn), 0) > 0


def _check_vma(mm: AddressSpace, addr: int, gup_flags: int):  # type: ignore[no-untyped-def]
    vma = mm.find_vma(addr)
    if vma is None:
        raise BadAddress(f"GUP: no mapping at {addr:#x}")
    if vma.flags & (VM_IO | VM_PFNMAP):
        raise BadAddress(f"GUP: {vma} is VM_IO/VM_PFNMAP")
    forced_cow = bool(gup_flags & FOLL_FORCE) and vma.is_cow_mapping
    if gup_flags & FOLL_WRITE and not vma.flags & VM_WRITE and not forced_cow:
        raise BadAddress(f"GUP: write to read-only {vma}")
    if not gup_flags & FOLL_WRITE and not vma.flags & VM_READ and not gup_flags & FOLL_FORCE:
        raise BadAddress(f"GUP: read from unreadable {vma}")
    if gup_flags & FOLL_ANON and not vma.is_anonymous:
        raise BadAddress(f"GUP: FOLL_ANON on {vma}")
    return vma


def _follow_and_fault(mm: AddressSpace, addr: int, gup_flags: int, mode: int) -> int:
    """``follow_page`` + ``faultin_page`` until the page is there as asked."""
    machine = mm.machine
    phys = machine.phys
    write = bool(gup_flags & FOLL_WRITE)
    for _ in range(_MAX_TRIES):
        vma = _check_vma(mm, addr, gup_flags)
        vpn = addr >> PAGE_SHIFT
        loc, e, level = mm.pt.lookup(vpn)
        fault_flags = 0
        if loc >= 0 and pte_kind(e) == KIND_PRESENT:
            if gup_flags & FOLL_SPLIT_PMD and level != LEVEL_PTE and not vma.is_hugetlb:
                split_huge_pmd(vma, vpn)
                continue
            pfn = pte_pfn(e) + (vpn & ((1 << (9 * level)) - 1) if level else 0)
            if e & PTE_SPECIAL and not phys.is_zero_pfn(pfn):
                raise BadAddress(f"GUP: {addr:#x} maps a special (pfn-only) page")
            if write and not e & PTE_WRITE:
                fault_flags = FAULT_FLAG_WRITE
            elif (
                mode == FOLL_PIN
                and not write
                and phys.flags[pfn] & PG_anon
                and not phys.flags[pfn] & PG_anon_exclusive
            ):
                fault_flags = FAULT_FLAG_UNSHARE  # pin a private copy, not a shared page
            else:
                if phys.is_zero_pfn(pfn) and gup_flags & FOLL_DUMP:
                    raise BadAddress(f"GUP: {addr:#x} is the zero page (FOLL_DUMP)")
                pgmap = phys.pgmap_of(pfn)
                if (
                    pgmap is not None
                    and pgmap.type == MEMORY_DEVICE_PCI_P2PDMA
                    and not (gup_flags & FOLL_PCI_P2PDMA)
                ):
                    raise RemoteIO(f"GUP: {addr:#x} is PCI P2PDMA memory")
                return pfn
        else:
            fault_flags = FAULT_FLAG_WRITE if write else 0
        if gup_flags & FOLL_NOFAULT:
            raise BadAddress(f"GUP: {addr:#x} needs a fault (FOLL_NOFAULT)")
        failures = phys.order0_failures
        ret = handle_mm_fault(vma, addr, fault_flags | FAULT_FLAG_REMOTE)
        if ret & VM_FAULT_ERROR:
            if ret & VM_FAULT_OOM:
                if direct_reclaim(machine, 1, since=failures):
                    continue  # RAM ran out; reclaim freed some: fault again
                raise OutOfMemory(f"GUP: out of memory faulting {addr:#x}")
            if ret & (VM_FAULT_HWPOISON | VM_FAULT_HWPOISON_LARGE) and gup_flags & FOLL_HWPOISON:
                raise HardwarePoison(f"GUP: {addr:#x} is poisoned")
            raise BadAddress(f"GUP: fault at {addr:#x} failed ({ret:#x})")
    raise BadAddress(f"GUP: {addr:#x} kept changing under the fault")


def _longterm_pinnable(mm: AddressSpace, start: int, pages: list[int], gup_flags: int) -> list[int]:
    """``check_and_migrate_movable_pages``: no device-coherent page may be pinned long."""
    machine = mm.machine
    phys = machine.phys
    coherent = [
        p
        for p in pages
        if (pg := phys.pgmap_of(p)) is not None and pg.type == MEMORY_DEVICE_COHERENT
    ]
    if not coherent:
        return pages
    unpin_user_pages(machine, pages)
    for pfn in coherent:
        migrate_device_coherent_folio(machine, phys.head(pfn))  # Busy if it cannot move
    again = _gup(mm, start, len(pages), gup_flags & ~FOLL_LONGTERM, FOLL_PIN)
    if any(
        (pg := phys.pgmap_of(p)) is not None and pg.type == MEMORY_DEVICE_COHERENT for p in again
    ):
        unpin_user_pages(machine, again)
        raise Busy("GUP: device-coherent pages came back before they could be pinned")
    return again


__all__ = [
    "FOLL_ANON",
    "FOLL_DUMP",
    "FOLL_FORCE",
    "FOLL_GET",
    "FOLL_HONOR_NUMA_FAULT",
    "FOLL_HWPOISON",
    "FOLL_INTERRUPTIBLE",
    "FOLL_LONGTERM",
    "FOLL_NOFAULT",
    "FOLL_NOWAIT",
    "FOLL_PCI_P2PDMA",
    "FOLL_PIN",
    "FOLL_SPLIT_PMD",
    "FOLL_WRITE",
    "folio_maybe_dma_pinned",
    "get_user_pages",
    "pin_user_pages",
    "put_page",
    "unpin_user_page",
    "unpin_user_pages",
]
