"""Frame allocator, folio metadata, lazy zeroing, and page-table encoding/walks."""

from __future__ import annotations

import hmmsim
import numpy as np
import pytest
from hmmsim.mm import pagetable as ptm
from hmmsim.mm.physmem import (
    HUGE_ZERO_PFN,
    ZERO_PFN,
    FrameAllocator,
    PG_zeroed,
    PG_zone_device,
    PhysMem,
)
from hmmsim.trace import Costs


def test_allocator_hands_out_naturally_aligned_blocks_of_every_order():
    a = FrameAllocator(1 << 19)  # 2 GiB
    for order in range(19):
        heads = a.alloc(order, 1)
        assert heads[0] % (1 << order) == 0
    assert a.nr_free == (1 << 19) - sum(1 << o for o in range(19))


def test_one_page_allocations_match_the_general_path():
    one, many = (PhysMem(16 << 20, True, Costs()) for _ in range(2))
    rng = np.random.default_rng(5)
    live: list[int] = []
    for step in range(3000):
        if live and rng.random() < 0.4:
            pfn = live.pop(int(rng.integers(len(live))))
            for phys in (one, many):
                phys.refcount[pfn] = 0
                phys.allocator.free(np.array([pfn]), 0)
            continue
        a = one.alloc_one(0, flags=step & 1)
        b = int(many.alloc(0, 1, flags=step & 1)[0])
        assert a == b
        live.append(a)
    for name in ("refcount", "mapcount", "order", "flags", "mapping", "index"):
        assert (getattr(one, name) == getattr(many, name)).all(), name
    assert (one.allocator.used == many.allocator.used).all()
    assert (one.allocator.block_used == many.allocator.block_used).all()
    assert one.allocator.nr_free == many.allocator.nr_free
    assert one.costs.pages_allocated == many.costs.pages_allocated


def test_allocator_is_all_or_nothing_and_reports_oom():
    a = FrameAllocator(4096)
    a.alloc(0, 4000)
    free = a.nr_free
    with pytest.raises(hmmsim.OutOfMemory):
        a.alloc(0, 200)
    assert a.nr_free == free
    with pytest.raises(hmmsim.OutOfMemory):
        a.alloc(9, 1)  # no 2 MiB block is fully free any more


def test_small_allocations_prefer_partly_used_blocks():
    a = FrameAllocator(2048)
    first = a.alloc(0, 1)[0]
    second = a.alloc(0, 1)[0]
    assert first >> 9 == second >> 9
    assert a.alloc(9, 3).tolist() == [512, 1024, 1536]


def test_freeing_twice_is_caught():
    a = FrameAllocator(1024)
    h = a.alloc(0, 1)
    a.free(h, 0)
    with pytest.raises(AssertionError):
        a.free(h, 0)


def test_new_pages_read_as_zero_without_touching_the_arena():
    phys = PhysMem(16 << 20, True, Costs())
    pfn = phys.alloc_one(0)
    phys.arena.page(pfn)[:] = 0xAB  # stale contents of a previous owner
    phys.flags[pfn] |= np.uint16(PG_zeroed)
    assert phys.read(pfn, 0, 4) == bytes(4)
    phys.write(pfn, 10, b"x")
    assert phys.read(pfn, 8, 4) == b"\0\0x\0"


@pytest.mark.parametrize("npages", [1, 3])
def test_copy_pages_copies_contents_and_keeps_zero_pages_lazy(npages):
    phys = PhysMem(16 << 20, True, Costs())
    data, zero, dst = (phys.alloc(0, npages) for _ in range(3))
    payload = np.arange(npages * 4096, dtype=np.uint32).astype(np.uint8).reshape(npages, 4096)
    phys.write_pages(data, payload)
    phys.write_pages(dst, payload[::-1] + 1)
    phys.copy_pages(dst, data)
    assert (phys.read_pages(dst) == payload).all()
    assert not (phys.flags[dst] & PG_zeroed).any()
    phys.copy_pages(dst, zero)  # never written: stays lazily zero
    assert (phys.flags[dst] & PG_zeroed).all()
    assert not phys.read_pages(dst).any()
    assert phys.costs.pages_copied == 2 * npages


def test_zero_pages_are_reserved():
    phys = PhysMem(16 << 20, True, Costs())
    assert phys.is_zero_pfn(ZERO_PFN) and phys.is_zero_pfn(HUGE_ZERO_PFN + 511)
    assert phys.allocator.used[ZERO_PFN] and phys.allocator.used[HUGE_ZERO_PFN]
    assert phys.order[HUGE_ZERO_PFN] == 9


def test_store_data_false_drops_contents():
    m = hmmsim.Machine(hmmsim.MachineConfig(ram_bytes=16 << 20, store_data=False))
    p = m.spawn()
    a = p.mmap(
        4096, hmmsim.PROT_READ | hmmsim.PROT_WRITE, hmmsim.MAP_PRIVATE | hmmsim.MAP_ANONYMOUS
    )
    p.write(a, b"gone")
    assert p.read(a, 4) == bytes(4)
    assert p.pagemap(a, 1)[0].kind == "anon"


def test_entry_kinds_decode():
    entries = np.array(
        [
            0,
            ptm.make_present(5, write=True),
            ptm.make_protnone(ptm.make_present(6)),
            ptm.make_swap(7),
            ptm.make_softleaf(ptm.SWP_MIGRATION_WRITE, 8),
            ptm.make_softleaf(ptm.SWP_DEVICE_PRIVATE_WRITE, 9),
            ptm.make_softleaf(ptm.SWP_DEVICE_EXCLUSIVE, 10),
            ptm.make_hwpoison(11),
            ptm.make_softleaf(ptm.SWP_MARKER, 0),
        ],
        dtype=np.uint64,
    )
    assert ptm.pte_kind_array(entries).tolist() == list(range(9))
    assert ptm.pte_pfn_array(entries)[1:8].tolist() == [5, 6, 7, 8, 9, 10, 11]


def test_walk_reports_levels_locations_and_huge_offsets():
    pt = ptm.PageTable()
    pmdloc = pt.pmd_loc(1024, alloc=True)
    pt.set(pmdloc, ptm.make_present(4096, huge=True))
    pt.set_ptes(512, np.array([ptm.make_present(77)], dtype=np.uint64))
    w = pt.walk(510, 520)
    assert w.level[:2].tolist() == [0, 0] and w.loc[0] == -1  # no table there
    assert w.entries[2] != 0 and w.level[2] == 0
    assert w.level[514:].tolist() == [1] * 6
    assert w.pfns()[514 + 3] == 4096 + 3
    assert (w.loc[514:] == pmdloc).all()
    slots = w.slots()
    assert slots.vpns.tolist() == [512, 1024]
    assert slots.levels.tolist() == [0, 1]


def test_unaligned_walk_over_several_tables():
    pt = ptm.PageTable()
    vpns = np.arange(1000, 3000, dtype=np.int64)
    pt.set_ptes(1000, ptm.make_present_array(vpns, write=False, dirty=False))
    w = pt.walk(999, 2003)
    assert w.pfns()[1:2001].tolist() == vpns.tolist()
    assert w.entries[0] == 0 and w.entries[-1] == 0


def test_walk_inside_one_chunk_matches_the_walk_across_chunks():
    # A walk inside one 2 MiB chunk takes a scalar fast path; every field must
    # equal the slice of a walk over several chunks, for each way a chunk maps.
    pt = ptm.PageTable()
    pt.set_ptes(512 + 3, np.array([ptm.make_present(77), ptm.make_swap(5)], dtype=np.uint64))
    pt.set(pt.pmd_loc(1024, alloc=True), ptm.make_present(4096, huge=True))
    pt.set(pt.pud_loc(1 << 18, alloc=True), ptm.make_present(1 << 18, huge=True))
    cases = [(0, 0, 512), (512, 512, 512), (1024, 1024, 512), (1 << 18, (1 << 18) + 512, 512)]
    cases.append((1 << 28, 1 << 28, 512))  # no PUD table at all
    for first, vpn, n in cases:
        whole = pt.walk(first - 512 if first else 0, 2048)
        base = vpn - whole.vpn
        for off, length in [(0, n), (3, 2), (511, 1), (100, 300)]:
            one = pt.walk(vpn + off, length)
            assert one.entries.tolist() == whole.entries[base + off : base + off + length].tolist()
            assert one.level.tolist() == whole.level[base + off : base + off + length].tolist()
            assert one.loc.tolist() == whole.loc[base + off : base + off + length].tolist()
            assert one.pfns().tolist() == whole.pfns()[base + off : base + off + length].tolist()
            assert one.order.tolist() == whole.order[base + off : base + off + length].tolist()
            assert one.huge == bool(whole.level[base + off : base + off + length].any())
            assert pt.walk(vpn + off, length, per_page=False).entries.size == 0


def test_device_ranges_beyond_the_metadata_reserve_keep_earlier_metadata():
    phys = PhysMem(16 << 20, store_data=True, costs=Costs())
    ram = phys.ram_pages
    first = phys.add_device_range(8, pgmap="a")
    phys.refcount[first] = 3
    phys.write_pages(np.array([first], dtype=np.int64), np.full((1, 4096), 9, dtype=np.uint8))
    # More device memory than the reserve: the metadata moves, keeping its values.
    big = phys.add_device_range(2 * (1 << 18), pgmap="b")
    assert first == ram and big > first
    assert phys.capacity == big + 2 * (1 << 18)
    assert len(phys.refcount) == len(phys.flags) == phys.capacity
    assert phys.refcount[first] == 3
    assert phys.flags[first] & PG_zone_device and phys.flags[big + 5] & PG_zone_device
    assert phys.read_pages(np.array([first], dtype=np.int64))[0, 0] == 9
    assert phys.pgmap_of(big + 1) == "b" and phys.pgmap_of(first + 1) == "a"
    with pytest.raises(IndexError):
        phys.refcount[phys.capacity]


def test_signature_changes_with_any_entry_or_level_of_the_range():
    pt = ptm.PageTable()
    empty = pt.signature(512, 4)
    pt.set_ptes(512, np.array([ptm.make_present(77)], dtype=np.uint64))
    one = pt.signature(512, 4)
    assert one != empty
    assert pt.signature(516, 4) == pt.signature(520, 4)  # untouched pages alike
    pt.set(pt.pte_loc(515), ptm.make_swap(3))
    assert pt.signature(512, 4) != one
    pmdloc = pt.pmd_loc(512)
    pt.set(pmdloc, ptm.make_present(4096, huge=True))  # the same chunk, now a PMD
    huge = pt.signature(512, 4)
    assert huge not in (empty, one) and huge == pt.signature(600, 4)
    assert pt.signature(510, 4) != pt.signature(506, 4)  # across chunks: a walk
