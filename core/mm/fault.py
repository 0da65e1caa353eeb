"""Page faults: ``handle_mm_fault`` and the batched fault path.

Kernel counterpart: mm/memory.c (``handle_mm_fault``, ``do_anonymous_page``,
``do_read_fault``/``do_cow_fault``/``do_shared_fault``, ``do_wp_page``,
``wp_page_copy``, ``do_swap_page``, ``do_numa_page``), mm/huge_memory.c
(``do_huge_pmd_anonymous_page``, ``do_huge_pmd_wp_page``) and mm/hugetlb.c
(``hugetlb_fault``, ``hugetlb_wp``).

``handle_mm_fault`` returns ``VM_FAULT_*`` bits like the kernel; it assumes
the caller checked the VMA's permissions (the arch fault handler and GUP do
that) and holds ``mmap_lock``. ``populate_range`` is the same logic applied
to a whole range at once: filling empty slots is vectorised (one batched
allocation, one scatter of PTEs, one call for all THPs of the range) and only
entries that need real work (COW, swap-in …) go through ``handle_mm_fault``
one by one. MAP_POPULATE, CPU accesses, and (later) ``hmm_range_fault`` and
GUP all fault through it.

Filling an empty slot emits no MMU-notifier event; replacing a translation
does (COW → CLEAR on one page, THP split or huge zero → THP → CLEAR on
2 MiB). Read faults on page-cache mappings fault around (``do_fault_around``):
cached neighbours in the 64 KiB window get mapped too, which is what a later
``hmm_range_fault`` snapshot of the range sees.

Target is Linux 6.18; the docstrings of ``do_huge_pmd_wp_page`` and
``_can_reuse_anon`` name the releases whose behaviour changed (6.14, 6.15).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import numpy as np
from numpy.typing import NDArray

from .. import sched
from ..errors import OutOfMemory
from ..notifier import MMU_NOTIFY_CLEAR, MMU_NOTIFY_EXCLUSIVE, invalidation
from ..trace import COST_FAULT_NS, COST_SWAP_IO_NS
from .hugetlb import alloc_hugetlb_folio, is_resv_owner
from .pagetable import (
    CHUNK_PMD,
    KIND_DEVICE_EXCLUSIVE,
    KIND_DEVICE_PRIVATE,
    KIND_HWPOISON,
    KIND_MIGRATION,
    KIND_NONE,
    KIND_PRESENT,
    KIND_PROTNONE,
    KIND_SWAP,
    PAGE_SHIFT,
    PMD_ORDER,
    PMD_PAGES,
    PTE_DIRTY,
    PTE_PRESENT,
    PTE_PROTNONE,
    PTE_SPECIAL,
    PTE_WRITE,
    PTE_YOUNG,
    PTRS_PER_TABLE,
    U64,
    is_table_pointer,
    make_present,
    make_present_array,
    pte_kind,
    pte_pfn,
)
from .physmem import (
    HUGE_ZERO_PFN,
    ZERO_PFN,
    PG_anon,
    PG_anon_exclusive,
    PG_dirty,
    PG_hugetlb,
    PG_hwpoison,
    PG_locked,
    PG_swapbacked,
    PG_swapcache,
    PG_uptodate,
    PhysMem,
)
from .rmap import anon_vma_prepare, folio_add_new_anon_rmap, rmap_walk, root_anon_vma
from .swap import swapcache_add, swapcache_del
from .thp import split_huge_pmd, thp_vma_allowable, thp_vma_suitable
from .vma import VM_IO, VM_LOCKED, VM_NOHUGEPAGE, VM_PFNMAP, VM_WRITE
from .zap import zap_range

if TYPE_CHECKING:
    from ..machine import Machine
    from .address_space import AddressSpace
    from .swap import SwapDevice
    from .vma import Vma

FAULT_FLAG_WRITE: Final = 1 << 0
FAULT_FLAG_MKWRITE: Final = 1 << 1
FAULT_FLAG_ALLOW_RETRY: Final = 1 << 2
FAULT_FLAG_RETRY_NOWAIT: Final = 1 << 3
FAULT_FLAG_KILLABLE: Final = 1 << 4
FAULT_FLAG_TRIED: Final = 1 << 5
FAULT_FLAG_USER: Final = 1 << 6
FAULT_FLAG_REMOTE: Final = 1 << 7
FAULT_FLAG_INSTRUCTION: Final = 1 << 8
FAULT_FLAG_INTERRUPTIBLE: Final = 1 << 9
FAULT_FLAG_UNSHARE: Final = 1 << 10

VM_FAULT_OOM: Final = 0x000001
VM_FAULT_SIGBUS: Final = 0x000002
VM_FAULT_MAJOR: Final = 0x000004
VM_FAULT_HWPOISON: Final = 0x000010
VM_FAULT_HWPOISON_LARGE: Final = 0x000020
VM_FAULT_SIGSEGV: Final = 0x000040
VM_FAULT_NOPAGE: Final = 0x000100
VM_FAULT_LOCKED: Final = 0x000200
VM_FAULT_RETRY: Final = 0x000400
VM_FAULT_FALLBACK: Final = 0x000800
VM_FAULT_DONE_COW: Final = 0x001000
VM_FAULT_ERROR: Final = (
    VM_FAULT_OOM
    | VM_FAULT_SIGBUS
    | VM_FAULT_SIGSEGV
    | VM_FAULT_HWPOISON
    | VM_FAULT_HWPOISON_LARGE
    | VM_FAULT_FALLBACK
)

#: ``fault_around_bytes`` (64 KiB, the default) in pages.
FAULT_AROUND_PAGES: Final = 16
_AROUND: Final = np.arange(FAULT_AROUND_PAGES, dtype=np.int64)

#: Pages handled per vectorised step of ``populate_range`` (bounds temporaries).
POPULATE_BATCH: Final = 1 << 15

_I64 = np.int64


def handle_mm_fault(vma: Vma, addr: int, flags: int) -> int:
    """Resolve one fault at ``addr``; returns ``VM_FAULT_*`` bits (0 = done)."""
    mm = vma.mm
    mm.mmap_lock.assert_held()
    if not vma.contains(addr):
        return VM_FAULT_SIGSEGV
    machine = mm.machine
    machine.costs.faults += 1
    machine.clock.advance(COST_FAULT_NS)
    write = bool(flags & FAULT_FLAG_WRITE)
    if flags & FAULT_FLAG_UNSHARE and not write:
        return _unshare(vma, addr >> PAGE_SHIFT)
    machine.trace.log(sched.current(), "fault", addr=addr, write=write)
    sched.point("fault")
    vpn = addr >> PAGE_SHIFT
    if vma.is_hugetlb:
        return hugetlb_fault(vma, vpn, write)
    ret = _pmd_fault(vma, vpn, write)
    if ret is not None:
        return ret
    return _pte_fault(vma, vpn, write)


# ----- PMD level -----------------------------------------------------------------


def _pmd_fault(vma: Vma, vpn: int, write: bool) -> int | None:
    """Handle the fault at PMD level; None means "go on at PTE level"."""
    pt = vma.mm.pt
    pmdloc = pt.pmd_loc(vpn, alloc=True)
    e = pt.get(pmdloc)
    if e == 0:
        if thp_vma_allowable(vma) and thp_vma_suitable(vma, vpn):
            ret = do_huge_pmd_anonymous_page(vma, vpn, pmdloc, write)
            if ret != VM_FAULT_FALLBACK:
                return ret
        elif vma.page_cache is not None:
            heads = _file_pmd_heads(vma, np.array([vpn], dtype=_I64))
            if heads[0] >= 0:
                _do_set_pmd(vma, np.array([pmdloc], dtype=_I64), heads, write)
                return 0
        return None
    if is_table_pointer(e):
        return None
    kind = pte_kind(e)
    if kind == KIND_PROTNONE:
        e = _numa_restore(vma, e)
        pt.set(pmdloc, e)
        kind = KIND_PRESENT
    if kind == KIND_PRESENT:
        if write and not e & PTE_WRITE:
            if not vma.is_anonymous:
                # wp_huge_pmd on a file VMA: COW and write-notify are done at
                # PTE level, so the PMD goes (split_huge_pmd removes a file
                # PMD) and the fault starts again from the empty PMD.
                split_huge_pmd(vma, vpn)
                return _pmd_fault(vma, vpn, write)
            ret = do_huge_pmd_wp_page(vma, vpn, pmdloc, e)
            return None if ret == VM_FAULT_FALLBACK else ret
        pt.set(pmdloc, e | PTE_YOUNG | (PTE_DIRTY if write else 0))
        return 0
    if kind == KIND_MIGRATION:
        return wait_on_migration(vma, pmdloc, e)
    if kind == KIND_DEVICE_PRIVATE:
        return do_device_private_fault(
            vma, vpn, pmdloc, e, pte_pfn(e) + (vpn & 511), write, PMD_ORDER
        )
    return VM_FAULT_SIGBUS


def do_huge_pmd_anonymous_page(vma: Vma, vpn: int, pmdloc: int, write: bool) -> int:
    machine = vma.mm.machine
    pt = vma.mm.pt
    # vmf_anon_prepare comes first, even for the huge zero page: fork then
    # copies the VMA's page tables, zero PMDs included.
    anon_vma_prepare(machine, vma)
    if not write and machine.config.thp_use_zero_page:
        pt.set(pmdloc, make_present(HUGE_ZERO_PFN, special=True, huge=True))
        machine.costs.pte_writes += 1
        return 0
    try:
        head = machine.phys.alloc_one(PMD_ORDER)
    except OutOfMemory:
        return VM_FAULT_FALLBACK
    haddr = vpn & ~(PMD_PAGES - 1)
    folio_add_new_anon_rmap(
        machine, vma, np.array([head], dtype=_I64), np.array([haddr], dtype=_I64), PMD_ORDER
    )
    pt.set(pmdloc, make_present(head, write=bool(vma.flags & VM_WRITE), dirty=True, huge=True))
    machine.costs.pte_writes += 1
    return 0


def do_huge_pmd_wp_page(vma: Vma, vpn: int, pmdloc: int, e: int) -> int:
    """Write to a read-only PMD: reuse an exclusive THP, else split and fall back.

    A write to the huge zero page gets a new THP (``do_huge_zero_wp_pmd``,
    Linux 6.14 and later; older kernels split the PMD and copied one 4 KiB
    page). Only if no THP can be had does it split and fall back to PTEs.
    """
    phys = vma.mm.machine.phys
    head = pte_pfn(e)
    if phys.is_zero_pfn(head):
        # No THP-policy check here: the huge zero PMD is replaced by a THP
        # even after MADV_NOHUGEPAGE (as observed on 6.18).
        if thp_vma_suitable(vma, vpn):
            ret = do_huge_zero_wp_pmd(vma, vpn, pmdloc, e)
            if ret != VM_FAULT_FALLBACK:
                return ret
    else:
        flags = int(phys.flags[head])
        exclusive = bool(flags & PG_anon_exclusive) or (
            bool(flags & PG_anon)
            and not flags & PG_swapcache
            and phys.refcount[head] == 1
            and phys.mapcount[head] == 1
        )
        if flags & PG_anon and exclusive:
            phys.flags[head : head + PMD_PAGES] |= np.uint16(PG_anon_exclusive)
            vma.mm.pt.set(pmdloc, e | PTE_WRITE | PTE_DIRTY | PTE_YOUNG)
            return 0
    split_huge_pmd(vma, vpn)
    return VM_FAULT_FALLBACK


def do_huge_zero_wp_pmd(vma: Vma, vpn: int, pmdloc: int, e: int) -> int:
    """Replace a huge zero PMD by a new zeroed THP (one ``CLEAR`` over 2 MiB)."""
    mm = vma.mm
    machine = mm.machine
    phys = machine.phys
    try:
        head = phys.alloc_one(PMD_ORDER)
    except OutOfMemory:
        return VM_FAULT_FALLBACK
    haddr = vpn & ~(PMD_PAGES - 1)
    start = haddr << PAGE_SHIFT
    with invalidation(mm, MMU_NOTIFY_CLEAR, start, start + (PMD_PAGES << PAGE_SHIFT)):
        if mm.pt.get(pmdloc) != e:  # changed meanwhile: retry the access
            phys.put_one(head)
            return 0
        folio_add_new_anon_rmap(
            machine, vma, np.array([head], dtype=_I64), np.array([haddr], dtype=_I64), PMD_ORDER
        )
        mm.pt.set(pmdloc, make_present(head, write=True, dirty=True, huge=True))
        machine.costs.pte_writes += 1
    return 0


# ----- PTE level -----------------------------------------------------------------


def _pte_fault(vma: Vma, vpn: int, write: bool) -> int:
    pt = vma.mm.pt
    loc = pt.pte_loc(vpn, alloc=True)
    if loc < 0:  # raced with a new huge mapping: let the caller retry
        return 0
    e = pt.get(loc)
    kind = pte_kind(e)
    if kind == KIND_NONE:
        if vma.is_anonymous:
            return do_anonymous_page(vma, vpn, loc, write)
        if vma.page_cache is not None:
            return do_file_fault(vma, vpn, loc, write)
        if vma.vm_ops is not None and hasattr(vma.vm_ops, "fault"):
            return int(vma.vm_ops.fault(vma, vpn << PAGE_SHIFT, write))
        return VM_FAULT_SIGBUS
    if kind == KIND_SWAP:
        return do_swap_page(vma, vpn, loc, e, write)
    if kind == KIND_MIGRATION:
        return wait_on_migration(vma, loc, e)
    if kind == KIND_HWPOISON:
        return VM_FAULT_HWPOISON
    if kind == KIND_DEVICE_PRIVATE:
        return do_device_private_fault(vma, vpn, loc, e, pte_pfn(e), write, 0)
    if kind == KIND_DEVICE_EXCLUSIVE:
        return remove_device_exclusive_entry(vma, vpn, loc, e)
    if kind == KIND_PROTNONE:
        e = _numa_restore(vma, e)
        pt.set(loc, e)
        kind = KIND_PRESENT
    if kind == KIND_PRESENT:
        if write and not e & PTE_WRITE:
            return do_wp_page(vma, vpn, loc, e)
        pt.set(loc, e | PTE_YOUNG | (PTE_DIRTY if write else 0))
        return 0
    return VM_FAULT_SIGBUS  # poison and guard markers


def do_device_private_fault(
    vma: Vma, vpn: int, loc: int, e: int, pfn: int, write: bool, order: int
) -> int:
    """CPU touch of device-private page ``pfn``: the owner's ``migrate_to_ram`` (§3.5).

    ``order`` is that of the faulting entry (0 for a PTE, ``PMD_ORDER`` for a
    device-private PMD); it travels in the ``VmFault`` so the driver never
    reads the CPU page table to learn it.

    The core takes a reference and the folio lock, rechecks the entry, and
    lets the driver move the page back; the lock and reference are dropped
    afterwards (``migrate_vma_finalize`` leaves the fault page alone).
    """
    from .memremap import VmFault

    phys = vma.mm.machine.phys
    head = phys.get_page(pfn)
    try:
        phys.folio_lock(head)
        try:
            if vma.mm.pt.get(loc) != e:
                return 0  # changed under us: let the access retry
            pgmap = phys.pgmap_of(pfn)
            flags = FAULT_FLAG_WRITE if write else 0
            vmf = VmFault(vma, vpn << PAGE_SHIFT, flags, pfn, pgmap, e, order)
            return int(pgmap.ops.migrate_to_ram(vmf))
        finally:
            # The driver may have split the folio: unlock the fault page's folio.
            if phys.folio_locked(phys.head(pfn)):
                phys.folio_unlock(phys.head(pfn))
    finally:
        phys.put_page(pfn)


def remove_device_exclusive_entry(vma: Vma, vpn: int, loc: int, e: int) -> int:
    """CPU touch of a device-exclusive entry: restore the PTE, tell the device.

    Sends ``MMU_NOTIFY_EXCLUSIVE`` with no owner, so the device that held
    exclusive access drops it, then puts back a writable, dirty PTE.
    """
    mm = vma.mm
    phys = mm.machine.phys
    pfn = pte_pfn(e)
    head = phys.get_page(pfn)
    try:
        phys.folio_lock(head)
        try:
            addr = vpn << PAGE_SHIFT
            with invalidation(mm, MMU_NOTIFY_EXCLUSIVE, addr, addr + (1 << PAGE_SHIFT), None):
                if mm.pt.get(loc) == e:
                    mm.pt.set(loc, make_present(pfn, write=True, dirty=True, young=False))
                    mm.machine.costs.pte_writes += 1
        finally:
            phys.folio_unlock(head)
    finally:
        phys.put_page(head)
    return 0


def _unshare(vma: Vma, vpn: int) -> int:
    """``FAULT_FLAG_UNSHARE``: give this mm an exclusive copy, still read-only.

    What a read-only long-term pin needs so that a later COW cannot leave the
    pinned page behind the process's back.
    """
    pt = vma.mm.pt
    _loc, e, level = pt.lookup(vpn)
    if level != 0:
        split_huge_pmd(vma, vpn)
    loc, e, level = pt.lookup(vpn)
    if loc < 0 or pte_kind(e) != KIND_PRESENT:
        return 0
    phys = vma.mm.machine.phys
    pfn = pte_pfn(e)
    if phys.is_zero_pfn(pfn) or not phys.flags[pfn] & PG_anon:
        return 0
    if _can_reuse_anon(vma, pfn, phys.head(pfn), int(phys.flags[pfn])):
        phys.flags[pfn] |= np.uint16(PG_anon_exclusive)
        return 0
    return wp_page_copy(vma, vpn, loc, e, pfn, writable=False)


def _numa_restore(vma: Vma, e: int) -> int:
    """``do_numa_page``: make a PROT_NONE-hinted entry accessible again."""
    e = (e & ~PTE_PROTNONE) | PTE_PRESENT
    if not vma.flags & VM_WRITE:
        e &= ~PTE_WRITE
    return e


def wait_on_migration(vma: Vma, loc: int, e: int) -> int:
    """``migration_entry_wait``: sleep until the entry changes, then retry."""
    pt = vma.mm.pt
    vma.mm.machine.migration_wq.wait_event(lambda: pt.get(loc) != e)
    return 0


def do_anonymous_page(vma: Vma, vpn: int, loc: int, write: bool) -> int:
    machine = vma.mm.machine
    pt = vma.mm.pt
    if not write:
        pt.set(loc, make_present(ZERO_PFN, special=True))
        machine.costs.pte_writes += 1
        return 0
    try:
        pfn = machine.phys.alloc_one(0)
    except OutOfMemory:
        return VM_FAULT_OOM
    folio_add_new_anon_rmap(
        machine, vma, np.array([pfn], dtype=_I64), np.array([vpn], dtype=_I64), 0
    )
    pt.set(loc, make_present(pfn, write=bool(vma.flags & VM_WRITE), dirty=True))
    machine.costs.pte_writes += 1
    return 0


def do_wp_page(vma: Vma, vpn: int, loc: int, e: int) -> int:
    """Write to a present read-only PTE: reuse, make writable, or copy."""
    mm = vma.mm
    phys = mm.machine.phys
    pt = mm.pt
    pfn = pte_pfn(e)
    if phys.is_zero_pfn(pfn):
        return wp_page_copy(vma, vpn, loc, e, None)
    if e & PTE_SPECIAL:
        if vma.is_shared:
            pt.set(loc, e | PTE_WRITE | PTE_DIRTY | PTE_YOUNG)
            return 0
        return VM_FAULT_SIGBUS
    head = phys.head(pfn)
    if vma.is_shared:
        # wp_page_shared: a write-notified page-cache page becomes dirty.
        phys.flags[head] |= np.uint16(PG_dirty)
        pt.set(loc, e | PTE_WRITE | PTE_DIRTY | PTE_YOUNG)
        return 0
    flags = int(phys.flags[pfn])
    if flags & PG_anon and _can_reuse_anon(vma, pfn, head, flags):
        phys.flags[pfn] |= np.uint16(PG_anon_exclusive)
        pt.set(loc, e | PTE_WRITE | PTE_DIRTY | PTE_YOUNG)
        return 0
    return wp_page_copy(vma, vpn, loc, e, pfn)


def _can_reuse_anon(vma: Vma, pfn: int, head: int, flags: int) -> bool:
    """``wp_can_reuse_anon_folio``: is this mm the only user of the page?

    A small folio is reused when its only reference is this mapping. A large
    (PTE-mapped) folio is reused, as since Linux 6.15, when only this mm
    maps it and nothing else holds a reference, unless a single page of it
    is left mapped (then copying lets the large folio be freed). Before 6.15
    pages of a large folio were reused only if marked exclusive. The kernel
    tracks "mapped by another mm" approximately (two mm slots per folio);
    the model counts the mms that map it.
    """
    if flags & PG_anon_exclusive:
        return True
    phys = vma.mm.machine.phys
    if phys.order[head] != 0:
        if phys.flags[head] & PG_hugetlb:
            return False
        mapcount = int(phys.mapcount[head])
        if mapcount <= 1 or phys.flags[head] & PG_swapcache:
            return False
        if phys.refcount[head] != mapcount:
            return False
        return _mapped_only_by(vma.mm.machine, head, vma.mm)
    if flags & PG_swapcache:
        swap = vma.mm.machine.swap
        slot = swap.slot_of[head]
        if swap.count[slot] != 1 or phys.refcount[head] != 2:
            return False
        swapcache_del(swap, phys, head)
    return bool(phys.refcount[head] == 1)


def _mapped_only_by(machine: Machine, head: int, mm: AddressSpace) -> bool:
    """Whether every mapping of the folio at ``head`` belongs to ``mm``."""
    return all(hit.vma.mm is mm for hit in rmap_walk(machine, head))


def wp_page_copy(
    vma: Vma, vpn: int, loc: int, e: int, src: int | None, writable: bool = True
) -> int:
    """Break COW: a private copy replaces the PTE (``CLEAR`` on the page).

    ``writable=False`` is the unshare variant: the copy stays read-only.
    """
    mm = vma.mm
    machine = mm.machine
    phys = machine.phys
    try:
        new = phys.alloc_one(0)
    except OutOfMemory:
        return VM_FAULT_OOM
    new_arr = np.array([new], dtype=_I64)
    if src is not None:
        phys.copy_pages(new_arr, np.array([src], dtype=_I64))
    addr = vpn << PAGE_SHIFT
    with invalidation(mm, MMU_NOTIFY_CLEAR, addr, addr + (1 << PAGE_SHIFT)):
        if mm.pt.get(loc) != e:  # somebody else changed it meanwhile: retry
            phys.put_one(new)
            return 0
        folio_add_new_anon_rmap(machine, vma, new_arr, np.array([vpn], dtype=_I64), 0)
        mm.pt.set(loc, make_present(new, write=writable, dirty=True))
        machine.costs.pte_writes += 1
        if src is not None:
            head = phys.head(src)
            phys.mapcount[head] -= 1
            phys.put_one(head)
    return 0


def do_file_fault(vma: Vma, vpn: int, loc: int, write: bool) -> int:
    """Fault on a file (or shmem) mapping: read, COW into anon, or shared write."""
    ret = _file_fault_batch(vma, np.array([vpn], dtype=_I64), np.array([loc], dtype=_I64), write)
    return ret


def _file_fault_batch(
    vma: Vma, vpns: NDArray[np.int64], locs: NDArray[np.int64], write: bool
) -> int:
    """Map file pages into empty slots ``locs``; stops at end of file (SIGBUS).

    Read faults also fault around (``do_fault_around``), as ``do_read_fault``
    does; write faults (``do_cow_fault``, ``do_shared_fault``) do not. The
    kernel maps the neighbours before the faulting page; mapping them after
    it gives the same page tables and lets the faulting slots, no longer
    empty, be skipped.
    """
    f = vma.page_cache
    indices = vma.pgoff + vpns - vma.start_vpn
    inside = indices < f.npages
    # Which pages fault-around could map before this batch allocates holes.
    cached = None if write or len(vpns) == 1 else _mappable_cached(vma, indices, inside)
    if inside.all():
        ret = _map_file_pages(vma, vpns, locs, indices, write)
        if not write:
            _fault_around(vma, vpns, locs, cached)
        return ret
    keep = int(np.argmin(inside))
    ret = _map_file_pages(vma, vpns[:keep], locs[:keep], indices[:keep], write)
    if not write:
        # The fault that hits EOF still maps its cached neighbours.
        _fault_around(
            vma, vpns[: keep + 1], locs[: keep + 1], None if cached is None else cached[: keep + 1]
        )
    return ret if ret & VM_FAULT_ERROR else VM_FAULT_SIGBUS


def _mappable_cached(
    vma: Vma, indices: NDArray[np.int64], inside: NDArray[np.bool_]
) -> NDArray[np.bool_]:
    """Pages at ``indices`` in the page cache, uptodate, not locked or poisoned."""
    f = vma.page_cache
    assert f is not None
    out = np.zeros(len(indices), dtype=np.bool_)
    pfns = f.cache.get(indices[inside])
    flags = vma.mm.machine.phys.flags[np.maximum(pfns, 0)]
    usable = ((flags & PG_uptodate) != 0) & ((flags & (PG_locked | PG_hwpoison)) == 0)
    out[inside] = (pfns >= 0) & usable
    return out


def _map_file_pages(
    vma: Vma,
    vpns: NDArray[np.int64],
    locs: NDArray[np.int64],
    indices: NDArray[np.int64],
    write: bool,
) -> int:
    if len(vpns) == 0:
        return 0
    machine = vma.mm.machine
    phys = machine.phys
    try:
        pfns = vma.page_cache.get_pages(indices)
    except OutOfMemory:
        return VM_FAULT_OOM
    pt = vma.mm.pt
    if write and not vma.is_shared:
        try:
            new = phys.alloc(0, len(pfns))
        except OutOfMemory:
            return VM_FAULT_OOM
        phys.copy_pages(new, pfns)
        folio_add_new_anon_rmap(machine, vma, new, vpns, 0)
        pt.flat[locs] = make_present_array(new, write=True, dirty=True)
    else:
        heads = phys.head_of(pfns)
        np.add.at(phys.mapcount, heads, 1)
        np.add.at(phys.refcount, heads, 1)
        if write:
            phys.flags[pfns] |= np.uint16(PG_dirty)
            phys.flags[heads] |= np.uint16(PG_dirty)
        pt.flat[locs] = make_present_array(pfns, write=_file_pte_writable(vma, write), dirty=write)
    machine.costs.pte_writes += len(locs)
    return 0


def _file_pte_writable(vma: Vma, write: bool) -> bool:
    """Whether a file PTE is installed writable.

    Shared writable mappings of write-notified files start read-only (the
    first write marks the page dirty); shmem is not write-notified, so even
    a read fault maps it writable (and clean). Private mappings never are.
    """
    f = vma.page_cache
    return vma.is_shared and bool(vma.flags & VM_WRITE) and (write or not f.writenotify)


def _fault_around(
    vma: Vma,
    vpns: NDArray[np.int64],
    locs: NDArray[np.int64],
    cached: NDArray[np.bool_] | None = None,
) -> None:
    """``do_fault_around`` + ``filemap_map_pages`` for read faults at ``vpns``.

    Each fault maps the pages around it that are already in the page cache
    and uptodate (not locked, not poisoned, not past EOF) into empty PTEs.
    The window is ``do_fault_around``'s: ``FAULT_AROUND_PAGES`` long,
    starting at the aligned start below the fault or at the VMA's start if
    that is later (the window then shifts right, it is not just clipped),
    and cut at the end of the page table and of the VMA. It never leaves the
    fault's page table, so its slots are in the table of the fault's own
    slot ``locs``. Entries are young and clean, writable as a read fault
    would map them; filling empty PTEs sends no MMU-notifier event.
    """
    f = vma.page_cache
    if f is None or f.hugetlb_order or len(vpns) == 0:
        return
    if len(vpns) > 1:
        assert cached is not None
        vpns, locs = _first_faults(vma, vpns, locs, cached)
    pte_off = vpns % PTRS_PER_TABLE
    base = vpns - pte_off
    lo = np.maximum(
        pte_off & ~(FAULT_AROUND_PAGES - 1), pte_off - np.minimum(pte_off, vpns - vma.start_vpn)
    )
    hi = np.minimum(
        np.minimum(lo + FAULT_AROUND_PAGES, PTRS_PER_TABLE), pte_off + vma.end_vpn - vpns
    )
    start = base + lo
    if len(start) > 1:
        start, first = np.unique(start, return_index=True)
        tables = locs[first] // PTRS_PER_TABLE
        stop = (base + hi)[first]
    else:
        tables = locs // PTRS_PER_TABLE
        stop = base + hi
    cand = (start[:, None] + _AROUND).reshape(-1)
    clocs = (
        tables[:, None] * PTRS_PER_TABLE + (cand.reshape(len(start), -1) % PTRS_PER_TABLE)
    ).reshape(-1)
    pt = vma.mm.pt
    ok = (cand >= vma.start_vpn) & (cand < np.repeat(stop, FAULT_AROUND_PAGES))
    ok[ok] = pt.flat[clocs[ok]] == 0
    indices = vma.pgoff + cand[ok] - vma.start_vpn
    clocs = clocs[ok]
    inside = indices < f.npages
    pfns = f.cache.get(indices[inside])
    clocs = clocs[inside][pfns >= 0]
    pfns = pfns[pfns >= 0]
    if len(pfns) == 0:
        return
    phys = vma.mm.machine.phys
    flags = phys.flags[pfns]
    usable = ((flags & PG_uptodate) != 0) & ((flags & (PG_locked | PG_hwpoison)) == 0)
    clocs, pfns = clocs[usable], pfns[usable]
    heads = phys.head_of(pfns)
    np.add.at(phys.mapcount, heads, 1)
    np.add.at(phys.refcount, heads, 1)
    pt.flat[clocs] = make_present_array(pfns, write=_file_pte_writable(vma, False), dirty=False)
    vma.mm.machine.costs.pte_writes += len(clocs)


def _first_faults(
    vma: Vma, vpns: NDArray[np.int64], locs: NDArray[np.int64], cached: NDArray[np.bool_]
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """The pages of an ascending batch that would really fault, one after another.

    A CPU reading the batch in order faults on its first page; that fault's
    window maps the pages after it that were already cached (``cached``),
    so the next fault is at the first page past the window or at the first
    page that was not cached (a hole: fault-around maps nothing there, the
    CPU faults on it and that fault has a window of its own, which can reach
    cached pages beyond the batch). One step per hole or window.
    """
    order = np.argsort(vpns, kind="stable")
    vpns, locs, cached = vpns[order], locs[order], cached[order]
    off = vpns % PTRS_PER_TABLE
    lo = np.maximum(off & ~(FAULT_AROUND_PAGES - 1), off - np.minimum(off, vpns - vma.start_vpn))
    stops = (
        vpns
        - off
        + np.minimum(np.minimum(lo + FAULT_AROUND_PAGES, PTRS_PER_TABLE), off + vma.end_vpn - vpns)
    )
    real = ~cached
    # The window of the last hole before each page (stops grow with the page).
    hole_stop = np.where(real, stops, -1)
    before = np.concatenate(([-1], np.maximum.accumulate(hole_stop)[:-1]))
    # Cached pages no hole's window covers; those a cached fault's window
    # covers are found in order, one step per such fault.
    cand = np.flatnonzero(cached & (vpns >= before))
    cand_vpns = vpns[cand]
    k = 0
    while k < len(cand):
        i = int(cand[k])
        real[i] = True
        k = int(np.searchsorted(cand_vpns, stops[i], side="left"))
    sel = np.flatnonzero(real)
    return vpns[sel], locs[sel]


def _should_try_to_free_swap(vma: Vma, swap: SwapDevice, pfn: int, write: bool) -> bool:
    """``should_try_to_free_swap``: drop a swapped-in folio from the swap cache now?

    Only when no swap entry refers to its slot any more (the caller checks),
    and then: when swap is more than half full (``vm_swap_full``), in a
    locked VMA, or on a write fault when the cache and this mapping are the
    folio's only references (so it can be mapped writable and exclusive).
    A read fault otherwise keeps it cached: the slot still holds its data,
    so reclaim can drop the folio again without writing it, unless it was
    written meanwhile.
    """
    if swap.nr_free * 2 < swap.nslots or vma.flags & VM_LOCKED:
        return True
    return write and bool(vma.mm.machine.phys.refcount[pfn] == 2)


def do_swap_page(vma: Vma, vpn: int, loc: int, e: int, write: bool) -> int:
    """Swap-in through the swap cache; exclusive pages are reused at once.

    As 6.18's ``do_swap_page``: the folio stays in the swap cache unless
    ``_should_try_to_free_swap`` says otherwise, and leaving it marks it
    dirty (``folio_free_swap``), since its only copy is now in memory.
    """
    mm = vma.mm
    machine = mm.machine
    phys = machine.phys
    swap = machine.swap
    slot = pte_pfn(e)
    pfn = swap.cache.get(slot)
    major = pfn is None
    if pfn is None:
        try:
            pfn = phys.alloc_one(0)
        except OutOfMemory:
            return VM_FAULT_OOM
        data = swap.read(slot)
        if data is not None:
            phys.write_pages(np.array([pfn], dtype=_I64), data[None, :])
        machine.costs.swap_ins += 1
        machine.clock.advance(COST_SWAP_IO_NS)
        swapcache_add(swap, phys, slot, pfn)
        sched.point("swapin:after_read")
        if mm.pt.get(loc) != e:  # raced: someone else resolved it
            return 0
        exclusive = swap.count[slot] == 2  # this entry plus the cache
        av = vma.anon_vma if exclusive or vma.anon_vma is None else root_anon_vma(vma)
        assert av is not None
        phys.flags[pfn] |= np.uint16(PG_anon | PG_swapbacked)
        phys.mapping[pfn] = av.id
        phys.index[pfn] = vma.linear_index(vpn)
    else:
        # Found in the swap cache: exclusive only if nobody maps it yet.
        exclusive = swap.count[slot] == 2 and phys.mapcount[pfn] == 0
        phys.refcount[pfn] += 1
    phys.mapcount[pfn] += 1
    swap.put(slot)
    if swap.count[slot] == 1 and _should_try_to_free_swap(vma, swap, pfn, write):
        swapcache_del(swap, phys, pfn)  # folio_free_swap: the folio is dirty now
    if not exclusive and phys.refcount[pfn] == 1:
        exclusive = True  # nothing else holds it: the swap cache let go of it above
    if exclusive:
        phys.flags[pfn] |= np.uint16(PG_anon_exclusive)
    # An exclusive page is mapped writable even on a read fault, and dirty
    # only on a write fault: until it is written, the slot holds its data.
    writable = exclusive and bool(vma.flags & VM_WRITE)
    entry = make_present(pfn, write=writable, dirty=writable and write) | (e & PTE_DIRTY)
    mm.pt.set(loc, entry)
    machine.costs.pte_writes += 1
    if write and not writable:
        return do_wp_page(vma, vpn, loc, entry)
    return VM_FAULT_MAJOR if major else 0


# ----- hugetlb -------------------------------------------------------------------


def hugetlb_fault(vma: Vma, vpn: int, write: bool) -> int:
    mm = vma.mm
    machine = mm.machine
    phys = machine.phys
    pt = mm.pt
    order = vma.hugetlb_order
    nr = 1 << order
    hvpn = vpn & ~(nr - 1)
    loc = pt.pmd_loc(hvpn, alloc=True) if order == PMD_ORDER else pt.pud_loc(hvpn, alloc=True)
    e = pt.get(loc)
    pool = machine.hugetlb[order]
    hidx = vma.linear_index(hvpn) >> order
    if e == 0:
        if vma.hugetlb_resv_unmapped:
            return VM_FAULT_SIGBUS  # the owner took a page back from this fork child
        if vma.is_shared:
            f = vma.file
            if hidx >= len(f.cache):
                return VM_FAULT_SIGBUS
            pfn = int(f.cache[hidx])
            if pfn < 0:
                got = alloc_hugetlb_folio(pool, f.hugetlb_resv, hidx)
                if got is None:
                    return VM_FAULT_SIGBUS
                pfn = got
                phys.mapping[pfn] = f.id
                phys.index[pfn] = hidx
                f.cache[hidx] = pfn
            phys.refcount[pfn] += 1
            phys.mapcount[pfn] += 1
            if write:
                phys.flags[pfn] |= np.uint16(PG_dirty)
            writable = bool(vma.flags & VM_WRITE)
        else:
            got = alloc_hugetlb_folio(pool, vma.hugetlb_resv, hidx)
            if got is None:
                return VM_FAULT_SIGBUS
            pfn = got
            folio_add_new_anon_rmap(
                machine, vma, np.array([pfn], dtype=_I64), np.array([hvpn], dtype=_I64), order
            )
            writable = write
        pt.set(loc, make_present(pfn, write=writable, dirty=write, huge=True))
        machine.costs.pte_writes += 1
        return 0
    kind = pte_kind(e)
    if kind == KIND_PRESENT:
        if write and not e & PTE_WRITE:
            return hugetlb_wp(vma, hvpn, loc, e)
        pt.set(loc, e | PTE_YOUNG | (PTE_DIRTY if write else 0))
        return 0
    if kind == KIND_MIGRATION:
        return wait_on_migration(vma, loc, e)
    if kind == KIND_HWPOISON:
        return VM_FAULT_HWPOISON_LARGE
    return VM_FAULT_SIGBUS


def hugetlb_wp(vma: Vma, hvpn: int, loc: int, e: int) -> int:
    """COW of a private huge page: reuse if mapped once, else copy from the pool.

    As Linux 6.18, reuse looks at the mapcount only, not at extra references
    (a copy that the pool cannot give would kill the process where a
    fork-and-exit user expects to carry on). The copy takes an unreserved
    page, also for the reservation's owner (its reservation for the index was
    used by the page it copies); when there is none, the owner takes the page
    back from its fork children (``unmap_ref_private``) and reuses it, while
    any other mapping gets SIGBUS.
    """
    mm = vma.mm
    machine = mm.machine
    phys = machine.phys
    order = vma.hugetlb_order
    nr = 1 << order
    old = pte_pfn(e)
    if vma.is_shared:
        mm.pt.set(loc, e | PTE_WRITE | PTE_DIRTY | PTE_YOUNG)
        return 0
    if phys.mapcount[old] != 1:
        new = machine.hugetlb[order].alloc(reserved=False)
        if new is not None:
            return _hugetlb_copy(vma, hvpn, loc, e, new)
        if not is_resv_owner(vma):
            return VM_FAULT_SIGBUS
        _unmap_ref_private(vma, old, hvpn)
        if mm.pt.get(loc) != e:
            return 0  # the entry changed meanwhile: the access faults again
        if phys.mapcount[old] != 1:
            return VM_FAULT_SIGBUS
    phys.flags[old : old + nr] |= np.uint16(PG_anon_exclusive)
    mm.pt.set(loc, e | PTE_WRITE | PTE_DIRTY | PTE_YOUNG)
    return 0


def _unmap_ref_private(vma: Vma, head: int, hvpn: int) -> None:
    """The owner ``vma`` could not copy the huge page ``head`` it shares with its
    fork children: unmap the page from every other private mapping of it that
    owns no reservation, and mark those mappings (``HPAGE_RESV_UNMAPPED``).

    Linux finds those mappings through the hugetlbfs object's ``i_mmap`` at
    the owner's address; the model asks the folio's rmap, which finds the
    same mappings (a child mapping the page at another address after an
    mremap is found too, where Linux would miss it and retry the COW again).
    """
    nr = 1 << vma.hugetlb_order
    for hit in list(rmap_walk(vma.mm.machine, head)):
        other = hit.vma
        if other is vma or other.is_shared or is_resv_owner(other):
            continue
        for vpn in np.unique(hit.vpns & ~(nr - 1)).tolist():
            addr = vpn << PAGE_SHIFT
            with invalidation(other.mm, MMU_NOTIFY_CLEAR, addr, addr + (nr << PAGE_SHIFT)):
                zap_range(other, vpn, nr)
        other.hugetlb_resv_unmapped = True


def _hugetlb_copy(vma: Vma, hvpn: int, loc: int, e: int, new: int) -> int:
    """Map a private copy ``new`` of the huge page that ``e`` maps."""
    mm = vma.mm
    machine = mm.machine
    phys = machine.phys
    order = vma.hugetlb_order
    nr = 1 << order
    old = pte_pfn(e)
    phys.copy_pages(np.arange(new, new + nr, dtype=_I64), np.arange(old, old + nr, dtype=_I64))
    addr = hvpn << PAGE_SHIFT
    with invalidation(mm, MMU_NOTIFY_CLEAR, addr, addr + (nr << PAGE_SHIFT)):
        if mm.pt.get(loc) != e:
            phys.put_one(new)
            return 0
        folio_add_new_anon_rmap(
            machine, vma, np.array([new], dtype=_I64), np.array([hvpn], dtype=_I64), order
        )
        mm.pt.set(loc, make_present(new, write=True, dirty=True, huge=True))
        phys.mapcount[old] -= 1
        phys.put_one(old)
    return 0


# ----- batched faulting ----------------------------------------------------------


def entries_needing_fault(entries: NDArray[np.uint64], write: bool) -> NDArray[np.bool_]:
    """Which entries a CPU access (read, or write) would fault on."""
    present: NDArray[np.bool_] = (entries & U64(PTE_PRESENT)) != 0
    if write:
        writable: NDArray[np.bool_] = (entries & U64(PTE_WRITE)) != 0
        return ~present | ~writable
    return ~present


def populate_range(vma: Vma, start_vpn: int, npages: int, write: bool) -> int:
    """Fault in [start_vpn, start_vpn + npages) of ``vma`` as an access would.

    Returns 0 or the ``VM_FAULT_*`` bits of the first failure. The caller
    holds ``mmap_lock`` and has checked the VMA's permissions.
    """
    mm = vma.mm
    mm.mmap_lock.assert_held()
    if vma.flags & (VM_IO | VM_PFNMAP):
        return 0
    end = start_vpn + npages
    if vma.is_hugetlb:
        nr = 1 << vma.hugetlb_order
        for hvpn in range(start_vpn & ~(nr - 1), end, nr):
            ret = hugetlb_fault(vma, max(hvpn, start_vpn), write)
            if ret & VM_FAULT_ERROR:
                return ret
        return 0
    for lo in range(start_vpn, end, POPULATE_BATCH):
        ret = _populate_batch(vma, lo, min(end, lo + POPULATE_BATCH), write)
        if ret & VM_FAULT_ERROR:
            return ret
    return 0


def _populate_batch(vma: Vma, lo: int, hi: int, write: bool) -> int:
    mm = vma.mm
    machine = mm.machine
    pt = mm.pt
    n = hi - lo
    if thp_vma_allowable(vma):
        _populate_thp_chunks(vma, lo, hi, write)
    elif vma.page_cache is not None and vma.is_shared:
        _populate_file_pmds(vma, lo, hi, write)
    walk = pt.walk(lo, n)
    if (
        bool((walk.chunk_kind >= CHUNK_PMD).all())
        and not entries_needing_fault(walk.chunk_entry, write).any()
    ):
        return 0  # all huge-mapped already (the THP populate fast path)
    kinds = walk.kinds
    empty = kinds == KIND_NONE
    ret = 0
    if empty.any() and (vma.is_anonymous or vma.page_cache is not None):
        vpns = np.flatnonzero(empty).astype(_I64) + lo
        # Only PTE-level slots (an empty PMD of a non-THP VMA gets a table).
        locs = pt.ensure_pte_locs(vpns)
        machine.costs.faults += len(vpns)
        machine.clock.advance(COST_FAULT_NS * len(vpns))
        machine.trace.log(
            sched.current(), "fault", addr=int(vpns[0]) << PAGE_SHIFT, write=write, npages=len(vpns)
        )
        if vma.is_anonymous:
            ret = _anon_fill(vma, vpns, locs, write)
        else:
            ret = _file_fault_batch(vma, vpns, locs, write)
        if ret & VM_FAULT_ERROR:
            return ret
        walk = pt.walk(lo, n)
    need = np.flatnonzero(entries_needing_fault(walk.entries, write)).astype(_I64) + lo
    flags = FAULT_FLAG_WRITE if write else 0
    for vpn in need.tolist():
        _, e, _ = pt.lookup(vpn)
        if not entries_needing_fault(np.array([e], dtype=U64), write)[0]:
            continue  # resolved by an earlier fault in the same huge page
        ret = handle_mm_fault(vma, vpn << PAGE_SHIFT, flags)
        if ret & VM_FAULT_ERROR:
            return ret
    return 0


def _anon_fill(vma: Vma, vpns: NDArray[np.int64], locs: NDArray[np.int64], write: bool) -> int:
    machine = vma.mm.machine
    pt = vma.mm.pt
    if not write:
        pt.flat[locs] = U64(make_present(ZERO_PFN, special=True))
        machine.costs.pte_writes += len(locs)
        return 0
    try:
        pfns = machine.phys.alloc(0, len(vpns))
    except OutOfMemory:
        # Fault page by page until memory runs out, like a fault loop would.
        for vpn, loc in zip(vpns.tolist(), locs.tolist(), strict=True):
            ret = do_anonymous_page(vma, vpn, loc, True)
            if ret:
                return ret
        return 0
    folio_add_new_anon_rmap(machine, vma, pfns, vpns, 0)
    pt.flat[locs] = make_present_array(pfns, write=bool(vma.flags & VM_WRITE), dirty=True)
    machine.costs.pte_writes += len(locs)
    return 0


def _populate_thp_chunks(vma: Vma, lo: int, hi: int, write: bool) -> None:
    """Map every empty, suitable 2 MiB chunk that [lo, hi) touches, in one batched call."""
    machine = vma.mm.machine
    pt = vma.mm.pt
    # A fault anywhere in a suitable empty 2 MiB chunk maps the whole chunk
    # (an anonymous VMA's pgoff does not matter: thp_vma_suitable).
    first = max(lo & ~(PMD_PAGES - 1), (vma.start_vpn + PMD_PAGES - 1) & ~(PMD_PAGES - 1))
    last = min(hi, vma.end_vpn & ~(PMD_PAGES - 1))  # chunks must end inside the VMA
    if first >= last:
        return
    chunks = np.arange(first, last, PMD_PAGES, dtype=_I64)
    pmdlocs = pt.pmd_locs(chunks)
    empty = pt.flat[pmdlocs] == 0
    if not empty.any():
        return
    cvpns = chunks[empty]
    pmdlocs = pmdlocs[empty]
    machine.costs.faults += len(cvpns)
    machine.clock.advance(COST_FAULT_NS * len(cvpns))
    machine.trace.log(
        sched.current(),
        "fault",
        addr=int(cvpns[0]) << PAGE_SHIFT,
        write=write,
        npages=len(cvpns) * PMD_PAGES,
    )
    anon_vma_prepare(machine, vma)  # as do_huge_pmd_anonymous_page, zero page or not
    if not write and machine.config.thp_use_zero_page:
        pt.flat[pmdlocs] = U64(make_present(HUGE_ZERO_PFN, special=True, huge=True))
        machine.costs.pte_writes += len(pmdlocs)
        return
    try:
        heads = machine.phys.alloc(PMD_ORDER, len(cvpns))
    except OutOfMemory:
        heads = _alloc_some_thps(machine.phys, len(cvpns))
        cvpns, pmdlocs = cvpns[: len(heads)], pmdlocs[: len(heads)]
    if len(heads) == 0:
        return
    folio_add_new_anon_rmap(machine, vma, heads, cvpns, PMD_ORDER)
    pt.flat[pmdlocs] = make_present_array(
        heads, write=bool(vma.flags & VM_WRITE), dirty=True, huge=True
    )
    machine.costs.pte_writes += len(pmdlocs)


def _file_pmd_heads(vma: Vma, vpns: NDArray[np.int64]) -> NDArray[np.int64]:
    """The page-cache THP a PMD at each of ``vpns`` may map, or -1.

    ``do_set_pmd`` (reached from ``finish_fault`` and ``filemap_map_pmd``)
    maps a PMD-sized page-cache folio by a PMD when the VMA holds its whole,
    suitably aligned 2 MiB, whatever the THP settings say, unless the VMA
    has ``VM_NOHUGEPAGE``. The model does so
    in shared mappings only: a private mapping maps the folio's pages by PTEs
    (Linux maps a read fault by a read-only PMD there and splits it on the
    first write; the bytes seen are the same).
    """
    out = np.full(len(vpns), -1, dtype=_I64)
    f = vma.page_cache
    if f is None or f.hugetlb_order or not vma.is_shared or vma.flags & VM_NOHUGEPAGE:
        return out  # vma_thp_disabled: MADV_NOHUGEPAGE refuses do_set_pmd
    if (vma.start_vpn - vma.pgoff) % PMD_PAGES:
        return out
    haddrs = vpns & ~(PMD_PAGES - 1)
    ok = (haddrs >= vma.start_vpn) & (haddrs + PMD_PAGES <= vma.end_vpn)
    idx = vma.pgoff + haddrs - vma.start_vpn
    ok &= idx + PMD_PAGES <= f.npages
    if not ok.any():
        return out
    pfns = f.cache.get(idx[ok])
    phys = vma.mm.machine.phys
    good = pfns >= 0
    good[good] = phys.order[pfns[good]] == PMD_ORDER
    sel = np.flatnonzero(ok)[good]
    out[sel] = pfns[good]
    return out


def _do_set_pmd(
    vma: Vma, pmdlocs: NDArray[np.int64], heads: NDArray[np.int64], write: bool
) -> None:
    """``do_set_pmd``: map page-cache THPs by PMDs (empty PMDs, no notifier)."""
    machine = vma.mm.machine
    phys = machine.phys
    np.add.at(phys.mapcount, heads, 1)
    np.add.at(phys.refcount, heads, 1)
    if write:
        for head in heads.tolist():
            phys.or_folio_flags(np.array([head], dtype=_I64), PMD_ORDER, PG_dirty)
    vma.mm.pt.flat[pmdlocs] = make_present_array(
        heads, write=_file_pte_writable(vma, write), dirty=write, huge=True
    )
    machine.costs.pte_writes += len(pmdlocs)


def _populate_file_pmds(vma: Vma, lo: int, hi: int, write: bool) -> None:
    """Map by PMDs the page-cache THPs of [lo, hi) whose PMD is empty."""
    pt = vma.mm.pt
    first = max(lo & ~(PMD_PAGES - 1), (vma.start_vpn + PMD_PAGES - 1) & ~(PMD_PAGES - 1))
    last = min(hi, vma.end_vpn & ~(PMD_PAGES - 1))
    if first >= last:
        return
    chunks = np.arange(first, last, PMD_PAGES, dtype=_I64)
    heads = _file_pmd_heads(vma, chunks)
    if not (heads >= 0).any():
        return
    chunks, heads = chunks[heads >= 0], heads[heads >= 0]
    pmdlocs = pt.pmd_locs(chunks)
    empty = pt.flat[pmdlocs] == 0
    if empty.any():
        _do_set_pmd(vma, pmdlocs[empty], heads[empty], write)


def _alloc_some_thps(phys: PhysMem, want: int) -> NDArray[np.int64]:
    free_blocks = int((phys.allocator.block_used == 0).sum())
    n = min(want, free_blocks)
    return phys.alloc(PMD_ORDER, n) if n else np.empty(0, dtype=_I64)


def swap_in_range(vma: Vma, vpn: int, npages: int) -> int:
    """Fault in every swapped-out page of the range (read faults)."""
    walk = vma.mm.pt.walk(vpn, npages)
    for v in (np.flatnonzero(walk.kinds == KIND_SWAP) + vpn).tolist():
        ret = handle_mm_fault(vma, v << PAGE_SHIFT, 0)
        if ret & VM_FAULT_ERROR:
            return ret
    return 0
