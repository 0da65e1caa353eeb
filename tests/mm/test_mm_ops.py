"""More operations: mremap variants, reclaim, migration, poison, OOM, pins, device files."""

from __future__ import annotations

import errno

import hmmsim
import pytest
from helpers import ANON, MB2, PAGE, RW, EventLog
from hmmsim import (
    MADV_COLLAPSE,
    MADV_FREE,
    MADV_PAGEOUT,
    MAP_HUGETLB,
    MAP_POPULATE,
    MAP_PRIVATE,
    MAP_SHARED,
    MREMAP_DONTUNMAP,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PROT_READ,
)
from hmmsim.mm.debug import verify_machine
from hmmsim.mm.pfnmap import remap_pfn_range, vm_insert_page
from hmmsim.mm.vma import VM_IO, VM_MIXEDMAP, VM_PFNMAP


def test_mremap_shrinks_in_place_and_grows_in_place(proc):
    a = proc.mmap(8 * PAGE, RW, ANON)
    proc.write(a, b"keep")
    assert proc.mremap(a, 8 * PAGE, 2 * PAGE) == a
    assert proc.mm.find_vma(a).end == a + 2 * PAGE
    assert proc.mremap(a, 2 * PAGE, 4 * PAGE) == a  # the space after it is free
    assert proc.read(a, 4) == b"keep" and proc.read(a + 3 * PAGE, 1) == b"\0"


def test_mremap_without_maymove_cannot_move(proc):
    a = proc.mmap(2 * PAGE, RW, ANON)
    proc.mmap(PAGE, PROT_READ, ANON | hmmsim.MAP_FIXED, addr=a + 2 * PAGE)
    with pytest.raises(hmmsim.OutOfMemory):
        proc.mremap(a, 2 * PAGE, 4 * PAGE)


def test_mremap_dontunmap_moves_pages_and_leaves_the_old_range_empty(proc, events):
    a = proc.mmap(4 * PAGE, RW, ANON)
    proc.write(a, b"moved")
    b = proc.mremap(a, 4 * PAGE, 4 * PAGE, MREMAP_MAYMOVE | MREMAP_DONTUNMAP)
    assert b != a
    assert proc.read(b, 5) == b"moved"
    assert proc.read(a, 5) == bytes(5)  # still mapped, refilled with zeroes
    assert events.names() == ["UNMAP"]
    verify_machine(proc.machine)


def test_mremap_fixed_over_an_existing_mapping_replaces_it(proc):
    a = proc.mmap(2 * PAGE, RW, ANON)
    b = proc.mmap(2 * PAGE, RW, ANON)
    proc.write(a, b"A")
    proc.write(b, b"B")
    assert proc.mremap(a, 2 * PAGE, 2 * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, new_addr=b) == b
    assert proc.read(b, 1) == b"A"
    verify_machine(proc.machine)


def test_mremap_keeps_thp_when_moved_to_an_aligned_address(make_machine):
    m = make_machine(thp="always")
    p = m.spawn()
    a = p.mmap(MB2, RW, ANON | MAP_POPULATE)
    p.write(a + 99, b"t")
    head = p.pagemap(a, 1)[0].pfn
    target = p.mmap(3 * MB2, RW, ANON)
    p.munmap(target, 3 * MB2)
    dest = (target + MB2 - 1) & ~(MB2 - 1)
    assert p.mremap(a, MB2, MB2, MREMAP_MAYMOVE | MREMAP_FIXED, new_addr=dest) == dest
    e = p.pagemap(dest, 1)[0]
    assert e.order == 9 and e.pfn == head and p.read(dest + 99, 1) == b"t"
    verify_machine(m)


def test_reclaim_writes_back_dirty_file_pages_and_refaults_them(make_machine):
    m = make_machine()
    p = m.spawn()
    f = m.create_file(2 * PAGE)
    a = p.mmap(2 * PAGE, RW, MAP_SHARED, file=f)
    p.write(a, b"persist")
    assert f.lookup(0) >= 0
    assert m.reclaim(2 * PAGE) >= PAGE
    assert f.lookup(0) == -1 and f.backing[0][:7] == b"persist"
    assert p.pagemap(a, 1)[0].kind == "none"
    assert p.read(a, 7) == b"persist"
    verify_machine(m)


def test_anon_memory_is_not_reclaimed_without_swap(machine, proc):
    a = proc.mmap(2 * PAGE, RW, ANON | MAP_POPULATE)
    assert machine.reclaim(8 * PAGE) == 0
    assert proc.pagemap(a, 1)[0].present


def test_madv_free_discards_clean_pages_but_keeps_redirtied_ones(make_machine):
    m = make_machine(swap_bytes=4 << 20)
    p = m.spawn()
    a = p.mmap(2 * PAGE, RW, ANON)
    p.write(a, b"drop")
    p.write(a + PAGE, b"keep")
    p.madvise(a, 2 * PAGE, MADV_FREE)
    p.write(a + PAGE, b"K")
    p.madvise(a, 2 * PAGE, MADV_PAGEOUT)
    assert p.pagemap(a, 2)[0].kind == "none"  # discarded, no swap used
    # The re-dirtied page is swap-backed again and kept by this pass (Linux
    # aborts its unmap and activates it); the next reclaim swaps it out.
    assert p.pagemap(a, 2)[1].kind == "anon"
    p.madvise(a, 2 * PAGE, MADV_PAGEOUT)
    assert p.pagemap(a, 2)[1].kind == "swap"
    assert p.read(a, 4) == bytes(4) and p.read(a + PAGE, 4) == b"Keep"
    verify_machine(m)


def test_pinned_page_refuses_migration_reclaim_and_collapse(make_machine):
    m = make_machine(swap_bytes=4 << 20)
    p = m.spawn()
    a = p.mmap(MB2, RW, ANON)
    p.write(a, b"pinned")
    pfn = p.pagemap(a, 1)[0].pfn
    m.phys.get_page(pfn)  # what a GUP pin does to the refcount
    assert p.move_pages(a, 1) == [-errno.EBUSY]
    assert m.reclaim(PAGE) == 0
    with pytest.raises(hmmsim.Again):
        p.madvise(a, MB2, MADV_COLLAPSE)
    assert p.pagemap(a, 1)[0].pfn == pfn
    verify_machine(m)
    m.phys.put_page(pfn)
    assert p.move_pages(a, 1) == [0]
    assert p.read(a, 6) == b"pinned"


def test_fork_copies_a_pinned_exclusive_page_at_once(proc, machine):
    from hmmsim.gup import pin_user_pages, unpin_user_page

    a = proc.mmap(PAGE, RW, ANON)
    proc.write(a, b"pin")
    pfn = proc.pagemap(a, 1)[0].pfn
    with proc.mm.mmap_lock.read():
        assert pin_user_pages(proc.mm, a, 1, hmmsim.gup.FOLL_WRITE) == [pfn]
    child = proc.fork()
    assert child.pagemap(a, 1)[0].pfn != pfn
    assert proc.pagemap(a, 1)[0].writable and proc.pagemap(a, 1)[0].pfn == pfn
    assert child.read(a, 3) == b"pin"
    unpin_user_page(machine, pfn)
    verify_machine(machine)


def test_fork_shares_a_page_held_by_a_plain_reference(proc, machine):
    a = proc.mmap(PAGE, RW, ANON)
    proc.write(a, b"ref")
    pfn = proc.pagemap(a, 1)[0].pfn
    machine.phys.get_page(pfn)  # FOLL_GET: no copy at fork (the classic GUP/fork hazard)
    child = proc.fork()
    assert child.pagemap(a, 1)[0].pfn == pfn
    machine.phys.put_page(pfn)
    verify_machine(machine)


def test_move_pages_migrates_a_whole_thp_and_shared_pages(make_machine):
    m = make_machine(thp="always")
    log = EventLog(m)
    p = m.spawn()
    a = p.mmap(MB2, RW, ANON | MAP_POPULATE)
    p.write(a + 5 * PAGE, b"thp data")
    c = p.fork()
    old = p.pagemap(a, 1)[0].pfn
    log.clear()
    assert set(p.move_pages(a, 4)) == {0}
    new = p.pagemap(a, 1)[0].pfn
    assert new != old and m.phys.order[new] == 9
    assert c.pagemap(a, 1)[0].pfn == new and p.pagemap(a, 1)[0].order == 9
    assert sorted(e.mm for e in log.events) == sorted([p.mm.id, c.mm.id])
    assert c.read(a + 5 * PAGE, 8) == b"thp data"
    verify_machine(m)


def test_memory_failure_on_a_thp_loses_only_that_page(make_machine):
    m = make_machine(thp="always")
    p = m.spawn()
    a = p.mmap(MB2, RW, ANON | MAP_POPULATE)
    p.write(a + PAGE, b"ok")
    bad = p.pagemap(a + 3 * PAGE, 1)[0].pfn
    m.memory_failure(bad)
    assert p.pagemap(a + 3 * PAGE, 1)[0].kind == "hwpoison"
    assert p.read(a + PAGE, 2) == b"ok"
    with pytest.raises(hmmsim.BusError):
        p.read(a + 3 * PAGE, 1)
    verify_machine(m)
    assert m.phys.allocator.used[bad]  # never handed out again


def test_memory_failure_of_a_clean_file_page_just_drops_it(machine, proc):
    f = machine.create_file(PAGE)
    f.pwrite(0, b"disk")
    f.sync()
    a = proc.mmap(PAGE, PROT_READ, MAP_SHARED, file=f)
    assert proc.read(a, 4) == b"disk"
    machine.memory_failure(proc.pagemap(a, 1)[0].pfn)
    assert proc.pagemap(a, 1)[0].kind == "none"
    assert proc.read(a, 4) == b"disk"


def test_truncate_drops_private_cow_copies_and_punch_hole_keeps_them(machine, proc):
    f = machine.create_file(3 * PAGE)
    a = proc.mmap(3 * PAGE, RW, MAP_PRIVATE, file=f)
    proc.write(a, b"cow0")
    proc.write(a + PAGE, b"cow1")
    f.punch_hole(0, PAGE)
    assert proc.read(a, 4) == b"cow0"
    f.truncate(PAGE)
    with pytest.raises(hmmsim.BusError):
        proc.read(a + PAGE, 1)
    verify_machine(machine)


def test_shared_hugetlb_mapping_is_shared_across_fork(make_machine):
    m = make_machine(hugetlb_pages={2 << 20: 2})
    p = m.spawn()
    a = p.mmap(MB2, RW, MAP_SHARED | hmmsim.MAP_ANONYMOUS | MAP_HUGETLB)
    c = p.fork()
    c.write(a + 10, b"both")
    assert p.read(a + 10, 4) == b"both"
    assert p.pagemap(a, 1)[0].pfn == c.pagemap(a, 1)[0].pfn
    c.exit()
    p.exit()
    assert m.hugetlb_pool(2 << 20).nr_free == 2


def test_mm_with_an_extra_user_is_torn_down_at_the_last_mmput(machine):
    p = machine.spawn()
    a = p.mmap(PAGE, RW, ANON | MAP_POPULATE)
    mm = p.mm
    assert mm.mmget_not_zero()
    p.exit()
    assert len(mm.vmas) == 1  # a driver still holds the mm
    mm.mmput()
    assert len(mm.vmas) == 0 and not mm.mmget_not_zero()
    del a


class DeviceFile:
    """A device file whose mmap installs pages the way drivers do."""

    def __init__(self, machine, mode):
        self.machine = machine
        self.mode = mode
        self.page = machine.phys.alloc_one(0)

    def mmap(self, vma):
        if self.mode == "pfnmap":
            remap_pfn_range(vma, vma.start, 0x100, vma.length)
        else:
            vm_insert_page(vma, vma.start, self.page)


def test_device_file_mmap_builds_pfnmap_and_mixedmap_vmas(machine, proc):
    dev = DeviceFile(machine, "pfnmap")
    a = proc.mmap(2 * PAGE, RW, MAP_SHARED, file=dev)
    vma = proc.mm.find_vma(a)
    assert vma.flags & (VM_IO | VM_PFNMAP) == VM_IO | VM_PFNMAP
    e = proc.pagemap(a + PAGE, 1)[0]
    assert e.present and e.pfn == 0x101 and e.kind == "pfnmap"
    mixed = DeviceFile(machine, "mixed")
    b = proc.mmap(PAGE, RW, MAP_SHARED, file=mixed)
    assert proc.mm.find_vma(b).flags & VM_MIXEDMAP
    assert proc.pagemap(b, 1)[0].pfn == mixed.page
    assert machine.phys.mapcount[mixed.page] == 1
    proc.munmap(b, PAGE)
    assert machine.phys.mapcount[mixed.page] == 0 and machine.phys.refcount[mixed.page] == 1


def test_populate_of_a_vma_without_pages_for_a_device_file_is_sigbus(machine, proc):
    class Empty:
        def mmap(self, vma):
            vma.vm_ops = self

    a = proc.mmap(PAGE, RW, MAP_SHARED, file=Empty())
    with pytest.raises(hmmsim.BusError):
        proc.read(a, 1)


def test_madv_collapse_is_refused_only_by_nohugepage(make_machine):
    m = make_machine(thp="never")
    p = m.spawn()
    a = p.mmap(MB2, RW, ANON | MAP_POPULATE)
    p.madvise(a, MB2, hmmsim.MADV_NOHUGEPAGE)
    with pytest.raises(hmmsim.InvalidArgument):
        p.madvise(a, MB2, MADV_COLLAPSE)
    assert p.pagemap(a, 1)[0].order == 0
    p.madvise(a, MB2, hmmsim.MADV_HUGEPAGE)
    p.madvise(a, MB2, MADV_COLLAPSE)
    assert p.pagemap(a, 1)[0].order == 9
