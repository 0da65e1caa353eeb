"""``fork(2)``: duplicating an address space copy-on-write.

Kernel counterpart: kernel/fork.c (``copy_process``, ``dup_mm``), mm/mmap.c
(``dup_mmap``), mm/memory.c (``copy_page_range``, ``copy_pte_range``,
``copy_present_ptes``, ``copy_present_page``, ``copy_nonpresent_pte``),
mm/huge_memory.c (``copy_huge_pmd``), mm/hugetlb.c
(``copy_hugetlb_page_range``).

Only VMAs that need it get their page tables copied (``vma_needs_copy``:
private mappings with an anon_vma, PFNMAP/MIXEDMAP mappings); shared mappings
are refilled by faults in the child. For COW mappings the parent's entries
are write-protected inside a ``PROTECTION_PAGE`` invalidation of the whole
VMA (``CLEAR`` for hugetlb), and anonymous pages lose ``PG_anon_exclusive``.
The child's present entries are old (``pte_mkold``), and clean in shared
mappings (``pte_mkclean``).

An exclusive anonymous page that may be DMA-pinned (``folio_needs_cow_for_dma``)
is copied for the child at once instead of being shared, which keeps a GUP
pin coherent across fork; a pinned exclusive PMD-mapped THP is first split in
the parent (``copy_huge_pmd`` fails with ``-EAGAIN`` after ``__split_huge_pmd``)
and its pages are then copied one by one; a pinned private hugetlb page gets
a copy from the pool (``copy_hugetlb_page_range``). When no frame (or huge
page) is left for such a copy, fork fails with ``ENOMEM`` and the half-built child is torn down as
``dup_mmap``'s error path does (``exit_mmap`` of the new mm): no child process,
no frame leaked, every mapcount and reference back where it was. Like Linux,
the parent keeps what the copy had already done to it up to the failing page:
those entries stay write-protected and their pages non-exclusive (a later
write fault reuses them, as they are mapped once again).

The copy is vectorised over whole page-table rows, 64 PTE tables per step:
one gather of the source rows, array arithmetic over the entries, one store
into the parent's rows and one into the child's, and the folio counters
raised with one indexed add. Huge leaves (few per gigabyte) form one more
batch.

Where the model differs: ``fork`` takes the child's pid before copying, so a
failed fork uses up a pid number (Linux allocates the pid after ``copy_mm``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import numpy as np
from numpy.typing import NDArray

from ..errors import OutOfMemory
from ..notifier import MMU_NOTIFY_CLEAR, MMU_NOTIFY_PROTECTION_PAGE, invalidation
from .address_space import AddressSpace
from .exit import exit_mmap
from .pagetable import (
    CHUNK_TABLE,
    KIND_DEVICE_EXCLUSIVE,
    KIND_DEVICE_PRIVATE,
    KIND_MIGRATION,
    KIND_PRESENT,
    KIND_PROTNONE,
    KIND_SWAP,
    LEVEL_PMD,
    LEVEL_PTE,
    LEVEL_PUD,
    PMD_ORDER,
    PMD_PAGES,
    PTE_DIRTY,
    PTE_PFN_MASK,
    PTE_PRESENT,
    PTE_PROTNONE,
    PTE_SOFTLEAF,
    PTE_SPECIAL,
    PTE_WRITE,
    PTE_YOUNG,
    PTRS_PER_TABLE,
    PUD_PAGES,
    SOFTLEAF_TYPE_MASK,
    SOFTLEAF_TYPE_SHIFT,
    SWP_DEVICE_EXCLUSIVE,
    SWP_MIGRATION_READ,
    SWP_MIGRATION_READ_EXCLUSIVE,
    U64,
    PageTable,
    make_present_array,
    pte_kind_array,
    softleaf_entries_readonly,
)
from .physmem import HUGE_ZERO_PFN, PG_anon, PG_anon_exclusive, PhysMem
from .rmap import anon_vma_fork, folio_add_new_anon_rmap
from .thp import split_huge_pmd
from .vma import (
    VM_DONTCOPY,
    VM_MIXEDMAP,
    VM_PFNMAP,
    VM_SHARED,
    VM_WIPEONFORK,
    VM_WRITE,
    Vma,
)

if TYPE_CHECKING:
    from ..machine import Machine
    from .process import Process

_I64 = np.int64
_NOT_EXCLUSIVE = np.uint16(~PG_anon_exclusive & 0xFFFF)


class _ForkFailed(OutOfMemory):
    """A page copy at fork found no free frame (``copy_pte_range`` → ``-ENOMEM``)."""


def do_fork(parent: Process) -> Process:
    """``copy_process`` for the memory side: a child with a COW copy of ``parent``'s mm.

    On ``ENOMEM`` the child's mm is torn down and no child exists. The pid
    is allocated after the mm is copied, as ``copy_process`` calls
    ``alloc_pid`` after ``copy_mm``: a failed fork consumes no pid, and the
    half-built child is never among the machine's processes (the OOM killer
    cannot pick it, as it cannot pick a task not yet on the task list).
    """
    machine = parent.machine
    child = type(parent)(machine, 0)
    try:
        with parent.mm.mmap_lock.write():
            dup_mm(parent, child.mm)
    except OutOfMemory:
        # dup_mmap's error path: the new mm goes as at exit (every VMA copied
        # so far, the failing one included, is zapped and its anon_vmas
        # unlinked), and copy_process frees the task before it is ever seen.
        exit_mmap(child.mm)
        child.exited = True
        raise
    child.pid = machine.alloc_pid()
    machine.processes.append(child)
    return child


def dup_mm(parent: Process, child_mm: AddressSpace) -> None:
    """Copy every VMA of ``parent`` (and its entries where needed) into ``child_mm``."""
    machine = parent.machine
    if not len(child_mm.vmas):
        # Room for as many tables as the parent has, so that the pool does
        # not grow (and get copied) table by table during the copy.
        child_mm.pt = PageTable(capacity=parent.mm.pt.tables_in_use)
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
    """Copy the entries of ``src`` into ``dst`` (a VMA of the child at the same place)."""
    mm = src.mm
    if not src.is_cow_mapping:
        _copy_entries(dst, src, cow=False)
        return
    event = MMU_NOTIFY_CLEAR if src.is_hugetlb else MMU_NOTIFY_PROTECTION_PAGE
    with invalidation(mm, event, src.start, src.end):
        if not src.is_hugetlb:
            _split_pinned_thps(src)
        _copy_entries(dst, src, cow=True)


def _pinned_heads(phys: PhysMem) -> NDArray[np.int64]:
    return np.fromiter((h for h, n in phys.pins.items() if n > 0), dtype=_I64)


def _split_pinned_thps(src: Vma) -> None:
    """Split PMD-mapped THPs that must be copied (pinned and exclusive) in the parent.

    ``copy_huge_pmd`` cannot copy a THP for the child: it splits the PMD and
    lets ``copy_pte_range`` copy the pages.
    """
    phys = src.mm.machine.phys
    if not phys.pins:
        return
    walk = src.mm.pt.walk(src.start_vpn, src.npages, per_page=False)
    if not walk.huge:
        return
    pinned = _pinned_heads(phys)
    for first, level, _loc, e in walk.leaves():
        if level != LEVEL_PMD or not e & PTE_PRESENT or e & PTE_SPECIAL:
            continue
        pfn = e & PTE_PFN_MASK
        if phys.is_zero_pfn(pfn):
            continue
        head = phys.head(pfn)
        flags = int(phys.flags[head])
        if flags & PG_anon and flags & PG_anon_exclusive and head in pinned:
            split_huge_pmd(src, first)


# What fork does with an entry, by its top 12 bits (flags and softleaf type).
_CAT_OTHER = 0  # none, special present (pfnmap, zero page), hwpoison, marker: copied as is
_CAT_PAGE = 1  # present or PROT_NONE mapping of a normal page
_CAT_DEVICE_PRIVATE = 2
_CAT_SWAP = 3
_CAT_MIGRATION = 4
_CAT_DEVICE_EXCLUSIVE = 5


def _build_cat_lut() -> NDArray[np.uint8]:
    tops = np.arange(1 << 12, dtype=U64)
    kinds = pte_kind_array(tops << U64(52))
    special = (tops << U64(52)) & U64(PTE_SPECIAL) != 0
    lut = np.full(1 << 12, _CAT_OTHER, dtype=np.uint8)
    lut[((kinds == KIND_PRESENT) | (kinds == KIND_PROTNONE)) & ~special] = _CAT_PAGE
    lut[kinds == KIND_DEVICE_PRIVATE] = _CAT_DEVICE_PRIVATE
    lut[kinds == KIND_SWAP] = _CAT_SWAP
    lut[kinds == KIND_MIGRATION] = _CAT_MIGRATION
    lut[kinds == KIND_DEVICE_EXCLUSIVE] = _CAT_DEVICE_EXCLUSIVE
    return lut


_CAT_LUT = _build_cat_lut()


def _categories(entries: NDArray[np.uint64]) -> NDArray[np.uint8]:
    return _CAT_LUT[(entries >> U64(52)).astype(np.intp)]


@attrs.define
class _Batch:
    """Entries of one level being copied, and what the copy found out about them."""

    entries: NDArray[np.uint64]
    cat: NDArray[np.uint8]
    counts: NDArray[np.int64]
    #: Indices of mappings of normal pages (present, PROT_NONE, device-private).
    mapped: NDArray[np.int64]
    pfns: NDArray[np.int64]  # of ``mapped``
    heads: NDArray[np.int64]  # of ``mapped``
    anon: NDArray[np.bool_]  # of ``mapped``


def _classify(phys: PhysMem, entries: NDArray[np.uint64]) -> _Batch:
    cat = _categories(entries)
    counts = np.bincount(cat, minlength=8).astype(np.int64)
    nmapped = int(counts[_CAT_PAGE] + counts[_CAT_DEVICE_PRIVATE])
    if nmapped == len(entries):
        mapped = np.arange(len(entries), dtype=_I64)
        pfns = (entries & U64(PTE_PFN_MASK)).view(_I64)
    else:
        mapped = np.flatnonzero((cat - np.uint8(1)) <= np.uint8(1)).astype(_I64)
        pfns = (entries[mapped] & U64(PTE_PFN_MASK)).view(_I64)
    low = pfns < HUGE_ZERO_PFN + PMD_PAGES
    if low.any():
        # The zero pages hold no per-mapping counts (vm_normal_page is NULL).
        keep = ~(low & phys.zero_mask(pfns))
        if not keep.all():
            mapped, pfns = mapped[keep], pfns[keep]
    order = phys.order[pfns]
    heads = phys.head_of(pfns) if order.any() else pfns
    anon = (phys.flags[heads] & np.uint16(PG_anon)) != 0
    return _Batch(entries, cat, counts, mapped, pfns, heads, anon)


def _share(phys: PhysMem, heads: NDArray[np.int64]) -> None:
    """Each of these entries is one more mapping (and reference) of its folio."""
    if not len(heads):
        return
    if phys.order[heads].any():
        # Pages of one large folio repeat: count each occurrence.
        np.add.at(phys.mapcount, heads, np.int32(1))
        np.add.at(phys.refcount, heads, np.int32(1))
    else:
        phys.mapcount[heads] += np.int32(1)
        phys.refcount[heads] += np.int32(1)


def _parent_and_child(
    b: _Batch, cow: bool, vm_shared: bool
) -> tuple[NDArray[np.uint64], NDArray[np.uint64]]:
    """The parent's entries after the copy and the child's copies of them."""
    entries = b.entries
    counts = b.counts
    soft = int(counts[_CAT_DEVICE_PRIVATE] + counts[_CAT_MIGRATION])
    if cow:
        # COW: every writable mapping becomes read-only on both sides
        # (softleaf entries keep writability in their type, not in WRITE).
        parent = entries & ~U64(PTE_WRITE)
        if soft:
            parent = softleaf_entries_readonly(parent)
            if counts[_CAT_MIGRATION]:
                # A read-exclusive migration entry becomes a plain read one.
                rx = (parent & U64(PTE_PRESENT | PTE_SOFTLEAF | SOFTLEAF_TYPE_MASK)) == U64(
                    PTE_SOFTLEAF | (SWP_MIGRATION_READ_EXCLUSIVE << SOFTLEAF_TYPE_SHIFT)
                )
                parent[rx] = (parent[rx] & ~U64(SOFTLEAF_TYPE_MASK)) | U64(
                    SWP_MIGRATION_READ << SOFTLEAF_TYPE_SHIFT
                )
    else:
        parent = entries
    # The child's present entries start old, and clean in a shared mapping.
    drop = U64(PTE_YOUNG | (PTE_DIRTY if vm_shared else 0))
    if int(counts[_CAT_SWAP] + counts[_CAT_DEVICE_PRIVATE] + counts[_CAT_MIGRATION]) == 0:
        # No softleaf entries (none entries are zero): one pass.
        child = parent & ~drop
    else:
        mappable = (parent & U64(PTE_PRESENT | PTE_PROTNONE)) != 0
        child = np.where(mappable, parent & ~drop, parent)
    return parent, child


def _apply(
    machine: Machine,
    dst: Vma,
    b: _Batch,
    levels: NDArray[np.int8] | None,
    cow: bool,
    copy_sel: NDArray[np.int64],
    new_pages: NDArray[np.int64],
    vpns_of_copies: NDArray[np.int64],
    copy_order: int = 0,
) -> tuple[NDArray[np.uint64], NDArray[np.uint64]]:
    """Account the child's mappings and build both sides' entries.

    ``copy_sel`` indexes ``b.mapped``: the pages (folios of ``copy_order``)
    that get ``new_pages`` for the child instead of being shared. ``levels``
    None means all PTEs.
    """
    phys = machine.phys
    if len(copy_sel):
        shared = np.ones(len(b.mapped), dtype=np.bool_)
        shared[copy_sel] = False
        share_heads = b.heads[shared]
    else:
        shared = None
        share_heads = b.heads
    _share(phys, share_heads)
    if cow:
        anon = b.anon if shared is None else b.anon & shared
        if anon.all():
            _clear_anon_exclusive(phys, b.pfns, None if levels is None else levels[b.mapped])
        elif anon.any():
            sel = b.mapped[anon]
            _clear_anon_exclusive(phys, b.pfns[anon], None if levels is None else levels[sel])
    parent, child = _parent_and_child(b, cow, bool(dst.flags & VM_SHARED))
    if len(copy_sel):
        # copy_present_page: the child gets its own exclusive, writable copy;
        # the parent keeps its page as it was (still writable and exclusive).
        at = b.mapped[copy_sel]
        phys.copy_pages(
            phys.pages_of(new_pages, copy_order), phys.pages_of(b.pfns[copy_sel], copy_order)
        )
        folio_add_new_anon_rmap(machine, dst, new_pages, vpns_of_copies, copy_order)
        child[at] = make_present_array(
            new_pages,
            write=bool(dst.flags & VM_WRITE),
            dirty=True,
            young=True,
            huge=copy_order > 0,
        )
        parent[at] = b.entries[at]
    swapped = b.cat == _CAT_SWAP if b.counts[_CAT_SWAP] else None
    if swapped is not None:
        machine.swap.dup((b.entries[swapped] & U64(PTE_PFN_MASK)).view(_I64))
    return parent, child


def _clear_anon_exclusive(
    phys: PhysMem, pfns: NDArray[np.int64], levels: NDArray[np.int8] | None
) -> None:
    """The pages these entries map are shared now: clear ``PG_anon_exclusive``."""
    if levels is None or not levels.any():
        phys.flags[pfns] &= _NOT_EXCLUSIVE
        return
    small = levels == LEVEL_PTE
    phys.flags[pfns[small]] &= _NOT_EXCLUSIVE
    pmd = levels == LEVEL_PMD
    if pmd.any():
        blocks = phys.flags[: phys.ram_pages].reshape(-1, PMD_PAGES)
        heads = pfns[pmd]
        ram = heads < phys.ram_pages
        blocks[heads[ram] >> PMD_ORDER] &= _NOT_EXCLUSIVE
        for pfn in heads[~ram].tolist():  # device memory beyond RAM
            phys.flags[pfn : pfn + PMD_PAGES] &= _NOT_EXCLUSIVE
    for pfn in pfns[levels == LEVEL_PUD].tolist():
        phys.flags[pfn : pfn + PUD_PAGES] &= _NOT_EXCLUSIVE


def _put_range(
    pt: PageTable, tables: NDArray[np.int64], values: NDArray[np.uint64], lo: int, hi: int
) -> None:
    """Store ``values[lo:hi]`` (flat over the rows of ``tables``) into those tables."""
    if lo >= hi:
        return
    rows = pt.rows
    r0, r1 = lo >> PMD_ORDER, (hi - 1) >> PMD_ORDER
    c0, c1 = lo & (PTRS_PER_TABLE - 1), ((hi - 1) & (PTRS_PER_TABLE - 1)) + 1
    if r0 == r1:
        rows[tables[r0], c0:c1] = values[lo:hi]
        return
    rows[tables[r0], c0:] = values[lo : (r0 + 1) * PTRS_PER_TABLE]
    if r1 > r0 + 1:
        full = values[(r0 + 1) * PTRS_PER_TABLE : r1 * PTRS_PER_TABLE]
        rows[tables[r0 + 1 : r1]] = full.reshape(-1, PTRS_PER_TABLE)
    rows[tables[r1], :c1] = values[r1 * PTRS_PER_TABLE : hi]


def _child_pte_tables(pt: PageTable, chunk_vpns: NDArray[np.int64]) -> NDArray[np.int64]:
    """PTE tables of the child for these 2 MiB chunks, allocated where missing."""
    pmdlocs = pt.pmd_locs(chunk_vpns)
    cur = pt.flat[pmdlocs]
    tables = (cur & U64(PTE_PFN_MASK)).view(_I64).copy()
    need = np.flatnonzero(cur == 0)
    if len(need):
        fresh = np.array([pt.alloc_table() for _ in range(len(need))], dtype=_I64)
        tables[need] = fresh
        pt.flat[pmdlocs[need]] = fresh.astype(U64) | U64(PTE_PRESENT)
    return tables


#: PTE tables copied per step: 64 rows (256 KiB of entries) keep each step's
#: temporaries in cache and recycled, instead of fresh host memory per array.
_BLOCK_ROWS = 64


def _copy_entries(dst: Vma, src: Vma, cow: bool) -> None:
    """``copy_pte_range`` and ``copy_huge_pmd`` over the whole of ``src``.

    Raises ``_ForkFailed`` after copying what precedes the first pinned page
    that found no frame for its copy.
    """
    machine = src.mm.machine
    spt = src.mm.pt
    dpt = dst.mm.pt
    vpn0, npages = src.start_vpn, src.npages
    walk = spt.walk(vpn0, npages, per_page=False)
    tab = np.flatnonzero(walk.chunk_kind == CHUNK_TABLE)
    stop_vpn = None  # where the copy stopped, when a copy failed
    if len(tab):
        tables = walk.chunk_table[tab]
        chunk_vpns = ((vpn0 >> PMD_ORDER) + tab) << PMD_ORDER
        dtables = _child_pte_tables(dpt, chunk_vpns)
        # The first and last chunks may hold entries of neighbouring VMAs.
        first = vpn0 - int(chunk_vpns[0]) if tab[0] == 0 else 0
        end = vpn0 + npages
        for r0 in range(0, len(tab), _BLOCK_ROWS):
            r1 = min(len(tab), r0 + _BLOCK_ROWS)
            lo = first if r0 == 0 else 0
            # The rows are the chunks that have a table, not consecutive
            # chunks: only the block's last row can reach past the VMA's end.
            last = min(PTRS_PER_TABLE, end - int(chunk_vpns[r1 - 1]))
            hi = (r1 - r0 - 1) * PTRS_PER_TABLE + last
            stop_vpn = _copy_pte_block(
                machine, dst, src, tables[r0:r1], dtables[r0:r1], chunk_vpns[r0:r1], lo, hi, cow
            )
            if stop_vpn is not None:
                break
    leaves = walk.leaves() if walk.huge else []
    if leaves and not src.is_hugetlb and not src.is_anonymous:
        # copy_huge_pmd leaves a file THP's PMD to be refilled by a fault.
        leaves = [x for x in leaves if x[1] != LEVEL_PMD]
    if stop_vpn is not None:
        leaves = [x for x in leaves if x[0] < stop_vpn]
    if leaves:
        leaf_stop = _copy_leaves(machine, dst, src, leaves, cow)
        if leaf_stop is not None:
            stop_vpn = leaf_stop
    if stop_vpn is not None:
        raise _ForkFailed(f"fork: no memory to copy a pinned page at {stop_vpn << 12:#x}")


def _copy_pte_block(
    machine: Machine,
    dst: Vma,
    src: Vma,
    tables: NDArray[np.int64],
    dtables: NDArray[np.int64],
    chunk_vpns: NDArray[np.int64],
    lo: int,
    hi: int,
    cow: bool,
) -> int | None:
    """Copy entries [lo, hi) of the PTE tables ``tables`` (flat over their rows).

    Returns the vpn where the copy stopped if a pinned page found no frame
    for its copy (what precedes it is done), else None.
    """
    phys = machine.phys
    flat = src.mm.pt.rows[tables].reshape(-1)  # a copy: the rows before the fork
    work = flat
    if lo or hi < len(flat):
        work = flat.copy()
        work[:lo] = 0
        work[hi:] = 0
    b = _classify(phys, work)
    if b.counts[_CAT_DEVICE_EXCLUSIVE]:
        work = _restore_device_exclusive(work)
        b = _classify(phys, work)
    copy_sel = np.empty(0, dtype=_I64)
    if cow and phys.pins and b.anon.any():
        cand = b.anon & (b.cat[b.mapped] == _CAT_PAGE)
        cand &= np.isin(b.heads, _pinned_heads(phys))
        cand &= (phys.flags[b.pfns] & np.uint16(PG_anon_exclusive)) != 0
        copy_sel = np.flatnonzero(cand)
    new_pages = np.empty(0, dtype=_I64)
    stop_vpn = None
    if len(copy_sel):
        avail = min(len(copy_sel), phys.allocator.nr_free)
        if avail < len(copy_sel):
            # copy_pte_range gives up at the first page it cannot copy: what
            # precedes it is done, and stays done in the parent.
            cut = int(b.mapped[copy_sel[avail]])
            stop_vpn = int(chunk_vpns[cut >> PMD_ORDER]) + (cut & (PTRS_PER_TABLE - 1))
            hi = cut
            if work is flat:
                work = flat.copy()
            work[hi:] = 0
            b = _classify(phys, work)
            copy_sel = copy_sel[:avail]
        if avail:
            new_pages = phys.alloc(0, avail)
    at = b.mapped[copy_sel]
    copy_vpns = chunk_vpns[at >> PMD_ORDER] + (at & (PTRS_PER_TABLE - 1))
    parent, child = _apply(machine, dst, b, None, cow, copy_sel, new_pages, copy_vpns)
    writes = hi - lo
    if parent is not work or work is not flat:
        _put_range(src.mm.pt, tables, parent, lo, hi)
        writes += hi - lo
    _put_range(dst.mm.pt, dtables, child, lo, hi)
    machine.costs.pte_writes += writes
    return stop_vpn


def _copy_leaves(
    machine: Machine, dst: Vma, src: Vma, leaves: list[tuple[int, int, int, int]], cow: bool
) -> int | None:
    """``copy_huge_pmd`` and the huge hugetlb entries: the few leaves, as one batch.

    A maybe-pinned exclusive hugetlb page of a private mapping gets a copy
    from the pool for the child (``copy_hugetlb_page_range``); when the pool
    has none, the copy stops there and the vpn where it stopped is returned.
    """
    phys = machine.phys
    dpt = dst.mm.pt
    lvpns = np.array([x[0] for x in leaves], dtype=_I64)
    levels = np.array([x[1] for x in leaves], dtype=np.int8)
    locs = np.array([x[2] for x in leaves], dtype=_I64)
    work = _restore_device_exclusive(np.array([x[3] for x in leaves], dtype=U64))
    b = _classify(phys, work)
    copy_sel = np.empty(0, dtype=_I64)
    new_pages = np.empty(0, dtype=_I64)
    stop_vpn = None
    order = src.hugetlb_order if src.is_hugetlb else 0
    if cow and order and phys.pins and b.anon.any():
        cand = b.anon & (b.cat[b.mapped] == _CAT_PAGE)
        cand &= np.isin(b.heads, _pinned_heads(phys))
        cand &= (phys.flags[b.pfns] & np.uint16(PG_anon_exclusive)) != 0
        pool = machine.hugetlb[order]
        got = []
        for i in np.flatnonzero(cand).tolist():
            new = pool.alloc(reserved=False)  # the child's mapping has no reservation
            if new is None:
                stop_vpn = int(lvpns[b.mapped[i]])
                break
            got.append(i)
            new_pages = np.append(new_pages, _I64(new))
        copy_sel = np.array(got, dtype=_I64)
        if stop_vpn is not None:
            keep = lvpns < stop_vpn
            lvpns, levels, locs, work = lvpns[keep], levels[keep], locs[keep], work[keep]
            b = _classify(phys, work)
            if not len(work):
                return stop_vpn
    none = np.empty(0, dtype=_I64)
    copy_vpns = lvpns[b.mapped[copy_sel]] if len(copy_sel) else none
    parent, child = _apply(machine, dst, b, levels, cow, copy_sel, new_pages, copy_vpns, order)
    src.mm.pt.flat[locs] = parent
    pmd = levels == LEVEL_PMD
    if pmd.any():
        dpt.flat[dpt.pmd_locs(lvpns[pmd])] = child[pmd]
    for i in np.flatnonzero(~pmd).tolist():
        dpt.set(dpt.pud_loc(int(lvpns[i]), alloc=True), int(child[i]))
    machine.costs.pte_writes += 2 * len(lvpns)
    return stop_vpn


def _restore_device_exclusive(entries: NDArray[np.uint64]) -> NDArray[np.uint64]:
    """Device-exclusive entries made present (writable, dirty, old) again.

    The kernel restores the original entry and copies it as a present one;
    the device learns of it through the fork's own invalidation.
    """
    typ = entries & U64(PTE_PRESENT | PTE_SOFTLEAF | SOFTLEAF_TYPE_MASK)
    excl = typ == U64(PTE_SOFTLEAF | (SWP_DEVICE_EXCLUSIVE << SOFTLEAF_TYPE_SHIFT))
    if not excl.any():
        return entries
    out = entries.copy()
    out[excl] = make_present_array(
        (entries[excl] & U64(PTE_PFN_MASK)).view(_I64), write=True, dirty=True, young=False
    )
    return out
