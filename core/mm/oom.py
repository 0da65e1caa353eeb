"""The OOM killer and allocations that must not fail (``__GFP_NOFAIL``).

Kernel counterpart: mm/oom_kill.c (``oom_badness``, ``select_bad_process``,
``out_of_memory``) and the ``__GFP_NOFAIL`` retry loop of mm/page_alloc.c
(``__alloc_pages_slowpath``).

An allocation that may not fail reclaims first (direct reclaim) and, when
reclaim frees nothing, invokes the OOM killer: the process with the largest
footprint is killed and its memory reaped, then the allocation is retried.
Device memory counts in a process's footprint like the pages it replaced,
so a process whose data sits mostly in device memory can be the victim.

Departure from the kernel, on purpose: when nothing is left to kill the
kernel panics ("Out of memory and no killable processes"); the model's
``alloc_pages_nofail`` then returns the pages it got, so that the caller can
leave its state whole before it reports ``OutOfMemory``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from .pagetable import (
    KIND_DEVICE_EXCLUSIVE,
    KIND_DEVICE_PRIVATE,
    KIND_MIGRATION,
    KIND_PRESENT,
    KIND_PROTNONE,
    KIND_SWAP,
    PAGE_SHIFT,
    PAGE_SIZE,
)

if TYPE_CHECKING:
    from ..machine import Machine
    from .process import Process

#: Entry kinds counted in a process's footprint (``get_mm_rss`` + swap entries).
_COUNTED = (
    KIND_PRESENT,
    KIND_PROTNONE,
    KIND_SWAP,
    KIND_MIGRATION,
    KIND_DEVICE_PRIVATE,
    KIND_DEVICE_EXCLUSIVE,
)


def oom_badness(process: Process) -> int:
    """``oom_badness``: pages the process's memory holds (resident, device, swapped).

    The zero pages are not counted (the kernel's rss counters skip them). Returns
    -1 for a process the OOM killer must leave alone: exited, or already reaped.
    """
    if process.exited or process.mm.unstable:
        return -1
    phys = process.machine.phys
    total = 0
    for vma in process.mm.vmas:
        walk = process.mm.pt.walk(vma.start >> PAGE_SHIFT, vma.npages)
        kinds = walk.kinds
        counted = np.isin(kinds, _COUNTED)
        present = kinds == KIND_PRESENT
        if present.any():
            counted[present] &= ~phys.zero_mask(walk.pfns()[present])
        total += int(counted.sum())
    return total


def select_bad_process(machine: Machine) -> Process | None:
    """``select_bad_process``: the live process with the largest badness (first on ties)."""
    victim = None
    best = -1
    for process in machine.processes:
        points = oom_badness(process)
        if points > best:
            victim, best = process, points
    return victim


def out_of_memory(machine: Machine) -> bool:
    """``out_of_memory``: kill the worst process; False if there is none to kill."""
    victim = select_bad_process(machine)
    if victim is None:
        return False
    machine.oom_kill(victim)
    return True


def alloc_pages_nofail(machine: Machine, count: int) -> NDArray[np.int64]:
    """``count`` order-0 pages with ``__GFP_NOFAIL``, in as few batches as RAM allows.

    Takes what is free, then reclaims (and if that frees nothing, OOM-kills)
    for the rest. Returns fewer than ``count`` pages only when nothing is
    left to reclaim or kill (where the kernel panics); the caller decides
    what to do with the pages it got.
    """
    phys = machine.phys
    got: list[NDArray[np.int64]] = []
    need = count
    while need > 0:
        free = phys.allocator.nr_free
        if free:
            # Order-0 blocks never fragment: any free frame will do.
            batch = phys.alloc(0, min(free, need))
            got.append(batch)
            need -= len(batch)
            continue
        if machine.reclaim(need * PAGE_SIZE) > 0:
            continue
        if not out_of_memory(machine):
            break
    if not got:
        return np.empty(0, dtype=np.int64)
    return got[0] if len(got) == 1 else np.concatenate(got)
