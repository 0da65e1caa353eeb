"""Page-table and fault behaviour of the CPU model."""

from __future__ import annotations

import hmmsim
import pytest
from helpers import ANON, MB2, PAGE, RW
from hmmsim import (
    MADV_HUGEPAGE,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_HUGE_1GB,
    MAP_HUGE_2MB,
    MAP_HUGETLB,
    MAP_POPULATE,
    MAP_PRIVATE,
    MAP_SHARED,
    MREMAP_MAYMOVE,
    PROT_READ,
)
from hmmsim.mm.physmem import HUGE_ZERO_PFN, ZERO_PFN


def test_read_of_untouched_anon_memory_maps_the_zero_page(proc):
    a = proc.mmap(4 * PAGE, RW, ANON)
    assert proc.read(a, 16) == bytes(16)
    e = proc.pagemap(a, 2)
    assert e[0].present and e[0].pfn == ZERO_PFN and e[0].kind == "zero"
    assert not e[0].writable
    assert not e[1].present and e[1].kind == "none"


def test_write_after_zero_page_read_allocates_a_private_page(proc, machine):
    a = proc.mmap(PAGE, RW, ANON)
    proc.read(a, 1)
    proc.write(a, b"x")
    e = proc.pagemap(a, 1)[0]
    assert e.kind == "anon" and e.writable and e.pfn != ZERO_PFN
    assert proc.read(a, 2) == b"x\x00"


def test_fork_gives_each_side_its_own_data_after_cow(proc):
    a = proc.mmap(2 * PAGE, RW, ANON)
    proc.write(a, b"parent")
    child = proc.fork()
    before = proc.pagemap(a, 1)[0]
    assert child.pagemap(a, 1)[0].pfn == before.pfn  # shared until written
    assert not before.writable
    child.write(a, b"child!")
    assert proc.read(a, 6) == b"parent"
    assert child.read(a, 6) == b"child!"
    assert child.pagemap(a, 1)[0].pfn != proc.pagemap(a, 1)[0].pfn
    # The parent is now the only user: its write reuses the page in place.
    pfn = proc.pagemap(a, 1)[0].pfn
    proc.write(a, b"P")
    assert proc.pagemap(a, 1)[0].pfn == pfn


def test_shared_anonymous_mapping_is_not_copied_on_write(proc):
    a = proc.mmap(PAGE, RW, MAP_SHARED | MAP_ANONYMOUS)
    proc.write(a, b"one")
    child = proc.fork()
    child.write(a, b"two")
    assert proc.read(a, 3) == b"two"
    assert proc.pagemap(a, 1)[0].pfn == child.pagemap(a, 1)[0].pfn
    assert proc.pagemap(a, 1)[0].kind == "shmem"


def test_thp_on_aligned_madv_hugepage_region(proc):
    a = proc.mmap(2 * MB2, RW, ANON)
    assert a % MB2 == 0
    proc.madvise(a, 2 * MB2, MADV_HUGEPAGE)
    proc.write(a + 5 * PAGE, b"huge")
    e = proc.pagemap(a, 512)
    assert {x.order for x in e} == {9}
    assert e[1].pfn == e[0].pfn + 1 and e[0].pfn % 512 == 0
    assert proc.read(a + 5 * PAGE, 4) == b"huge"


def test_thp_read_fault_maps_the_huge_zero_page(make_machine):
    m = make_machine(thp="always")
    p = m.spawn()
    a = p.mmap(MB2, RW, ANON)
    assert p.read(a + 100, 4) == bytes(4)
    e = p.pagemap(a, 2)
    assert e[0].pfn == HUGE_ZERO_PFN and e[1].pfn == HUGE_ZERO_PFN + 1 and e[0].order == 9
    p.write(a, b"z")  # 6.14+: a new THP replaces the huge zero PMD
    e = p.pagemap(a, 2)
    assert e[0].order == 9 and e[0].kind == "anon" and e[1].pfn == e[0].pfn + 1


def test_no_thp_when_mode_is_never_or_not_madvised(make_machine):
    for mode in ("never", "madvise"):
        p = make_machine(thp=mode).spawn()
        a = p.mmap(MB2, RW, ANON)
        p.write(a, b"x")
        assert p.pagemap(a, 1)[0].order == 0


def test_partial_munmap_splits_pmd_but_keeps_the_folio_and_data(make_machine):
    m = make_machine(thp="always")
    p = m.spawn()
    a = p.mmap(MB2, RW, ANON | MAP_POPULATE)
    p.write(a + 10 * PAGE, b"keep")
    head = p.pagemap(a, 1)[0].pfn
    p.munmap(a, PAGE)
    e = p.pagemap(a + PAGE, 511)
    assert all(x.order == 0 for x in e)
    assert e[0].pfn == head + 1
    assert m.phys.order[head] == 9  # the folio is still one THP
    assert m.phys.mapcount[head] == 511
    assert p.read(a + 10 * PAGE, 4) == b"keep"


def test_partial_mprotect_splits_pmd_keeping_data(make_machine):
    m = make_machine(thp="always")
    p = m.spawn()
    a = p.mmap(MB2, RW, ANON | MAP_POPULATE)
    p.write(a + MB2 - 4, b"tail")
    p.mprotect(a, PAGE, PROT_READ)
    assert p.pagemap(a, 1)[0].order == 0 and not p.pagemap(a, 1)[0].writable
    assert p.pagemap(a + PAGE, 1)[0].writable
    assert p.read(a + MB2 - 4, 4) == b"tail"
    with pytest.raises(hmmsim.SegmentationFault):
        p.write(a, b"no")


@pytest.mark.parametrize(
    ("size", "flag", "order"), [(2 << 20, MAP_HUGE_2MB, 9), (1 << 30, MAP_HUGE_1GB, 18)]
)
def test_hugetlb_pages_come_from_the_pool(make_machine, size, flag, order):
    m = make_machine(ram_bytes=4 << 30, hugetlb_pages={size: 2}, store_data=False)
    p = m.spawn()
    pool = m.hugetlb_pool(size)
    a = p.mmap(size, RW, ANON | MAP_HUGETLB | flag)
    assert a % size == 0
    assert pool.reserved == 1
    p.write(a + 3 * PAGE, b"h")
    e = p.pagemap(a + 3 * PAGE, 1)[0]
    assert e.kind == "hugetlb" and e.order == order
    assert pool.nr_free == 1 and pool.reserved == 0
    p.munmap(a, size)
    assert pool.nr_free == 2


def test_hugetlb_mmap_fails_with_enomem_when_pool_cannot_reserve(make_machine):
    m = make_machine(hugetlb_pages={2 << 20: 1})
    p = m.spawn()
    with pytest.raises(hmmsim.OutOfMemory):
        p.mmap(2 * MB2, RW, ANON | MAP_HUGETLB)
    assert len(p.mm.vmas) == 0


def test_hugetlb_fault_with_empty_pool_is_sigbus(make_machine):
    m = make_machine(hugetlb_pages={2 << 20: 1})
    p = m.spawn()
    a = p.mmap(2 * MB2, RW, ANON | MAP_HUGETLB | hmmsim.MAP_NORESERVE)
    p.write(a, b"1")
    with pytest.raises(hmmsim.BusError):
        p.write(a + MB2, b"2")


def test_hugetlb_cow_after_fork(make_machine):
    m = make_machine(hugetlb_pages={2 << 20: 3})
    p = m.spawn()
    a = p.mmap(MB2, RW, ANON | MAP_HUGETLB)
    p.write(a, b"parent")
    c = p.fork()
    c.write(a, b"child")
    assert p.read(a, 6) == b"parent" and c.read(a, 5) == b"child"
    assert p.pagemap(a, 1)[0].pfn != c.pagemap(a, 1)[0].pfn


def test_shared_file_mapping_writes_reach_the_file(machine, proc):
    f = machine.create_file(3 * PAGE)
    f.pwrite(PAGE, b"file data")
    a = proc.mmap(3 * PAGE, RW, MAP_SHARED, file=f)
    assert proc.read(a + PAGE, 9) == b"file data"
    assert not proc.pagemap(a + PAGE, 1)[0].writable  # write-notify: read maps RO
    proc.write(a, b"via mapping")
    assert f.pread(0, 11) == b"via mapping"
    assert proc.pagemap(a, 1)[0].kind == "file"


def test_private_file_mapping_copies_on_write(machine, proc):
    f = machine.create_file(2 * PAGE)
    f.pwrite(0, b"original")
    a = proc.mmap(2 * PAGE, RW, MAP_PRIVATE, file=f)
    assert proc.read(a, 8) == b"original"
    assert proc.pagemap(a, 1)[0].kind == "file"
    proc.write(a, b"changed!")
    assert proc.pagemap(a, 1)[0].kind == "anon"
    assert f.pread(0, 8) == b"original"
    assert proc.read(a, 8) == b"changed!"


def test_access_beyond_end_of_file_is_sigbus(machine, proc):
    f = machine.create_file(PAGE)
    a = proc.mmap(2 * PAGE, RW, MAP_SHARED, file=f)
    with pytest.raises(hmmsim.BusError):
        proc.read(a + PAGE, 1)


def test_swap_out_and_in_keeps_data(make_machine):
    m = make_machine(swap_bytes=16 << 20)
    p = m.spawn()
    a = p.mmap(4 * PAGE, RW, ANON)
    p.write(a, b"A" * PAGE + b"B" * PAGE)
    p.madvise(a, 4 * PAGE, hmmsim.MADV_PAGEOUT)
    e = p.pagemap(a, 2)
    assert e[0].swapped and e[0].kind == "swap" and e[1].swapped
    assert p.read(a, PAGE) == b"A" * PAGE
    assert p.read(a + PAGE, 2) == b"BB"
    assert p.pagemap(a, 1)[0].kind == "anon"
    # A read fault keeps each page in the swap cache, holding its slot.
    assert m.swap.nr_free == m.swap.nslots - 2


def test_swapped_page_shared_after_fork_swaps_in_once(make_machine):
    m = make_machine(swap_bytes=16 << 20)
    p = m.spawn()
    a = p.mmap(PAGE, RW, ANON)
    p.write(a, b"shared")
    c = p.fork()
    assert m.reclaim(PAGE) == PAGE
    assert p.pagemap(a, 1)[0].swapped and c.pagemap(a, 1)[0].swapped
    assert p.read(a, 6) == b"shared"
    assert c.read(a, 6) == b"shared"
    assert p.pagemap(a, 1)[0].pfn == c.pagemap(a, 1)[0].pfn
    c.write(a, b"C")
    assert p.read(a, 6) == b"shared" and c.read(a, 2) == b"Ch"


def test_mremap_move_keeps_data(proc):
    a = proc.mmap(4 * PAGE, RW, ANON)
    proc.write(a, b"moved" + bytes(PAGE - 5) + b"page2")
    b = proc.mremap(a, 4 * PAGE, 8 * PAGE, MREMAP_MAYMOVE)
    assert proc.read(b, 5) == b"moved" and proc.read(b + PAGE, 5) == b"page2"
    if b != a:
        with pytest.raises(hmmsim.SegmentationFault):
            proc.read(a, 1)


def test_mremap_of_thp_to_unaligned_address_splits_and_keeps_data(make_machine):
    m = make_machine(thp="always")
    p = m.spawn()
    a = p.mmap(MB2, RW, ANON | MAP_POPULATE)
    p.write(a + 12345, b"thp")
    target = p.mmap(4 * MB2, RW, ANON)
    p.munmap(target, 4 * MB2)
    new = p.mremap(a, MB2, MB2, MREMAP_MAYMOVE | hmmsim.MREMAP_FIXED, new_addr=target + PAGE)
    assert new == target + PAGE
    assert p.read(new + 12345, 3) == b"thp"
    assert p.pagemap(new, 1)[0].order == 0


def test_map_fixed_replaces_existing_mapping(proc):
    a = proc.mmap(4 * PAGE, RW, ANON)
    proc.write(a + PAGE, b"old")
    b = proc.mmap(PAGE, RW, ANON | MAP_FIXED, addr=a + PAGE)
    assert b == a + PAGE
    assert proc.read(a + PAGE, 3) == bytes(3)
    # Compatible neighbours merge back into one VMA, as vma_merge does.
    assert len(proc.mm.vmas) == 1


def test_vmas_merge_and_split(proc):
    a = proc.mmap(4 * PAGE, RW, ANON)
    proc.mprotect(a + PAGE, PAGE, PROT_READ)
    assert len(proc.mm.vmas) == 3
    proc.mprotect(a + PAGE, PAGE, RW)
    assert len(proc.mm.vmas) == 1


def test_exit_frees_all_memory(machine):
    free0 = machine.phys.allocator.nr_free
    p = machine.spawn()
    a = p.mmap(64 * PAGE, RW, ANON | MAP_POPULATE)
    p.fork().exit()
    p.write(a, b"x")
    p.exit()
    assert machine.phys.allocator.nr_free == free0


def test_prot_none_mapping_faults_and_keeps_pages_across_mprotect(proc):
    a = proc.mmap(2 * PAGE, RW, ANON)
    proc.write(a, b"hidden")
    proc.mprotect(a, 2 * PAGE, hmmsim.PROT_NONE)
    e = proc.pagemap(a, 1)[0]
    assert e.present and not e.writable and e.kind == "anon"  # protnone keeps the page
    with pytest.raises(hmmsim.SegmentationFault):
        proc.read(a, 1)
    proc.mprotect(a, 2 * PAGE, RW)
    assert proc.pagemap(a, 1)[0].writable  # exclusive anon page: writable again at once
    assert proc.read(a, 6) == b"hidden"
    b = proc.mmap(PAGE, hmmsim.PROT_NONE, ANON)
    with pytest.raises(hmmsim.SegmentationFault):
        proc.write(b, b"x")


def test_running_out_of_memory_is_an_error_not_a_crash(make_machine):
    from hmmsim.mm.debug import verify_machine

    m = make_machine(ram_bytes=16 << 20)
    p = m.spawn()
    a = p.mmap(32 << 20, RW, ANON | MAP_POPULATE)  # populate errors are ignored
    with pytest.raises(hmmsim.OutOfMemory):
        p.write(a, b"x" * (32 << 20))
    verify_machine(m)
    p.munmap(a, 32 << 20)
    b = p.mmap(PAGE, RW, ANON)
    p.write(b, b"fine")
    assert p.read(b, 4) == b"fine"


def test_event_log_records_faults_and_invalidations(machine, proc):
    machine.trace.enable_log()
    a = proc.mmap(PAGE, RW, ANON)
    proc.write(a, b"x")
    proc.munmap(a, PAGE)
    kinds = [e.kind for e in machine.trace.events]
    assert kinds == ["fault", "invalidate_start", "invalidate_end"]
    assert machine.trace.events[1].detail["event"] == "UNMAP"
    assert machine.clock.now_ns > 0
