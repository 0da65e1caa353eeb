"""Reverse mapping: from a folio to every place that maps it.

Kernel counterpart: mm/rmap.c (``anon_vma``, ``anon_vma_chain``,
``anon_vma_fork``, ``rmap_walk``) and the file ``i_mmap`` tree.

A folio records its ``mapping`` (an anon_vma or a file, by registry id) and
its ``index`` (linear page index). Every VMA that may map it is linked to
that anon_vma (or, for files, sits in the file's ``i_mmap``); the address of
the folio in such a VMA is ``start + (index - pgoff) * PAGE_SIZE``. Fork links
the child's VMAs to all of the parent's anon_vmas and gives the child an
anon_vma of its own for the pages it creates (or reuses an unused one of the
chain), as ``anon_vma_fork`` does. An anon_vma is freed with the last VMA
linked to it (a root once its last descendant is gone too); a folio whose
anon_vma is gone is mapped nowhere, and its rmap walk finds nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import attrs
import numpy as np
from numpy.typing import NDArray

from ..errors import KernelBug
from .memremap import MEMORY_DEVICE_PRIVATE
from .pagetable import (
    KIND_DEVICE_EXCLUSIVE,
    KIND_DEVICE_PRIVATE,
    KIND_HWPOISON,
    KIND_MIGRATION,
    KIND_PRESENT,
    KIND_PROTNONE,
    LEVEL_PTE,
    PAGE_SHIFT,
    PTE_DIRTY,
    PTE_WRITE,
    SWP_DEVICE_PRIVATE_READ,
    SWP_DEVICE_PRIVATE_WRITE,
    SWP_MIGRATION_READ,
    SWP_MIGRATION_READ_EXCLUSIVE,
    SWP_MIGRATION_WRITE,
    U64,
    make_present,
    make_softleaf,
    pte_kind,
    pte_pfn,
    softleaf_type,
)
from .physmem import PG_anon, PG_anon_exclusive, PG_swapbacked, PhysMem

if TYPE_CHECKING:
    from ..machine import Machine
    from .vma import Vma


@attrs.define(eq=False)
class AnonVma:
    """A group of VMAs that may map the same anonymous pages (``struct anon_vma``).

    ``vmas`` is the interval tree of the VMAs linked to it (through their
    anon_vma chains). ``root`` is the oldest anon_vma of the fork hierarchy
    and ``parent`` the one it was forked from (both itself for a root).
    ``refcount`` is one for being in use plus, at a root, one per descendant.
    ``num_children`` counts the anon_vmas whose parent this is (a root counts
    itself), ``num_active_vmas`` the VMAs whose ``anon_vma`` this is: the two
    counters Linux (since v6.0) decides anon_vma reuse at fork by.
    """

    id: int
    vmas: set[Vma] = attrs.field(factory=set)
    serial: int = attrs.field(factory=itertools.count(1).__next__)
    root: AnonVma = attrs.field(default=None, repr=False)
    parent: AnonVma = attrs.field(default=None, repr=False)
    refcount: int = 1
    num_children: int = 0
    num_active_vmas: int = 0

    def __attrs_post_init__(self) -> None:
        if self.root is None:
            self.root = self
        if self.parent is None:
            self.parent = self


def _anon_vma_alloc(machine: Machine) -> AnonVma:
    av = AnonVma(machine.register_mapping(None))
    machine.mappings[av.id] = av
    return av


def _link(vma: Vma, av: AnonVma) -> None:
    """``anon_vma_chain_link``: ``vma`` may map pages of ``av``."""
    vma.anon_chain.append(av)
    av.vmas.add(vma)


def anon_vma_prepare(machine: Machine, vma: Vma) -> AnonVma:
    """Give ``vma`` an anon_vma before its first anonymous page.

    As ``find_mergeable_anon_vma`` does, a neighbour's anon_vma is reused
    (next first, then previous) when the two VMAs could merge but for their
    access flags and the neighbour's anon_vma is its only one: that keeps them
    mergeable later, e.g. after an mprotect makes their protections equal.
    Otherwise the VMA gets a new root.
    """
    if vma.anon_vma is None:
        av = _mergeable_anon_vma(vma)
        if av is None:
            av = _anon_vma_alloc(machine)
            av.num_children += 1  # the self-parent link of a root
        av.num_active_vmas += 1
        vma.anon_vma = av
        _link(vma, av)
    return vma.anon_vma


def _mergeable_anon_vma(vma: Vma) -> AnonVma | None:
    from .vma import VM_ACCESS_FLAGS

    if vma.mm.vmas.find(vma.start) is not vma:
        return None  # not linked yet (being built)
    prev, nxt = vma.mm.vmas.neighbours(vma)
    for a, b, old in ((vma, nxt, nxt), (prev, vma, prev)):
        if a is None or b is None or old is None or old.anon_vma is None:
            continue
        if (
            len(old.anon_chain) == 1
            and a.end == b.start
            and a.file is b.file
            and a.vm_ops is b.vm_ops
            and not (a.flags ^ b.flags) & ~VM_ACCESS_FLAGS
            and b.pgoff == a.pgoff + a.npages
        ):
            return old.anon_vma
    return None


def anon_vma_clone(dst: Vma, src: Vma) -> None:
    """Link ``dst`` (a split-off part, a moved or merged copy) to every anon_vma of ``src``.

    ``dst`` takes ``src``'s anon_vma for its new pages.
    """
    dst.anon_vma = src.anon_vma
    dst.anon_chain = []
    for av in src.anon_chain:
        _link(dst, av)
    if dst.anon_vma is not None:
        dst.anon_vma.num_active_vmas += 1


def anon_vma_fork(machine: Machine, child: Vma, parent: Vma) -> None:
    """Child VMA of a fork: linked to the parent's anon_vmas, with one of its own.

    As ``anon_vma_clone`` does for fork, an anon_vma of the chain that no VMA
    uses as its own any more and that has fewer than two children is reused
    instead of allocating a new level: this bounds the hierarchy (and every
    chain) however many generations fork and exit. A root always has its
    self-parent link plus a child, so it is never reused.
    """
    child.anon_chain = []
    child.anon_vma = None
    if parent.anon_vma is None:
        return
    for av in parent.anon_chain:
        _link(child, av)
        if child.anon_vma is None and av.num_children < 2 and av.num_active_vmas == 0:
            child.anon_vma = av
    if child.anon_vma is not None:
        child.anon_vma.num_active_vmas += 1
        return
    own = _anon_vma_alloc(machine)
    own.num_active_vmas += 1
    own.root = parent.anon_vma.root
    own.parent = parent.anon_vma
    own.root.refcount += 1  # get_anon_vma(root): a root outlives its descendants
    own.parent.num_children += 1
    child.anon_vma = own
    _link(child, own)


def unlink_anon_vmas(vma: Vma) -> None:
    """The VMA goes away (``unlink_anon_vmas``): anon_vmas left empty are freed."""
    machine = vma.mm.machine
    empty = []
    for av in vma.anon_chain:
        av.vmas.discard(vma)
        if not av.vmas:
            av.parent.num_children -= 1
            empty.append(av)
    if vma.anon_vma is not None:
        vma.anon_vma.num_active_vmas -= 1
    vma.anon_chain = []
    vma.anon_vma = None
    for av in empty:
        if av.num_children or av.num_active_vmas:
            raise KernelBug(f"anon_vma {av.id} freed while still in use")
        put_anon_vma(machine, av)


def put_anon_vma(machine: Machine, av: AnonVma) -> None:
    """Drop a reference; the last frees the anon_vma (and its root's reference)."""
    av.refcount -= 1
    if av.refcount > 0:
        return
    if av.refcount < 0:
        raise KernelBug(f"anon_vma {av.id} refcount underflow")
    machine.mappings.pop(av.id, None)
    root = av.root
    if root is not av:
        put_anon_vma(machine, root)


def root_anon_vma(vma: Vma) -> AnonVma:
    """The oldest anon_vma of the VMA: where shared (non-exclusive) pages go."""
    return vma.anon_chain[0]


@attrs.frozen
class RmapHit:
    """The pages of one folio mapped by one VMA: virtual pages and entry slots."""

    vma: Vma
    vpns: NDArray[np.int64]
    pfns: NDArray[np.int64]
    locs: NDArray[np.int64]
    levels: NDArray[np.int8]
    entries: NDArray[np.uint64]


def ptes_dirty(hits: Iterable[RmapHit]) -> bool:
    """Whether any of the mappings found holds its page dirty (``pte_dirty``)."""
    return any(bool((h.entries & U64(PTE_DIRTY)).any()) for h in hits)


_MAPPING_KINDS = (
    KIND_PRESENT,
    KIND_PROTNONE,
    KIND_MIGRATION,
    KIND_DEVICE_PRIVATE,
    KIND_DEVICE_EXCLUSIVE,
    KIND_HWPOISON,
)


#: Entry kinds that are live mappings of their folio (hold mapcount + a reference).
_LIVE_KINDS = (KIND_PRESENT, KIND_PROTNONE, KIND_DEVICE_PRIVATE, KIND_DEVICE_EXCLUSIVE)


def candidate_vmas(machine: Machine, head: int) -> list[Vma]:
    phys = machine.phys
    owner = machine.mappings.get(int(phys.mapping[head]))
    if owner is None:
        return []
    if phys.flags[head] & PG_anon:
        return sorted(owner.vmas, key=lambda v: (v.mm.id, v.start))
    return sorted(owner.i_mmap, key=lambda v: (v.mm.id, v.start))


def rmap_walk(machine: Machine, head: int) -> Iterator[RmapHit]:
    """Every mapping of the folio at ``head`` (present or a pfn-carrying softleaf)."""
    phys = machine.phys
    nr = 1 << int(phys.order[head])
    index = int(phys.index[head])
    for vma in candidate_vmas(machine, head):
        first_vpn = vma.start_vpn + (index - vma.pgoff)
        lo = max(first_vpn, vma.start_vpn)
        hi = min(first_vpn + nr, vma.end_vpn)
        if lo >= hi:
            continue
        if nr == 1:
            # An order-0 folio (the common case): one entry to look at.
            loc, e, level = vma.mm.pt.lookup(lo)
            if level == LEVEL_PTE:
                if loc >= 0 and pte_kind(e) in _MAPPING_KINDS and pte_pfn(e) == head:
                    yield RmapHit(
                        vma,
                        np.array([lo], dtype=np.int64),
                        np.array([head], dtype=np.int64),
                        np.array([loc], dtype=np.int64),
                        np.zeros(1, dtype=np.int8),
                        np.array([e], dtype=np.uint64),
                    )
                continue
        walk = vma.mm.pt.walk(lo, hi - lo)
        kinds = walk.kinds
        pfns = walk.pfns()
        mask = np.isin(kinds, _MAPPING_KINDS) & (pfns >= head) & (pfns < head + nr)
        if not mask.any():
            continue
        vpns = np.arange(lo, hi, dtype=np.int64)[mask]
        yield RmapHit(vma, vpns, pfns[mask], walk.loc[mask], walk.level[mask], walk.entries[mask])


def folio_address(vma: Vma, head: int, index: int) -> int:
    return (vma.start_vpn + index - vma.pgoff) << PAGE_SHIFT


def folio_add_new_anon_rmap(
    machine: Machine, vma: Vma, heads: NDArray[np.int64], vpns: NDArray[np.int64], order: int
) -> None:
    """New exclusive anonymous folios of ``vma``, mapped once at ``vpns``.

    Sets the folio flags on every page (so vectorised checks need no head
    lookup), ``PG_anon_exclusive`` on every page, and the rmap key
    (anon_vma id, linear index) at the head.
    """
    phys = machine.phys
    av = anon_vma_prepare(machine, vma)
    phys.or_folio_flags(heads, order, PG_anon | PG_swapbacked | PG_anon_exclusive)
    phys.mapping[heads] = av.id
    phys.index[heads] = vma.pgoff + vpns - vma.start_vpn
    phys.mapcount[heads] = 1


def folios_mapped_only_by(
    mapcount: NDArray[np.int32], heads: NDArray[np.int64], locs: NDArray[np.int64]
) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
    """Distinct folios among ``heads``, and whether these entries are all their mappings.

    ``locs`` are the entries mapping each page (a PMD leaf repeats for its 512
    pages but is one mapping).
    """
    if len(heads) == 0:
        return heads, np.zeros(0, dtype=np.bool_)
    pairs = np.unique(np.stack([heads, locs]), axis=1)
    uheads, nmaps = np.unique(pairs[0], return_counts=True)
    return uheads, mapcount[uheads] == nmaps


def try_to_unmap(machine: Machine, head: int, make_entry: Callable[[int], int]) -> None:
    """Replace every mapping of a folio by ``make_entry(old_entry)`` (``try_to_unmap``).

    One ``CLEAR`` invalidation per mapping VMA, as ``try_to_unmap_one`` sends;
    each mapping's count and reference are dropped.
    """
    from ..notifier import MMU_NOTIFY_CLEAR, invalidation

    phys = machine.phys
    for hit in list(rmap_walk(machine, head)):
        mm = hit.vma.mm
        start = int(hit.vpns.min()) << PAGE_SHIFT
        end = (int(hit.vpns.max()) + 1) << PAGE_SHIFT
        with invalidation(mm, MMU_NOTIFY_CLEAR, start, end):
            for loc in np.unique(hit.locs).tolist():
                old = mm.pt.get(loc)
                if pte_kind(old) not in _LIVE_KINDS:
                    continue  # already a migration or poison entry: not a mapping
                mm.pt.set(loc, make_entry(old))
                phys.mapcount[head] -= 1
                phys.put_one(head)
                machine.costs.pte_writes += 1


def migration_entry_for(phys: PhysMem, e: int) -> int:
    """The migration entry that replaces mapping entry ``e`` (``try_to_migrate_one``).

    Writable mappings become writable migration entries; read-only ones of an
    exclusive anonymous page become read-exclusive ones. YOUNG/DIRTY survive.
    """
    pfn = pte_pfn(e)
    if pte_kind(e) == KIND_DEVICE_PRIVATE:
        write = softleaf_type(e) == SWP_DEVICE_PRIVATE_WRITE
    else:
        write = bool(e & PTE_WRITE)
    if write:
        typ = SWP_MIGRATION_WRITE
    elif phys.flags[pfn] & PG_anon_exclusive:
        typ = SWP_MIGRATION_READ_EXCLUSIVE
    else:
        typ = SWP_MIGRATION_READ
    return make_softleaf(typ, pfn, keep=e)


def remove_migration_ptes(machine: Machine, src_head: int, target: int) -> None:
    """Turn every migration entry of folio ``src_head`` into a mapping of ``target``.

    ``target`` is the new folio (or ``src_head`` itself when a migration is
    undone). Device-private targets get device-private entries; others get
    present entries, writable iff the migration entry was.

    An anonymous page is exclusive afterwards iff its entry was writable or
    read-exclusive (``RMAP_EXCLUSIVE`` in ``remove_migration_pte``): the
    entry, not the folio, carries exclusivity during a migration. Linux
    clears ``PageAnonExclusive`` when it installs the entry; the model keeps
    the flag on the folio meanwhile, so a fork that copied the entry as a
    plain read one (the page is shared now) must not leave it set.
    """
    phys = machine.phys
    pgmap = phys.pgmap_of(target)
    device_private = pgmap is not None and pgmap.type == MEMORY_DEVICE_PRIVATE
    anon = bool(phys.flags[target] & PG_anon)
    for hit in list(rmap_walk(machine, src_head)):
        pt = hit.vma.mm.pt
        if len(hit.locs) == 1:
            first = [0]
        else:
            first = np.unique(hit.locs, return_index=True)[1].tolist()
        for i in first:
            loc = int(hit.locs[i])
            e = pt.get(loc)
            if pte_kind(e) != KIND_MIGRATION:
                continue
            new_pfn = target + (pte_pfn(e) - src_head)
            typ = softleaf_type(e)
            write = typ == SWP_MIGRATION_WRITE
            if anon:
                nr = 1 << (9 * int(hit.levels[i]))  # the pages this entry maps
                if write or typ == SWP_MIGRATION_READ_EXCLUSIVE:
                    phys.flags[new_pfn : new_pfn + nr] |= np.uint16(PG_anon_exclusive)
                else:
                    phys.flags[new_pfn : new_pfn + nr] &= np.uint16(~PG_anon_exclusive & 0xFFFF)
            if device_private:
                dtyp = SWP_DEVICE_PRIVATE_WRITE if write else SWP_DEVICE_PRIVATE_READ
                entry = make_softleaf(dtyp, new_pfn, keep=e)
            else:
                entry = make_present(
                    new_pfn,
                    write=write,
                    dirty=bool(e & PTE_DIRTY),
                    young=True,
                    huge=bool(hit.levels[i] > 0),
                )
            pt.set(loc, entry)
            phys.mapcount[target] += 1
            phys.refcount[target] += 1
            machine.costs.pte_writes += 1
    machine.migration_wq.wake_up_all()
