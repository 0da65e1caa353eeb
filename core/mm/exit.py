"""Address-space teardown: ``exit_mmap`` and the OOM reaper.

Kernel counterpart: mm/mmap.c (``exit_mmap``), kernel/exit.c (``exit_mm``),
mm/oom_kill.c (``__oom_reap_task_mm``).

``exit_mmap`` first releases the notifiers (``RELEASE`` over the whole
address space to interval subscriptions, ``release`` to classic ones), then
unmaps every VMA with a blockable ``UNMAP``. The OOM reaper instead tears
down private memory with *non-blockable* ``UNMAP`` invalidations; a VMA whose
notifier refuses is skipped, exactly as the kernel does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import Again
from ..notifier import (
    MMU_NOTIFY_UNMAP,
    NotifierRange,
    invalidate_range_end,
    invalidate_range_start_nonblock,
    invalidation,
    mmu_notifier_release,
)
from .mmap import remove_vma, unmap_vma
from .pagetable import PAGE_SHIFT, PMD_PAGES, PageTable
from .vma import VM_IO, VM_PFNMAP
from .zap import zap_range

if TYPE_CHECKING:
    from .address_space import AddressSpace
    from .process import Process
    from .vma import Vma


#: Pages zapped per step at exit: 32 MiB of 4 KiB pages (64 PTE tables), so
#: that each step's arrays stay in cache. A multiple of the PMD size, so no
#: THP straddles two steps.
_EXIT_BLOCK_PAGES = 64 * PMD_PAGES


def exit_mmap(mm: AddressSpace) -> None:
    """Tear down an address space whose last user is gone."""
    with mm.mmap_lock.write():
        mmu_notifier_release(mm)
        for vma in list(mm.vmas):
            _unmap_whole_vma(vma)
        mm.pt = PageTable(capacity=8)  # every table is empty now: drop them all at once


def _unmap_whole_vma(vma: Vma) -> None:
    """``unmap_vma`` in steps of ``_EXIT_BLOCK_PAGES`` (one UNMAP invalidation)."""
    if vma.is_hugetlb or vma.npages <= _EXIT_BLOCK_PAGES:
        unmap_vma(vma)
        return
    with invalidation(vma.mm, MMU_NOTIFY_UNMAP, vma.start, vma.end):
        vpn = vma.start_vpn
        end = vma.end_vpn
        while vpn < end:
            step_end = min(end, (vpn + _EXIT_BLOCK_PAGES) & ~(_EXIT_BLOCK_PAGES - 1))
            zap_range(vma, vpn, step_end - vpn)
            vpn = step_end
    remove_vma(vma)


def oom_reap(mm: AddressSpace) -> list[str]:
    """``__oom_reap_task_mm``: reap private memory without blocking.

    Returns a description of each VMA skipped because a notifier refused.
    """
    skipped = []
    mm.unstable = True
    with mm.mmap_lock.read():
        for vma in mm.vmas:
            if vma.is_hugetlb or vma.flags & (VM_IO | VM_PFNMAP):
                continue
            if not (vma.is_anonymous or not vma.is_shared):
                continue
            rng = NotifierRange(mm, vma.start, vma.end, MMU_NOTIFY_UNMAP, None, False)
            try:
                invalidate_range_start_nonblock(rng)
            except Again as exc:
                skipped.append(f"{vma}: {exc.message}")
                continue
            zap_range(vma, vma.start >> PAGE_SHIFT, vma.npages)
            invalidate_range_end(rng)
    return skipped


def oom_kill(process: Process) -> None:
    """Kill ``process``: reap its memory, then let it exit."""
    process.oom_reap_skipped = oom_reap(process.mm)
    process.exit()
