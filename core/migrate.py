"""Device migration: ``migrate_vma_*`` and ``migrate_device_*``.

Kernel counterpart: include/linux/migrate.h and mm/migrate_device.c (mainline
6.19+, with device-private THP: ``MIGRATE_VMA_SELECT_COMPOUND`` and
``MIGRATE_PFN_COMPOUND``). ``make_device_exclusive`` (mm/rmap.c) is
:mod:`hmmsim.exclusive`.

The three steps follow the kernel's (docs/hmm-protocol.md §3):

* ``migrate_vma_setup`` collects [start, end) inside one ``MMU_NOTIFY_MIGRATE``
  invalidation (owner = ``pgmap_owner``): holes of anonymous VMAs and zero
  pages become "empty" entries (MIGRATE without VALID); selected pages are
  referenced, locked, unmapped and replaced by migration entries; then pages
  still mapped elsewhere are unmapped there too (``CLEAR``), and any page with
  references beyond the migration's own (pinned) is restored and dropped;
* the driver allocates and fills ``dst``; ``migrate_vma_pages`` commits the
  struct-page state and inserts pages into holes (a second ``MIGRATE``
  invalidation); ``migrate_vma_finalize`` turns the migration entries into
  entries for the new pages (or back to the old ones), unlocks and releases.

A folio is named by its head pfn; entries of ``src``/``dst`` are
``(pfn << MIGRATE_PFN_SHIFT) | flags``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import attrs
import numpy as np
from numpy.typing import NDArray

from . import sched
from .errors import InvalidArgument
from .mm.memremap import MEMORY_DEVICE_COHERENT, MEMORY_DEVICE_PRIVATE
from .mm.pagetable import (
    KIND_DEVICE_PRIVATE,
    KIND_MIGRATION,
    KIND_NONE,
    KIND_PRESENT,
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_ORDER,
    PMD_PAGES,
    PTE_DIRTY,
    PTE_PFN_MASK,
    PTE_PRESENT,
    PTE_SOFTLEAF,
    PTE_SPECIAL,
    PTE_WRITE,
    PTE_YOUNG,
    SOFTLEAF_TYPE_MASK,
    SOFTLEAF_TYPE_SHIFT,
    SWP_DEVICE_PRIVATE_READ,
    SWP_DEVICE_PRIVATE_WRITE,
    SWP_MIGRATION_READ,
    SWP_MIGRATION_READ_EXCLUSIVE,
    SWP_MIGRATION_WRITE,
    U64,
    entry_kind,
    is_table_pointer,
    kind_of,
    make_present,
    make_softleaf,
    make_table_pointer,
    pfn_of,
    softleaf_type,
)
from .mm.physmem import (
    PER_PAGE_FLAGS,
    PG_anon,
    PG_anon_exclusive,
    PG_dirty,
    PG_locked,
    PG_swapbacked,
    PG_swapcache,
    PG_uptodate,
    PG_zone_device,
)
from .mm.rmap import (
    anon_vma_prepare,
    migration_entry_for,
    remove_migration_ptes,
    rmap_walk,
    try_to_unmap,
)
from .mm.swap import swapcache_del
from .mm.thp import split_huge_pmd, split_leaf_entries
from .mm.vma import VM_SPECIAL, VM_WRITE
from .notifier import MMU_NOTIFY_MIGRATE, invalidation

if TYPE_CHECKING:
    from .machine import Machine
    from .mm.vma import Vma

MIGRATE_PFN_VALID: Final = 1 << 0
MIGRATE_PFN_MIGRATE: Final = 1 << 1
MIGRATE_PFN_WRITE: Final = 1 << 3
MIGRATE_PFN_COMPOUND: Final = 1 << 4
MIGRATE_PFN_SHIFT: Final = 6

MIGRATE_VMA_SELECT_SYSTEM: Final = 1 << 0
MIGRATE_VMA_SELECT_DEVICE_PRIVATE: Final = 1 << 1
MIGRATE_VMA_SELECT_DEVICE_COHERENT: Final = 1 << 2
MIGRATE_VMA_SELECT_COMPOUND: Final = 1 << 3

_I64 = np.int64

#: Up to this many pages, collect/pages/finalize take the per-entry paths:
#: array set-up costs more than it saves on a fault's one page (the
#: vectorised paths pay off on migration windows of tens of pages and more).
SCALAR_MAX_PAGES: Final = 8


def migrate_pfn(pfn: int) -> int:
    return (pfn << MIGRATE_PFN_SHIFT) | MIGRATE_PFN_VALID


def migrate_pfn_to_page(entry: int) -> int | None:
    """The pfn an entry names, or None when it has no page (no VALID)."""
    entry = int(entry)
    if not entry & MIGRATE_PFN_VALID:
        return None
    return entry >> MIGRATE_PFN_SHIFT


@attrs.define(eq=False)
class MigrateVma:
    """``struct migrate_vma``."""

    vma: Vma | None
    start: int
    end: int
    src: NDArray[np.uint64] | None
    dst: NDArray[np.uint64] | None
    pgmap_owner: object | None = None
    flags: int = 0
    #: Set by ``migrate_to_ram``: the faulting device-private page, locked.
    fault_page: int | None = None
    cpages: int = 0
    npages: int = 0
    #: Model bookkeeping, not in the kernel struct: folios that were also
    #: unmapped from other mappings (so finalize must find those via rmap).
    unmapped_elsewhere: set[int] = attrs.field(factory=set, repr=False)


def _entries(args: MigrateVma) -> tuple[NDArray[np.uint64], NDArray[np.uint64]]:
    assert args.src is not None and args.dst is not None
    return args.src, args.dst


# ----- setup: collect + unmap ----------------------------------------------------


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
            _collect_ptes(args, vma, vpn, chunk_end)
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
    kind = kind_of(e)
    pfn = pfn_of(e)
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


def _collect_ptes(args: MigrateVma, vma: Vma, lo: int, hi: int) -> None:
    """Collect a range mapped by PTEs: vectorised unless small or a large folio is in it."""
    if hi - lo <= SCALAR_MAX_PAGES or not _collect_ptes_vectorised(args, vma, lo, hi):
        _collect_ptes_one_by_one(args, vma, lo, hi)


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


def _collect_ptes_vectorised(args: MigrateVma, vma: Vma, lo: int, hi: int) -> bool:
    """The whole PTE range in array operations; False (nothing done) if a large
    folio needs splitting first."""
    machine = vma.mm.machine
    phys = machine.phys
    pt = vma.mm.pt
    src, _ = _entries(args)
    walk = pt.walk(lo, hi - lo)
    e = walk.entries
    kinds = entry_kind(e)
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


def _collect_ptes_one_by_one(args: MigrateVma, vma: Vma, lo: int, hi: int) -> None:
    machine = vma.mm.machine
    phys = machine.phys
    pt = vma.mm.pt
    src, _ = _entries(args)
    base = args.start >> PAGE_SHIFT
    vpn = lo
    while vpn < hi:
        loc, e, _level = pt.lookup(vpn)
        i = vpn - base
        kind = kind_of(e) if loc >= 0 else KIND_NONE
        if kind == KIND_NONE:
            if vma.is_anonymous:
                src[i] = U64(MIGRATE_PFN_MIGRATE)
                args.cpages += 1
            vpn += 1
            continue
        pfn = pfn_of(e)
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
    from .mm.reclaim import split_folio

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
    args.unmapped_elsewhere = _unmap_entries(machine, src, npages, args.fault_page)


def _unmap_entries(
    machine: Machine, src: NDArray[np.uint64], npages: int, fault_page: int | None
) -> set[int]:
    """Unmap selected folios everywhere else; drop those that cannot move.

    Returns the folios that had other mappings.
    """
    if npages <= SCALAR_MAX_PAGES:
        return _unmap_entries_one_by_one(machine, src, npages, fault_page)
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


def _unmap_entries_one_by_one(
    machine: Machine, src: NDArray[np.uint64], npages: int, fault_page: int | None
) -> set[int]:
    """``_unmap_entries`` entry by entry: cheaper for the few pages a fault migrates."""
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


# ----- pages + finalize -------------------------------------------------------------


def migrate_vma_pages(args: MigrateVma) -> None:
    """Commit the migration of every entry that has a destination."""
    vma = args.vma
    assert vma is not None
    vma.mm.mmap_lock.assert_held()
    sched.point("migrate:before_pages")
    _migrate_pages(vma.mm.machine, args, vma)


def migrate_device_pages(
    machine: Machine, src: NDArray[np.uint64], dst: NDArray[np.uint64], npages: int
) -> None:
    """``migrate_device_pages``: as ``migrate_vma_pages``, without a VMA (no holes)."""
    args = MigrateVma(None, 0, npages << PAGE_SHIFT, src, dst)
    args.npages = npages
    _migrate_pages(machine, args, None)


def _migrate_pages_vectorised(machine: Machine, args: MigrateVma) -> NDArray[np.int64]:
    """``folio_migrate_mapping`` for order-0 anonymous/device pages in one pass.

    Returns the selected entries it left undecided, for the generic loop.
    """
    phys = machine.phys
    src, dst = _entries(args)
    # Only selected entries matter; a sparse src (an evicted device chunk with
    # a few pages in use) costs one pass over the array, then its few entries.
    selected = np.flatnonzero(src[: args.npages] & U64(MIGRATE_PFN_MIGRATE))
    if args.npages <= SCALAR_MAX_PAGES:
        return selected  # the generic loop is cheaper
    s = src[selected]
    d = dst[selected]
    todo = (s & U64(MIGRATE_PFN_VALID)) != 0
    todo &= (d & U64(MIGRATE_PFN_VALID)) != 0
    todo &= ((s | d) & U64(MIGRATE_PFN_COMPOUND)) == 0
    if not todo.any():
        return selected
    pos = np.flatnonzero(todo)  # positions in ``selected``
    spage = (s[pos] >> U64(MIGRATE_PFN_SHIFT)).astype(_I64)
    dpage = (d[pos] >> U64(MIGRATE_PFN_SHIFT)).astype(_I64)
    sflags = phys.flags[spage]
    simple = (sflags & PG_anon) != 0  # anonymous (RAM or device): no page cache
    simple &= (sflags & PG_swapcache) == 0
    simple &= phys.order[spage] == 0
    for start, end, pgmap in phys.pgmaps:
        if pgmap.type not in (MEMORY_DEVICE_PRIVATE, MEMORY_DEVICE_COHERENT):
            simple &= ~((dpage >= start) & (dpage < end))
    pos, spage, dpage = pos[simple], spage[simple], dpage[simple]
    idx = selected[pos]
    fault_head = phys.head(args.fault_page) if args.fault_page is not None else -1
    extra = 1 + (spage == fault_head)
    ok = (phys.refcount[spage] == extra) & (phys.mapcount[spage] == 0)
    src[idx[~ok]] &= ~U64(MIGRATE_PFN_MIGRATE)  # somebody took a reference meanwhile
    sp, dp = spage[ok], dpage[ok]
    keep = np.uint16(PG_zone_device | PG_locked)
    moved = np.uint16(int(PER_PAGE_FLAGS) | PG_anon | PG_dirty | PG_swapbacked | PG_uptodate)
    phys.flags[dp] = (phys.flags[dp] & keep) | (phys.flags[sp] & moved)
    phys.mapping[dp] = phys.mapping[sp]
    phys.index[dp] = phys.index[sp]
    undecided = np.ones(len(selected), dtype=np.bool_)
    undecided[pos] = False
    return selected[undecided]


def _migrate_pages(machine: Machine, args: MigrateVma, vma: Vma | None) -> None:
    todo = _migrate_pages_vectorised(machine, args)
    src, dst = _entries(args)
    stack = None  # the MIGRATE invalidation, started at the first hole filled
    pending = todo[::-1].tolist()  # a stack, lowest index on top
    try:
        while pending:
            i = pending.pop()
            s = int(src[i])
            d = int(dst[i])
            dpage = migrate_pfn_to_page(d)
            spage = migrate_pfn_to_page(s)
            if not s & MIGRATE_PFN_MIGRATE:
                continue
            if dpage is None:
                src[i] = U64(s & ~MIGRATE_PFN_MIGRATE)
                continue
            if spage is None:
                if vma is None:
                    src[i] = U64(s & ~MIGRATE_PFN_MIGRATE)
                    continue
                if stack is None:
                    addr = args.start + (i << PAGE_SHIFT)
                    stack = invalidation(
                        vma.mm, MMU_NOTIFY_MIGRATE, addr, args.end, args.pgmap_owner
                    )
                    stack.__enter__()
                if s & MIGRATE_PFN_COMPOUND and not d & MIGRATE_PFN_COMPOUND:
                    # A compound hole with small destinations: page by page
                    # (a huge zero PMD there is split to zero-page PTEs first).
                    src[i : i + PMD_PAGES] = U64(MIGRATE_PFN_MIGRATE)
                    s = int(src[i])
                    pending = _with_tail_entries(pending, i)
                    split_huge_pmd(vma, (args.start >> PAGE_SHIFT) + i)
                ok = _insert_page(
                    args,
                    vma,
                    i,
                    dpage,
                    bool(d & MIGRATE_PFN_COMPOUND) and bool(s & MIGRATE_PFN_COMPOUND),
                )
                if not ok:
                    src[i] = U64(s & ~MIGRATE_PFN_MIGRATE)
                continue
            if s & MIGRATE_PFN_COMPOUND and not d & MIGRATE_PFN_COMPOUND:
                if not _split_migrating_folio(machine, args, i, spage):
                    src[i] = U64(s & ~MIGRATE_PFN_MIGRATE)
                    continue
                pending = _with_tail_entries(pending, i)
                s = int(src[i])
            elif d & MIGRATE_PFN_COMPOUND and not s & MIGRATE_PFN_COMPOUND:
                src[i] = U64(s & ~MIGRATE_PFN_MIGRATE)
                continue
            if not _migrate_mapping(machine, args, spage, dpage):
                src[i] = U64(s & ~MIGRATE_PFN_MIGRATE)
    finally:
        if stack is not None:
            stack.__exit__(None, None, None)


def _with_tail_entries(pending: list[int], i: int) -> list[int]:
    """A compound entry at ``i`` was split into small ones: its tails need work too."""
    return sorted(set(pending) | set(range(i + 1, i + PMD_PAGES)), reverse=True)


def _migrate_mapping(machine: Machine, args: MigrateVma, spage: int, dpage: int) -> bool:
    """``folio_migrate_mapping`` + flags: the destination takes the source's place."""
    phys = machine.phys
    sflags = int(phys.flags[spage])
    dpgmap = phys.pgmap_of(dpage)
    if dpgmap is not None and dpgmap.type not in (MEMORY_DEVICE_PRIVATE, MEMORY_DEVICE_COHERENT):
        return False
    page_cache = (
        not sflags & PG_anon and bool(phys.mapping[spage]) and not (sflags & PG_zone_device)
    )
    if page_cache and dpgmap is not None:
        return False  # only anonymous memory moves into device memory
    if sflags & PG_swapcache:
        # Only if the swap slot can be freed, i.e. the cache is its last user.
        slot = machine.swap.slot_of[spage]
        if machine.swap.count[slot] != 1:
            return False
        swapcache_del(machine.swap, phys, spage)
    extra = 1  # the migration's own reference
    if args.fault_page is not None and spage == phys.head(args.fault_page):
        extra += 1  # the fault path's reference
    if page_cache:
        extra += 1
    if phys.refcount[spage] != extra or phys.mapcount[spage] != 0:
        return False  # somebody took a reference meanwhile (a GUP pin)
    nr = 1 << int(phys.order[spage])
    src_pages = np.arange(spage, spage + nr, dtype=_I64)
    dst_pages = np.arange(dpage, dpage + nr, dtype=_I64)
    keep = np.uint16(PG_zone_device | PG_locked)
    moved = np.uint16(int(PER_PAGE_FLAGS) | PG_anon | PG_dirty | PG_swapbacked | PG_uptodate)
    phys.flags[dst_pages] = (phys.flags[dst_pages] & keep) | (phys.flags[src_pages] & moved)
    phys.mapping[dpage] = phys.mapping[spage]
    phys.index[dpage] = phys.index[spage]
    if page_cache:
        f = machine.mappings[int(phys.mapping[spage])]
        f.cache[int(phys.index[spage])] = dpage
        phys.refcount[dpage] += 1
        phys.refcount[spage] -= 1
    return True


def _split_migrating_folio(machine: Machine, args: MigrateVma, i: int, spage: int) -> bool:
    """A compound source with small destinations: split the (unmapped) folio.

    In a ``migrate_to_ram`` of the folio, the fault path's reference (and its
    lock, which every page now has) stays with the faulting page, whose folio
    it becomes; that page then migrates like the others.
    """
    phys = machine.phys
    src, _ = _entries(args)
    nr = 1 << int(phys.order[spage])
    # Its single PMD migration entry becomes 512 PTE migration entries.
    for hit in list(rmap_walk(machine, spage)):
        for first in np.unique(hit.vpns[hit.levels > 0] & ~(PMD_PAGES - 1)).tolist():
            pt = hit.vma.mm.pt
            pmdloc = pt.pmd_loc(first)
            e = pt.get(pmdloc)
            t = pt.alloc_table()
            pt.rows[t] = split_leaf_entries(phys, e)
            pt.set(pmdloc, make_table_pointer(t))
    # Unmapped: no mappings, and each page now holds the migration's reference.
    pages = phys.split_folio_metadata(spage, np.zeros(nr, dtype=np.int32))
    phys.refcount[pages] = 1
    fault = args.fault_page
    if fault is not None and spage <= fault < spage + nr:
        extra = phys.extra_refs.pop(spage, 0)
        if extra:
            phys.extra_refs[fault] = extra
            phys.refcount[fault] += extra
    pgmap = phys.pgmap_of(spage)
    split = getattr(pgmap.ops, "folio_split", None) if pgmap is not None else None
    if split is not None:
        for tail in range(spage + 1, spage + nr):
            split(spage, tail)
    write = int(src[i]) & MIGRATE_PFN_WRITE
    for k in range(nr):
        src[i + k] = U64(migrate_pfn(spage + k) | MIGRATE_PFN_MIGRATE | write)
    phys.flags[pages[1:]] |= np.uint16(PG_locked)
    return True


def _insert_page(args: MigrateVma, vma: Vma, i: int, dpage: int, compound: bool) -> bool:
    """``migrate_vma_insert_page``: put a new page into a hole or zero-page slot."""
    machine = vma.mm.machine
    phys = machine.phys
    pt = vma.mm.pt
    if not vma.is_anonymous:
        return False
    dpgmap = phys.pgmap_of(dpage)
    if dpgmap is not None and dpgmap.type not in (MEMORY_DEVICE_PRIVATE, MEMORY_DEVICE_COHERENT):
        return False
    vpn = (args.start >> PAGE_SHIFT) + i
    writable = bool(vma.flags & VM_WRITE)
    device_private = dpgmap is not None and dpgmap.type == MEMORY_DEVICE_PRIVATE
    if compound:
        loc = pt.pmd_loc(vpn, alloc=True)
        old = pt.get(loc)
        if old and is_table_pointer(old):
            if pt.rows[pfn_of(old)].any():
                return False
            pt.set(loc, 0)
            pt.free_table(pfn_of(old))
            old = 0
        if old and not (kind_of(old) == KIND_PRESENT and phys.is_zero_pfn(pfn_of(old))):
            return False  # a CPU fault won the race
        order = PMD_ORDER
    else:
        loc = pt.pte_loc(vpn, alloc=True)
        if loc < 0:
            return False
        old = pt.get(loc)
        if old and not (kind_of(old) == KIND_PRESENT and phys.is_zero_pfn(pfn_of(old))):
            return False
        order = 0
    if vma.mm.unstable:
        return False
    av = anon_vma_prepare(machine, vma)
    nr = 1 << order
    phys.flags[dpage : dpage + nr] |= np.uint16(PG_anon | PG_anon_exclusive | PG_swapbacked)
    phys.mapping[dpage] = av.id
    phys.index[dpage] = vma.linear_index(vpn)
    phys.mapcount[dpage] += 1
    phys.refcount[dpage] += 1
    if device_private:
        entry = make_softleaf(
            SWP_DEVICE_PRIVATE_WRITE if writable else SWP_DEVICE_PRIVATE_READ, dpage
        )
    else:
        entry = make_present(dpage, write=writable, dirty=writable, huge=compound)
    pt.set(loc, entry)
    machine.costs.pte_writes += 1
    src, _ = _entries(args)
    src[i] = U64(MIGRATE_PFN_MIGRATE | (MIGRATE_PFN_COMPOUND if compound else 0))
    return True


def migrate_vma_finalize(args: MigrateVma) -> None:
    """Replace migration entries by the new pages (or restore), unlock, release."""
    vma = args.vma
    assert vma is not None
    src, dst = _entries(args)
    machine = vma.mm.machine
    sched.point("migrate:before_finalize")
    _finalize_in_place(machine, args)
    _finalize(machine, src, dst, args.npages, args.fault_page)


def migrate_device_finalize(
    machine: Machine, src: NDArray[np.uint64], dst: NDArray[np.uint64], npages: int
) -> None:
    _finalize_device_in_place(machine, src, dst, npages)
    _finalize(machine, src, dst, npages, None)


def _finalize(
    machine: Machine,
    src: NDArray[np.uint64],
    dst: NDArray[np.uint64],
    npages: int,
    fault_page: int | None,
) -> None:
    phys = machine.phys
    fault_head = phys.head(fault_page) if fault_page is not None else None
    # Entries with neither a source nor a destination need nothing.
    for i in np.flatnonzero((src[:npages] != 0) | (dst[:npages] != 0)).tolist():
        s = int(src[i])
        d = int(dst[i])
        spage = migrate_pfn_to_page(s)
        dpage = migrate_pfn_to_page(d)
        if spage is None:
            if dpage is not None:
                # Inserted into a hole (it holds its own mapping reference), or unused.
                if phys.folio_locked(dpage):
                    phys.folio_unlock(dpage)
                phys.put_one(dpage)
            continue
        if not s & MIGRATE_PFN_MIGRATE or dpage is None:
            if dpage is not None:
                if phys.folio_locked(dpage):
                    phys.folio_unlock(dpage)
                phys.put_one(dpage)
            target = spage
        else:
            target = dpage
        remove_migration_ptes(machine, spage, target)
        if spage != fault_head and phys.folio_locked(spage):
            phys.folio_unlock(spage)
        if target != spage:
            phys.mapping[spage] = 0
        phys.put_one(spage)
        if dpage is not None and target == dpage:
            if phys.folio_locked(dpage):
                phys.folio_unlock(dpage)
            phys.put_one(dpage)


def _finalize_in_place(machine: Machine, args: MigrateVma) -> None:
    """The common case of finalize, vectorised: order-0 pages whose only
    migration entry is the one at their own address in this VMA.

    Handled entries are cleared from ``src``/``dst`` so the generic pass
    skips them.
    """
    vma = args.vma
    assert vma is not None
    phys = machine.phys
    src, dst = _entries(args)
    n = args.npages
    if n <= SCALAR_MAX_PAGES:
        return  # the generic pass is cheaper
    s = src[:n]
    d = dst[:n]
    has = (s & U64(MIGRATE_PFN_VALID)) != 0
    has &= ((s | d) & U64(MIGRATE_PFN_COMPOUND)) == 0
    if not has.any():
        return
    spage = (s >> U64(MIGRATE_PFN_SHIFT)).astype(_I64)
    has &= phys.order[np.where(has, spage, 0)] == 0
    if args.unmapped_elsewhere:
        has &= ~np.isin(spage, np.fromiter(args.unmapped_elsewhere, dtype=_I64))
    idx = np.flatnonzero(has)
    if len(idx):
        vpns = (args.start >> PAGE_SHIFT) + idx.astype(_I64)
        _finalize_at(machine, vma, idx, vpns, src, dst, args.fault_page)


def _finalize_device_in_place(
    machine: Machine, src: NDArray[np.uint64], dst: NDArray[np.uint64], npages: int
) -> None:
    """``migrate_device_finalize``'s common case, vectorised: order-0 anonymous
    sources whose anon_vma has one VMA, so that their only possible migration
    entry is at their linear address in it (an evicted chunk's pages).

    Handled entries are cleared from ``src``/``dst`` so the generic pass
    skips them.
    """
    phys = machine.phys
    if npages <= SCALAR_MAX_PAGES:
        return
    s = src[:npages]
    d = dst[:npages]
    idx = np.flatnonzero(
        ((s & U64(MIGRATE_PFN_VALID)) != 0) & (((s | d) & U64(MIGRATE_PFN_COMPOUND)) == 0)
    )
    if len(idx) <= SCALAR_MAX_PAGES:
        return
    spage = (s[idx] >> U64(MIGRATE_PFN_SHIFT)).astype(_I64)
    ok = (phys.order[spage] == 0) & ((phys.flags[spage] & PG_anon) != 0)
    idx, spage = idx[ok], spage[ok]
    mapping = phys.mapping[spage]
    for mid in np.unique(mapping).tolist():
        owner = machine.mappings.get(int(mid))
        if owner is None or len(owner.vmas) != 1:
            continue  # several VMAs may map these pages: the rmap walk finds them
        (vma,) = owner.vmas
        sel = mapping == mid
        vpns = vma.start_vpn + phys.index[spage[sel]].astype(_I64) - vma.pgoff
        inside = (vpns >= vma.start_vpn) & (vpns < vma.end_vpn)
        if inside.any():
            _finalize_at(machine, vma, idx[sel][inside], vpns[inside], src, dst, None)


def _finalize_at(
    machine: Machine,
    vma: Vma,
    idx: NDArray[np.int64],
    vpns: NDArray[np.int64],
    src: NDArray[np.uint64],
    dst: NDArray[np.uint64],
    fault_page: int | None,
) -> None:
    """Finalize entries ``idx`` (order-0, not compound, with a source) whose
    migration entry, if any, is the PTE at ``vpns`` in ``vma``.

    Entries whose PTE holds that migration entry are finalized here and
    cleared from ``src``/``dst``; the others are left to the generic pass.
    """
    phys = machine.phys
    lo = int(vpns.min())
    walk = vma.mm.pt.walk(lo, int(vpns.max()) + 1 - lo)
    off = vpns - lo
    e = walk.entries[off]
    s = src[idx]
    spage = (s >> U64(MIGRATE_PFN_SHIFT)).astype(_I64)
    ours = (
        (entry_kind(e) == KIND_MIGRATION)
        & ((e & U64(PTE_PFN_MASK)).astype(_I64) == spage)
        & (walk.level[off] == 0)
    )
    if not ours.any():
        return
    k = np.flatnonzero(ours)
    idx, s, spage, ent, locs = idx[k], s[k], spage[k], e[k], walk.loc[off][k]
    d = dst[idx]
    dpage = (d >> U64(MIGRATE_PFN_SHIFT)).astype(_I64)
    dvalid = (d & U64(MIGRATE_PFN_VALID)) != 0
    use_dst = ((s & U64(MIGRATE_PFN_MIGRATE)) != 0) & dvalid
    target = np.where(use_dst, dpage, spage)
    write = ((ent & U64(SOFTLEAF_TYPE_MASK)) >> U64(SOFTLEAF_TYPE_SHIFT)) == U64(
        SWP_MIGRATION_WRITE
    )
    private = np.zeros(len(idx), dtype=np.bool_)
    for start, end, pgmap in phys.pgmaps:
        if pgmap.type == MEMORY_DEVICE_PRIVATE:
            private |= (target >= start) & (target < end)
    keep = ent & U64(PTE_YOUNG | PTE_DIRTY)
    present = target.astype(U64) | U64(PTE_PRESENT | PTE_YOUNG) | (ent & U64(PTE_DIRTY))
    present |= np.where(write, U64(PTE_WRITE), U64(0))
    dp_type = np.where(write, U64(SWP_DEVICE_PRIVATE_WRITE), U64(SWP_DEVICE_PRIVATE_READ))
    devpriv = target.astype(U64) | U64(PTE_SOFTLEAF) | (dp_type << U64(SOFTLEAF_TYPE_SHIFT)) | keep
    vma.mm.pt.flat[locs] = np.where(private, devpriv, present)
    machine.costs.pte_writes += len(idx)
    phys.mapcount[target] += 1
    phys.refcount[target] += 1
    machine.migration_wq.wake_up_all()
    # Unlock and release: the sources (collect reference), the destinations
    # (allocation reference; the new mappings hold theirs), unused destinations.
    fault_head = phys.head(fault_page) if fault_page is not None else -1
    unlock = spage[spage != fault_head]
    phys.flags[unlock] &= np.uint16(~PG_locked & 0xFFFF)
    phys.mapping[spage[use_dst]] = 0
    dsts = dpage[dvalid]
    phys.flags[dsts] &= np.uint16(~PG_locked & 0xFFFF)
    phys.lock_wq.wake_up_all()
    phys.put(spage)
    phys.put(dsts)
    src[idx] = U64(0)
    dst[idx] = U64(0)


# ----- evicting device memory by pfn ---------------------------------------------------


def migrate_device_range(
    machine: Machine, src: NDArray[np.uint64], start_pfn: int, npages: int
) -> None:
    """``migrate_device_range``: select every in-use device page of a pfn range."""
    phys = machine.phys
    src[:npages] = U64(0)
    in_use = np.flatnonzero(phys.refcount[start_pfn : start_pfn + npages] > 0)
    covered = 0  # pages below this index belong to a folio already taken
    for i in in_use.tolist():
        if i < covered:
            continue
        pfn = start_pfn + i
        head = phys.head(pfn)
        if head != pfn:
            continue
        nr = 1 << int(phys.order[head])
        covered = i + nr
        phys.refcount[head] += 1
        if not phys.folio_trylock(head):
            phys.put_one(head)
            continue
        src[i] = U64(
            migrate_pfn(pfn) | MIGRATE_PFN_MIGRATE | (MIGRATE_PFN_COMPOUND if nr > 1 else 0)
        )
    _unmap_entries(machine, src, npages, None)


def migrate_device_pfns(machine: Machine, src: NDArray[np.uint64], npages: int) -> None:
    """``migrate_device_pfns``: as ``migrate_device_range`` for a list of pfns in ``src``."""
    phys = machine.phys
    for i in range(npages):
        pfn = int(src[i])
        src[i] = U64(0)
        if phys.refcount[pfn] <= 0:
            continue
        phys.refcount[pfn] += 1
        if not phys.folio_trylock(pfn):
            phys.put_one(pfn)
            continue
        src[i] = U64(migrate_pfn(pfn) | MIGRATE_PFN_MIGRATE)
    _unmap_entries(machine, src, npages, None)


def migrate_device_coherent_folio(machine: Machine, head: int) -> None:
    """Move one device-coherent folio to system RAM (GUP long-term pins); ``Busy`` on failure."""
    from .errors import Busy

    phys = machine.phys
    src = np.zeros(1, dtype=np.uint64)
    dst = np.zeros(1, dtype=np.uint64)
    phys.refcount[head] += 1
    if not phys.folio_trylock(head):
        phys.put_one(head)
        raise Busy(f"device-coherent folio {head:#x} is locked")
    src[0] = U64(migrate_pfn(head) | MIGRATE_PFN_MIGRATE)
    _unmap_entries(machine, src, 1, None)
    if src[0] & U64(MIGRATE_PFN_MIGRATE):
        new = phys.alloc_one(0)
        phys.folio_trylock(new)
        phys.copy_pages(np.array([new], dtype=_I64), np.array([head], dtype=_I64))
        dst[0] = U64(migrate_pfn(new))
    _migrate_pages(machine, MigrateVma(None, 0, PAGE_SIZE, src, dst, npages=1), None)
    ok = bool(src[0] & U64(MIGRATE_PFN_MIGRATE))
    _finalize(machine, src, dst, 1, None)
    if not ok:
        raise Busy(f"device-coherent folio {head:#x} could not be migrated")


__all__ = [
    "MIGRATE_PFN_COMPOUND",
    "MIGRATE_PFN_MIGRATE",
    "MIGRATE_PFN_SHIFT",
    "MIGRATE_PFN_VALID",
    "MIGRATE_PFN_WRITE",
    "MIGRATE_VMA_SELECT_COMPOUND",
    "MIGRATE_VMA_SELECT_DEVICE_COHERENT",
    "MIGRATE_VMA_SELECT_DEVICE_PRIVATE",
    "MIGRATE_VMA_SELECT_SYSTEM",
    "MigrateVma",
    "migrate_device_coherent_folio",
    "migrate_device_finalize",
    "migrate_device_pages",
    "migrate_device_pfns",
    "migrate_device_range",
    "migrate_pfn",
    "migrate_pfn_to_page",
    "migrate_vma_finalize",
    "migrate_vma_pages",
    "migrate_vma_setup",
]
