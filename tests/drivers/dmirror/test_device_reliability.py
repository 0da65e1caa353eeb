"""Device memory under stress: eviction with RAM exhausted, exclusive access to
sub-pages of a THP, migration back to RAM running out of memory half-way,
device stores into shmem, and sub-page device stores racing CPU stores."""

from __future__ import annotations

import attrs
import hmmsim
import pytest
from helpers import ANON, PAGE, RW
from hmmsim.driver import Capability
from hmmsim.drivers.dmirror import HMM_DMIRROR_RELEASE, HMM_DMIRROR_WRITE, DmirrorCmd
from hmmsim.explore import explore
from hmmsim.mm.pagetable import KIND_DEVICE_PRIVATE, KIND_MIGRATION, pte_kind_array
from hmmsim.sched import BoundedDFS
from hmmsim.testing.checks import DriverSpec
from hmmsim.testing.env import pattern
from hmmsim.testing.invariants import check_no_leaks
from hmmsim.testing.races import OLD_SEED, Race, RaceState, race_scenario

PATTERN = bytes(range(256)) * (64 * PAGE // 256)


def _migration_entries(p: hmmsim.Process, addr: int, npages: int) -> int:
    walk = p.mm.pt.walk(addr // PAGE, npages)
    return int((pte_kind_array(walk.entries) == KIND_MIGRATION).sum())


def _fill_ram(m: hmmsim.Machine) -> tuple[hmmsim.Process, int]:
    """Another process that takes every free page of RAM (and where)."""
    hog = m.spawn()
    n = m.phys.allocator.nr_free
    b = hog.mmap(n * PAGE, RW, ANON)
    hog.madvise(b, n * PAGE, hmmsim.MADV_NOHUGEPAGE)  # small pages, to free them one by one
    hog.write(b, b"h" * (n * PAGE))
    assert m.phys.allocator.nr_free == 0
    return hog, b


@pytest.fixture
def exhausted(make_machine):
    """16 MiB RAM, no swap, 64 pages in dmirror memory, then RAM filled by a hog."""
    m = make_machine(ram_bytes=16 << 20)
    dev = m.probe("dmirror")
    p = m.spawn()
    fd = dev.open(p)
    a = p.mmap(64 * PAGE, RW, ANON)
    p.write(a, PATTERN)
    assert fd.migrate_to_device(a, 64) == 64
    hog, _ = _fill_ram(m)
    return m, dev, p, fd, a, hog


def _evict(how: str, dev, fd) -> None:
    if how == "close":
        fd.close()
    elif how == "release":
        fd.ioctl(HMM_DMIRROR_RELEASE, DmirrorCmd(0, 1, None))
    else:
        dev.remove()


@pytest.mark.parametrize("how", ["close", "release", "remove"])
def test_eviction_with_ram_exhausted_oom_kills_the_hog_and_keeps_the_data(exhausted, how):
    m, dev, p, fd, a, hog = exhausted
    _evict(how, dev, fd)
    assert hog.exited and hog not in m.processes
    assert _migration_entries(p, a, 64) == 0
    assert {e.kind for e in p.pagemap(a, 64)} == {"anon"}
    assert p.read(a, 64 * PAGE) == PATTERN
    if how == "close":
        dev.remove()
    elif how == "release":
        fd.close()
    assert dev.chunks == [] and dev.calloc == dev.cfree
    p.munmap(a, 64 * PAGE)
    p.exit()
    check_no_leaks(m)


@pytest.mark.parametrize("how", ["close", "release", "remove"])
def test_eviction_with_ram_exhausted_by_the_owner_kills_the_owner(make_machine, how):
    m = make_machine(ram_bytes=16 << 20)
    dev = m.probe("dmirror")
    p = m.spawn()
    fd = dev.open(p)
    a = p.mmap(64 * PAGE, RW, ANON)
    p.write(a, PATTERN)
    assert fd.migrate_to_device(a, 64) == 64
    n = m.phys.allocator.nr_free
    b = p.mmap(n * PAGE, RW, ANON)
    p.write(b, b"o" * (n * PAGE))  # the owner itself is now the largest process
    bystander = m.spawn()
    c = bystander.mmap(PAGE, RW, ANON)
    _evict(how, dev, fd)
    assert p.exited and not bystander.exited
    bystander.write(c, b"still here")  # RAM is free again: no Deadlock, no OOM
    assert bystander.read(c, 10) == b"still here"
    if how != "remove":
        dev.remove()
    assert dev.chunks == [] and dev.calloc == dev.cfree
    bystander.exit()
    check_no_leaks(m)


def test_process_exit_after_exhausted_eviction_leaves_nothing_behind(exhausted):
    m, _dev, p, fd, a, _hog = exhausted
    fd.ioctl(HMM_DMIRROR_RELEASE, DmirrorCmd(0, 1, None))
    p.munmap(a, 32 * PAGE)
    p.exit()
    fd.close()
    check_no_leaks(m)


def _thp_for_device(m: hmmsim.Machine):  # type: ignore[no-untyped-def]
    """A process with a mirror and one 2 MiB-aligned THP filled with a pattern."""
    dev = m.probe("dmirror")
    p = m.spawn()
    fd = dev.open(p)
    size = 2 << 20
    raw = p.mmap(2 * size, RW, ANON)
    a = (raw + size - 1) & ~(size - 1)
    data = bytes(range(251)) * (size // 251) + bytes(size % 251)
    p.write(a, data)
    return dev, p, fd, a, size, data


def test_evicting_a_device_thp_without_a_free_pmd_block_moves_all_512_pages(make_machine):
    m = make_machine(ram_bytes=16 << 20, thp="always")
    dev, p, fd, a, size, data = _thp_for_device(m)
    assert p.pagemap(a, 1)[0].order == 9
    assert fd.migrate_to_device(a, 512) == 512
    entry = p.pagemap(a, 1)[0]
    assert entry.kind == "device_private" and entry.order == 9  # one device THP
    hog, b = _fill_ram(m)
    for k in range(0, 1024, 2):  # 512 free pages, no free 2 MiB block
        hog.munmap(b + k * PAGE, PAGE)
    assert m.phys.allocator.nr_free == 512
    fd.close()
    assert not hog.exited and not p.exited
    assert {e.kind for e in p.pagemap(a, 512)} == {"anon"}
    assert p.read(a, size) == data
    dev.remove()
    assert dev.chunks == [] and dev.calloc == dev.cfree
    p.exit()
    hog.exit()
    check_no_leaks(m)


def test_exclusive_subpage_of_a_pte_mapped_thp_maps_that_page(make_machine):
    m = make_machine(thp="always")
    dev = m.probe("dmirror")
    p = m.spawn()
    fd = dev.open(p)
    size = 2 << 20
    raw = p.mmap(2 * size, RW, ANON)
    a = (raw + size - 1) & ~(size - 1)
    data = b"".join(bytes([k % 256]) * PAGE for k in range(512))
    p.write(a, data)
    p.mprotect(a + size - PAGE, PAGE, hmmsim.PROT_READ)  # the THP is now PTE-mapped
    p.mprotect(a + size - PAGE, PAGE, RW)
    cpu = p.pagemap(a + 5 * PAGE, 1)[0]
    assert cpu.order == 0 and m.phys.order[cpu.pfn] == 9  # a PTE-mapped large folio
    fd.make_exclusive(a + 5 * PAGE, 1)
    (dpte,) = fd.device_ptes(a + 5 * PAGE, 1)
    assert dpte is not None and dpte.atomic and dpte.pfn == cpu.pfn
    assert p.pagemap(a + 5 * PAGE, 1)[0].kind == "device_exclusive"
    assert fd.read(a + 5 * PAGE, PAGE) == bytes([5]) * PAGE
    assert p.read(a + 5 * PAGE, PAGE) == bytes([5]) * PAGE
    fd.close()
    p.exit()
    check_no_leaks(m)


def _hog_leaving(m: hmmsim.Machine, free: int) -> tuple[hmmsim.Process, int, int]:
    """A process that takes all but ``free`` pages of RAM, in small pages."""
    hog = m.spawn()
    n = m.phys.allocator.nr_free - free
    b = hog.mmap(n * PAGE, RW, ANON)
    hog.madvise(b, n * PAGE, hmmsim.MADV_NOHUGEPAGE)
    hog.write(b, b"h" * (n * PAGE))
    return hog, b, n


def _kinds(p: hmmsim.Process, a: int, npages: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in p.pagemap(a, npages):
        out[e.kind] = out.get(e.kind, 0) + 1
    return out


def test_migrate_to_system_out_of_ram_half_way_keeps_every_page_whole(make_machine):
    m = make_machine(ram_bytes=16 << 20, swap_bytes=8 << 20)
    dev = m.probe("dmirror")
    p = m.spawn()
    fd = dev.open(p)
    a = p.mmap(64 * PAGE, RW, ANON)
    p.write(a, PATTERN)
    assert fd.migrate_to_device(a, 64) == 64
    hog, b, n = _hog_leaving(m, 10)
    with pytest.raises(hmmsim.OutOfMemory):
        fd.migrate_to_system(a, 64)
    assert _kinds(p, a, 64) == {"anon": 10, "device_private": 54}
    assert _migration_entries(p, a, 64) == 0
    hog.munmap(b, n * PAGE)
    assert m.reclaim(64 * PAGE) == 10 * PAGE  # the 10 moved pages swap out like any others
    assert p.read(a, 64 * PAGE) == PATTERN
    fd.close()
    p.exit()
    hog.exit()
    check_no_leaks(m)


def test_cpu_fault_on_a_device_thp_out_of_ram_half_way_reclaims_and_completes(make_machine):
    m = make_machine(ram_bytes=16 << 20, thp="always", swap_bytes=8 << 20)
    _, p, fd, a, size, data = _thp_for_device(m)
    assert fd.migrate_to_device(a, 512) == 512
    hog, b, n = _hog_leaving(m, 100)  # 100 small pages, no PMD block
    # migrate_to_ram of the whole PMD-mapped folio runs out half-way; the
    # allocator reclaims (the hog goes to swap) and the fault is retried.
    assert p.read(a, size) == data
    assert _kinds(p, a, 512) == {"anon": 512}
    assert _migration_entries(p, a, 512) == 0
    assert sum(e.swapped for e in hog.pagemap(b, n)) > 0
    for i, e in enumerate(hog.pagemap(b, n)):  # back in page by page, reclaiming others
        if e.swapped:
            assert hog.read(b + i * PAGE, PAGE) == b"h" * PAGE
    assert p.read(a, size) == data
    fd.close()
    p.exit()
    hog.exit()
    check_no_leaks(m)


def test_cpu_fault_out_of_ram_without_swap_fails_and_keeps_every_page_whole(make_machine):
    """Reclaim can free nothing (no swap): the model's access raises where the
    kernel would OOM-kill (a documented departure), and nothing is half-done."""
    m = make_machine(ram_bytes=16 << 20, thp="always")
    _, p, fd, a, size, data = _thp_for_device(m)
    assert fd.migrate_to_device(a, 512) == 512
    hog, b, n = _hog_leaving(m, 100)
    with pytest.raises(hmmsim.OutOfMemory):
        p.read(a, 1)
    assert _kinds(p, a, 512) == {"anon": 100, "device_private": 412}
    assert _migration_entries(p, a, 512) == 0
    hog.munmap(b, n * PAGE)
    assert p.read(a, size) == data
    fd.close()
    p.exit()
    hog.exit()
    check_no_leaks(m)


def test_cpu_fault_on_a_device_thp_without_a_pmd_block_moves_the_faulting_page_too(
    make_machine,
):
    m = make_machine(ram_bytes=16 << 20, thp="always")
    _, p, fd, a, size, data = _thp_for_device(m)
    assert fd.migrate_to_device(a, 512) == 512
    hog, b = _fill_ram(m)
    for k in range(0, 1024, 2):  # 512 free pages, no free 2 MiB block
        hog.munmap(b + k * PAGE, PAGE)
    assert p.read(a + 7 * PAGE, 3) == data[7 * PAGE : 7 * PAGE + 3]
    assert _kinds(p, a, 512) == {"anon": 512}
    assert m.phys.allocator.nr_free == 0  # every destination page is in use
    assert p.read(a, size) == data
    fd.close()
    p.exit()
    hog.exit()
    check_no_leaks(m)


def test_device_store_into_a_clean_writable_shmem_page_survives_reclaim(make_machine):
    m = make_machine(ram_bytes=16 << 20)
    dev = m.probe("dmirror")
    p = m.spawn()
    fd = dev.open(p)
    a = p.mmap(2 * PAGE, RW, hmmsim.MAP_SHARED | hmmsim.MAP_ANONYMOUS)
    assert p.read(a, 2 * PAGE) == bytes(2 * PAGE)  # read faults: writable, clean
    e = p.pagemap(a, 1)[0]
    assert e.kind == "shmem" and e.writable and not e.dirty
    fd.ioctl(HMM_DMIRROR_WRITE, DmirrorCmd(a, 2, bytearray(b"D" * 2 * PAGE)))
    p.madvise(a, 2 * PAGE, hmmsim.MADV_PAGEOUT)
    assert p.pagemap(a, 2)[0].kind == "none"  # reclaimed
    assert p.read(a, 2 * PAGE) == b"D" * 2 * PAGE
    fd.close()
    p.exit()
    check_no_leaks(m)


def test_device_store_into_a_lazy_free_page_is_not_discarded(make_machine):
    m = make_machine(ram_bytes=16 << 20, swap_bytes=1 << 20)
    dev = m.probe("dmirror")
    p = m.spawn()
    fd = dev.open(p)
    a = p.mmap(PAGE, RW, ANON)
    p.write(a, b"cpu")
    p.madvise(a, PAGE, hmmsim.MADV_FREE)  # clean and lazy-free; the PTE stays writable
    fd.ioctl(HMM_DMIRROR_WRITE, DmirrorCmd(a, 1, bytearray(b"dev".ljust(PAGE, b"\0"))))
    p.madvise(a, PAGE, hmmsim.MADV_PAGEOUT)
    assert p.read(a, 3) == b"dev"
    fd.close()
    p.exit()
    check_no_leaks(m)


# ----- a sub-page device store racing a CPU store to the same page ---------------------------

DEVICE_AT, CPU_AT, STORE = 100, 2000, 16


def _device_subpage_store(st: RaceState) -> None:
    st.env.mirror.write(st.addr + DEVICE_AT, b"D" * STORE)


def _cpu_subpage_store(st: RaceState) -> None:
    st.env.proc.write(st.addr + CPU_AT, b"C" * STORE)


def _both_stores_kept(st: RaceState) -> None:
    want = bytearray(pattern(st.npages * PAGE, OLD_SEED))
    want[DEVICE_AT : DEVICE_AT + STORE] = b"D" * STORE
    want[CPU_AT : CPU_AT + STORE] = b"C" * STORE
    got = st.env.proc.read(st.addr, st.npages * PAGE)
    assert got[:PAGE] == want[:PAGE], "a store to the page was lost"
    assert got == want


SUBPAGE_RACE = Race(
    "subpage_write_vs_cpu_write",
    Capability.WRITE,
    "write",
    _cpu_subpage_store,
    _both_stores_kept,
    first=_device_subpage_store,
    doc="a device store of a few bytes against a CPU store elsewhere in the same page",
)


@pytest.mark.parametrize("premap", [False, True])
@pytest.mark.parametrize("spec", ["dmirror", "dmirror:memory=coherent"])
def test_subpage_device_store_racing_a_cpu_store_keeps_both(spec, premap):
    race = attrs.evolve(SUBPAGE_RACE, premap=premap)
    result = explore(race_scenario(DriverSpec.parse(spec), race), BoundedDFS(2), 3000)
    assert result.exhausted and result.schedules >= 2
    assert not result.failures, result.failures[0].description


@pytest.mark.parametrize("memory", ["private", "coherent"])
def test_device_stores_at_any_offset_write_exactly_their_bytes(make_machine, memory):
    import random

    m = make_machine(ram_bytes=32 << 20)
    dev = m.probe("dmirror", memory=memory)
    p = m.spawn()
    fd = dev.open(p)
    n = 6
    a = p.mmap(n * PAGE, RW, ANON)
    model = bytearray(pattern(n * PAGE, 3))
    p.write(a, model)
    rng = random.Random(5)
    for step in range(60):
        off = rng.randrange(n * PAGE)
        length = rng.choice([1, 7, PAGE - 1, PAGE, PAGE + 3, 2 * PAGE + 5, 3 * PAGE])
        length = min(length, n * PAGE - off)
        data = bytes(rng.randrange(256) for _ in range(length))
        if step % 3 == 0:
            p.write(a + off, data)
        else:
            fd.write(a + off, data)
        model[off : off + length] = data
        if step % 10 == 9:
            fd.migrate_to_device(a, n)  # device-private pages: stores land there
    assert fd.read(a, n * PAGE) == model
    assert p.read(a, n * PAGE) == model
    fd.write(a, b"")  # an empty store does nothing
    with pytest.raises(hmmsim.BadAddress):
        fd.write(a + n * PAGE - 2, b"abcd")  # runs past the mapping: nothing stored
    assert p.read(a + n * PAGE - 2, 2) == model[-2:]
    fd.close()
    with pytest.raises(hmmsim.BadAddress):
        fd.write(a, b"x")
    p.exit()
    check_no_leaks(m)


def test_template_driver_store_into_a_clean_shmem_page_survives_reclaim(make_machine):
    import sys
    import types

    from hmmsim.newdriver import class_name, render_module

    mod = types.ModuleType("hmmsim_tmpl_reliability")
    sys.modules[mod.__name__] = mod  # attrs and dataclasses look their module up
    try:
        exec(compile(render_module("tmpl"), mod.__name__, "exec"), mod.__dict__)
        m = make_machine(ram_bytes=16 << 20)
        dev = getattr(mod, class_name("tmpl"))().probe(m)
        p = m.spawn()
        fd = dev.open(p)
        a = p.mmap(PAGE, RW, hmmsim.MAP_SHARED | hmmsim.MAP_ANONYMOUS)
        assert p.read(a, 4) == bytes(4)  # writable and clean
        fd.write(a + 10, b"tmpl")
        p.madvise(a, PAGE, hmmsim.MADV_PAGEOUT)
        assert p.pagemap(a, 1)[0].kind == "none"
        assert p.read(a + 8, 8) == b"\0\0tmpl\0\0"
        fd.close()
        p.exit()
        check_no_leaks(m)
    finally:
        del sys.modules[mod.__name__]


def test_eviction_with_nothing_left_to_kill_leaves_the_pages_on_the_device(make_machine):
    m = make_machine(ram_bytes=16 << 20, hugetlb_pages={2 << 20: 6})
    dev = m.probe("dmirror")
    p = m.spawn()
    fd = dev.open(p)
    a = p.mmap(64 * PAGE, RW, ANON)
    p.write(a, PATTERN)
    assert fd.migrate_to_device(a, 64) == 64
    n = m.phys.allocator.nr_free
    b = p.mmap(n * PAGE, RW, ANON)
    p.write(b, b"o" * (n * PAGE))
    mm = p.mm
    assert mm.mmget_not_zero()  # the mm outlives its process: nothing the OOM killer sees
    p.exit()
    assert m.processes == []
    with pytest.raises(hmmsim.OutOfMemory, match="no process left to kill"):
        fd.close()  # where the kernel panics
    assert fd.closed and fd not in dev.files and fd.device_ptes(a, 1) == [None]
    walk = mm.pt.walk(a // PAGE, 64)
    assert (pte_kind_array(walk.entries) == KIND_DEVICE_PRIVATE).all()  # whole, still mapped
    mm.mmput()  # the last user: the address space and its device pages go
    dev.remove()
    assert dev.chunks == [] and dev.calloc == dev.cfree
    check_no_leaks(m)


# ----- the same rules for the core's testing device ----------------------------------------


def test_devmem_migrations_that_run_out_of_memory_leave_no_migration_entry(make_machine):
    from hmmsim.testing.devmem import Device

    m = make_machine(ram_bytes=16 << 20, swap_bytes=8 << 20)
    dev = Device(m, npages=512)
    p = m.spawn()
    a = p.mmap(600 * PAGE, RW, ANON)
    data = pattern(600 * PAGE, 9)
    p.write(a, data)
    moved, _ = dev.migrate_to_device(p, a, 600)  # the device holds 512 pages
    assert moved == 512
    assert _kinds(p, a, 600) == {"device_private": 512, "anon": 88}
    hog, _, _ = _hog_leaving(m, 10)
    with pytest.raises(hmmsim.OutOfMemory):
        dev.migrate_to_system(p, a, 512)
    assert _kinds(p, a, 600) == {"anon": 98, "device_private": 502}
    assert _migration_entries(p, a, 600) == 0
    assert dev.evict() == 502  # __GFP_NOFAIL: direct reclaim swaps the hog out for it
    assert not hog.exited and m.swap.nr_free < m.swap.nslots
    assert _kinds(p, a, 600) == {"anon": 600}
    assert p.read(a, 600 * PAGE) == data
    p.exit()
    hog.exit()
    check_no_leaks(m)


def test_eviction_restores_every_mapping_exactly(make_machine):
    m = make_machine(ram_bytes=64 << 20)
    dev = m.probe("dmirror")
    p = m.spawn()
    fd = dev.open(p)
    a = p.mmap(64 * PAGE, RW, ANON)
    p.write(a, pattern(64 * PAGE, 1))
    b0 = p.mmap(64 * PAGE, RW, ANON)
    p.write(b0, pattern(64 * PAGE, 2))
    flags = hmmsim.MREMAP_MAYMOVE | hmmsim.MREMAP_FIXED
    b = p.mremap(b0 + 16 * PAGE, 32 * PAGE, 32 * PAGE, flags, a + 1024 * PAGE)
    for addr, npages in ((a, 64), (b, 32)):
        assert fd.migrate_to_device(addr, npages) == npages
    p.mprotect(a + 8 * PAGE, 8 * PAGE, hmmsim.PROT_READ)
    fd.close()
    assert p.read(a, 64 * PAGE) == pattern(64 * PAGE, 1)
    assert p.read(b, 32 * PAGE) == pattern(64 * PAGE, 2)[16 * PAGE : 48 * PAGE]
    entries = p.pagemap(a, 64)
    assert {e.kind for e in entries} == {"anon"}
    assert [e.writable for e in entries] == [not 8 <= i < 16 for i in range(64)]
    assert all(e.kind == "anon" and e.writable for e in p.pagemap(b, 32))
    # Pages two mms map (after fork) go back to both.
    fd = dev.open(p)
    c = p.mmap(32 * PAGE, RW, ANON)
    p.write(c, pattern(32 * PAGE, 3))
    assert fd.migrate_to_device(c, 32) == 32
    child = p.fork()
    fd.close()
    for proc in (p, child):
        assert {e.kind for e in proc.pagemap(c, 32)} == {"anon"}
        assert proc.read(c, 32 * PAGE) == pattern(32 * PAGE, 3)
    p.write(c, b"parent")
    assert child.read(c, 6) == pattern(6, 3)  # COW still separates them
    child.exit()
    p.exit()
    dev.remove()
    check_no_leaks(m)


# ----- random sequences under memory pressure --------------------------------------------------

_TOLERATED = (
    hmmsim.OutOfMemory,
    hmmsim.BadAddress,
    hmmsim.NoEntry,
    hmmsim.Busy,
    hmmsim.InvalidArgument,
    hmmsim.NotSupported,
)


_OPS = ("cpu", "dev", "todev", "tosys", "hog", "unhog", "pageout", "excl", "close", "fork")
_OPS += ("read", "release")


def _read_freeing_memory(p, addr: int, length: int, others: list) -> bytes:
    """``p.read``, letting the other processes exit until the read's own faults
    (a shmem hole read in, a swap-in) find memory."""
    while True:
        try:
            return p.read(addr, length)
        except hmmsim.OutOfMemory:
            live = [q for q in others if not q.exited]
            if not live:
                raise
            live[0].exit()


def _random_run(make_machine, seed: int, steps: int = 80) -> None:
    """CPU and device stores, migrations both ways, exclusive access, reclaim,
    close and RELEASE, fork, with other processes taking most of RAM; after
    every step the machine and mirror invariants hold, and at the end the data
    is what the successful stores wrote and nothing leaks."""
    import random

    from hmmsim.drivers.dmirror import HMM_DMIRROR_RELEASE, DmirrorCmd
    from hmmsim.mm.debug import verify_machine
    from hmmsim.testing.invariants import check_mirror

    r = random.Random(seed)
    m = make_machine(
        ram_bytes=16 << 20, swap_bytes=r.choice([0, 2 << 20]), thp=r.choice(["always", "never"])
    )
    dev = m.probe("dmirror", memory=r.choice(["private", "coherent"]))
    p = m.spawn()
    fd = dev.open(p)
    n = 96
    a = p.mmap(n * PAGE, RW, r.choice([ANON, hmmsim.MAP_SHARED | hmmsim.MAP_ANONYMOUS]))
    model = bytearray(n * PAGE)
    others: list[hmmsim.Process] = []
    for _ in range(steps):
        op = r.choice(_OPS)
        off = r.randrange(n) * PAGE + r.choice([0, 1, 100, PAGE - 3])
        length = min(r.choice([1, 50, PAGE, 3 * PAGE + 7]), n * PAGE - off)
        count = r.randrange(1, 40)
        first = a + r.randrange(n - count + 1) * PAGE
        data = bytes([r.randrange(1, 256)]) * length
        try:
            if op == "cpu":
                p.write(a + off, data)
                model[off : off + length] = data
            elif op == "dev":
                fd.write(a + off, data)
                model[off : off + length] = data
            elif op == "todev":
                fd.migrate_to_device(first, count)
            elif op == "tosys":
                fd.migrate_to_system(first, count)
            elif op == "hog":
                hog, _, _ = _hog_leaving(m, min(r.randrange(0, 30), m.phys.allocator.nr_free - 1))
                others.append(hog)
            elif op == "unhog":
                live = [q for q in others if not q.exited]
                if live:
                    live[0].exit()
            elif op == "pageout":
                p.madvise(a, n * PAGE, hmmsim.MADV_PAGEOUT)
            elif op == "excl":
                fd.make_exclusive(first, min(count, 4))
            elif op == "close":
                fd.close()
                fd = dev.open(p)
            elif op == "release":
                fd.ioctl(HMM_DMIRROR_RELEASE, DmirrorCmd(a, 1, None))
            elif op == "fork":
                others.append(p.fork())
            else:
                assert fd.read(a + off, length) == model[off : off + length]
        except _TOLERATED:
            if op == "cpu":
                # A CPU store that faults part-way (out of memory on its next
                # page) has stored every byte before that page, as a CPU's
                # store loop has; the rest is untouched.
                got = _read_freeing_memory(p, a + off, length, others)
                old = bytes(model[off : off + length])
                cuts = [0, *range(PAGE - (off % PAGE), length, PAGE)]
                stored = [k for k in cuts if got == data[:k] + old[k:]]
                assert stored, (
                    f"a failed CPU store at {off:#x} left neither a page prefix nor nothing"
                )
                model[off : off + stored[-1]] = data[: stored[-1]]
            # a failed device store stores nothing: the model stays as it is
        assert not p.exited  # the processes that take RAM are always larger
        verify_machine(m)
        check_mirror(fd, a, n)
    for q in others:
        if not q.exited:
            q.exit()
    assert p.read(a, n * PAGE) == model
    fd.close()
    p.exit()
    dev.remove()
    check_no_leaks(m)


@pytest.mark.parametrize("seed", range(6))
def test_random_device_sequences_under_memory_pressure_lose_nothing(make_machine, seed):
    _random_run(make_machine, seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6, 200))
def test_random_device_sequences_under_memory_pressure_lose_nothing_long(make_machine, seed):
    _random_run(make_machine, seed, steps=120)
