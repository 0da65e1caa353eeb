"""Invariants every mirror must keep, checked from the outside after any step.

They read CPU page tables and physical memory directly, never through a
faulting load (which would migrate pages back and disturb the run):

1. the device page table is a subset of the CPU's: a device entry maps the
   page the CPU maps at that address, or the device's own private page behind
   a device-private entry (or the page behind a device-exclusive entry; a
   page in flight behind a migration entry is checked when it lands);
2. device-writable implies CPU-writable;
3. the device never maps more than the CPU does (mapping order), and maps
   whole granules of the driver's declared ``Driver.mapping_granule``;
4. what the device reads (through ``Mirror.read``) is what the CPU would
   read; device-atomic access holds exactly where the CPU entry is
   device-exclusive (both directions) or the page is the device's own;
5. after close/exit nothing leaks: no stray references, pins, device pages
   that nothing maps, or mapping counts no page table accounts for;
6. no kernel warning is recorded (no notifier refuses a blockable
   invalidation, no driver hits a ``WARN_ON``);
7. every device access to memory went through a live DMA mapping made for
   that direction, and no page was freed under a live mapping (DMA-API
   debugging and the IOMMU, ``hmmsim.dma``); after close no mapping is left.
8. the zero page and the huge zero page still read zero: a device store
   through an entry a read fault mapped (the zero page of untouched memory)
   must fault for write and break COW, never land in the shared zero page.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from .. import sched
from ..dma import machine_violations
from ..mm.debug import verify_machine
from ..mm.pagetable import (
    KIND_DEVICE_EXCLUSIVE,
    KIND_DEVICE_PRIVATE,
    KIND_MIGRATION,
    KIND_PRESENT,
    KIND_PROTNONE,
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_PAGES,
    PTE_SPECIAL,
    PTE_WRITE,
    SWP_DEVICE_PRIVATE_WRITE,
    Walk,
    softleaf_type,
)
from ..mm.physmem import HUGE_ZERO_PFN, ZERO_PFN, PG_zeroed

if TYPE_CHECKING:
    from ..driver import DevicePte, Mirror
    from ..machine import Machine


def check_mirror(
    mirror: Mirror, addr: int, npages: int, *, data: bool = True, granule: int = PAGE_SIZE
) -> None:
    """Check invariants 1-4 for [addr, addr + npages pages) of ``mirror``.

    With ``data`` the device's view is read through ``mirror.read`` (the
    driver's own data path, run over each stretch of pages the device maps,
    so it takes no fault) and compared with the bytes the CPU would read.
    Between the steps of an explored run (a scheduler is active) the data
    read is left out: the driver's data path takes locks an actor may hold at
    that point, and a check must not act as another thread; the run's final
    check, after the scheduler is gone, reads. ``granule`` is the driver's
    ``mapping_granule``.
    """
    mm = mirror.process.mm
    ptes = mirror.device_ptes(addr, npages)
    if not any(p is not None for p in ptes):
        return
    _check_entries(mirror, addr, ptes, mm.pt.walk(addr >> PAGE_SHIFT, npages), False, granule)
    if data and sched.active() is None:
        _check_data(mirror, addr, ptes)


def _runs(idx: list[int]) -> list[tuple[int, int]]:
    """Maximal stretches ``(first, count)`` of consecutive indices."""
    out: list[tuple[int, int]] = []
    for i in idx:
        if out and out[-1][0] + out[-1][1] == i:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out


def _check_data(mirror: Mirror, addr: int, ptes: list[DevicePte | None]) -> None:
    """Invariant 4, data: what ``mirror.read`` returns is what the CPU would read.

    The device reads first (its data path may use anything it cached); the
    CPU's view is then taken from the pages the CPU maps at that moment (a
    device-private page holds the data a CPU fault would bring back).
    """
    mm = mirror.process.mm
    phys = mm.machine.phys
    vpn = addr >> PAGE_SHIFT
    walk = mm.pt.walk(vpn, len(ptes))
    kinds = walk.kinds.tolist()
    readable = (KIND_PRESENT, KIND_DEVICE_PRIVATE, KIND_DEVICE_EXCLUSIVE)
    idx = [i for i, p in enumerate(ptes) if p is not None and kinds[i] in readable]
    for first, count in _runs(idx):
        start = addr + first * PAGE_SIZE
        got = mirror.read(start, count * PAGE_SIZE)
        now = mm.pt.walk(start >> PAGE_SHIFT, count)
        cpu = phys.read_pages(now.pfns()).reshape(-1).tobytes()
        if got != cpu:
            view = np.frombuffer(got, dtype=np.uint8).reshape(count, PAGE_SIZE)
            want = np.frombuffer(cpu, dtype=np.uint8).reshape(count, PAGE_SIZE)
            bad = int(np.flatnonzero((view != want).any(axis=1))[0])
            raise AssertionError(
                f"device data differs from CPU data at {start + bad * PAGE_SIZE:#x}"
            )


def check_granules(ptes: list[DevicePte | None], walk: Walk, addr: int, granule: int) -> None:
    """Invariant 3, granule: where the CPU maps a whole aligned granule the
    device maps all of it or none of it (it maps and unmaps granules)."""
    assert granule >= PAGE_SIZE and granule & (granule - 1) == 0, (
        f"the driver declares a mapping granule of {granule} bytes, not a power of two "
        f"of at least {PAGE_SIZE}"
    )
    step = granule // PAGE_SIZE
    if step <= 1:
        return
    mapped_cpu = np.isin(walk.kinds, (KIND_PRESENT, KIND_DEVICE_PRIVATE, KIND_DEVICE_EXCLUSIVE))
    dev = np.array([p is not None for p in ptes], dtype=bool)
    vpn = addr >> PAGE_SHIFT
    first = (-vpn) % step  # the first index at a granule boundary
    for i in range(first, len(ptes) - step + 1, step):
        sl = slice(i, i + step)
        if mapped_cpu[sl].all() and dev[sl].any() and not dev[sl].all():
            raise AssertionError(
                f"device maps part of the {granule // 1024} KiB granule at "
                f"{addr + i * PAGE_SIZE:#x} (it declares that it maps whole granules)"
            )


class MirrorWatch:
    """``check_mirror(data=False)`` of one range after every step of a run,
    re-verifying only when something it depends on changed.

    Invariants 1-3 are a function of the device's entries, the CPU's entries
    (with the level that maps them) and which device owns which pfn (fixed
    once memory is added), so a step that changed neither entry set cannot
    break them: comparing both (the device's through ``device_pte_state``)
    against the last verified state is exact.
    """

    def __init__(self, mirror: Mirror, addr: int, npages: int, granule: int = PAGE_SIZE) -> None:
        self.mirror = mirror
        self.granule = granule
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
        walk = pt.walk(vpn, self.npages)
        _check_entries(self.mirror, self.addr, ptes, walk, False, self.granule)
        self._verified = state


def _check_entries(
    mirror: Mirror,
    addr: int,
    ptes: list[DevicePte | None],
    walk: Walk,
    data: bool,
    granule: int = PAGE_SIZE,
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
        if dpte.atomic and kind not in (KIND_DEVICE_EXCLUSIVE, KIND_DEVICE_PRIVATE, KIND_MIGRATION):
            # Converse of the exclusive check below: atomic access to memory
            # the CPU can reach needs the CPU locked out (make_device_exclusive).
            raise AssertionError(
                f"device holds atomic access at {where} but the CPU entry is not "
                f"device-exclusive (the CPU can write the page meanwhile)"
            )
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
    check_granules(ptes, walk, addr, granule)
    if data and sched.active() is None:
        _check_data(mirror, addr, ptes)


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


def mapped_heads(machine: Machine) -> NDArray[np.int64]:
    """The folio heads some page table of a live process maps (with repeats)."""
    phys = machine.phys
    found = []
    for proc in machine.processes:
        mm = proc.mm
        for vma in mm.vmas:
            slots = mm.pt.walk(vma.start_vpn, vma.npages).slots()
            k = slots.kinds
            mapped = np.isin(
                k, (KIND_PRESENT, KIND_PROTNONE, KIND_DEVICE_PRIVATE, KIND_DEVICE_EXCLUSIVE)
            )
            mapped &= (slots.entries & np.uint64(PTE_SPECIAL)) == 0
            mapped &= ~phys.zero_mask(slots.pfns)
            found.append(phys.head_of(slots.pfns[mapped]))
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


def check_mapcounts(machine: Machine) -> None:
    """Invariant 5, mappings: no page counts a mapping that no page table holds.

    ``verify_machine`` recounts the pages it finds mapped; a page whose
    mapping count was never dropped (a zap that forgot it) is mapped by
    nothing, so only a scan of every mapping count sees it.
    """
    phys = machine.phys
    counted = np.flatnonzero(phys.mapcount > 0)
    stray = np.setdiff1d(counted, mapped_heads(machine))
    assert len(stray) == 0, (
        f"{len(stray)} page(s) count mappings no page table holds, first {int(stray[0]):#x} "
        f"(mapcount {int(phys.mapcount[stray[0]])}, refcount {int(phys.refcount[stray[0]])})"
    )


def check_zero_pages(machine: Machine) -> None:
    """Invariant 8: ``ZERO_PFN`` and the huge zero folio hold only zeros."""
    phys = machine.phys
    # A page still flagged PG_zeroed reads as zeros whatever its frame holds
    # (every store clears the flag first): only the others need reading, and
    # on a machine whose zero pages were never written there are none (this
    # runs at the end of every explored schedule: 2 MiB copied each time).
    flagged = (phys.flags[: HUGE_ZERO_PFN + PMD_PAGES] & PG_zeroed) != 0
    if not flagged[ZERO_PFN]:
        zero = phys.read_pages(np.arange(ZERO_PFN, ZERO_PFN + 1, dtype=np.int64))
        assert not zero.any(), "the zero page was written: a store went through a read-only entry"
    written = HUGE_ZERO_PFN + np.flatnonzero(~flagged[HUGE_ZERO_PFN:])
    huge = phys.read_pages(written)
    if huge.any():
        bad = int(written[np.flatnonzero(huge.any(axis=1))[0]] - HUGE_ZERO_PFN)
        raise AssertionError(
            f"the huge zero page was written (subpage {bad}): a store went through a "
            "read-only entry"
        )


def check_no_leaks(machine: Machine) -> None:
    """Invariants 5 and 7: consistent accounting, no stray references, mapping
    counts, device pages or DMA mappings."""
    verify_machine(machine)
    check_mapcounts(machine)
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
