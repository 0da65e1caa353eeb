"""fork(2) fidelity: large populated address spaces, ENOMEM teardown, anon_vma
lifetime and reuse, the huge zero page.

Expected outcomes were checked against the host kernel (Linux 6.18) with
forked children reading /proc/self/pagemap where the model's behaviour is
observable there.
"""

from __future__ import annotations

import errno

import hmmsim
import numpy as np
import pytest
from helpers import ANON, MB2, PAGE, RW
from hmmsim import MAP_POPULATE, MachineConfig
from hmmsim.mm.debug import verify_machine
from hmmsim.mm.pagetable import KIND_PRESENT, PTE_WRITE, U64
from hmmsim.mm.physmem import PG_anon_exclusive
from hmmsim.mm.rmap import AnonVma

MIB = 1 << 20


def _big_machine(ram: int, **kw: object) -> hmmsim.Machine:
    kw.setdefault("thp", "never")
    return hmmsim.Machine(MachineConfig(ram_bytes=ram, **kw))  # type: ignore[arg-type]


def _present(p: hmmsim.Process, addr: int, npages: int) -> tuple[np.ndarray, np.ndarray]:
    walk = p.mm.pt.walk(addr // PAGE, npages)
    return walk.pfns(), walk.entries


def _check_shared_cow(m: hmmsim.Machine, p: hmmsim.Process, c: hmmsim.Process, a: int, n: int):
    ppfn, pent = _present(p, a, n)
    cpfn, cent = _present(c, a, n)
    phys = m.phys
    assert (np.asarray(p.mm.pt.walk(a // PAGE, n).kinds) == KIND_PRESENT).all()
    assert (np.asarray(c.mm.pt.walk(a // PAGE, n).kinds) == KIND_PRESENT).all()
    assert np.array_equal(ppfn, cpfn)
    assert len(np.unique(ppfn)) == n
    assert not ((pent | cent) & U64(PTE_WRITE)).any()
    assert (phys.mapcount[ppfn] == 2).all()
    assert (phys.refcount[ppfn] == 2).all()
    assert not (phys.flags[ppfn] & PG_anon_exclusive).any()


@pytest.mark.parametrize("mib", [32, 256])
def test_fork_of_32mib_or_more_populated_shares_every_page(mib):
    size = mib * MIB
    m = _big_machine(2 * size + 64 * MIB)
    p = m.spawn()
    a = p.mmap(size, RW, ANON | MAP_POPULATE)
    n = size // PAGE
    for off in (0, size // 2, size - PAGE):
        p.write(a + off, f"page at {off:#x}".encode())
    c = p.fork()
    _check_shared_cow(m, p, c, a, n)
    free_before = m.phys.allocator.nr_free
    for off in (0, size // 2, size - PAGE):
        text = f"page at {off:#x}".encode()
        assert c.read(a + off, len(text)) == text
    c.write(a + size // 2, b"child")
    assert p.read(a + size // 2, 5) == b"page "
    assert c.read(a + size // 2, 5) == b"child"
    assert m.phys.allocator.nr_free == free_before - 1
    c.exit()
    ppfn, _ = _present(p, a, n)
    assert (m.phys.mapcount[ppfn] == 1).all()
    if mib <= 32:
        verify_machine(m)


def test_fork_of_1gib_populated_shares_every_page():
    size = 1 << 30
    m = _big_machine(2 * size + 64 * MIB)
    p = m.spawn()
    a = p.mmap(size, RW, ANON | MAP_POPULATE)
    p.write(a + size - PAGE, b"last")
    c = p.fork()
    _check_shared_cow(m, p, c, a, size // PAGE)
    assert c.read(a + size - PAGE, 4) == b"last"


def test_fork_copies_only_the_vma_share_of_a_page_table_shared_with_neighbours(proc, machine):
    # Three VMAs inside one 2 MiB chunk: one PTE table holds all of them.
    base = proc.mmap(MB2 * 2, RW, ANON)
    base = (base + MB2 - 1) & ~(MB2 - 1)
    proc.munmap(base + 4 * PAGE, PAGE)
    proc.munmap(base + 9 * PAGE, PAGE)
    proc.mprotect(base + 5 * PAGE, 4 * PAGE, hmmsim.PROT_READ | hmmsim.PROT_WRITE)
    for i in (0, 3, 5, 8, 10, 11):
        proc.write(base + i * PAGE, bytes([i + 1]))
    child = proc.fork()
    for i in (0, 3, 5, 8, 10, 11):
        assert child.read(base + i * PAGE, 1) == bytes([i + 1])
        assert child.pagemap(base + i * PAGE, 1)[0].pfn == proc.pagemap(base + i * PAGE, 1)[0].pfn
    for i in (1, 2, 6, 7, 12):
        assert not child.pagemap(base + i * PAGE, 1)[0].present
    verify_machine(machine)


def test_fork_skips_empty_chunks_without_copying_a_neighbours_ptes():
    # A VMA over three 2 MiB chunks whose middle one has no PTE table: its
    # tables are not consecutive chunks, and the copy of the last one must
    # stop at the VMA's end, not take the neighbour's entries too.
    m = _big_machine(32 * MIB)
    p = m.spawn()
    base = p.mmap(4 * MB2, RW, ANON)
    base = (base + MB2 - 1) & ~(MB2 - 1)
    start, end = base + MB2 - PAGE, base + 2 * MB2 + PAGE
    p.write(start, b"a")
    p.write(end - PAGE, b"b")
    for i in range(8):
        p.write(end + i * PAGE, bytes([i + 1]))
    p.mprotect(end, 8 * PAGE, hmmsim.PROT_READ)  # a neighbour VMA in the last chunk
    c = p.fork()
    verify_machine(m)
    pfns, _ = _present(p, end, 8)
    assert m.phys.mapcount[pfns].tolist() == [2] * 8
    assert c.read(start, 1) == b"a" and c.read(end - PAGE, 1) == b"b"
    assert [c.read(end + i * PAGE, 1)[0] for i in range(8)] == list(range(1, 9))


def _state(m: hmmsim.Machine, p: hmmsim.Process, a: int, n: int):
    pfns, entries = _present(p, a, n)
    return (
        pfns.tolist(),
        ((entries & U64(PTE_WRITE)) != 0).tolist(),
        m.phys.mapcount[pfns].tolist(),
        m.phys.refcount[pfns].tolist(),
        ((m.phys.flags[pfns] & PG_anon_exclusive) != 0).tolist(),
    )


def test_fork_enomem_copying_a_pinned_page_leaves_no_child_and_no_leak(make_machine):
    from hmmsim.gup import FOLL_WRITE, pin_user_pages, unpin_user_page

    m = make_machine()
    p = m.spawn()
    a = p.mmap(11 * PAGE, RW, ANON | MAP_POPULATE)
    p.munmap(a + 4 * PAGE, PAGE)  # two VMAs: a (4 pages), then b (6 pages)
    b = a + 5 * PAGE
    for i in range(4):
        p.write(a + i * PAGE, b"a%d" % i)
    for i in range(6):
        p.write(b + i * PAGE, b"b%d" % i)
    with p.mm.mmap_lock.read():
        pinned = [pin_user_pages(p.mm, b + i * PAGE, 1, FOLL_WRITE)[0] for i in (1, 3)]
    before_a, before_b = _state(m, p, a, 4), _state(m, p, b, 6)
    hog = m.phys.alloc(0, m.phys.allocator.nr_free - 1)  # one frame left: one copy only
    free = m.phys.allocator.nr_free
    procs = list(m.processes)
    with pytest.raises(hmmsim.OutOfMemory) as exc:
        p.fork()
    assert exc.value.errno == errno.ENOMEM
    assert m.processes == procs
    assert m.phys.allocator.nr_free == free
    after_a, after_b = _state(m, p, a, 4), _state(m, p, b, 6)
    # No frame moved and every count is back. What the copy had reached stays
    # write-protected and non-exclusive in the parent, as in Linux: all of a;
    # in b page 0 (shared), page 1 (copied: the parent's is untouched), page 2
    # (shared); page 3 failed, and it and what follows were never reached.
    for before, after in ((before_a, after_a), (before_b, after_b)):
        assert after[0] == before[0] and after[2] == before[2] and after[3] == before[3]
    assert after_a[1] == [False] * 4 and after_a[4] == [False] * 4
    assert after_b[1] == [False, True, False, True, True, True]
    assert after_b[4] == [False, True, False, True, True, True]
    # The parent's write-protected pages are mapped once again: reused on write.
    p.write(b, b"again")
    p.write(a + 3 * PAGE, b"again")
    assert p.pagemap(b, 1)[0].pfn == before_b[0][0]
    assert p.pagemap(a + 3 * PAGE, 1)[0].pfn == before_a[0][3]
    assert m.phys.allocator.nr_free == free
    m.phys.put(hog)
    verify_machine(m)
    child = p.fork()  # memory again: the pinned pages are copied
    assert child.read(b + 3 * PAGE, 2) == b"b3"
    assert child.pagemap(b + 3 * PAGE, 1)[0].pfn != pinned[1]
    for pfn in pinned:
        unpin_user_page(m, pfn)
    verify_machine(m)


def _anon_vmas(m: hmmsim.Machine) -> list[AnonVma]:
    return [x for x in m.mappings.values() if isinstance(x, AnonVma)]


def test_anon_vma_is_freed_with_its_last_user(make_machine):
    m = make_machine()
    p = m.spawn()
    a = p.mmap(4 * PAGE, RW, ANON)
    p.write(a, b"root")
    root = p.mm.vmas.find(a).anon_vma
    c = p.fork()
    own = c.mm.vmas.find(a).anon_vma
    assert own is not root and own.parent is root and own.root is root
    assert {x.id for x in _anon_vmas(m)} == {root.id, own.id}
    c.write(a + PAGE, b"child page")
    c.exit()
    assert {x.id for x in _anon_vmas(m)} == {root.id}
    assert root.num_children == 1 and root.refcount == 1  # only the self-parent link
    p.munmap(a, 4 * PAGE)
    assert _anon_vmas(m) == []
    verify_machine(m)


def test_anon_vma_root_outlives_its_first_process_while_descendants_live(make_machine):
    m = make_machine()
    p = m.spawn()
    a = p.mmap(PAGE, RW, ANON)
    p.write(a, b"gen0")
    root = p.mm.vmas.find(a).anon_vma
    c = p.fork()
    p.exit()
    assert root.id in m.mappings  # c's VMA still links to it and maps its page
    assert c.read(a, 4) == b"gen0"
    c.exit()
    assert _anon_vmas(m) == []


def test_fork_exit_generations_keep_the_anon_vma_hierarchy_bounded(make_machine):
    m = make_machine(swap_bytes=16 << 20)
    p = m.spawn()
    n = 8
    a = p.mmap(n * PAGE, RW, ANON)
    for i in range(n):
        p.write(a + i * PAGE, b"gen0 page %d" % i)
    longest = 0
    for gen in range(1, 60):
        child = p.fork()
        # The child writes a page of its own (a COW copy in its anon_vma).
        child.write(a + (gen % n) * PAGE, b"gen%d page %d" % (gen, gen % n))
        p.exit()
        p = child
        longest = max(longest, len(p.mm.vmas.find(a).anon_chain))
        assert len(_anon_vmas(m)) <= 3
    assert longest <= 3
    for i in range(n):
        text = p.read(a + i * PAGE, 16).split(b"\0")[0]
        assert text.endswith(b"page %d" % i)
    verify_machine(m)


def test_rmap_finds_every_mapping_across_reused_anon_vmas(make_machine):
    m = make_machine(swap_bytes=16 << 20)
    p = m.spawn()
    a = p.mmap(4 * PAGE, RW, ANON)
    p.write(a, b"oldest")
    for gen in range(6):  # grow and reuse levels of the hierarchy
        c = p.fork()
        c.write(a + PAGE, b"gen %d" % gen)
        p.exit()
        p = c
    sibling = p.fork()  # shares both the oldest page and the newest one
    for addr in (a, a + PAGE):
        pfn = p.pagemap(addr, 1)[0].pfn
        assert sibling.pagemap(addr, 1)[0].pfn == pfn
        assert p.move_pages(addr, 1) == [0]  # migration: every mapping follows
        new = p.pagemap(addr, 1)[0].pfn
        assert new != pfn and sibling.pagemap(addr, 1)[0].pfn == new
    assert m.reclaim(2 * PAGE) == 2 * PAGE  # reclaim: every mapping unmapped
    assert p.pagemap(a, 1)[0].swapped and sibling.pagemap(a, 1)[0].swapped
    assert p.read(a, 6) == b"oldest" and sibling.read(a, 6) == b"oldest"
    assert p.read(a + PAGE, 5) == b"gen 5" and sibling.read(a + PAGE, 5) == b"gen 5"
    sibling.write(a, b"COW")
    assert p.read(a, 6) == b"oldest" and sibling.read(a, 6) == b"COWest"
    verify_machine(m)


@pytest.mark.parametrize("populate", [False, True])
def test_fork_copies_a_huge_zero_page_pmd(make_machine, populate):
    # Host kernel: a read fault in a THP-eligible VMA maps the huge zero page
    # (after preparing an anon_vma); a forked child's pagemap shows the same
    # huge zero pfns, present, without faulting.
    m = make_machine(thp="always")
    p = m.spawn()
    if populate:  # MAP_POPULATE of a read-only mapping: read faults
        raw = p.mmap(3 * MB2, hmmsim.PROT_READ, ANON | MAP_POPULATE)
    else:
        raw = p.mmap(3 * MB2, RW, ANON)
    a = (raw + MB2 - 1) & ~(MB2 - 1)
    if not populate:
        assert p.read(a + 5 * PAGE, 4) == bytes(4)
    parent = p.pagemap(a, 2)
    assert parent[0].kind == "zero" and parent[0].order == 9
    c = p.fork()
    faults = m.costs.faults
    child = c.pagemap(a, 2)
    assert [(e.present, e.pfn, e.kind, e.order) for e in child] == [
        (e.present, e.pfn, e.kind, e.order) for e in parent
    ]
    assert m.costs.faults == faults
    if populate:
        c.mprotect(raw, 3 * MB2, RW)
    c.write(a, b"child")  # COW away from the huge zero page in the child only
    assert p.pagemap(a, 1)[0].kind == "zero" and c.read(a, 5) == b"child"
    verify_machine(m)


def test_fork_splits_a_pinned_exclusive_thp_and_copies_its_pages(make_machine):
    from hmmsim.gup import FOLL_WRITE, pin_user_pages, unpin_user_page

    m = make_machine(thp="always")
    p = m.spawn()
    raw = p.mmap(2 * MB2, RW, ANON)
    a = (raw + MB2 - 1) & ~(MB2 - 1)
    p.write(a, b"thp head")
    p.write(a + 300 * PAGE, b"thp tail")
    assert p.pagemap(a, 1)[0].order == 9
    head = p.pagemap(a, 1)[0].pfn
    with p.mm.mmap_lock.read():
        assert pin_user_pages(p.mm, a + 7 * PAGE, 1, FOLL_WRITE) == [head + 7]
    free = m.phys.allocator.nr_free
    c = p.fork()
    # copy_huge_pmd cannot share a maybe-pinned exclusive THP: it splits the
    # PMD in the parent, and copy_pte_range copies every (exclusive) page.
    pe, ce = p.pagemap(a, 512), c.pagemap(a, 512)
    assert [e.pfn for e in pe] == list(range(head, head + 512))
    assert all(e.order == 0 and e.writable for e in pe)
    assert not {e.pfn for e in ce} & set(range(head, head + 512))
    assert all(e.writable and e.present for e in ce)
    assert m.phys.allocator.nr_free == free - 512
    assert c.read(a, 8) == b"thp head" and c.read(a + 300 * PAGE, 8) == b"thp tail"
    p.write(a + 7 * PAGE, b"via pin")
    assert c.read(a + 7 * PAGE, 7) == bytes(7)
    unpin_user_page(m, head + 7)
    verify_machine(m)


def test_fork_pagemap_matches_the_host_kernel(make_machine):
    # Host (Linux 6.18, a forked child reading /proc/self/pagemap): a VMA that
    # only read-faulted the zero page has no anon_vma and is not copied; a
    # shared anonymous mapping is not copied; a written page and a PROT_NONE
    # page are shared, "exclusively mapped" (bit 56) clear on both sides; a
    # write in the parent then moves the parent to a new frame and the child,
    # alone on the old one, reads as exclusively mapped again.
    m = make_machine(thp="never")
    p = m.spawn()
    base = p.mmap(8 * PAGE, RW, ANON)
    p.munmap(base, 2 * PAGE)
    p.munmap(base + 6 * PAGE, 2 * PAGE)
    ro = base + 2 * PAGE
    assert p.read(ro, 1) == b"\0"
    sh = p.mmap(4 * PAGE, RW, hmmsim.MAP_SHARED | hmmsim.MAP_ANONYMOUS)
    p.write(sh, b"s")
    pn = p.mmap(4 * PAGE, RW, ANON)
    p.write(pn, b"p")
    p.mprotect(pn, 4 * PAGE, hmmsim.PROT_NONE)
    w = p.mmap(4 * PAGE, RW, ANON)
    p.write(w, b"w")
    before = {k: p.pagemap(x, 1)[0] for k, x in (("ro", ro), ("sh", sh), ("pn", pn), ("w", w))}
    assert before["ro"].present and before["ro"].kind == "zero"
    assert before["pn"].present and before["pn"].exclusive
    assert before["w"].present and before["w"].exclusive
    c = p.fork()
    child = {k: c.pagemap(x, 1)[0] for k, x in (("ro", ro), ("sh", sh), ("pn", pn), ("w", w))}
    assert not child["ro"].present and not child["sh"].present
    for k in ("pn", "w"):
        assert child[k].present and child[k].pfn == before[k].pfn and not child[k].exclusive
        assert not p.pagemap({"pn": pn, "w": w}[k], 1)[0].exclusive
    p.write(w, b"W")
    after = p.pagemap(w, 1)[0]
    assert after.pfn != before["w"].pfn and after.exclusive
    assert c.pagemap(w, 1)[0].pfn == before["w"].pfn and c.pagemap(w, 1)[0].exclusive
    verify_machine(m)


def test_fork_child_entries_start_old_and_write_protected(proc):
    from hmmsim.mm.pagetable import PTE_YOUNG

    a = proc.mmap(2 * PAGE, RW, ANON)
    proc.write(a, b"young")
    proc.write(a + PAGE, b"young")
    assert proc.mm.pt.lookup(a // PAGE)[1] & PTE_YOUNG
    child = proc.fork()
    for vpn in (a // PAGE, a // PAGE + 1):
        pe, ce = proc.mm.pt.lookup(vpn)[1], child.mm.pt.lookup(vpn)[1]
        assert pe & PTE_YOUNG and not ce & PTE_YOUNG  # copy_present_ptes: pte_mkold
        assert not pe & PTE_WRITE and not ce & PTE_WRITE
        assert pe & ~(PTE_YOUNG) == ce


@pytest.mark.parametrize("pool_left", [1, 0])
def test_fork_copies_a_pinned_private_hugetlb_page_from_the_pool(make_machine, pool_left):
    from hmmsim.gup import FOLL_WRITE, pin_user_pages, unpin_user_page

    m = make_machine(hugetlb_pages={MB2: 2 + pool_left})
    pool = m.hugetlb[9]
    p = m.spawn()
    a = p.mmap(2 * MB2, RW, ANON | hmmsim.MAP_HUGETLB)
    p.write(a, b"first")
    p.write(a + MB2, b"second")
    first, second = p.pagemap(a, 1)[0].pfn, p.pagemap(a + MB2, 1)[0].pfn
    with p.mm.mmap_lock.read():
        assert pin_user_pages(p.mm, a + MB2 + PAGE, 1, FOLL_WRITE) == [second + 1]
    free = pool.nr_free
    procs = list(m.processes)
    if pool_left:
        # copy_hugetlb_page_range: the pinned page is copied for the child from
        # the pool (no reservation); the unpinned one is shared.
        c = p.fork()
        assert c.pagemap(a, 1)[0].pfn == first and not p.pagemap(a, 1)[0].writable
        copy = c.pagemap(a + MB2, 1)[0]
        assert copy.pfn != second and copy.writable and p.pagemap(a + MB2, 1)[0].writable
        assert c.read(a + MB2, 6) == b"second" and pool.nr_free == free - 1
        c.exit()
    else:
        with pytest.raises(hmmsim.OutOfMemory) as exc:
            p.fork()
        assert exc.value.errno == errno.ENOMEM
        assert m.processes == procs and pool.nr_free == free
        assert m.phys.mapcount[first] == 1 and m.phys.refcount[first] == 1
        assert not p.pagemap(a, 1)[0].writable  # reached before the failure: stays so
        assert p.pagemap(a + MB2, 1)[0].writable
    unpin_user_page(m, second + 1)
    verify_machine(m)


def test_vma_without_anon_vma_does_not_merge_into_a_forked_one(machine):
    # Host: a VMA whose anon_vma chain came from a fork (more than one link)
    # is not merged with a neighbour that has no anon_vma (vma_had_uncowed_parents),
    # so that neighbour keeps no anon_vma and is not copied by the next fork.
    p = machine.spawn()
    f = machine.create_shmem(2 * PAGE)
    f.pwrite(0, b"a" * PAGE + b"b" * PAGE)
    a = p.mmap(2 * PAGE, RW, hmmsim.MAP_PRIVATE, file=f)
    b = a + PAGE
    p.mprotect(b, PAGE, hmmsim.PROT_READ)
    p.write(a, b"A")  # a's VMA gets an anon_vma
    c = p.fork()
    assert c.read(b, 1) == b"b"
    c.mprotect(b, PAGE, RW)
    assert [(v.start, v.end) for v in c.mm.vmas] == [(a, b), (b, b + PAGE)]
    g = c.fork()
    assert g.pagemap(a, 1)[0].present and not g.pagemap(b, 1)[0].present
    assert g.read(a, 1) == b"A" and g.read(b, 1) == b"b"
    # A VMA with a single-link chain (no fork behind it) still merges.
    q = machine.spawn()
    x = q.mmap(2 * PAGE, RW, hmmsim.MAP_PRIVATE, file=f)
    q.mprotect(x + PAGE, PAGE, hmmsim.PROT_READ)
    q.write(x, b"X")
    q.mprotect(x + PAGE, PAGE, RW)
    assert [(v.start, v.end) for v in q.mm.vmas] == [(x, x + 2 * PAGE)]
    verify_machine(machine)
