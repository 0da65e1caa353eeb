"""What a driver's ``mmap`` handler installs: ``remap_pfn_range`` and ``vm_insert_page``.

Kernel counterpart: mm/memory.c ``remap_pfn_range`` (``VM_IO|VM_PFNMAP``,
special PTEs with no struct-page accounting) and ``vm_insert_page``
(``VM_MIXEDMAP``, a normal refcounted page mapped like any other).

HMM refuses ``VM_IO|VM_PFNMAP`` VMAs outright, and reports special PTEs of a
``VM_MIXEDMAP`` VMA as errors; pages inserted with ``vm_insert_page`` are
normal pages it reports as valid.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import BadAddress, InvalidArgument
from .pagetable import (
    KIND_NONE,
    PAGE_SHIFT,
    PAGE_SIZE,
    PTE_SPECIAL,
    U64,
    make_present,
    make_present_array,
    pte_kind,
)
from .vma import VM_DONTEXPAND, VM_IO, VM_MIXEDMAP, VM_PFNMAP, VM_SHARED, VM_WRITE

if TYPE_CHECKING:
    from .vma import Vma


def remap_pfn_range(vma: Vma, addr: int, pfn: int, size: int) -> None:
    """Map ``size`` bytes of raw frames from ``pfn`` at ``addr`` (special PTEs)."""
    if addr % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
        raise InvalidArgument("remap_pfn_range: page-aligned, non-empty range required")
    if addr < vma.start or addr + size > vma.end:
        raise InvalidArgument(f"remap_pfn_range: [{addr:#x}, +{size:#x}) is outside {vma}")
    vma.flags |= VM_IO | VM_PFNMAP | VM_DONTEXPAND
    n = size >> PAGE_SHIFT
    write = bool(vma.flags & VM_WRITE) and bool(vma.flags & VM_SHARED)
    entries = make_present_array(np.arange(pfn, pfn + n, dtype=np.int64), write=write, dirty=False)
    vma.mm.pt.set_ptes(addr >> PAGE_SHIFT, entries | U64(PTE_SPECIAL))
    vma.mm.machine.costs.pte_writes += n


def vm_insert_page(vma: Vma, addr: int, pfn: int) -> None:
    """Map one refcounted page at ``addr`` of a ``VM_MIXEDMAP`` VMA."""
    if addr % PAGE_SIZE or not vma.contains(addr):
        raise InvalidArgument(f"vm_insert_page: {addr:#x} is not a page of {vma}")
    if vma.flags & VM_PFNMAP:
        raise InvalidArgument("vm_insert_page on a VM_PFNMAP mapping")
    phys = vma.mm.machine.phys
    if not phys.valid_pfn(pfn) or phys.refcount[phys.head(pfn)] <= 0:
        raise InvalidArgument(f"vm_insert_page: pfn {pfn:#x} is not an allocated page")
    vma.flags |= VM_MIXEDMAP
    loc = vma.mm.pt.pte_loc(addr >> PAGE_SHIFT, alloc=True)
    if pte_kind(vma.mm.pt.get(loc)) != KIND_NONE:
        raise BadAddress(f"vm_insert_page: {addr:#x} is already mapped")
    head = phys.head(pfn)
    phys.refcount[head] += 1
    phys.mapcount[head] += 1
    write = bool(vma.flags & VM_WRITE) and bool(vma.flags & VM_SHARED)
    vma.mm.pt.set(loc, make_present(pfn, write=write))
    vma.mm.machine.costs.pte_writes += 1


def vmf_insert_pfn(vma: Vma, addr: int, pfn: int) -> None:
    """Map a raw frame at ``addr`` with a special PTE (``vmf_insert_pfn``/``_mixed``).

    Allowed in ``VM_PFNMAP`` and ``VM_MIXEDMAP`` VMAs; the PTE carries no
    struct-page accounting, and HMM reports it as ERROR.
    """
    if addr % PAGE_SIZE or not vma.contains(addr):
        raise InvalidArgument(f"vmf_insert_pfn: {addr:#x} is not a page of {vma}")
    if not vma.flags & (VM_PFNMAP | VM_MIXEDMAP):
        raise InvalidArgument("vmf_insert_pfn needs a VM_PFNMAP or VM_MIXEDMAP mapping")
    loc = vma.mm.pt.pte_loc(addr >> PAGE_SHIFT, alloc=True)
    if pte_kind(vma.mm.pt.get(loc)) != KIND_NONE:
        raise BadAddress(f"vmf_insert_pfn: {addr:#x} is already mapped")
    write = bool(vma.flags & VM_WRITE) and bool(vma.flags & VM_SHARED)
    vma.mm.pt.set(loc, make_present(pfn, write=write, special=True))
    vma.mm.machine.costs.pte_writes += 1
