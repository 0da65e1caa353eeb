"""Behaviours a sampled mutation run found unobserved: fault-around skipping
a locked page-cache folio, THP only for a fault whose aligned 2 MiB chunk
lies inside the VMA, and anon_vma reuse between VMAs that could merge
(``find_mergeable_anon_vma``), which decides whether they merge later.

The window, THP alignment and merge outcomes were checked on the host
(Linux 6.18) with ctypes: /proc/self/pagemap, /proc/kpageflags (KPF_THP)
and /proc/self/maps give the same outcomes as asserted here.
"""

from __future__ import annotations

from collections import Counter

import hmmsim
import pytest
from helpers import PAGE, RW
from hmmsim import (
    MADV_DONTNEED,
    MADV_PAGEOUT,
    MADV_REMOVE,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    MAP_SHARED,
    PROT_EXEC,
)
from hmmsim.gup import FOLL_WRITE, get_user_pages, put_page
from hmmsim.mm.debug import verify_machine

MB2 = 2 << 20
ANON = MAP_PRIVATE | MAP_ANONYMOUS
BASE = 0x4000_0000


def _vmas(p: hmmsim.Process, a: int, npages: int) -> list[tuple[int, int]]:
    """The VMAs over [a, +npages) as (first page, end page) relative to ``a``."""
    end = a + npages * PAGE
    return [
        ((v.start - a) // PAGE, (v.end - a) // PAGE)
        for v in p.mm.vmas
        if v.end > a and v.start < end
    ]


# ----- fault-around -------------------------------------------------------------


def test_fault_around_maps_cached_window_but_not_a_hole(proc: hmmsim.Process) -> None:
    """Host: a read at page 1 of a shmem mapping 3 pages into a 64 KiB window
    maps pages 0..15 but the one punched out of the cache (MADV_REMOVE)."""
    b = BASE + 3 * PAGE
    a = proc.mmap(64 * PAGE, RW, MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED, addr=b)
    proc.write(a, b"\x05" * (64 * PAGE))
    proc.madvise(a, 64 * PAGE, MADV_DONTNEED)
    proc.madvise(a + 5 * PAGE, PAGE, MADV_REMOVE)
    assert proc.read(a + PAGE, 1) == b"\x05"
    assert [i for i, e in enumerate(proc.pagemap(a, 64)) if e.present] == [
        0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
    ]  # fmt: skip


def test_fault_around_skips_a_locked_folio(machine: hmmsim.Machine) -> None:
    """``filemap_map_pages`` only maps folios it can trylock: a page-cache
    folio someone holds locked (under I/O, being migrated) stays unmapped in
    the window, and is mapped by its own fault once it is unlocked."""
    p = machine.spawn()
    a = p.mmap(32 * PAGE, RW, MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED, addr=BASE)
    p.write(a, bytes(range(32)) * (32 * PAGE // 32))
    pfns = [e.pfn for e in p.pagemap(a, 32)]
    p.madvise(a, 32 * PAGE, MADV_DONTNEED)
    phys = machine.phys
    mapcounts = [int(phys.mapcount[x]) for x in pfns]
    assert mapcounts == [0] * 32
    assert phys.folio_trylock(pfns[6])
    assert p.read(a + 2 * PAGE, 1) == b"\x00"
    present = [i for i, e in enumerate(p.pagemap(a, 32)) if e.present]
    assert present == [i for i in range(16) if i != 6]
    assert [int(phys.mapcount[x]) for x in pfns[:16]] == [int(i != 6) for i in range(16)]
    assert [e.pfn for e in p.pagemap(a, 16) if e.present] == [
        x for i, x in enumerate(pfns[:16]) if i != 6
    ]
    assert not p.pagemap(a + 16 * PAGE, 1)[0].present  # the window ends at 64 KiB
    phys.folio_unlock(pfns[6])
    assert p.read(a + 6 * PAGE, 4) == bytes(range(4))
    e6 = p.pagemap(a + 6 * PAGE, 1)[0]
    assert (e6.present, e6.pfn) == (True, pfns[6])
    verify_machine(machine)


# ----- THP suitability ----------------------------------------------------------


@pytest.fixture
def thp_machine() -> hmmsim.Machine:
    return hmmsim.Machine(
        hmmsim.MachineConfig(ram_bytes=64 << 20, swap_bytes=16 << 20, thp="always")
    )


def test_fault_whose_chunk_crosses_the_vma_start_maps_a_small_page(
    thp_machine: hmmsim.Machine,
) -> None:
    """``thp_vma_suitable_order``: the aligned 2 MiB around the fault must lie
    in the VMA. A fault (here through GUP, which goes to ``handle_mm_fault``
    page by page) in a chunk that starts one page before the VMA gets a 4 KiB
    page; a fault in the next chunk, wholly inside, gets a THP. Host: the same
    with MADV_HUGEPAGE (KPF_THP clear, then set)."""
    m = thp_machine
    p = m.spawn()
    base = BASE + 4 * MB2  # 2 MiB aligned
    a = p.mmap(2 * MB2 - PAGE, RW, ANON | MAP_FIXED, addr=base + PAGE)
    with p.mm.mmap_lock.read():
        (small,) = get_user_pages(p.mm, base + 2 * PAGE, 1, FOLL_WRITE)
        (huge,) = get_user_pages(p.mm, base + MB2 + PAGE, 1, FOLL_WRITE)
    first = p.pagemap(a, 3)
    assert [(e.kind, e.order) for e in first] == [("none", 0), ("anon", 0), ("none", 0)]
    assert first[1].pfn == small
    second = p.pagemap(base + MB2, 512)
    assert {(e.kind, e.order) for e in second} == {("anon", 9)}
    assert second[1].pfn == huge and second[0].pfn == huge - 1
    assert int(m.phys.order[small]) == 0
    for pfn in (small, huge):
        put_page(m, pfn)
    verify_machine(m)


def test_fault_whose_chunk_crosses_the_vma_end_maps_a_small_page(
    thp_machine: hmmsim.Machine,
) -> None:
    m = thp_machine
    p = m.spawn()
    base = BASE + 8 * MB2
    a = p.mmap(MB2 + PAGE, RW, ANON | MAP_FIXED, addr=base)
    with p.mm.mmap_lock.read():
        (small,) = get_user_pages(p.mm, base + MB2, 1, FOLL_WRITE)
    assert [(e.kind, e.order) for e in p.pagemap(base + MB2, 1)] == [("anon", 0)]
    assert p.pagemap(a, 1)[0].kind == "none"
    put_page(m, small)
    verify_machine(m)


# ----- anon_vma reuse and merging -----------------------------------------------


@pytest.fixture
def swap_machine() -> hmmsim.Machine:
    return hmmsim.Machine(hmmsim.MachineConfig(ram_bytes=64 << 20, swap_bytes=16 << 20))


def test_adjacent_vma_reuses_the_neighbours_anon_vma_so_they_merge_later(
    swap_machine: hmmsim.Machine,
) -> None:
    """Two adjacent VMAs that differ only in VM_EXEC: the second to fault
    reuses the first's anon_vma, so once mprotect makes them equal they merge
    into one VMA, and reclaim's rmap walk still finds both pages. Host: one
    rw-p VMA."""
    machine = swap_machine
    p = machine.spawn()
    a = p.mmap(2 * PAGE, RW, ANON | MAP_FIXED, addr=BASE)
    p.mprotect(a + PAGE, PAGE, RW | PROT_EXEC)
    assert _vmas(p, a, 2) == [(0, 1), (1, 2)]
    p.write(a + PAGE, b"B")
    p.write(a, b"A")
    v0, v1 = p.mm.vmas.find(a), p.mm.vmas.find(a + PAGE)
    assert v0.anon_vma is v1.anon_vma
    assert len(v0.anon_chain) == len(v1.anon_chain) == 1
    p.mprotect(a + PAGE, PAGE, RW)
    assert _vmas(p, a, 2) == [(0, 2)]
    p.madvise(a, 2 * PAGE, MADV_PAGEOUT)
    assert Counter(e.kind for e in p.pagemap(a, 2)) == {"swap": 2}
    assert p.read(a, 1) + p.read(a + PAGE, 1) == b"AB"
    verify_machine(machine)


def test_no_anon_vma_reuse_across_a_gap(swap_machine: hmmsim.Machine) -> None:
    """VMAs with a hole between them cannot merge, so the second to fault
    gets an anon_vma of its own; filling the hole later joins the new VMA to
    one side only. Without faults (no anon_vma) the fill joins all three.
    Host: [0, 2) and [2, 3); without faults [0, 3)."""
    machine = swap_machine
    p = machine.spawn()
    a = p.mmap(3 * PAGE, RW, ANON | MAP_FIXED, addr=BASE)
    p.munmap(a + PAGE, PAGE)
    p.write(a + 2 * PAGE, b"C")
    p.write(a, b"A")
    assert p.mm.vmas.find(a).anon_vma is not p.mm.vmas.find(a + 2 * PAGE).anon_vma
    assert p.mmap(PAGE, RW, ANON | MAP_FIXED, addr=a + PAGE) == a + PAGE
    assert _vmas(p, a, 3) == [(0, 2), (2, 3)]
    c = BASE + 0x10_0000
    p.mmap(3 * PAGE, RW, ANON | MAP_FIXED, addr=c)
    p.munmap(c + PAGE, PAGE)
    p.mmap(PAGE, RW, ANON | MAP_FIXED, addr=c + PAGE)
    assert _vmas(p, c, 3) == [(0, 3)]
    p.madvise(a, 3 * PAGE, MADV_PAGEOUT)
    assert [e.kind for e in p.pagemap(a, 3)] == ["swap", "none", "swap"]
    assert p.read(a, 1) + p.read(a + 2 * PAGE, 1) == b"AC"
    verify_machine(machine)


def test_neighbour_moved_by_mremap_is_not_reused_so_they_never_merge(
    machine: hmmsim.Machine,
) -> None:
    """``anon_vma_compatible`` also wants the page offsets to follow on: a
    VMA's anon pgoff is where it was created, so one moved next to another by
    mremap does not share its anon_vma and the two never merge. Host: two
    rw-p VMAs after the mprotect."""
    p = machine.spawn()
    a = p.mmap(2 * PAGE, RW, ANON | MAP_FIXED, addr=BASE)
    p.munmap(a + PAGE, PAGE)
    far = p.mmap(PAGE, RW | PROT_EXEC, ANON | MAP_FIXED, addr=BASE + 0x20_0000)
    p.write(far, b"F")
    p.mremap(far, PAGE, PAGE, hmmsim.MREMAP_MAYMOVE | hmmsim.MREMAP_FIXED, a + PAGE)
    p.write(a, b"A")
    v0, v1 = p.mm.vmas.find(a), p.mm.vmas.find(a + PAGE)
    assert v0.anon_vma is not v1.anon_vma
    p.mprotect(a + PAGE, PAGE, RW)
    assert _vmas(p, a, 2) == [(0, 1), (1, 2)]
    assert p.read(a, 1) + p.read(a + PAGE, 1) == b"AF"
    verify_machine(machine)
