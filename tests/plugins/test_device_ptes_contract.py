"""``Mirror.device_ptes(addr, npages)``: one entry per 4 KiB slot, each with its own pfn.

The contract (``hmmsim.driver.Mirror.device_ptes``): exactly ``npages`` items;
item ``i`` is the slot at ``addr + i * PAGE_SIZE`` (page aligned), None when
nothing translates it, else that subpage's own pfn and the order of the device
entry covering it, so the invariants can compare it slot by slot with the CPU.
Run over every shipped driver that mirrors: dmirror (both memories) and nouveau.
"""

from __future__ import annotations

import pytest
from hmmsim import (
    MADV_HUGEPAGE,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    PROT_READ,
    PROT_WRITE,
    BadAddress,
    Capability,
    InvalidArgument,
    Machine,
    MachineConfig,
)

PAGE = 4096
HUGE = 2 << 20
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS

#: (driver, probe parameters, the order its device maps a CPU THP with):
#: dmirror's page table has 4 KiB entries only; nouveau writes a 2 MiB PD0 entry.
SPECS = [
    ("dmirror", {}, 0),
    ("dmirror", {"memory": "coherent"}, 0),
    ("nouveau", {}, 9),
]


def _spec_id(spec: tuple[str, dict[str, str], int]) -> str:
    return ":".join([spec[0], *(f"{k}={v}" for k, v in spec[1].items())])


@pytest.fixture(params=SPECS, ids=_spec_id)
def env(request):  # type: ignore[no-untyped-def]
    name, params, huge_order = request.param
    m = Machine(MachineConfig(ram_bytes=64 << 20))
    dev = m.probe(name, **params)
    p = m.spawn()
    mirror = dev.open(p)
    yield m, p, mirror, (dev.driver.capabilities_for(**params), huge_order)
    mirror.close()


def _thp(p) -> int:  # type: ignore[no-untyped-def]
    a = (p.mmap(2 * HUGE, RW, ANON) + HUGE - 1) & ~(HUGE - 1)
    p.madvise(a, HUGE, MADV_HUGEPAGE)
    p.write(a, b"\x5a" * HUGE)
    assert p.pagemap(a, 1)[0].order == 9
    return a


def _assert_slots_carry_cpu_pfns(p, ptes, addr, n):  # type: ignore[no-untyped-def]
    cpu = p.pagemap(addr, n)
    assert len(ptes) == n
    for i, d in enumerate(ptes):
        assert d is not None, f"slot {i} unmapped"
        assert d.addr == addr + i * PAGE
        assert d.pfn == cpu[i].pfn, f"slot {i}: pfn {d.pfn:#x}, CPU {cpu[i].pfn:#x}"


def _assert_entries_consistent(ptes):  # type: ignore[no-untyped-def]
    """Slots covered by one device entry of order k agree: consecutive pfns
    from an aligned head, same permissions and memory, same order."""
    for i, d in enumerate(ptes):
        if d is None or d.order == 0:
            continue
        span = 1 << d.order
        base_addr = d.addr & ~(span * PAGE - 1)
        idx = (d.addr - base_addr) // PAGE
        head = d.pfn - idx
        assert head % span == 0, f"slot {i}: order {d.order} entry's head {head:#x} unaligned"
        for j, e in enumerate(ptes):
            if e is None or not base_addr <= e.addr < base_addr + span * PAGE:
                continue
            assert (e.order, e.writable, e.atomic, e.memory) == (
                d.order,
                d.writable,
                d.atomic,
                d.memory,
            ), f"slots {i} and {j} of one entry disagree"
            assert e.pfn == head + (e.addr - base_addr) // PAGE


def test_one_item_per_4k_slot_with_the_cpus_pfn(env):
    _m, p, mirror, _caps = env
    a = p.mmap(8 * PAGE, RW, ANON)
    p.write(a, bytes(range(256)) * (8 * PAGE // 256))
    mirror.read(a, 8 * PAGE)
    ptes = mirror.device_ptes(a - PAGE, 10)  # one unmapped slot either side
    assert ptes[0] is None and ptes[-1] is None
    _assert_slots_carry_cpu_pfns(p, ptes[1:-1], a, 8)
    assert {(d.order, d.memory) for d in ptes[1:-1]} == {(0, "system")}


def test_a_huge_device_entry_shows_in_every_slot_with_its_subpage_pfn(env):
    _m, p, mirror, (_caps, huge_order) = env
    a = _thp(p)
    mirror.read(a, HUGE)
    ptes = mirror.device_ptes(a, HUGE // PAGE)
    _assert_slots_carry_cpu_pfns(p, ptes, a, HUGE // PAGE)
    _assert_entries_consistent(ptes)
    assert {d.order for d in ptes} == {huge_order}


def test_a_window_starting_inside_a_device_entry_carries_each_subpages_pfn(env):
    _m, p, mirror, _caps = env
    a = _thp(p)
    mirror.read(a, HUGE)
    whole = mirror.device_ptes(a, HUGE // PAGE)
    mid = mirror.device_ptes(a + 37 * PAGE, 5)
    assert mid == whole[37:42]
    _assert_slots_carry_cpu_pfns(p, mid, a + 37 * PAGE, 5)


def test_an_unaligned_address_means_its_slot(env):
    _m, p, mirror, _caps = env
    a = p.mmap(4 * PAGE, RW, ANON)
    p.write(a, b"x" * 4 * PAGE)
    mirror.read(a, 4 * PAGE)
    assert mirror.device_ptes(a + 123, 3) == mirror.device_ptes(a, 3)


def test_device_memory_slots_carry_the_device_pfn_the_cpu_sees(env):
    _m, p, mirror, (caps, _order) = env
    if not Capability.MIGRATE & caps:
        pytest.skip("no device memory")
    a = p.mmap(8 * PAGE, RW, ANON)
    p.write(a, b"d" * 8 * PAGE)
    assert mirror.migrate_to_device(a, 8) == 8
    ptes = mirror.device_ptes(a, 8)
    _assert_slots_carry_cpu_pfns(p, ptes, a, 8)
    kinds = {e.kind for e in p.pagemap(a, 8)}
    assert {d.memory for d in ptes} == kinds
    assert kinds <= {"device_private", "device_coherent"}


def test_empty_range_and_closed_mirror(env):
    _m, p, mirror, _caps = env
    a = p.mmap(2 * PAGE, RW, ANON)
    mirror.read(a, 2 * PAGE)
    assert mirror.device_ptes(a, 0) == []
    mirror.close()
    assert mirror.device_ptes(a, 2) == [None, None]
    assert mirror.device_pte_state(a, 2) is None


def test_bad_ranges_are_typed_errors(env):
    _m, _p, mirror, _caps = env
    with pytest.raises(InvalidArgument):
        mirror.device_ptes(0x10000, -1)
    with pytest.raises(InvalidArgument):
        mirror.device_ptes(-PAGE, 1)
    with pytest.raises(BadAddress):
        mirror.device_ptes(1 << 47, 1)


def test_device_pte_state_follows_device_ptes(env):
    _m, p, mirror, _caps = env
    a = p.mmap(4 * PAGE, RW, ANON)
    assert mirror.device_pte_state(a, 4) is None
    mirror.read(a, 4 * PAGE)
    before = mirror.device_pte_state(a, 4)
    assert before is not None
    p.write(a + PAGE, b"y")  # COW of the zero page: the device entry goes
    assert mirror.device_ptes(a + PAGE, 1) == [None]
    assert mirror.device_pte_state(a, 4) != before


def _driver_locks(mirror):  # type: ignore[no-untyped-def]
    """The update locks a device fault and an invalidation of this mirror take."""
    if hasattr(mirror, "mutex"):  # dmirror: struct dmirror's mutex
        return [mirror.mutex]
    return [mirror.cli.svm.mutex, mirror.drm.svm.mutex]  # nouveau: svmm and svm


def test_device_ptes_takes_no_driver_lock(env):
    # The invariant checks read the device page table between the steps of a
    # scheduled run, while an actor may hold these locks: a read that took one
    # would deadlock (a recursive acquire raises Deadlock here).
    _m, p, mirror, _caps = env
    a = p.mmap(4 * PAGE, RW, ANON)
    p.write(a, b"l" * 4 * PAGE)
    mirror.read(a, 4 * PAGE)
    locks = _driver_locks(mirror)
    for lock in locks:
        lock.acquire()
    try:
        ptes = mirror.device_ptes(a, 4)
        state = mirror.device_pte_state(a, 4)
    finally:
        for lock in reversed(locks):
            lock.release()
    assert all(d is not None for d in ptes) and state is not None
