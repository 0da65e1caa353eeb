"""Device memory and migration: round trips, fork, THP, pins, CPU faults, eviction."""

from __future__ import annotations

import errno

import hmmsim
import numpy as np
import pytest
from helpers import ANON, MB2, PAGE, RW, EventLog
from hmmsim import MAP_POPULATE
from hmmsim.gup import FOLL_LONGTERM, FOLL_WRITE, pin_user_pages, unpin_user_page
from hmmsim.memremap import MEMORY_DEVICE_PRIVATE, DevPagemap, memremap_pages, memunmap_pages
from hmmsim.migrate import MigrateVma, migrate_vma_setup
from hmmsim.mm.debug import verify_machine
from hmmsim.testing.devmem import Device


@pytest.fixture(params=["private", "coherent"])
def memory(request):
    return request.param


#: Every test runs on both implementations of the migrate phases.
pytestmark = pytest.mark.usefixtures("migrate_path")


def _fill(p, a, n):
    data = bytes((i * 7 + j) % 251 for i in range(n) for j in range(0, PAGE, 512))
    for i in range(n):
        p.write(a + i * PAGE, bytes([i % 250 + 1]) * 16)
    return data


def test_round_trip_of_small_pages_keeps_data(make_machine, memory):
    m = make_machine()
    dev = Device(m, memory)
    p = m.spawn()
    a = p.mmap(16 * PAGE, RW, ANON)
    for i in range(16):
        p.write(a + i * PAGE, bytes([i + 1]) * 16)
    moved, _ = dev.migrate_to_device(p, a, 16)
    assert moved == 16
    kinds = {e.kind for e in p.pagemap(a, 16)}
    assert kinds == ({"device_private"} if memory == "private" else {"device_coherent"})
    if memory == "private":
        assert all(e.swapped and not e.present for e in p.pagemap(a, 16))
    assert dev.migrate_to_system(p, a, 16) == 16
    assert {e.kind for e in p.pagemap(a, 16)} == {"anon"}
    for i in range(16):
        assert p.read(a + i * PAGE, 16) == bytes([i + 1]) * 16
    assert dev.in_use() == 0
    verify_machine(m)


def test_holes_and_zero_pages_migrate_as_empty_entries(make_machine):
    m = make_machine()
    dev = Device(m)
    p = m.spawn()
    a = p.mmap(4 * PAGE, RW, ANON)
    p.read(a, 1)  # zero page at page 0; pages 1..3 are holes
    moved, _args = dev.migrate_to_device(p, a, 4)
    assert moved == 4
    assert p.read(a, 4 * PAGE) == bytes(4 * PAGE)  # faults back: zero-filled
    assert dev.faults == 4
    verify_machine(m)


def test_migration_emits_migrate_with_owner(make_machine):
    m = make_machine()
    dev = Device(m)
    log = EventLog(m)
    p = m.spawn()
    a = p.mmap(4 * PAGE, RW, ANON)
    p.write(a, b"x")
    dev.migrate_to_device(p, a, 4)
    assert [(e.event, e.start, e.end, e.owner) for e in log.events] == [
        ("MIGRATE", a, a + 4 * PAGE, dev),  # collect
        ("MIGRATE", a + PAGE, a + 4 * PAGE, dev),  # inserting into the first hole onwards
    ]


def test_cpu_fault_on_device_private_page_migrates_it_back(make_machine):
    m = make_machine()
    dev = Device(m)
    log = EventLog(m)
    p = m.spawn()
    a = p.mmap(2 * PAGE, RW, ANON)
    p.write(a, b"on device")
    dev.migrate_to_device(p, a, 2)
    log.clear()
    assert p.read(a, 9) == b"on device"
    assert dev.faults == 1
    assert p.pagemap(a, 1)[0].kind == "anon"
    assert p.pagemap(a + PAGE, 1)[0].kind == "device_private"
    assert [(e.event, e.owner) for e in log.events] == [("MIGRATE", dev)]
    verify_machine(m)


def test_failing_migrate_to_ram_is_sigbus(make_machine):
    m = make_machine()
    dev = Device(m)
    p = m.spawn()
    a = p.mmap(PAGE, RW, ANON)
    p.write(a, b"x")
    dev.migrate_to_device(p, a, 1)
    dev.fail_migrate_to_ram = True
    with pytest.raises(hmmsim.BusError):
        p.read(a, 1)
    assert p.pagemap(a, 1)[0].kind == "device_private"


def test_thp_round_trip_keeps_data_and_maps_a_device_pmd(make_machine, memory):
    m = make_machine(thp="always", ram_bytes=128 << 20)
    dev = Device(m, memory, npages=2048)
    p = m.spawn()
    a = p.mmap(MB2, RW, ANON | MAP_POPULATE)
    p.write(a + 300 * PAGE, b"thp page 300")
    moved, _ = dev.migrate_to_device(p, a, 512, compound=True)
    assert moved == 1  # one compound entry
    e = p.pagemap(a + 300 * PAGE, 1)[0]
    assert e.order == 9 and e.pfn in dev.range
    assert m.phys.order[dev.range.start] == 9 or m.phys.order[e.pfn - 300] == 9
    assert dev.migrate_to_system(p, a, 512) >= 1
    assert p.read(a + 300 * PAGE, 12) == b"thp page 300"
    assert dev.in_use() == 0
    verify_machine(m)


def test_fork_after_migration_copies_device_private_entries_read_only(make_machine):
    m = make_machine()
    dev = Device(m)
    p = m.spawn()
    a = p.mmap(2 * PAGE, RW, ANON)
    p.write(a, b"shared")
    dev.migrate_to_device(p, a, 1)
    pfn = p.pagemap(a, 1)[0].pfn
    c = p.fork()
    assert c.pagemap(a, 1)[0].pfn == pfn and c.pagemap(a, 1)[0].kind == "device_private"
    assert m.phys.mapcount[pfn] == 2
    c.write(a, b"child")  # faults back to RAM, then COW
    assert p.read(a, 6) == b"shared" and c.read(a, 5) == b"child"
    verify_machine(m)


def test_partial_munmap_of_a_device_private_thp(make_machine):
    m = make_machine(thp="always", ram_bytes=128 << 20)
    dev = Device(m, npages=2048)
    p = m.spawn()
    a = p.mmap(MB2, RW, ANON | MAP_POPULATE)
    p.write(a + 10 * PAGE, b"ten")
    dev.migrate_to_device(p, a, 512, compound=True)
    head = p.pagemap(a, 1)[0].pfn
    p.munmap(a + MB2 - PAGE, PAGE)
    e = p.pagemap(a, 2)
    assert e[0].kind == "device_private" and e[0].order == 0 and e[1].pfn == head + 1
    assert m.phys.mapcount[head] == 511
    assert p.read(a + 10 * PAGE, 3) == b"ten"
    verify_machine(m)


def test_mprotect_and_madv_free_of_device_private_entries(make_machine):
    m = make_machine()
    dev = Device(m)
    p = m.spawn()
    a = p.mmap(2 * PAGE, RW, ANON)
    p.write(a, b"dp")
    dev.migrate_to_device(p, a, 2)
    p.mprotect(a, 2 * PAGE, hmmsim.PROT_READ)
    assert p.pagemap(a, 1)[0].kind == "device_private"
    from hmmsim.mm.pagetable import SWP_DEVICE_PRIVATE_READ, softleaf_type

    assert softleaf_type(p.mm.pt.lookup(a >> 12)[1]) == SWP_DEVICE_PRIVATE_READ
    p.mprotect(a, 2 * PAGE, RW)
    p.madvise(a, 2 * PAGE, hmmsim.MADV_FREE)  # device-private entries are left alone
    assert p.pagemap(a, 1)[0].kind == "device_private"
    assert p.read(a, 2) == b"dp"
    verify_machine(m)


def test_mremap_moves_device_private_entries(make_machine):
    m = make_machine()
    dev = Device(m)
    p = m.spawn()
    a = p.mmap(2 * PAGE, RW, ANON)
    p.write(a + PAGE, b"move")
    dev.migrate_to_device(p, a, 2)
    b = p.mremap(a, 2 * PAGE, 8 * PAGE, hmmsim.MREMAP_MAYMOVE)
    assert p.pagemap(b + PAGE, 1)[0].kind == "device_private"
    assert p.read(b + PAGE, 4) == b"move"
    verify_machine(m)


def test_pinned_page_refuses_migration(make_machine):
    m = make_machine()
    dev = Device(m)
    p = m.spawn()
    a = p.mmap(2 * PAGE, RW, ANON)
    p.write(a, b"pinned")
    p.write(a + PAGE, b"free")
    with p.mm.mmap_lock.read():
        (pfn,) = pin_user_pages(p.mm, a, 1, FOLL_WRITE)
    moved, args = dev.migrate_to_device(p, a, 2)
    assert moved == 1 and args.src[0] == 0
    assert p.pagemap(a, 1)[0].pfn == pfn and p.pagemap(a + PAGE, 1)[0].kind == "device_private"
    unpin_user_page(m, pfn)
    verify_machine(m)


def test_shared_anonymous_and_page_cache_memory_do_not_migrate(make_machine):
    m = make_machine()
    dev = Device(m)
    p = m.spawn()
    a = p.mmap(2 * PAGE, RW, hmmsim.MAP_SHARED | hmmsim.MAP_ANONYMOUS)
    p.write(a, b"shm")
    assert dev.migrate_to_device(p, a, 2)[0] == 0
    f = m.create_file(PAGE)
    b = p.mmap(PAGE, RW, hmmsim.MAP_PRIVATE, file=f)
    p.read(b, 1)
    assert dev.migrate_to_device(p, b, 1)[0] == 0
    assert p.pagemap(b, 1)[0].kind == "file"


def test_pages_shared_with_a_fork_child_migrate_from_both(make_machine):
    m = make_machine()
    dev = Device(m)
    log = EventLog(m)
    p = m.spawn()
    a = p.mmap(PAGE, RW, ANON)
    p.write(a, b"both")
    c = p.fork()
    log.clear()
    assert dev.migrate_to_device(p, a, 1)[0] == 1
    assert c.pagemap(a, 1)[0].kind == "device_private"
    assert ("CLEAR", c.mm.id) in [(e.event, e.mm) for e in log.events]
    assert c.read(a, 4) == b"both"
    verify_machine(m)


def test_evicting_a_whole_pagemap(make_machine, memory):
    m = make_machine()
    dev = Device(m, memory, npages=64)
    p = m.spawn()
    a = p.mmap(32 * PAGE, RW, ANON)
    for i in range(32):
        p.write(a + i * PAGE, bytes([i + 1]))
    dev.migrate_to_device(p, a, 32)
    assert dev.in_use() == 32
    assert dev.evict() == 32
    assert dev.in_use() == 0
    assert {e.kind for e in p.pagemap(a, 32)} == {"anon"}
    assert [p.read(a + i * PAGE, 1)[0] for i in range(32)] == list(range(1, 33))
    memunmap_pages(dev.pgmap)
    verify_machine(m)


def test_memunmap_with_pages_in_use_is_busy(make_machine):
    m = make_machine()
    dev = Device(m)
    p = m.spawn()
    a = p.mmap(PAGE, RW, ANON)
    p.write(a, b"x")
    dev.migrate_to_device(p, a, 1)
    with pytest.raises(hmmsim.Busy):
        memunmap_pages(dev.pgmap)


def test_memremap_validates_its_pagemap(machine):
    with pytest.raises(hmmsim.InvalidArgument):
        memremap_pages(machine, DevPagemap(MEMORY_DEVICE_PRIVATE, owner=None, ops=object()), 8)
    with pytest.raises(hmmsim.InvalidArgument):
        memremap_pages(machine, DevPagemap(MEMORY_DEVICE_PRIVATE, owner=1, ops=object()), 8)


def test_migrate_vma_setup_rejects_bad_arguments(make_machine):
    m = make_machine()
    p = m.spawn()
    a = p.mmap(4 * PAGE, RW, ANON)
    vma = p.mm.find_vma(a)
    src = np.zeros(4, np.uint64)
    with p.mm.mmap_lock.read():
        for args in (
            MigrateVma(None, a, a + PAGE, src, src),
            MigrateVma(vma, a, a, src, src),
            MigrateVma(vma, a - PAGE, a + PAGE, src, src),
            MigrateVma(vma, a, a + 8 * PAGE, src, src),
            MigrateVma(vma, a, a + PAGE, None, src),
        ):
            with pytest.raises(hmmsim.InvalidArgument):
                migrate_vma_setup(args)


def test_gup_migrates_device_private_back_and_longterm_moves_coherent_out(make_machine):
    m = make_machine()
    priv = Device(m, "private", name="priv")
    coh = Device(m, "coherent", name="coh")
    p = m.spawn()
    a = p.mmap(2 * PAGE, RW, ANON)
    p.write(a, b"P")
    p.write(a + PAGE, b"C")
    priv.migrate_to_device(p, a, 1)
    coh.migrate_to_device(p, a + PAGE, 1)
    with p.mm.mmap_lock.read():
        pages = pin_user_pages(p.mm, a, 2, FOLL_WRITE | FOLL_LONGTERM)
    assert all(pfn < m.phys.ram_pages for pfn in pages)
    assert [e.kind for e in p.pagemap(a, 2)] == ["anon", "anon"]
    assert p.read(a, 1) == b"P" and p.read(a + PAGE, 1) == b"C"
    for pfn in pages:
        unpin_user_page(m, pfn)
    verify_machine(m)


def test_gup_refuses_pfnmap_and_p2p_without_flag(make_machine):
    from hmmsim.gup import FOLL_PCI_P2PDMA, get_user_pages, put_page
    from hmmsim.memremap import MEMORY_DEVICE_PCI_P2PDMA, zone_device_page_init
    from hmmsim.mm.pfnmap import remap_pfn_range, vm_insert_page

    m = make_machine()
    p = m.spawn()

    class Bar:
        def __init__(self, mode, pfn=0):
            self.mode, self.pfn = mode, pfn

        def mmap(self, vma):
            if self.mode == "pfnmap":
                remap_pfn_range(vma, vma.start, 0x100, vma.length)
            else:
                vm_insert_page(vma, vma.start, self.pfn)

    a = p.mmap(PAGE, RW, hmmsim.MAP_SHARED, file=Bar("pfnmap"))
    with p.mm.mmap_lock.read(), pytest.raises(hmmsim.BadAddress):
        get_user_pages(p.mm, a, 1, 0)
    pg = DevPagemap(MEMORY_DEVICE_PCI_P2PDMA, owner="bar")
    r = memremap_pages(m, pg, 8)
    zone_device_page_init(m, r.start)
    b = p.mmap(PAGE, RW, hmmsim.MAP_SHARED, file=Bar("p2p", r.start))
    with p.mm.mmap_lock.read():
        with pytest.raises(hmmsim.RemoteIO):
            get_user_pages(p.mm, b, 1, 0)
        (pfn,) = get_user_pages(p.mm, b, 1, FOLL_PCI_P2PDMA)
        assert pfn == r.start
        put_page(m, pfn)
    assert p.pagemap(b, 1)[0].kind == "p2p"


def test_gup_bad_flags(make_machine):
    from hmmsim.gup import FOLL_PIN, get_user_pages

    m = make_machine()
    p = m.spawn()
    a = p.mmap(PAGE, RW, ANON)
    with p.mm.mmap_lock.read():
        with pytest.raises(hmmsim.InvalidArgument):
            get_user_pages(p.mm, a, 1, FOLL_PIN)
        with pytest.raises(hmmsim.InvalidArgument):
            get_user_pages(p.mm, a, 1, FOLL_LONGTERM)
        with pytest.raises(hmmsim.BadAddress):
            get_user_pages(p.mm, a + PAGE * 100, 1, 0)


def test_move_pages_of_a_device_page_is_not_possible(make_machine):
    m = make_machine()
    dev = Device(m, "coherent")
    p = m.spawn()
    a = p.mmap(PAGE, RW, ANON)
    p.write(a, b"x")
    dev.migrate_to_device(p, a, 1)
    assert p.move_pages(a, 1) == [-errno.ENOENT]
