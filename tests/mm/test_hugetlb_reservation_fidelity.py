"""Hugetlb reservation fidelity: MAP_FIXED over old mappings, fork and COW.

Each expected outcome was checked on the host (Linux 6.18, 2 MiB pages) by a
forked child that held all but N of the pool's available pages in a reserved,
never-touched mapping of its own, so that exactly N were available
(``HugePages_Free - HugePages_Rsvd`` in /proc/meminfo) when the tested call
ran. The model's pool is sized so that the same N are available.
"""

from __future__ import annotations

import errno

import hmmsim
import pytest
from helpers import ANON, MB2, RW
from hmmsim import MAP_FIXED, MAP_HUGETLB, MAP_NORESERVE, MAP_POPULATE, MAP_SHARED
from hmmsim.mm.debug import verify_machine

HUGE = MAP_HUGETLB | hmmsim.MAP_HUGE_2MB
PRIVATE_HUGE = ANON | HUGE
SHARED_HUGE = (ANON & ~hmmsim.MAP_PRIVATE) | MAP_SHARED | HUGE
A = 0x5B0000000000


def _machine(make_machine, pages: int) -> hmmsim.Machine:
    return make_machine(hugetlb_pages={MB2: pages})


def _available(m: hmmsim.Machine) -> int:
    pool = m.hugetlb_pool(MB2)
    return pool.nr_free - pool.reserved


def _vmas(p: hmmsim.Process, lo: int, hi: int) -> list[tuple[int, int, bool]]:
    return [(v.start, v.end, v.is_shared) for v in p.mm.vmas.intersecting(lo, hi)]


@pytest.mark.parametrize("populated", [True, False])
def test_map_fixed_hugetlb_over_a_private_hugetlb_mapping_reuses_its_page(make_machine, populated):
    """Host: the old private mapping's page (or its reservation) is given back
    before the new mapping reserves: with 0 pages available, a 1-page MAP_FIXED
    private hugetlb mmap over a 1-page private hugetlb mapping succeeds, and
    0 are available after."""
    m = _machine(make_machine, 1)
    p = m.spawn()
    flags = PRIVATE_HUGE | (MAP_POPULATE if populated else 0)
    assert p.mmap(MB2, RW, flags | hmmsim.MAP_FIXED_NOREPLACE, addr=A) == A
    assert _available(m) == 0
    assert p.mmap(MB2, RW, PRIVATE_HUGE | MAP_FIXED, addr=A) == A
    assert _vmas(p, A, A + MB2) == [(A, A + MB2, False)]
    assert _available(m) == 0
    p.write(A, b"new")  # the new mapping's reservation is there to consume
    assert p.read(A, 3) == b"new"
    verify_machine(m)


def test_failed_map_fixed_hugetlb_leaves_the_old_range_unmapped(make_machine):
    """Host: with 0 pages available, a 2-page MAP_FIXED private hugetlb mmap over
    a populated 1-page private hugetlb mapping fails with ENOMEM after the old
    mapping was unmapped: no VMA is left in the range and 1 page is available
    (the old mapping's, freed)."""
    m = _machine(make_machine, 1)
    p = m.spawn()
    p.mmap(MB2, RW, PRIVATE_HUGE | MAP_POPULATE | hmmsim.MAP_FIXED_NOREPLACE, addr=A)
    with pytest.raises(hmmsim.OutOfMemory) as exc:
        p.mmap(2 * MB2, RW, PRIVATE_HUGE | MAP_FIXED, addr=A)
    assert exc.value.errno == errno.ENOMEM
    assert _vmas(p, A, A + 2 * MB2) == []
    assert _available(m) == 1
    verify_machine(m)


def test_failed_hugetlb_map_fixed_over_anonymous_memory_leaves_a_hole(make_machine):
    """Host: with 0 hugetlb pages available, a MAP_FIXED private hugetlb mmap
    over private anonymous memory fails with ENOMEM and leaves no VMA there."""
    m = _machine(make_machine, 0)
    p = m.spawn()
    p.mmap(MB2, RW, ANON | hmmsim.MAP_FIXED_NOREPLACE, addr=A)
    p.write(A, b"old")
    with pytest.raises(hmmsim.OutOfMemory):
        p.mmap(MB2, RW, PRIVATE_HUGE | MAP_FIXED, addr=A)
    assert _vmas(p, A, A + MB2) == []
    with pytest.raises(hmmsim.SegmentationFault):
        p.read(A, 1)
    verify_machine(m)


@pytest.mark.parametrize("new_flags", [SHARED_HUGE, PRIVATE_HUGE], ids=["shared", "private"])
def test_map_fixed_hugetlb_over_shared_hugetlb_still_counts_its_pages(make_machine, new_flags):
    """Host: the page of an old shared hugetlb mapping stays in its hugetlbfs
    object until the mmap drops the file, after the new reservation: with 0
    available, a 1-page MAP_FIXED hugetlb mmap (shared or private) over a
    populated 1-page shared one fails with ENOMEM, leaves no VMA, and 1 page
    is available after (the object's, freed with it)."""
    m = _machine(make_machine, 1)
    p = m.spawn()
    p.mmap(MB2, RW, SHARED_HUGE | MAP_POPULATE | hmmsim.MAP_FIXED_NOREPLACE, addr=A)
    files = len(m.files)
    with pytest.raises(hmmsim.OutOfMemory):
        p.mmap(MB2, RW, new_flags | MAP_FIXED, addr=A)
    assert _vmas(p, A, A + MB2) == []
    assert _available(m) == 1
    assert len(m.files) == files - 1  # the old object is gone, no new one was made
    verify_machine(m)


def test_map_fixed_shared_hugetlb_over_a_private_one_reuses_its_page(make_machine):
    """Host: with 0 available, a 1-page MAP_FIXED shared hugetlb mmap over a
    populated 1-page private hugetlb mapping succeeds; 0 are available after."""
    m = _machine(make_machine, 1)
    p = m.spawn()
    p.mmap(MB2, RW, PRIVATE_HUGE | MAP_POPULATE | hmmsim.MAP_FIXED_NOREPLACE, addr=A)
    assert p.mmap(MB2, RW, SHARED_HUGE | MAP_FIXED, addr=A) == A
    assert _vmas(p, A, A + MB2) == [(A, A + MB2, True)]
    assert _available(m) == 0
    verify_machine(m)


def test_owner_cow_without_a_free_page_takes_the_page_back_from_the_fork_child(make_machine):
    """Host: a 2-page private hugetlb mapping, page 0 written, then fork; with 0
    pages available (page 1's reservation is the owner's) the owner's write to
    page 0 succeeds in place and the child's page 0 is no longer present. The
    child then gets SIGBUS reading page 0, and also reading page 1 after 1 page
    became available again; a process forked from the child after that reads
    page 0 (a new page) without a fault."""
    m = _machine(make_machine, 3)
    parent = m.spawn()
    parent.mmap(2 * MB2, RW, PRIVATE_HUGE | hmmsim.MAP_FIXED_NOREPLACE, addr=A)
    hold = parent.mmap(MB2, RW, PRIVATE_HUGE)  # the host's squeeze: holds the third page
    parent.write(A, b"owner")
    pfn = parent.pagemap(A, 1)[0].pfn
    child = parent.fork()
    assert _available(m) == 0
    parent.write(A, b"again")
    assert parent.pagemap(A, 1)[0].pfn == pfn and parent.pagemap(A, 1)[0].writable
    assert not child.pagemap(A, 1)[0].present
    assert m.phys.mapcount[pfn] == 1
    parent.munmap(hold, MB2)
    assert _available(m) == 1
    grandchild = child.fork()
    for addr in (A + MB2, A):
        with pytest.raises(hmmsim.BusError):
            child.read(addr, 1)  # a page is available: the mark alone refuses
    assert _available(m) == 1
    assert grandchild.read(A, 5) == b"\0" * 5
    assert parent.read(A, 5) == b"again"
    verify_machine(m)


def test_fork_child_cow_without_a_free_page_gets_sigbus(make_machine):
    """Host: a 1-page private hugetlb mapping written, then fork; with 0 pages
    available the child's write gets SIGBUS (it owns no reservation) and the
    parent keeps its page."""
    m = _machine(make_machine, 1)
    parent = m.spawn()
    parent.mmap(MB2, RW, PRIVATE_HUGE | hmmsim.MAP_FIXED_NOREPLACE, addr=A)
    parent.write(A, b"owner")
    child = parent.fork()
    with pytest.raises(hmmsim.BusError):
        child.write(A, b"child")
    assert parent.read(A, 5) == b"owner" and child.read(A, 5) == b"owner"
    verify_machine(m)


def test_noreserve_private_hugetlb_is_no_owner_and_gets_sigbus_on_cow(make_machine):
    """Host: a 1-page MAP_NORESERVE private hugetlb mapping written, then fork;
    with 0 pages available the parent's write gets SIGBUS (no reservation, so
    no right to take the page back) and the child's page stays mapped."""
    m = _machine(make_machine, 1)
    parent = m.spawn()
    parent.mmap(MB2, RW, PRIVATE_HUGE | MAP_NORESERVE | hmmsim.MAP_FIXED_NOREPLACE, addr=A)
    parent.write(A, b"owner")
    child = parent.fork()
    assert _available(m) == 0
    with pytest.raises(hmmsim.BusError):
        parent.write(A, b"again")
    assert child.pagemap(A, 1)[0].present
    assert child.read(A, 5) == b"owner"
    verify_machine(m)


def _counts(m: hmmsim.Machine) -> tuple[int, int]:
    pool = m.hugetlb_pool(MB2)
    return pool.nr_free, pool.reserved


def test_madv_dontneed_gives_the_owner_its_reservation_back(make_machine):
    """Host (HugePages_Free, HugePages_Rsvd relative to before the mapping, 2
    pages free): populate a 2-page private mapping (-2, 0); MADV_DONTNEED of
    page 0 (-1, +1: the page is free but reserved again for the owner); fork;
    MADV_DONTNEED of page 1, which the child still maps (-1, +1: nothing
    changes yet); the owner reads page 1 again (-2, 0: it consumes the
    reservation); the child exits, freeing the old page 1 (-1, +1: its
    reservation comes back with it); munmap (0, 0)."""
    m = _machine(make_machine, 2)
    p = m.spawn()
    p.mmap(2 * MB2, RW, PRIVATE_HUGE | MAP_POPULATE | hmmsim.MAP_FIXED_NOREPLACE, addr=A)
    assert _counts(m) == (0, 0)
    p.madvise(A, MB2, hmmsim.MADV_DONTNEED)
    assert _counts(m) == (1, 1)
    child = p.fork()
    p.madvise(A + MB2, MB2, hmmsim.MADV_DONTNEED)
    assert _counts(m) == (1, 1)
    assert p.read(A + MB2, 1) == b"\0"
    assert _counts(m) == (0, 0)
    child.exit()
    assert _counts(m) == (1, 1)
    p.munmap(A, 2 * MB2)
    assert _counts(m) == (2, 0)
    verify_machine(m)


def test_owner_exit_gives_up_the_reservations_of_pages_its_fork_child_still_maps(make_machine):
    """Host (HugePages_Free, HugePages_Rsvd relative to before the mapping, 2
    pages free): populate a 2-page private mapping (-2, 0) and fork; when the
    owner exits, the child still maps both pages (-2, -2: 2 pages available
    again, while still in use); the child then writes both pages in place and
    exits (0, 0)."""
    m = _machine(make_machine, 2)
    owner = m.spawn()
    owner.mmap(2 * MB2, RW, PRIVATE_HUGE | MAP_POPULATE | hmmsim.MAP_FIXED_NOREPLACE, addr=A)
    child = owner.fork()
    pfns = [child.pagemap(A + i * MB2, 1)[0].pfn for i in range(2)]
    owner.exit()
    assert _counts(m) == (0, -2) and _available(m) == 2
    child.write(A, b"x" * (2 * MB2))
    assert [child.pagemap(A + i * MB2, 1)[0].pfn for i in range(2)] == pfns
    child.exit()
    assert _counts(m) == (2, 0)
    verify_machine(m)


def test_mremap_of_part_of_a_private_hugetlb_mapping_moves_the_reservation_map_away(
    make_machine,
):
    """Host: a never-touched 2-page read-only private hugetlb mapping; with 0
    pages available, mremap(MAYMOVE|FIXED) of its first page elsewhere
    succeeds; the moved page faults in from the reservation, but the page
    left behind gets SIGBUS (its VMA lost the reservation map). After the
    process exits, HugePages_Rsvd stays one higher than before the mapping:
    the left page's reservation is never given back."""
    m = _machine(make_machine, 2)
    p = m.spawn()
    ro = hmmsim.PROT_READ
    p.mmap(2 * MB2, ro, PRIVATE_HUGE | hmmsim.MAP_FIXED_NOREPLACE, addr=A + 2 * MB2)
    assert _available(m) == 0
    flags = hmmsim.MREMAP_MAYMOVE | hmmsim.MREMAP_FIXED
    assert p.mremap(A + 2 * MB2, MB2, MB2, flags, A) == A
    assert _vmas(p, A, A + 4 * MB2) == [(A, A + MB2, False), (A + 3 * MB2, A + 4 * MB2, False)]
    assert p.read(A + 0xAC000, 1) == b"\0"
    with pytest.raises(hmmsim.BusError):
        p.read(A + 3 * MB2, 1)
    assert _counts(m) == (1, 1)
    p.exit()
    assert _counts(m) == (2, 1)
    verify_machine(m)
