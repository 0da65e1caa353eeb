"""Exact outcomes of mm paths a sampled mutation run found untested: THP
suitability at VMA edges, aligned PMD splits, reclaim of a whole THP, mremap
with old_len 0 and MREMAP_FIXED resizing, move_pages range checks."""

from __future__ import annotations

from collections import Counter

import hmmsim
import pytest
from hmmsim import (
    MADV_HUGEPAGE,
    MADV_PAGEOUT,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PROT_READ,
    PROT_WRITE,
)
from hmmsim.mm.debug import verify_machine

PAGE = 4096
MB2 = 2 << 20
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS


@pytest.fixture
def m() -> hmmsim.Machine:
    return hmmsim.Machine(
        hmmsim.MachineConfig(ram_bytes=64 << 20, swap_bytes=16 << 20, thp="always")
    )


def test_small_vma_never_gets_a_huge_pmd(m: hmmsim.Machine) -> None:
    p = m.spawn()
    big = p.mmap(2 * MB2, RW, ANON)  # an aligned hole to place the small VMA in
    p.munmap(big, 2 * MB2)
    a = p.mmap(16 * PAGE, RW, ANON | hmmsim.MAP_FIXED, addr=big)
    assert a % MB2 == 0  # the aligned 2 MiB around it starts at the VMA
    p.write(a, b"s" * (16 * PAGE))
    pm = p.pagemap(a, 16)
    assert [(e.kind, e.order) for e in pm] == [("anon", 0)] * 16
    assert len({e.pfn for e in pm}) == 16
    verify_machine(m)


def test_mprotect_of_a_whole_aligned_thp_does_not_split_it(m: hmmsim.Machine) -> None:
    p = m.spawn()
    a = p.mmap(2 * MB2, RW, ANON)
    assert a % MB2 == 0
    p.write(a, b"x")
    p.write(a + MB2, b"y")
    assert [e.order for e in p.pagemap(a, 1) + p.pagemap(a + MB2, 1)] == [9, 9]
    p.mprotect(a, MB2, PROT_READ)  # both edges PMD-aligned: nothing to split
    first, second = p.pagemap(a, 1)[0], p.pagemap(a + MB2, 1)[0]
    assert (first.order, first.writable) == (9, False)
    assert (second.order, second.writable) == (9, True)
    p.munmap(a + MB2, MB2)
    assert p.pagemap(a, 1)[0].order == 9
    verify_machine(m)


def test_pageout_of_a_fully_written_thp_swaps_every_subpage(m: hmmsim.Machine) -> None:
    p = m.spawn()
    a = p.mmap(MB2, RW, ANON)
    p.madvise(a, MB2, MADV_HUGEPAGE)
    p.write(a, b"\x5a" * MB2)
    assert p.pagemap(a, 1)[0].order == 9
    free0 = m.swap.nr_free
    p.madvise(a, MB2, MADV_PAGEOUT)
    assert Counter(e.kind for e in p.pagemap(a, 512)) == {"swap": 512}
    assert m.swap.nr_free == free0 - 512
    assert p.read(a + 77 * PAGE, 4) == b"\x5a" * 4
    verify_machine(m)


def test_mremap_with_old_len_zero_duplicates_a_shared_mapping(m: hmmsim.Machine) -> None:
    p = m.spawn()
    a = p.mmap(2 * PAGE, RW, MAP_SHARED | MAP_ANONYMOUS)
    p.write(a, b"shared")
    b = p.mremap(a, 0, 2 * PAGE, MREMAP_MAYMOVE)
    assert b != a
    assert p.read(b, 6) == b"shared"
    p.write(b + PAGE, b"both")
    assert p.read(a + PAGE, 4) == b"both"
    # The duplicate is in the file's rmap: reclaim unmaps the pages from
    # both mappings (MADV_PAGEOUT would skip them: mapped twice).
    m.reclaim(64 << 20)
    verify_machine(m)
    assert [e.present for e in p.pagemap(a, 2) + p.pagemap(b, 2)] == [False] * 4
    assert p.read(b, 6) == b"shared"
    verify_machine(m)


@pytest.mark.parametrize("new_pages", [2, 6])
def test_mremap_fixed_may_resize(m: hmmsim.Machine, new_pages: int) -> None:
    p = m.spawn()
    a = p.mmap(4 * PAGE, RW, ANON)
    p.write(a, b"mv" * 2048 * 4)
    dst = p.mmap(8 * PAGE, PROT_READ, ANON)
    b = p.mremap(a, 4 * PAGE, new_pages * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, dst)
    assert b == dst
    keep = min(4, new_pages) * PAGE
    assert p.read(b, keep) == (b"mv" * 2048 * 4)[:keep]
    verify_machine(m)


def test_move_pages_past_task_size_is_efault(m: hmmsim.Machine) -> None:
    p = m.spawn()
    top = hmmsim.mm.mmap.TASK_SIZE if hasattr(hmmsim.mm.mmap, "TASK_SIZE") else 1 << 47
    with pytest.raises(hmmsim.BadAddress):
        p.move_pages(top - PAGE, 2)


@pytest.mark.parametrize("order", [0, 1, 9])
def test_frame_allocator_request_for_no_blocks_is_empty(m: hmmsim.Machine, order: int) -> None:
    alloc = m.phys.allocator
    free0 = alloc.nr_free
    heads = alloc.alloc(order, 0)
    assert heads.shape == (0,) and alloc.nr_free == free0


@pytest.mark.parametrize(
    ("prot", "flags", "accounted"),
    [
        (RW, ANON, True),
        (PROT_READ, ANON, False),
        (RW, MAP_SHARED | MAP_ANONYMOUS, False),
        (RW, ANON | hmmsim.MAP_NORESERVE, False),
    ],
)
def test_only_private_writable_reserved_mappings_are_accounted(
    m: hmmsim.Machine, prot: int, flags: int, accounted: bool
) -> None:
    from hmmsim.mm.vma import VM_ACCOUNT

    p = m.spawn()
    a = p.mmap(4 * PAGE, prot, flags)
    assert bool(p.mm.find_vma(a).flags & VM_ACCOUNT) is accounted


def test_fork_during_migration_turns_read_exclusive_entries_into_read_ones(
    m: hmmsim.Machine,
) -> None:
    import numpy as np
    from hmmsim.migrate import (
        MIGRATE_PFN_SHIFT,
        MIGRATE_PFN_VALID,
        MIGRATE_VMA_SELECT_SYSTEM,
        MigrateVma,
        migrate_vma_finalize,
        migrate_vma_pages,
        migrate_vma_setup,
    )
    from hmmsim.testing.devmem import Device

    dev = Device(m)
    p = m.spawn()
    n = 2
    a = p.mmap(n * PAGE, RW, ANON)
    p.write(a, b"A" * (n * PAGE))
    p.mprotect(a, n * PAGE, PROT_READ)  # read-only exclusive pages
    src = np.zeros(n, np.uint64)
    dst = np.zeros(n, np.uint64)
    args = MigrateVma(
        p.mm.find_vma(a),
        a,
        a + n * PAGE,
        src,
        dst,
        pgmap_owner=dev,
        flags=MIGRATE_VMA_SELECT_SYSTEM,
    )
    with p.mm.mmap_lock.read():
        migrate_vma_setup(args)
    assert [e.kind for e in p.pagemap(a, n)] == ["migration"] * n
    child = p.fork()
    assert [e.kind for e in p.pagemap(a, n)] == ["migration"] * n
    assert [e.kind for e in child.pagemap(a, n)] == ["migration"] * n
    with p.mm.mmap_lock.read():
        new = dev.alloc_pages(n)
        m.phys.copy_pages(new, (src >> np.uint64(MIGRATE_PFN_SHIFT)).astype(np.int64))
        dst[:] = (new.astype(np.uint64) << np.uint64(MIGRATE_PFN_SHIFT)) | np.uint64(
            MIGRATE_PFN_VALID
        )
        migrate_vma_pages(args)
        migrate_vma_finalize(args)
    verify_machine(m)
    assert p.read(a, n * PAGE) == b"A" * (n * PAGE)
    assert child.read(a, n * PAGE) == b"A" * (n * PAGE)
    verify_machine(m)


def test_fault_where_the_aligned_chunk_crosses_the_vma_start_maps_small_pages(
    m: hmmsim.Machine,
) -> None:
    p = m.spawn()
    r = p.mmap(4 * MB2, PROT_READ, ANON)  # a reservation never touched: no page tables
    c = (r + MB2 - 1) & ~(MB2 - 1)
    # A VMA that starts 1 MiB into an aligned chunk and runs 3 MiB.
    b = p.mmap(3 * MB2 // 2, RW, ANON | hmmsim.MAP_FIXED, addr=c + MB2 // 2)
    p.write(b, b"edge")
    (e,) = p.pagemap(b, 1)
    assert (e.kind, e.order) == ("anon", 0)
    assert p.pagemap(c, 1)[0].kind == "none"
    p.write(c + MB2, b"full")  # the next chunk lies inside the VMA: a THP
    assert p.pagemap(c + MB2, 1)[0].order == 9
    verify_machine(m)


def test_mremap_move_to_pmd_multiple_is_placed_top_down(m: hmmsim.Machine) -> None:
    p = m.spawn()
    a = p.mmap(4 * PAGE, RW, ANON)
    p.write(a, b"top")
    p.mmap(PAGE, PROT_READ, ANON | hmmsim.MAP_FIXED, addr=a + 4 * PAGE)  # no growing in place
    b = p.mremap(a, 4 * PAGE, 2 * MB2, MREMAP_MAYMOVE)
    # No hint: a PMD-aligned range from the top of the mmap area, as a fresh
    # mmap of the same size would get, not the lowest aligned address.
    assert b % MB2 == 0
    assert b > 1 << 46
    assert p.read(b, 3) == b"top"
    verify_machine(m)


class _FaultingFile:
    """A device file whose vm_ops.fault inserts a pfn, or fails with SIGBUS."""

    def __init__(self, machine: hmmsim.Machine, fail: bool) -> None:
        self.pfn = int(machine.phys.alloc_one(0))
        machine.phys.write(self.pfn, 0, b"dev")
        self.fail = fail
        self.calls = 0

    def mmap(self, vma):  # type: ignore[no-untyped-def]
        from hmmsim.mm.vma import VM_IO, VM_PFNMAP

        if not self.fail:
            vma.flags |= VM_IO | VM_PFNMAP  # what a pfn-inserting driver sets up
        vma.vm_ops = self

    def fault(self, vma, addr, write):  # type: ignore[no-untyped-def]
        from hmmsim.mm.fault import VM_FAULT_NOPAGE, VM_FAULT_SIGBUS
        from hmmsim.mm.pfnmap import vmf_insert_pfn

        self.calls += 1
        if self.fail:
            return VM_FAULT_SIGBUS
        vmf_insert_pfn(vma, addr, self.pfn)
        return VM_FAULT_NOPAGE


def test_vm_ops_fault_failure_is_the_access_result_at_once(m: hmmsim.Machine) -> None:
    p = m.spawn()
    bad = _FaultingFile(m, fail=True)
    b = p.mmap(PAGE, PROT_READ, MAP_SHARED, file=bad)
    with pytest.raises(hmmsim.BusError, match="SIGBUS"):
        p.read(b, 1)
    assert bad.calls == 1  # the fault handler's answer, not a retry loop
    assert p.pagemap(b, 1)[0].kind == "none"
