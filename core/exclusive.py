"""Device-exclusive access: ``make_device_exclusive``.

Kernel counterpart: ``make_device_exclusive`` in mm/rmap.c (the 6.15+
single-page API). The page at ``addr`` is faulted in writable through GUP,
its folio locked, and its PTE replaced, inside one ``MMU_NOTIFY_EXCLUSIVE``
invalidation carrying the caller's owner, by a device-exclusive entry; the
CPU's next touch restores the PTE (``remove_device_exclusive_entry`` in
:mod:`hmmsim.mm.fault`) and sends ``MMU_NOTIFY_EXCLUSIVE`` with owner None.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .errors import NotSupported
from .gup import FOLL_GET, FOLL_SPLIT_PMD, FOLL_WRITE, get_user_pages
from .mm.pagetable import (
    KIND_PRESENT,
    PAGE_SHIFT,
    PAGE_SIZE,
    PTE_DIRTY,
    PTE_WRITE,
    SWP_DEVICE_EXCLUSIVE,
    make_softleaf,
    pte_kind,
    pte_pfn,
)
from .mm.physmem import PG_anon, PG_dirty, PG_hugetlb
from .notifier import MMU_NOTIFY_EXCLUSIVE, invalidation

if TYPE_CHECKING:
    from .mm.address_space import AddressSpace


def make_device_exclusive(mm: AddressSpace, addr: int, owner: object) -> tuple[int, int]:
    """Give a device exclusive access to the anonymous page at ``addr``.

    Returns ``(page, folio)``: the pfn of the page at ``addr`` and the head
    pfn of its folio (they differ inside a PTE-mapped large folio), as the
    kernel returns the page and fills ``*foliop``. The folio is locked and
    referenced: the caller maps ``page`` in its device page table, then
    ``folio_unlock``s and ``put_page``s the folio. The CPU's next touch
    restores the PTE and sends ``MMU_NOTIFY_EXCLUSIVE`` (owner None).
    """
    mm.mmap_lock.assert_held()
    addr &= ~(PAGE_SIZE - 1)
    machine = mm.machine
    phys = machine.phys
    pt = mm.pt
    while True:
        pages = get_user_pages(mm, addr, 1, FOLL_WRITE | FOLL_SPLIT_PMD | FOLL_GET)
        pfn = pages[0]
        head = phys.head(pfn)
        flags = int(phys.flags[head])
        if not flags & PG_anon or flags & PG_hugetlb:
            phys.put_page(pfn)
            raise NotSupported(f"make_device_exclusive: {addr:#x} is not an anonymous page")
        phys.folio_lock(head)
        with invalidation(mm, MMU_NOTIFY_EXCLUSIVE, addr, addr + PAGE_SIZE, owner):
            loc, e, level = pt.lookup(addr >> PAGE_SHIFT)
            ok = (
                loc >= 0
                and level == 0
                and pte_kind(e) == KIND_PRESENT
                and pte_pfn(e) == pfn
                and bool(e & PTE_WRITE)
            )
            if ok:
                if e & PTE_DIRTY:
                    phys.flags[head] |= np.uint16(PG_dirty)
                pt.set(loc, make_softleaf(SWP_DEVICE_EXCLUSIVE, pfn))
                machine.costs.pte_writes += 1
        if ok:
            return pfn, head
        phys.folio_unlock(head)
        phys.put_page(pfn)


__all__ = ["make_device_exclusive"]
