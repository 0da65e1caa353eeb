"""Invariants every mirror must keep, checked from the outside after any step.

They read CPU page tables and physical memory directly, never through a
faulting load (which would migrate pages back and disturb the run):

1. the device page table is a subset of the CPU's: a device entry maps the
   page the CPU maps at that address, or the device's own private page behind
   a device-private entry (or the page behind a device-exclusive entry; a
   page in flight behind a migration entry is checked when it lands);
2. device-writable implies CPU-writable;
3. the device never maps more than the CPU does (mapping order);
4. what the device reads is what the CPU would read;
5. after close/exit nothing leaks: no stray references, pins, or device pages
   that nothing maps;
6. no kernel warning is recorded (no notifier refuses a blockable
   invalidation, no driver hits a ``WARN_ON``);
7. every device access to memory went through a live DMA mapping made for
   that direction, and no page was freed under a live mapping (DMA-API
   debugging and the IOMMU, ``hmmsim.dma``); after close no mapping is left.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..dma import machine_violations
from ..mm.debug import verify_machine
from ..mm.pagetable import (
    KIND_DEVICE_EXCLUSIVE,
    KIND_DEVICE_PRIVATE,
    KIND_MIGRATION,
    KIND_PRESENT,
    PAGE_SHIFT,
    PAGE_SIZE,
    PTE_WRITE,
    SWP_DEVICE_PRIVATE_WRITE,
    Walk,
    softleaf_type,
)

if TYPE_CHECKING:
    from ..driver import DevicePte, Mirror
    from ..machine import Machine


def check_mirror(mirror: Mirror, addr: int, npages: int, *, data: bool = True) -> None:
    """Check invariants 1-4 for [addr, addr + npages pages) of ``mirror``."""
    mm = mirror.process.mm
    ptes = mirror.device_ptes(addr, npages)
    if not any(p is not None for p in ptes):
        return
    _check_entries(mirror, addr, ptes, mm.pt.walk(addr >> PAGE_SHIFT, npages), data)


class MirrorWatch:
    """``check_mirror(data=False)`` of one range after every step of a run,
    re-verifying only when something it depends on changed.

    Invariants 1-3 are a function of the device's entries, the CPU's entries
    (with the level that maps them) and which device owns which pfn (fixed
    once memory is added), so a step that changed neither entry set cannot
    break them: comparing both (the device's through ``device_pte_state``)
    against the last verified state is exact.
    """

    def __init__(self, mirror: Mirror, addr: int, npages: int) -> None:
        self.mirror = mirror
        self.addr = addr
        self.npages = npages
        self._verified: tuple[object, ...] | None = None

    def check(self) -> None:
        device = self.mirror.device_pte_state(self.addr, self.npages)
        if device is None:  # the device maps nothing here: nothing to hold
            self._verified = None
            return
        pt = self.mirror.process.mm.pt
        vpn = self.addr >> PAGE_SHIFT
        state = (pt.signature(vpn, self.npages), device)
        if state == self._verified:
            return
        ptes = self.mirror.device_ptes(self.addr, self.npages)
        _check_entries(self.mirror, self.addr, ptes, pt.walk(vpn, self.npages), data=False)
        self._verified = state


def _check_entries(
    mirror: Mirror, addr: int, ptes: list[DevicePte | None], walk: Walk, data: bool
) -> None:
    phys = mirror.process.mm.machine.phys
    kinds = walk.kinds
    pfns = walk.pfns()
    # Python ints for the per-entry loop (numpy scalars are slow to compare).
    kind_list = kinds.tolist()
    pfn_list = pfns.tolist()
    order_list = walk.order.tolist()
    entry_list = walk.entries.tolist()
    owner = getattr(mirror, "device", None)
    for i, dpte in enumerate(ptes):
        if dpte is None:
            continue
        kind = kind_list[i]
        cpu_pfn = pfn_list[i]
        e = entry_list[i]
        where = f"{dpte.addr:#x}"
        if kind == KIND_PRESENT:
            cpu_writable = bool(e & PTE_WRITE)
        elif kind == KIND_DEVICE_PRIVATE:
            pgmap = phys.pgmap_of(cpu_pfn)
            assert pgmap is not None and (owner is None or pgmap.owner is owner), (
                f"device maps {where} but the CPU entry is another device's private page"
            )
            cpu_writable = softleaf_type(e) == SWP_DEVICE_PRIVATE_WRITE
        elif kind == KIND_MIGRATION:
            # The page is in flight (between migrate setup and finalize): the
            # migrating owner skips its own MIGRATE invalidation and may map
            # the source or, before finalize, already the destination. Where
            # it lands is checked once the migration entry is gone.
            continue
        elif kind == KIND_DEVICE_EXCLUSIVE:
            assert dpte.atomic, f"device maps {where} non-atomically behind an exclusive entry"
            cpu_writable = True
        else:
            raise AssertionError(
                f"device maps {where} (pfn {dpte.pfn:#x}) but the CPU maps nothing there"
            )
        assert dpte.pfn == cpu_pfn, (
            f"device maps pfn {dpte.pfn:#x} at {where} but the CPU maps {cpu_pfn:#x}"
        )
        if dpte.writable:
            assert cpu_writable, f"device may write {where}, which the CPU maps read-only"
        assert dpte.order <= order_list[i], (
            f"device maps order {dpte.order} at {where} where the CPU maps order {order_list[i]}"
        )
    if data:
        idx = [i for i, p in enumerate(ptes) if p is not None and kinds[i] != KIND_MIGRATION]
        dev_pfns = np.array([ptes[i].pfn for i in idx], dtype=np.int64)  # type: ignore[union-attr]
        cpu = phys.read_pages(pfns[idx])
        dev = phys.read_pages(dev_pfns)
        bad = np.flatnonzero((cpu != dev).any(axis=1))
        assert len(bad) == 0, (
            f"device data differs from CPU data at {addr + idx[int(bad[0])] * PAGE_SIZE:#x}"
        )


def check_notifier_contract(machine: Machine) -> None:
    """Invariant 6: no kernel warning was recorded (``Machine.kernel_warnings``):
    no notifier refused a blockable invalidation, no driver hit a ``WARN_ON``."""
    warnings = machine.kernel_warnings
    assert not warnings, f"{len(warnings)} kernel warning(s), first: {warnings[0]}"


def check_dma_contract(machine: Machine) -> None:
    """Invariant 7: no DMA violation (unmapped access, wrong direction, page freed
    under a live mapping, bad unmap, leak) was recorded."""
    violations = machine_violations(machine)
    assert not violations, f"{len(violations)} DMA violation(s), first: {violations[0]}"


def check_no_leaks(machine: Machine) -> None:
    """Invariants 5 and 7: consistent accounting, no stray references, device
    pages or DMA mappings."""
    verify_machine(machine)
    dbg = machine.dma_debug
    for dev in dbg.devices if dbg is not None else ():
        left = dev.mappings()
        assert not left, (
            f"{dev.name}: {len(left)} DMA mapping(s) still alive, first {left[0].type} "
            f"at {left[0].addr:#x} made at {left[0].origin}"
        )
    phys = machine.phys
    held = {hex(k): v for k, v in phys.extra_refs.items()}
    assert not held, f"page references still held: {held}"
    pins = {hex(k): v for k, v in phys.pins.items()}
    assert not pins, f"pins still held: {pins}"
    for start, end, pgmap in phys.pgmaps:
        used = np.flatnonzero(phys.refcount[start:end] > 0)
        mapped = phys.mapcount[start:end][used] > 0
        assert mapped.all(), (
            f"device page {start + int(used[~mapped][0]):#x} of {pgmap!r} is allocated "
            f"but nothing maps it (leak)"
        )
