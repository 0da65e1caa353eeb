"""``migrate_vma_pages`` and ``migrate_vma_finalize``: commit, then settle the entries.

Kernel counterpart: ``migrate_vma_pages``/``migrate_device_pages`` and
``migrate_vma_finalize``/``migrate_device_finalize`` in mm/migrate_device.c.
After the driver has allocated and filled ``dst``, ``migrate_vma_pages``
commits the struct-page state and inserts pages into holes (a second
``MIGRATE`` invalidation); ``migrate_vma_finalize`` turns the migration
entries into entries for the new pages (or back to the old ones), unlocks and
releases.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from .. import sched
from ..mm.memremap import MEMORY_DEVICE_COHERENT, MEMORY_DEVICE_PRIVATE
from ..mm.pagetable import (
    KIND_MIGRATION,
    KIND_PRESENT,
    PAGE_SHIFT,
    PMD_ORDER,
    PMD_PAGES,
    PTE_DIRTY,
    PTE_PFN_MASK,
    PTE_PRESENT,
    PTE_SOFTLEAF,
    PTE_WRITE,
    PTE_YOUNG,
    SOFTLEAF_TYPE_MASK,
    SOFTLEAF_TYPE_SHIFT,
    SWP_DEVICE_PRIVATE_READ,
    SWP_DEVICE_PRIVATE_WRITE,
    SWP_MIGRATION_WRITE,
    U64,
    is_table_pointer,
    make_present,
    make_softleaf,
    make_table_pointer,
    pte_kind,
    pte_kind_array,
    pte_pfn,
)
from ..mm.physmem import (
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
from ..mm.rmap import (
    anon_vma_prepare,
    remove_migration_ptes,
    rmap_walk,
)
from ..mm.swap import swapcache_del
from ..mm.thp import split_huge_pmd, split_leaf_entries
from ..mm.vma import VM_WRITE
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
    MigrateVma,
    _entries,
    migrate_pfn,
    migrate_pfn_to_page,
)


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


def _migrate_pages_array(machine: Machine, args: MigrateVma) -> NDArray[np.int64]:
    """``folio_migrate_mapping`` for order-0 anonymous/device pages in one pass.

    Returns the selected entries it left undecided, for the generic loop.
    """
    phys = machine.phys
    src, dst = _entries(args)
    # Only selected entries matter; a sparse src (an evicted device chunk with
    # a few pages in use) costs one pass over the array, then its few entries.
    selected = np.flatnonzero(src[: args.npages] & U64(MIGRATE_PFN_MIGRATE))
    if args.npages <= _defs.SCALAR_MAX_PAGES:
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
    todo = _migrate_pages_array(machine, args)
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
            if pt.rows[pte_pfn(old)].any():
                return False
            pt.set(loc, 0)
            pt.free_table(pte_pfn(old))
            old = 0
        if old and not (pte_kind(old) == KIND_PRESENT and phys.is_zero_pfn(pte_pfn(old))):
            return False  # a CPU fault won the race
        order = PMD_ORDER
    else:
        loc = pt.pte_loc(vpn, alloc=True)
        if loc < 0:
            return False
        old = pt.get(loc)
        if old and not (pte_kind(old) == KIND_PRESENT and phys.is_zero_pfn(pte_pfn(old))):
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
    _finalize_array(machine, args)
    _finalize(machine, src, dst, args.npages, args.fault_page)


def migrate_device_finalize(
    machine: Machine, src: NDArray[np.uint64], dst: NDArray[np.uint64], npages: int
) -> None:
    _finalize_device_array(machine, src, dst, npages)
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


def _finalize_array(machine: Machine, args: MigrateVma) -> None:
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
    if n <= _defs.SCALAR_MAX_PAGES:
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


def _finalize_device_array(
    machine: Machine, src: NDArray[np.uint64], dst: NDArray[np.uint64], npages: int
) -> None:
    """``migrate_device_finalize``'s common case, vectorised: order-0 anonymous
    sources whose anon_vma has one VMA, so that their only possible migration
    entry is at their linear address in it (an evicted chunk's pages).

    Handled entries are cleared from ``src``/``dst`` so the generic pass
    skips them.
    """
    phys = machine.phys
    if npages <= _defs.SCALAR_MAX_PAGES:
        return
    s = src[:npages]
    d = dst[:npages]
    idx = np.flatnonzero(
        ((s & U64(MIGRATE_PFN_VALID)) != 0) & (((s | d) & U64(MIGRATE_PFN_COMPOUND)) == 0)
    )
    if len(idx) <= _defs.SCALAR_MAX_PAGES:
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
        (pte_kind_array(e) == KIND_MIGRATION)
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
