"""Collapsing small pages into a THP: ``MADV_COLLAPSE``.

Kernel counterpart: mm/khugepaged.c (``madvise_collapse``,
``hpage_collapse_scan_pmd``/``collapse_huge_page`` for anonymous memory,
``hpage_collapse_scan_file``/``collapse_file``, ``retract_page_tables`` and
``collapse_pte_mapped_thp`` for shmem). The model has no khugepaged thread:
only the synchronous ``MADV_COLLAPSE`` path exists.

Anonymous memory: each 2 MiB chunk is copied into a fresh THP of the VMA,
mapped by one PMD.

shmem (``MAP_SHARED|MAP_ANONYMOUS`` and other shmem objects): the chunk is
collapsed in the page cache, as ``collapse_file`` does, whatever
``shmem_enabled`` says (forced collapse). The 512 page-cache slots of the
2 MiB-aligned index range get one new order-9 folio (the old pages' bytes
copied, holes zero-filled, the folio dirty); every mapping of an old page, in
every process, is unmapped (``try_to_unmap``: one ``CLEAR`` per mapping) and
the old pages freed; then ``retract_page_tables`` removes the emptied page
table of every other VMA that maps the range PMD-aligned and has no
``anon_vma`` (``CLEAR`` over the 2 MiB), and the caller's range is mapped by
a PMD (``collapse_pte_mapped_thp``). Other mappings fault the folio back in:
by a PMD where their VMA is PMD-aligned on the file (fault.py), by PTEs
otherwise. An ``hmm_range_fault`` of a PMD-mapped range then reports order 9.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import numpy as np

from ..errors import Again, InvalidArgument, OutOfMemory
from ..notifier import MMU_NOTIFY_CLEAR, invalidation
from .fault import swap_in_range
from .pagetable import (
    KIND_PRESENT,
    KIND_PROTNONE,
    PAGE_SHIFT,
    PMD_ORDER,
    PMD_PAGES,
    PTE_PRESENT,
    PTE_PROTNONE,
    PTE_SPECIAL,
    U64,
    is_table_pointer,
    make_present,
    pte_kind,
    pte_pfn,
)
from .physmem import PG_anon, PG_dirty, PG_locked, PG_swapbacked, PG_uptodate
from .rmap import folio_add_new_anon_rmap, try_to_unmap
from .thp import thp_vma_allowable, thp_vma_suitable
from .vma import VM_ACCESS_FLAGS, VM_NOHUGEPAGE, VM_SHARED, VM_WRITE

if TYPE_CHECKING:
    from .file import File
    from .vma import Vma

#: Outcomes of one shmem chunk (the kernel's ``SCAN_*`` results that matter).
_DONE: Final = "done"  # SCAN_SUCCEED / SCAN_PMD_MAPPED
_AGAIN: Final = "again"  # SCAN_PAGE_COUNT, SCAN_PAGE_LOCK: skipped, EAGAIN at the end
_TRUNCATED: Final = "truncated"  # SCAN_TRUNCATED: nothing cached, stop with EINVAL
_FAIL: Final = "fail"  # SCAN_FAIL: stop with EINVAL


def madvise_collapse(vma: Vma, start_vpn: int, end_vpn: int) -> None:
    """``MADV_COLLAPSE`` over the 2 MiB-aligned chunks of [start_vpn, end_vpn).

    Anonymous memory: each chunk is copied into a fresh THP mapped by one PMD
    (``CLEAR`` over the chunk). Missing and zero pages become zero; swapped-out pages are
    faulted in first; read-only and PROT_NONE chunks collapse too. A chunk
    already mapped by a PMD (a THP or the huge zero page) counts as done.

    Errors, as ``madvise_collapse`` reports them (Linux 6.18):

    * a VMA THP may not back, one too small to hold an aligned 2 MiB chunk,
      or one with no ``anon_vma`` yet (only zero-page reads so far) fails
      with EINVAL before anything is done;
    * a chunk without a page table stops the walk with EINVAL
      (``SCAN_PMD_NULL`` is not among the results it continues after);
    * a chunk with a pinned page or one that cannot be faulted in is skipped
      and the call ends with EAGAIN; no free huge page stops it with ENOMEM;
    * a range whose aligned chunks are inverted (a start that is not 2 MiB
      aligned and an end before the next 2 MiB boundary past it) fails with
      EINVAL: the kernel's chunk count underflows. That is the ABI.

    shmem chunks are collapsed in the page cache (see the module docstring):
    a chunk with no page cached or swapped stops the walk with EINVAL
    (``SCAN_TRUNCATED``), a chunk with a pinned or locked page is skipped
    (EAGAIN at the end), and a chunk the page cache already holds as a THP is
    only mapped by a PMD in the caller.
    """
    shmem = vma.page_cache is not None and vma.page_cache.shmem
    if not (shmem and not vma.flags & VM_NOHUGEPAGE) and not thp_vma_allowable(vma, collapse=True):
        raise InvalidArgument(f"MADV_COLLAPSE is not allowed on {vma}")
    # __thp_vma_allowable_orders outside the fault path: some 2 MiB chunk must
    # fit in the VMA, and an anonymous VMA must have an anon_vma.
    if vma.npages < PMD_PAGES or not thp_vma_suitable(vma, vma.end_vpn - PMD_PAGES):
        raise InvalidArgument(f"MADV_COLLAPSE: no 2 MiB chunk fits in {vma}")
    if not shmem and vma.anon_vma is None:
        raise InvalidArgument(f"MADV_COLLAPSE: {vma} has no anon_vma")
    first = (start_vpn + PMD_PAGES - 1) & ~(PMD_PAGES - 1)
    last = end_vpn & ~(PMD_PAGES - 1)
    if first > last:
        raise InvalidArgument("MADV_COLLAPSE: the range holds no aligned chunk (count underflow)")
    if shmem:
        _shmem_collapse(vma, first, last)
        return
    mm = vma.mm
    pt = mm.pt
    machine = mm.machine
    phys = machine.phys
    again = 0
    for haddr in range(first, last, PMD_PAGES):
        if not thp_vma_suitable(vma, haddr):
            raise InvalidArgument(f"MADV_COLLAPSE: {haddr << PAGE_SHIFT:#x} does not fit {vma}")
        pmdloc = pt.pmd_loc(haddr)
        e = pt.get(pmdloc) if pmdloc >= 0 else 0
        if e == 0:
            raise InvalidArgument(f"MADV_COLLAPSE: no page table at {haddr << PAGE_SHIFT:#x}")
        if not is_table_pointer(e):
            if pte_kind(e) in (KIND_PRESENT, KIND_PROTNONE):
                continue  # already PMD-mapped (a THP or the huge zero page)
            again += 1  # a PMD migration entry: SCAN_PMD_MAPPED is not reached
            continue
        if swap_in_range(vma, haddr, PMD_PAGES):
            again += 1
            continue
        walk = pt.walk(haddr, PMD_PAGES)
        kinds = walk.kinds
        mapped = (kinds == KIND_PRESENT) | (kinds == KIND_PROTNONE)
        if (~mapped & (kinds != 0)).any():
            again += 1
            continue
        pfns = walk.pfns()
        normal = mapped & ((walk.entries & U64(PTE_SPECIAL)) == 0)
        heads = phys.head_of(pfns[normal])
        uheads, nmaps = np.unique(heads, return_counts=True)
        if ((phys.flags[uheads] & PG_anon) == 0).any():
            raise InvalidArgument(f"MADV_COLLAPSE: a page of {vma} is not anonymous")
        if (phys.refcount[uheads] > phys.mapcount[uheads]).any():
            again += 1
            continue
        try:
            head = phys.alloc_one(PMD_ORDER)
        except OutOfMemory:
            raise OutOfMemory("MADV_COLLAPSE: no free huge page") from None
        start = haddr << PAGE_SHIFT
        with invalidation(mm, MMU_NOTIFY_CLEAR, start, start + (PMD_PAGES << PAGE_SHIFT)):
            dst = np.arange(head, head + PMD_PAGES, dtype=np.int64)
            if normal.any():
                phys.copy_pages(dst[normal], pfns[normal])
            folio_add_new_anon_rmap(
                machine,
                vma,
                np.array([head], dtype=np.int64),
                np.array([haddr], dtype=np.int64),
                PMD_ORDER,
            )
            pmdloc = pt.pmd_loc(haddr, alloc=True)
            old = pt.get(pmdloc)
            if old and is_table_pointer(old):
                pt.set(pmdloc, 0)
                pt.free_table(pte_pfn(old))
            new = make_present(head, write=bool(vma.flags & VM_WRITE), dirty=True, huge=True)
            if not vma.flags & VM_ACCESS_FLAGS:
                new = (new & ~PTE_PRESENT) | PTE_PROTNONE
            pt.set(pmdloc, new)
            machine.costs.pte_writes += PMD_PAGES + 1
            if len(uheads):
                np.subtract.at(phys.mapcount, uheads, nmaps.astype(np.int32))
                phys.put(np.repeat(uheads, nmaps))
    if again:
        raise Again(f"MADV_COLLAPSE could not collapse {again} chunk(s) of {vma}")


def _shmem_collapse(vma: Vma, first: int, last: int) -> None:
    """The shmem chunks of ``madvise_collapse``, in order, with its error rules."""
    again = 0
    for haddr in range(first, last, PMD_PAGES):
        if not thp_vma_suitable(vma, haddr):
            raise InvalidArgument(f"MADV_COLLAPSE: {haddr << PAGE_SHIFT:#x} does not fit {vma}")
        result = _collapse_file_chunk(vma, haddr)
        if result == _AGAIN:
            again += 1
        elif result == _TRUNCATED:
            raise InvalidArgument(f"MADV_COLLAPSE: no page of {vma} at {haddr << PAGE_SHIFT:#x}")
        elif result == _FAIL:
            raise InvalidArgument(f"MADV_COLLAPSE: cannot map {haddr << PAGE_SHIFT:#x} by a PMD")
    if again:
        raise Again(f"MADV_COLLAPSE could not collapse {again} chunk(s) of {vma}")


def _collapse_file_chunk(vma: Vma, haddr: int) -> str:
    """``hpage_collapse_scan_file`` + ``collapse_file`` + ``collapse_pte_mapped_thp``."""
    f = vma.page_cache
    assert f is not None
    machine = vma.mm.machine
    phys = machine.phys
    start = vma.linear_index(haddr)
    if start + PMD_PAGES > f.npages:
        return _FAIL
    idx = np.arange(start, start + PMD_PAGES, dtype=np.int64)
    pfns = f.cache.get(idx)
    cached = pfns >= 0
    if cached[0] and phys.order[pfns[0]] == PMD_ORDER and phys.head(int(pfns[0])) == pfns[0]:
        # SCAN_PTE_MAPPED_HUGEPAGE: already a THP in the page cache.
        return collapse_pte_mapped_thp(vma, haddr, int(pfns[0]))
    swapped = ~cached & np.isin(idx, np.fromiter(f.backing, np.int64, len(f.backing)))
    if not cached.any() and not swapped.any():
        return _TRUNCATED
    old = pfns[cached]
    if (phys.order[old] != 0).any():
        return _FAIL  # a large folio that is not this chunk's (SCAN_PAGE_COMPOUND)
    # The scan's reference check: the cache's reference plus one per mapping.
    if (phys.refcount[old] != phys.mapcount[old] + 1).any():
        return _AGAIN
    if (phys.flags[old] & PG_locked).any():
        return _AGAIN
    try:
        head = phys.alloc_one(PMD_ORDER)
    except OutOfMemory:
        raise OutOfMemory("MADV_COLLAPSE: no free huge page") from None
    if swapped.any():
        try:
            f.get_pages(idx[swapped])  # shmem swap-in of the written-back pages
        except OutOfMemory:
            phys.put_one(head)
            raise OutOfMemory("MADV_COLLAPSE: no memory to swap shmem pages in") from None
        pfns = f.cache.get(idx)
        cached = pfns >= 0
        old = pfns[cached]
    for pfn in old[phys.mapcount[old] > 0].tolist():
        try_to_unmap(machine, pfn, lambda e: 0)
    new = np.arange(head, head + PMD_PAGES, dtype=np.int64)
    phys.copy_pages(new[cached], old)
    # Holes were zero-filled by the allocation; the new folio is dirty shmem.
    phys.or_folio_flags(
        np.array([head], dtype=np.int64), PMD_ORDER, PG_uptodate | PG_swapbacked | PG_dirty
    )
    phys.mapping[head] = f.id
    phys.index[head] = start
    f.cache.set(idx, new)
    phys.mapping[old] = 0
    phys.put(old)
    retract_page_tables(f, start, skip=vma)
    return collapse_pte_mapped_thp(vma, haddr, head)


def _range_vpn(vma: Vma, index: int) -> int | None:
    """The vpn where ``vma`` maps file index ``index`` as a whole PMD, or None."""
    vpn = vma.start_vpn + index - vma.pgoff
    if vpn < vma.start_vpn or vpn + PMD_PAGES > vma.end_vpn or vpn % PMD_PAGES:
        return None
    return vpn


def retract_page_tables(f: File, index: int, *, skip: Vma | None = None) -> None:
    """Free the emptied page tables that map file range [index, index + 512).

    As ``retract_page_tables``: only VMAs that map the range PMD-aligned,
    have no ``anon_vma`` (a private one may hold COW copies there) and whose
    table maps nothing any more; ``CLEAR`` over the 2 MiB of each. ``skip``
    (the collapsing VMA) is left to ``collapse_pte_mapped_thp``.
    """
    for other in sorted(f.i_mmap, key=lambda v: (v.mm.id, v.start)):
        if other is skip or other.anon_vma is not None:
            continue
        vpn = _range_vpn(other, index)
        if vpn is None:
            continue
        mm = other.mm
        pmdloc = mm.pt.pmd_loc(vpn)
        if pmdloc < 0:
            continue
        e = mm.pt.get(pmdloc)
        if not e or not is_table_pointer(e) or mm.pt.rows[pte_pfn(e)].any():
            continue
        start = vpn << PAGE_SHIFT
        with invalidation(mm, MMU_NOTIFY_CLEAR, start, start + (PMD_PAGES << PAGE_SHIFT)):
            mm.pt.set(pmdloc, 0)
            mm.pt.free_table(pte_pfn(e))
            mm.machine.costs.pte_writes += 1


def collapse_pte_mapped_thp(vma: Vma, haddr: int, head: int) -> str:
    """Map the page-cache THP ``head`` by a PMD at ``haddr`` of ``vma``.

    A PMD already mapping it is done; a page table whose entries are empty or
    map exactly the folio's own pages at their places is replaced (``CLEAR``
    over the 2 MiB, the PTE mappings dropped); a table mapping anything else
    fails (``SCAN_FAIL``), as ``collapse_pte_mapped_thp`` does.
    """
    mm = vma.mm
    pt = mm.pt
    phys = mm.machine.phys
    pmdloc = pt.pmd_loc(haddr, alloc=True)
    e = pt.get(pmdloc)
    if e and not is_table_pointer(e):
        return _DONE if pte_pfn(e) == head else _FAIL
    if e:
        walk = pt.walk(haddr, PMD_PAGES)
        kinds = walk.kinds
        used = kinds != 0
        mapped = (kinds[used] == KIND_PRESENT) | (kinds[used] == KIND_PROTNONE)
        if not mapped.all() or ((walk.entries[used] & U64(PTE_SPECIAL)) != 0).any():
            return _FAIL
        if (walk.pfns()[used] != head + np.flatnonzero(used)).any():
            return _FAIL
        start = haddr << PAGE_SHIFT
        with invalidation(mm, MMU_NOTIFY_CLEAR, start, start + (PMD_PAGES << PAGE_SHIFT)):
            n = int(used.sum())
            if n:
                phys.mapcount[head] -= n
                phys.refcount[head] -= n
            pt.set(pmdloc, 0)
            pt.free_table(pte_pfn(e))
            _set_huge_pmd(vma, pmdloc, head)
        return _DONE
    _set_huge_pmd(vma, pmdloc, head)
    return _DONE


def _set_huge_pmd(vma: Vma, pmdloc: int, head: int) -> None:
    """``set_huge_pmd``: one PMD mapping of the folio, as a read fault would map it."""
    phys = vma.mm.machine.phys
    writable = bool(vma.flags & VM_SHARED) and bool(vma.flags & VM_WRITE)
    new = make_present(head, write=writable, huge=True)
    if not vma.flags & VM_ACCESS_FLAGS:
        new = (new & ~PTE_PRESENT) | PTE_PROTNONE
    vma.mm.pt.set(pmdloc, new)
    phys.mapcount[head] += 1
    phys.refcount[head] += 1
    vma.mm.machine.costs.pte_writes += 1
