"""Meta-tests: every invariant and leak check fails on a state crafted to violate it.

A check that cannot fail is a defect. Each test builds a real machine, puts it
in a state that breaks exactly one rule (a device page table reporting what
the CPU does not map, a page whose mapping count was never dropped, a store
to a freed page ...) and asserts the check names that rule; a control with
the honest state passes.
"""

from __future__ import annotations

import attrs
import numpy as np
import pytest
from hmmsim import MAP_ANONYMOUS, MAP_PRIVATE, PROT_READ, PROT_WRITE, Machine, MachineConfig
from hmmsim.dma import DmaDevice, dma_map_page, dma_read, dma_unmap_page
from hmmsim.driver import DevicePte, Mirror
from hmmsim.gup import FOLL_WRITE, pin_user_pages
from hmmsim.mm.pagetable import PAGE_SIZE
from hmmsim.testing.checks import DriverSpec, close_environment, open_environment
from hmmsim.testing.invariants import (
    MirrorWatch,
    check_dma_contract,
    check_mapcounts,
    check_mirror,
    check_no_leaks,
    check_notifier_contract,
)
from hmmsim.testing.poison import PAGE_POISON, Poisoner

RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS


class CraftedMirror(Mirror):
    """A mirror whose device page table and data path are whatever a test says."""

    def __init__(self, process, ptes=None, data=None):  # type: ignore[no-untyped-def]
        self.process = process
        self.ptes: dict[int, DevicePte] = dict(ptes or {})
        self.data = data  # addr -> bytes the "device" returns, else the CPU's bytes

    def read(self, addr: int, length: int) -> bytes:
        if self.data is not None:
            return bytes(self.data(addr, length))
        return self.process.read(addr, length)

    def write(self, addr: int, data: bytes) -> None:
        raise NotImplementedError

    def device_ptes(self, addr: int, npages: int) -> list[DevicePte | None]:
        return [self.ptes.get(addr + i * PAGE_SIZE) for i in range(npages)]

    def close(self) -> None:
        self.ptes.clear()


def _machine() -> Machine:
    return Machine(MachineConfig(ram_bytes=32 << 20, swap_bytes=1 << 20))


def _honest(proc, addr: int, npages: int, **kw) -> dict[int, DevicePte]:  # type: ignore[no-untyped-def]
    out = {}
    for e in proc.pagemap(addr, npages):
        a = addr + len(out) * PAGE_SIZE
        fields = {"writable": e.writable, "atomic": False, "order": 0, "memory": "system"}
        fields.update(kw)
        out[a] = DevicePte(a, e.pfn, **fields)
    return out


@pytest.fixture
def cpu():  # type: ignore[no-untyped-def]
    m = _machine()
    p = m.spawn()
    a = p.mmap(16 * PAGE_SIZE, RW, ANON)
    p.write(a, bytes(range(256)) * (16 * PAGE_SIZE // 256))
    return m, p, a


def test_honest_crafted_mirror_passes_every_mirror_invariant(cpu):  # type: ignore[no-untyped-def]
    _m, p, a = cpu
    check_mirror(CraftedMirror(p, _honest(p, a, 16)), a, 16)


def test_data_invariant_reads_through_the_device_and_catches_stale_data(cpu):  # type: ignore[no-untyped-def]
    _m, p, a = cpu
    stale = CraftedMirror(p, _honest(p, a, 16), data=lambda _a, n: bytes(n))
    with pytest.raises(AssertionError, match="device data differs from CPU data at"):
        check_mirror(stale, a, 16)
    check_mirror(stale, a, 16, data=False)  # identity alone holds


def test_data_invariant_names_the_first_differing_page(cpu):  # type: ignore[no-untyped-def]
    _m, p, a = cpu

    def off_by_one_page(addr: int, n: int) -> bytes:
        good = bytearray(p.read(addr, n))
        good[5 * PAGE_SIZE] ^= 1
        return bytes(good)

    with pytest.raises(AssertionError, match=f"at {a + 5 * PAGE_SIZE:#x}"):
        check_mirror(CraftedMirror(p, _honest(p, a, 16), data=off_by_one_page), a, 16)


def test_device_entry_for_a_page_the_cpu_does_not_map_fails(cpu):  # type: ignore[no-untyped-def]
    m, p, a = cpu
    ptes = _honest(p, a, 4)
    other = m.phys.alloc_one(0)
    ptes[a] = attrs.evolve(ptes[a], pfn=other)
    with pytest.raises(AssertionError, match="but the CPU maps"):
        check_mirror(CraftedMirror(p, ptes), a, 4, data=False)
    p.munmap(a + 8 * PAGE_SIZE, PAGE_SIZE)
    gone = {a + 8 * PAGE_SIZE: DevicePte(a + 8 * PAGE_SIZE, other, False, False, 0, "system")}
    with pytest.raises(AssertionError, match="the CPU maps nothing there"):
        check_mirror(CraftedMirror(p, gone), a + 8 * PAGE_SIZE, 1, data=False)


def test_device_writable_where_the_cpu_is_read_only_fails(cpu):  # type: ignore[no-untyped-def]
    _m, p, a = cpu
    p.mprotect(a, 4 * PAGE_SIZE, PROT_READ)
    ptes = _honest(p, a, 4, writable=True)
    with pytest.raises(AssertionError, match="which the CPU maps read-only"):
        check_mirror(CraftedMirror(p, ptes), a, 4, data=False)


def test_device_mapping_larger_than_the_cpus_fails(cpu):  # type: ignore[no-untyped-def]
    _m, p, a = cpu
    with pytest.raises(AssertionError, match=r"device maps order 9 .* where the CPU maps order 0"):
        check_mirror(CraftedMirror(p, _honest(p, a, 4, order=9)), a, 4, data=False)


def test_atomic_without_a_device_exclusive_cpu_entry_fails(cpu):  # type: ignore[no-untyped-def]
    _m, p, a = cpu
    with pytest.raises(AssertionError, match=r"atomic access .* not device-exclusive"):
        check_mirror(CraftedMirror(p, _honest(p, a, 4, atomic=True)), a, 4, data=False)


def test_non_atomic_entry_behind_a_device_exclusive_entry_fails():  # type: ignore[no-untyped-def]
    env = open_environment(DriverSpec("dmirror"))
    a = env.mmap(4 * PAGE_SIZE)
    env.proc.write(a, b"x" * 4 * PAGE_SIZE)
    env.mirror.make_exclusive(a, 4)
    ptes = {
        a + i * PAGE_SIZE: DevicePte(a + i * PAGE_SIZE, e.pfn, True, False, 0, "system")
        for i, e in enumerate(env.proc.pagemap(a, 4))
    }
    with pytest.raises(AssertionError, match="non-atomically behind an exclusive entry"):
        check_mirror(CraftedMirror(env.proc, ptes), a, 4, data=False)
    check_mirror(env.mirror, a, 4)  # dmirror itself holds them atomically
    close_environment(env)


def test_partially_mapped_granule_fails(cpu):  # type: ignore[no-untyped-def]
    _m, p, a = cpu
    aligned = (a + 0xFFFF) & ~0xFFFF
    if aligned + 16 * PAGE_SIZE > a + 16 * PAGE_SIZE:  # keep inside the mapping
        p.munmap(a, 16 * PAGE_SIZE)
        a = p.mmap(32 * PAGE_SIZE, RW, ANON)
        aligned = (a + 0xFFFF) & ~0xFFFF
        p.write(aligned, b"y" * 16 * PAGE_SIZE)
    ptes = _honest(p, aligned, 16)
    check_mirror(CraftedMirror(p, ptes), aligned, 16, granule=64 << 10)
    del ptes[aligned + 3 * PAGE_SIZE]
    with pytest.raises(AssertionError, match="part of the 64 KiB granule"):
        check_mirror(CraftedMirror(p, ptes), aligned, 16, granule=64 << 10)
    check_mirror(CraftedMirror(p, ptes), aligned, 16)  # a 4 KiB driver may do that


def test_a_granule_that_is_not_a_power_of_two_pages_is_refused(cpu):  # type: ignore[no-untyped-def]
    _m, p, a = cpu
    for bad in (3 * PAGE_SIZE, 2048):
        with pytest.raises(AssertionError, match="not a power of two"):
            check_mirror(CraftedMirror(p, _honest(p, a, 4)), a, 4, granule=bad)


def test_mirror_watch_catches_what_check_mirror_catches(cpu):  # type: ignore[no-untyped-def]
    _m, p, a = cpu
    mirror = CraftedMirror(p, _honest(p, a, 4))
    watch = MirrorWatch(mirror, a, 4)
    watch.check()
    p.mprotect(a, 4 * PAGE_SIZE, PROT_READ)  # the CPU side changed; the device did not
    with pytest.raises(AssertionError, match="read-only"):
        watch.check()


# ----- leaks ------------------------------------------------------------------------------------


def _exited() -> Machine:
    m = _machine()
    p = m.spawn()
    a = p.mmap(8 * PAGE_SIZE, RW, ANON)
    p.write(a, b"z" * 8 * PAGE_SIZE)
    p.exit()
    check_no_leaks(m)
    return m


def test_page_whose_mapcount_was_never_dropped_is_a_leak():
    m = _exited()
    pfn = m.phys.alloc_one(0)
    m.phys.mapcount[pfn] += 1  # a zap that forgot the page: counted, mapped by nothing
    with pytest.raises(AssertionError, match="count mappings no page table holds"):
        check_mapcounts(m)
    with pytest.raises(AssertionError):
        check_no_leaks(m)


def test_page_reference_never_put_is_a_leak():
    m = _exited()
    pfn = m.phys.alloc_one(0)
    with pytest.raises(AssertionError, match="leak"):
        check_no_leaks(m)
    m.phys.put_one(pfn)
    check_no_leaks(m)


def test_get_page_without_put_page_is_a_leak():
    m = _machine()
    p = m.spawn()
    a = p.mmap(PAGE_SIZE, RW, ANON)
    p.write(a, b"q")
    m.phys.get_page(p.pagemap(a, 1)[0].pfn)
    p.exit()
    with pytest.raises(AssertionError):
        check_no_leaks(m)


def test_pin_never_released_is_a_leak():
    m = _machine()
    p = m.spawn()
    a = p.mmap(PAGE_SIZE, RW, ANON)
    p.write(a, b"q")
    with p.mm.mmap_lock.read():
        pin_user_pages(p.mm, a, 1, FOLL_WRITE)
    p.exit()
    with pytest.raises(AssertionError):
        check_no_leaks(m)


def test_device_page_allocated_but_unmapped_is_a_leak():
    env = open_environment(DriverSpec("dmirror"))
    a = env.mmap(4 * PAGE_SIZE)
    env.proc.write(a, b"d" * 4 * PAGE_SIZE)
    env.mirror.migrate_to_device(a, 4)
    dpfn = env.proc.pagemap(a, 1)[0].pfn
    env.machine.phys.refcount[dpfn] += 1  # a reference the driver forgot
    env.mirror.close()
    for p in list(env.machine.processes):
        p.exit()
    with pytest.raises(AssertionError, match="is allocated but nothing maps it"):
        check_no_leaks(env.machine)


def test_dma_mapping_left_alive_is_a_leak_and_a_contract_violation():
    m = _machine()
    dev = DmaDevice(m, "meta")
    pfn = m.phys.alloc_one(0)
    addr = dma_map_page(dev, pfn, 0, PAGE_SIZE, 1)
    m.phys.put_one(pfn)  # freed under a live mapping
    with pytest.raises(AssertionError, match="DMA violation"):
        check_dma_contract(m)
    with pytest.raises(AssertionError):
        check_no_leaks(m)
    dma_unmap_page(dev, addr, PAGE_SIZE, 1)


def test_dma_access_after_unmap_violates_the_contract():
    m = _machine()
    dev = DmaDevice(m, "meta")
    pfn = m.phys.alloc_one(0)
    addr = dma_map_page(dev, pfn, 0, PAGE_SIZE, 1)  # DMA_TO_DEVICE: the device reads
    dma_read(dev, addr, 8)
    check_dma_contract(m)
    dma_unmap_page(dev, addr, PAGE_SIZE, 1)
    with pytest.raises(Exception):  # noqa: B017 - the IOMMU or the debug layer refuses
        dma_read(dev, addr, 8)
    assert m.dma_debug is not None
    with pytest.raises(AssertionError, match="DMA violation"):
        check_dma_contract(m)


def test_refused_blockable_invalidation_violates_the_notifier_contract():
    m = _machine()
    check_notifier_contract(m)
    m.warn("mmu_notifier", "mn_itree_invalidate", "a blockable invalidation was refused", "UNMAP")
    with pytest.raises(AssertionError, match="blockable"):
        check_notifier_contract(m)


# ----- poisoning ------------------------------------------------------------------------------


def test_freed_pages_hold_the_poison_pattern():
    m = _machine()
    pz = Poisoner(m).install()
    pfn = m.phys.alloc_one(0)
    m.phys.write(pfn, 0, b"secret")
    m.phys.put_one(pfn)
    assert m.phys.arena is not None
    assert set(m.phys.arena.page(pfn).tolist()) == {PAGE_POISON}
    pz.check()


def test_freed_device_pages_hold_the_poison_pattern():
    env = open_environment(DriverSpec("dmirror"))
    a = env.mmap(2 * PAGE_SIZE)
    env.proc.write(a, b"d" * 2 * PAGE_SIZE)
    env.mirror.migrate_to_device(a, 2)
    dpfn = env.proc.pagemap(a, 1)[0].pfn
    env.mirror.migrate_to_system(a, 2)
    assert env.machine.phys.refcount[dpfn] == 0
    assert env.machine.phys.arena is not None
    assert set(env.machine.phys.arena.page(dpfn).tolist()) == {PAGE_POISON}
    close_environment(env)


def test_load_from_a_freed_page_is_a_violation_by_itself():
    m = _machine()
    pz = Poisoner(m).install()
    pfn = m.phys.alloc_one(0)
    m.phys.put_one(pfn)
    assert m.phys.read(pfn, 0, 4) == bytes([PAGE_POISON]) * 4
    with pytest.raises(AssertionError, match=r"load from pfn .* a free page"):
        pz.check()


def test_store_to_a_freed_page_is_a_violation_by_itself():
    m = _machine()
    pz = Poisoner(m).install()
    pfns = m.phys.alloc(0, 2)
    m.phys.put(pfns)
    m.phys.write_pages(pfns, np.zeros((2, PAGE_SIZE), dtype=np.uint8))
    with pytest.raises(AssertionError, match=r"store to pfn .* a free page"):
        pz.check()


def test_store_after_free_that_bypassed_the_audit_breaks_the_poison():
    m = _machine()
    pz = Poisoner(m).install()
    pfn = m.phys.alloc_one(0)
    m.phys.put_one(pfn)
    assert m.phys.arena is not None
    m.phys.arena.page(pfn)[100] = 0  # e.g. a DMA engine writing the frame directly
    with pytest.raises(AssertionError, match="written after it was freed"):
        pz.check()


def test_a_reallocated_page_is_no_longer_checked_for_poison():
    m = _machine()
    pz = Poisoner(m).install()
    pfn = m.phys.alloc_one(0)
    m.phys.put_one(pfn)
    again = m.phys.alloc_one(0)
    m.phys.write(again, 0, b"new owner")
    pz.check()
