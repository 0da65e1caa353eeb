"""``migrate_vma_setup``: collect the range, then unmap what was selected.

Kernel counterpart: ``migrate_vma_setup``, ``migrate_vma_collect`` and
``migrate_device_unmap`` in mm/migrate_device.c. Inside one
``MMU_NOTIFY_MIGRATE`` invalidation (owner = ``pgmap_owner``), holes of
anonymous VMAs and zero pages become "empty" entries (MIGRATE without VALID);
selected pages are referenced, locked, unmapped and replaced by migration
entries; then pages still mapped elsewhere are unmapped there too
(``CLEAR``), and any page with references beyond the migration's own
(pinned) is restored and dropped. Each step has a vectorised path for
windows of pages and a per-entry path for a fault's few pages
(``SCALAR_MAX_PAGES``); both give the same result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from .. import sched
from ..errors import InvalidArgument
from ..mm.memremap import MEMORY_DEVICE_COHERENT, MEMORY_DEVICE_PRIVATE
from ..mm.pagetable import (
    KIND_DEVICE_PRIVATE,
    KIND_NONE,
    KIND_PRESENT,
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_PAGES,
    PTE_DIRTY,
    PTE_PFN_MASK,
    PTE_SOFTLEAF,
    PTE_SPECIAL,
    PTE_WRITE,
    PTE_YOUNG,
    SOFTLEAF_TYPE_MASK,
    SOFTLEAF_TYPE_SHIFT,
    SWP_DEVICE_PRIVATE_WRITE,
    SWP_MIGRATION_READ,
    SWP_MIGRATION_READ_EXCLUSIVE,
    SWP_MIGRATION_WRITE,
    U64,
    is_table_pointer,
    make_softleaf,
    pte_kind,
    pte_kind_array,
    pte_pfn,
    softleaf_type,
)
from ..mm.physmem import (
    PG_anon,
    PG_anon_exclusive,
    PG_dirty,
    PG_locked,
    PG_swapcache,
    PG_zone_device,
)
from ..mm.rmap import (
    migration_entry_for,
    remove_migration_ptes,
    rmap_walk,
    try_to_unmap,
)
from ..mm.thp import split_huge_pmd
from ..mm.vma import VM_SPECIAL
from ..notifier import MMU_NOTIFY_MIGRATE, invalidation

if TYPE_CHECKING:
    from ..machine import Machine
    from ..mm.vma import Vma
from . import args as _defs
from .args import (
    _I64,
    MIGRATE_PFN_COMPOUND,
    MIGRATE_PFN_MIGRATE,
    MIGRATE_PFN_SHIFT,
    MIGRATE_PFN_VALID,
    MIGRATE_PFN_WRITE,
    MIGRATE_VMA_SELECT_COMPOUND,
    MIGRATE_VMA_SELECT_DEVICE_COHERENT,
    MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
    MIGRATE_VMA_SELECT_SYSTEM,
    MigrateVma,
    _entries,
    migrate_pfn,
    migrate_pfn_to_page,
)


def migrate_vma_setup(args: MigrateVma) -> None:
    """Collect and unmap the pages of [start, end) that can migrate."""
    nr = (args.end - args.start) >> PAGE_SHIFT
    args.start &= ~(PAGE_SIZE - 1)
    args.end &= ~(PAGE_SIZE - 1)
    vma = args.vma
    if vma is None or vma.is_hugetlb or vma.flags & VM_SPECIAL:
        raise InvalidArgument("migrate_vma_setup: no VMA, or a hugetlb/special one")
    if nr <= 0:
        raise InvalidArgument("migrate_vma_setup: empty range")
    if not vma.start <= args.start < vma.end:
        raise InvalidArgument(f"migrate_vma_setup: start {args.start:#x} outside {vma}")
    if not vma.start < args.end <= vma.end:
        raise InvalidArgument(f"migrate_vma_setup: end {args.end:#x} outside {vma}")
    if args.src is None or args.dst is None or len(args.src) < nr or len(args.dst) < nr:
        raise InvalidArgument("migrate_vma_setup: src and dst need an entry per page")
    machine = vma.mm.machine
    phys = machine.phys
    if args.fault_page is not None:
        pgmap = phys.pgmap_of(args.fault_page)
        if pgmap is None or pgmap.type != MEMORY_DEVICE_PRIVATE:
            raise InvalidArgument("migrate_vma_setup: fault_page is not device-private")
        if not phys.folio_locked(phys.head(args.fault_page)):
            raise InvalidArgument("migrate_vma_setup: fault_page is not locked")
    vma.mm.mmap_lock.assert_held()
    src, _ = _entries(args)
    src[:nr] = 0
    args.cpages = 0
    args.npages = 0
    with invalidation(vma.mm, MMU_NOTIFY_MIGRATE, args.start, args.end, args.pgmap_owner):
        _collect(args, nr)
    args.end = args.start + (args.npages << PAGE_SHIFT)
    sched.point("migrate:collected")
    if args.cpages:
        _unmap_phase(machine, args, args.npages)
    args.cpages = int(((src[: args.npages] & U64(MIGRATE_PFN_MIGRATE)) != 0).sum())


def _selects(args: MigrateVma, machine: Machine, pfn: int) -> bool:
    """Does the selection (flags + owner) take the page at ``pfn``?"""
    pgmap = machine.phys.pgmap_of(pfn)
    if pgmap is None:
        return bool(args.flags & MIGRATE_VMA_SELECT_SYSTEM)
    if pgmap.owner is not args.pgmap_owner:
        return False
    if pgmap.type == MEMORY_DEVICE_PRIVATE:
        return bool(args.flags & MIGRATE_VMA_SELECT_DEVICE_PRIVATE)
    if pgmap.type == MEMORY_DEVICE_COHERENT:
        return bool(args.flags & MIGRATE_VMA_SELECT_DEVICE_COHERENT)
    return False


def _collect(args: MigrateVma, nr: int) -> None:
    vma = args.vma
    assert vma is not None
    mm = vma.mm
    pt = mm.pt
    start_vpn = args.start >> PAGE_SHIFT
    end_vpn = start_vpn + nr
    compound = bool(args.flags & MIGRATE_VMA_SELECT_COMPOUND)
    vpn = start_vpn
    while vpn < end_vpn:
        chunk_end = min(end_vpn, (vpn | (PMD_PAGES - 1)) + 1)
        i = vpn - start_vpn
        aligned = vpn % PMD_PAGES == 0 and chunk_end - vpn == PMD_PAGES
        pmdloc = pt.pmd_loc(vpn)
        e = pt.get(pmdloc) if pmdloc >= 0 else 0
        if e == 0:
            _collect_hole(args, vma, i, chunk_end - vpn, compound and aligned)
        elif not is_table_pointer(e):
            if not _collect_pmd(args, vma, vpn, pmdloc, e, compound and aligned):
                continue  # the PMD was split: look at it again as PTEs
        else:
            _collect_pte_range(args, vma, vpn, chunk_end)
        vpn = chunk_end
    args.npages = nr


def _collect_hole(args: MigrateVma, vma: Vma, i: int, n: int, as_compound: bool) -> None:
    src, _ = _entries(args)
    if not vma.is_anonymous:
        return  # stays 0
    if as_compound:
        src[i] = U64(MIGRATE_PFN_MIGRATE | MIGRATE_PFN_COMPOUND)
        args.cpages += 1
    else:
        src[i : i + n] = U64(MIGRATE_PFN_MIGRATE)
        args.cpages += n


def _collect_pmd(
    args: MigrateVma, vma: Vma, vpn: int, pmdloc: int, e: int, as_compound: bool
) -> bool:
    """A PMD entry; returns False if it was split (rescan the chunk as PTEs)."""
    machine = vma.mm.machine
    phys = machine.phys
    src, _ = _entries(args)
    i = vpn - (args.start >> PAGE_SHIFT)
    kind = pte_kind(e)
    pfn = pte_pfn(e)
    if kind == KIND_PRESENT and phys.is_zero_pfn(pfn):
        if not args.flags & MIGRATE_VMA_SELECT_SYSTEM:
            return True
        if as_compound:
            src[i] = U64(MIGRATE_PFN_MIGRATE | MIGRATE_PFN_COMPOUND)
            args.cpages += 1
            return True
        split_huge_pmd(vma, vpn)
        return False
    if kind not in (KIND_PRESENT, KIND_DEVICE_PRIVATE):
        return True  # migration entries and anything else stay 0
    if not _selects(args, machine, pfn):
        return True
    if not as_compound:
        split_huge_pmd(vma, vpn)
        return False
    write = _entry_writable(e, kind)
    if _isolate_one(args, vma, pmdloc, e, pfn, pfn, write):
        src[i] = U64(
            migrate_pfn(pfn)
            | MIGRATE_PFN_MIGRATE
            | MIGRATE_PFN_COMPOUND
            | (MIGRATE_PFN_WRITE if write else 0)
        )
        args.cpages += 1
    return True


def _entry_writable(e: int, kind: int) -> bool:
    """A present entry's write bit, or a device-private entry's write type."""
    if kind == KIND_PRESENT:
        return bool(e & PTE_WRITE)
    return softleaf_type(e) == SWP_DEVICE_PRIVATE_WRITE


def _collect_pte_range(args: MigrateVma, vma: Vma, lo: int, hi: int) -> None:
    """Collect a range mapped by PTEs: vectorised unless small or a large folio is in it."""
    if hi - lo <= _defs.SCALAR_MAX_PAGES or not _collect_ptes_array(args, vma, lo, hi):
        _collect_ptes(args, vma, lo, hi)


def _selectable(args: MigrateVma, machine: Machine, pfns: NDArray[np.int64]) -> NDArray[np.bool_]:
    """``_selects`` for many pfns at once."""
    phys = machine.phys
    ok = (pfns < phys.ram_pages) & bool(args.flags & MIGRATE_VMA_SELECT_SYSTEM)
    for start, end, pgmap in phys.pgmaps:
        if pgmap.owner is not args.pgmap_owner:
            continue
        wanted = (
            pgmap.type == MEMORY_DEVICE_PRIVATE and args.flags & MIGRATE_VMA_SELECT_DEVICE_PRIVATE
        ) or (
            pgmap.type == MEMORY_DEVICE_COHERENT and args.flags & MIGRATE_VMA_SELECT_DEVICE_COHERENT
        )
        if wanted:
            ok |= (pfns >= start) & (pfns < end)
    return ok


def _collect_ptes_array(args: MigrateVma, vma: Vma, lo: int, hi: int) -> bool:
    """The whole PTE range in array operations; False (nothing done) if a large
    folio needs splitting first."""
    machine = vma.mm.machine
    phys = machine.phys
    pt = vma.mm.pt
    src, _ = _entries(args)
    walk = pt.walk(lo, hi - lo)
    e = walk.entries
    kinds = pte_kind_array(e)
    pfn = (e & U64(PTE_PFN_MASK)).astype(_I64)
    present = kinds == KIND_PRESENT
    zero = present & phys.zero_mask(pfn)
    cand = (present & ~zero & ((e & U64(PTE_SPECIAL)) == 0)) | (kinds == KIND_DEVICE_PRIVATE)
    if cand.any():
        cand[cand] = _selectable(args, machine, pfn[cand])
    if cand.any():
        if (phys.order[pfn[cand]] > 0).any():
            return False  # a large folio: split it first, page by page
        cand[cand] = phys.mapping[pfn[cand]] != 0
    i0 = lo - (args.start >> PAGE_SHIFT)
    out = src[i0 : i0 + (hi - lo)]
    empty = (kinds == KIND_NONE) if vma.is_anonymous else np.zeros(len(e), dtype=np.bool_)
    if args.flags & MIGRATE_VMA_SELECT_SYSTEM:
        empty |= zero
    out[empty] = U64(MIGRATE_PFN_MIGRATE)
    args.cpages += int(empty.sum())
    if not cand.any():
        return True
    idx = np.flatnonzero(cand)
    heads = pfn[idx]
    fault_head = phys.head(args.fault_page) if args.fault_page is not None else -1
    flags = phys.flags[heads]
    locked = ((flags & PG_locked) != 0) & (heads != fault_head)
    excl = (flags & PG_anon_exclusive) != 0
    pinned = excl & np.isin(heads, np.fromiter(phys.pins, dtype=_I64, count=len(phys.pins)))
    ok = ~locked & ~pinned  # trylock failed, or a maybe-pinned page: left alone
    idx, heads, excl = idx[ok], heads[ok], excl[ok]
    ent = e[idx]
    phys.flags[heads[heads != fault_head]] |= np.uint16(PG_locked)
    dirty = (ent & U64(PTE_DIRTY)) != 0
    phys.flags[heads[dirty]] |= np.uint16(PG_dirty)
    is_present = kinds[idx] == KIND_PRESENT
    typ = (ent & U64(SOFTLEAF_TYPE_MASK)) >> U64(SOFTLEAF_TYPE_SHIFT)
    write = np.where(is_present, (ent & U64(PTE_WRITE)) != 0, typ == U64(SWP_DEVICE_PRIVATE_WRITE))
    mtype = np.where(
        write,
        U64(SWP_MIGRATION_WRITE),
        np.where(excl, U64(SWP_MIGRATION_READ_EXCLUSIVE), U64(SWP_MIGRATION_READ)),
    )
    migration = (
        heads.astype(U64)
        | U64(PTE_SOFTLEAF)
        | (mtype << U64(SOFTLEAF_TYPE_SHIFT))
        | (ent & U64(PTE_YOUNG | PTE_DIRTY))
    )
    pt.flat[walk.loc[idx]] = migration
    machine.costs.pte_writes += len(idx)
    # The collect reference replaces the mapping's: refcount stays, mapcount drops.
    phys.mapcount[heads] -= 1
    out[idx] = (
        (heads.astype(U64) << U64(MIGRATE_PFN_SHIFT))
        | U64(MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE)
        | np.where(write, U64(MIGRATE_PFN_WRITE), U64(0))
    )
    args.cpages += len(idx)
    return True


def _collect_ptes(args: MigrateVma, vma: Vma, lo: int, hi: int) -> None:
    machine = vma.mm.machine
    phys = machine.phys
    pt = vma.mm.pt
    src, _ = _entries(args)
    base = args.start >> PAGE_SHIFT
    vpn = lo
    while vpn < hi:
        loc, e, _level = pt.lookup(vpn)
        i = vpn - base
        kind = pte_kind(e) if loc >= 0 else KIND_NONE
        if kind == KIND_NONE:
            if vma.is_anonymous:
                src[i] = U64(MIGRATE_PFN_MIGRATE)
                args.cpages += 1
            vpn += 1
            continue
        pfn = pte_pfn(e)
        if kind == KIND_PRESENT and phys.is_zero_pfn(pfn):
            if args.flags & MIGRATE_VMA_SELECT_SYSTEM:
                src[i] = U64(MIGRATE_PFN_MIGRATE)
                args.cpages += 1
            vpn += 1
            continue
        if kind not in (KIND_PRESENT, KIND_DEVICE_PRIVATE) or e & PTE_SPECIAL:
            vpn += 1
            continue
        if not _selects(args, machine, pfn) or phys.mapping[phys.head(pfn)] == 0:
            vpn += 1
            continue
        head = phys.head(pfn)
        if phys.order[head] > 0:
            # A large folio mapped by PTEs is split first; if that fails the
            # rest of the chunk is left alone.
            if not _split_device_or_system_folio(machine, head, args.fault_page):
                vpn = hi
                continue
            continue  # look at the same page again, now order 0
        write = _entry_writable(e, kind)
        if _isolate_one(args, vma, loc, e, pfn, head, write):
            src[i] = U64(
                migrate_pfn(pfn) | MIGRATE_PFN_MIGRATE | (MIGRATE_PFN_WRITE if write else 0)
            )
            args.cpages += 1
        vpn += 1


def _split_device_or_system_folio(machine: Machine, head: int, fault_page: int | None) -> bool:
    from ..mm.reclaim import split_folio

    phys = machine.phys
    if phys.flags[head] & PG_zone_device:
        return _split_device_folio(machine, head, fault_page)
    return split_folio(machine, head)


def _split_device_folio(machine: Machine, head: int, fault_page: int | None) -> bool:
    """Split a PTE-mapped device THP, telling the driver (``folio_split``).

    The fault path's reference and lock move to the folio of the faulting
    page, which stays locked, as the kernel keeps the fault folio locked.
    """
    phys = machine.phys
    nr = 1 << int(phys.order[head])
    faulting = fault_page is not None and head <= fault_page < head + nr
    extra = phys.extra_refs.get(head, 0) if faulting else 0
    if phys.refcount[head] != phys.mapcount[head] + extra:
        return False
    counts = np.zeros(nr, dtype=np.int32)
    for hit in rmap_walk(machine, head):
        if (hit.levels > 0).any():
            return False
        np.add.at(counts, hit.pfns - head, 1)
    pages = phys.split_folio_metadata(head, counts)
    pgmap = phys.pgmap_of(head)
    split = getattr(pgmap.ops, "folio_split", None) if pgmap is not None else None
    for tail in range(head + 1, head + nr):
        if split is not None:
            split(head, tail)
    phys.flags[pages] &= np.uint16(~PG_locked & 0xFFFF)
    if faulting:
        assert fault_page is not None
        del phys.extra_refs[head]
        phys.extra_refs[fault_page] = extra
        phys.refcount[fault_page] += extra
        phys.flags[fault_page] |= np.uint16(PG_locked)
    unmapped = pages[phys.refcount[pages] == 0]
    if len(unmapped):
        phys.refcount[unmapped] = 1
        phys.put(unmapped)
    return True


def _isolate_one(
    args: MigrateVma, vma: Vma, loc: int, e: int, pfn: int, head: int, write: bool
) -> bool:
    """Reference, lock and unmap one selected page (or PMD folio) of ``vma``."""
    machine = vma.mm.machine
    phys = machine.phys
    pt = vma.mm.pt
    fault_head = phys.head(args.fault_page) if args.fault_page is not None else None
    phys.refcount[head] += 1  # the collect reference
    if head != fault_head and not phys.folio_trylock(head):
        phys.put_one(head)
        return False  # best effort: avoid deadlocking with another migration
    if phys.flags[head] & PG_anon_exclusive and phys.pins.get(head, 0):
        # folio_try_share_anon_rmap fails on a maybe-pinned page: leave it.
        if head != fault_head:
            phys.folio_unlock(head)
        phys.put_one(head)
        return False
    if e & PTE_DIRTY:
        phys.flags[head] |= np.uint16(PG_dirty)
    if phys.flags[pfn] & PG_anon_exclusive and not write:
        typ = SWP_MIGRATION_READ_EXCLUSIVE
    else:
        typ = SWP_MIGRATION_WRITE if write else SWP_MIGRATION_READ
    pt.set(loc, make_softleaf(typ, pfn, keep=e))
    phys.mapcount[head] -= 1
    phys.refcount[head] -= 1  # the mapping's reference
    machine.costs.pte_writes += 1
    return True


def _unmap_phase(machine: Machine, args: MigrateVma, npages: int) -> None:
    """``migrate_device_unmap``: unmap other mappings, drop what cannot move."""
    src, _ = _entries(args)
    args.unmapped_elsewhere = _migrate_device_unmap(machine, src, npages, args.fault_page)


def _migrate_device_unmap(
    machine: Machine, src: NDArray[np.uint64], npages: int, fault_page: int | None
) -> set[int]:
    """Unmap selected folios everywhere else; drop those that cannot move.

    Returns the folios that had other mappings. Up to ``SCALAR_MAX_PAGES``
    entries go entry by entry, more in one vectorised pass; both agree.
    """
    if npages <= _defs.SCALAR_MAX_PAGES:
        return _unmap_entries(machine, src, npages, fault_page)
    return _unmap_entries_array(machine, src, npages, fault_page)


def _unmap_entries_array(
    machine: Machine, src: NDArray[np.uint64], npages: int, fault_page: int | None
) -> set[int]:
    """``_migrate_device_unmap`` over the whole of ``src`` in one vectorised pass."""
    phys = machine.phys
    elsewhere: set[int] = set()
    s_all = src[:npages]
    sel = np.flatnonzero(
        (s_all & U64(MIGRATE_PFN_MIGRATE | MIGRATE_PFN_VALID))
        == U64(MIGRATE_PFN_MIGRATE | MIGRATE_PFN_VALID)
    )
    if len(sel) == 0:
        return elsewhere
    heads = phys.head_of((s_all[sel] >> U64(MIGRATE_PFN_SHIFT)).astype(_I64))
    for head in heads[phys.mapcount[heads] > 0].tolist():
        # Still mapped elsewhere (a fork child, another mapping): unmap those
        # too, with CLEAR, as try_to_migrate does.
        elsewhere.add(head)
        try_to_unmap(machine, head, lambda e: migration_entry_for(phys, e))
    flags = phys.flags[heads]
    extra = np.ones(len(heads), dtype=np.int64)
    if fault_page is not None:
        extra += heads == phys.head(fault_page)
    page_cache = (
        ((flags & PG_anon) == 0) & (phys.mapping[heads] != 0) & ((flags & PG_zone_device) == 0)
    )
    extra += page_cache
    extra += (flags & PG_swapcache) != 0
    # Still mapped, or referenced beyond the mappings (pinned): it stays.
    stuck = (phys.mapcount[heads] > 0) | (phys.refcount[heads] - extra > phys.mapcount[heads])
    _restore_stuck(machine, src, sel[stuck].tolist(), fault_page)
    return elsewhere


def _unmap_entries(
    machine: Machine, src: NDArray[np.uint64], npages: int, fault_page: int | None
) -> set[int]:
    """``_migrate_device_unmap`` entry by entry: cheaper for the few pages a fault migrates."""
    phys = machine.phys
    want = MIGRATE_PFN_MIGRATE | MIGRATE_PFN_VALID
    picked: list[tuple[int, int]] = []
    for i, s in enumerate(src[:npages].tolist()):
        if s & want == want:
            picked.append((i, phys.head(s >> MIGRATE_PFN_SHIFT)))
    elsewhere: set[int] = set()
    for head in [h for _, h in picked if phys.mapcount[h] > 0]:
        elsewhere.add(head)
        try_to_unmap(machine, head, lambda e: migration_entry_for(phys, e))
    fault_head = phys.head(fault_page) if fault_page is not None else -1
    stuck: list[int] = []
    for i, head in picked:
        flags = int(phys.flags[head])
        extra = 1 + (head == fault_head) + bool(flags & PG_swapcache)
        if not flags & (PG_anon | PG_zone_device) and phys.mapping[head] != 0:
            extra += 1  # the page cache's reference
        mapcount = int(phys.mapcount[head])
        if mapcount > 0 or int(phys.refcount[head]) - extra > mapcount:
            stuck.append(i)
    _restore_stuck(machine, src, stuck, fault_page)
    return elsewhere


def _restore_stuck(
    machine: Machine, src: NDArray[np.uint64], stuck: list[int], fault_page: int | None
) -> None:
    """Entries that cannot move: put their mappings back, unlock, drop the collect reference."""
    phys = machine.phys
    for i in stuck:
        src[i] = U64(int(src[i]) & ~MIGRATE_PFN_MIGRATE)
    for i in stuck:
        pfn = migrate_pfn_to_page(int(src[i]))
        assert pfn is not None
        head = phys.head(pfn)
        remove_migration_ptes(machine, head, head)
        if fault_page is None or head != phys.head(fault_page):
            phys.folio_unlock(head)
        phys.put_one(head)
        src[i] = U64(0)
