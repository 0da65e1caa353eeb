"""Each modelled row of hmm-core.md §2.2: which operation emits which event, where."""

from __future__ import annotations

import hmmsim
import pytest
from helpers import ANON, MB2, PAGE, RW, EventLog
from hmmsim import (
    MADV_COLLAPSE,
    MADV_DONTNEED,
    MADV_FREE,
    MADV_PAGEOUT,
    MAP_HUGETLB,
    MAP_POPULATE,
    MAP_SHARED,
    MREMAP_MAYMOVE,
    PROT_READ,
    mmu_interval_notifier_insert,
)
from hmmsim.notifier import ULONG_MAX


class Recorder:
    """An interval-notifier ops object that records its callbacks."""

    def __init__(self, refuse_nonblock: bool = False) -> None:
        self.calls: list[tuple[str, int, int, object, bool, int]] = []
        self.refuse_nonblock = refuse_nonblock

    def invalidate(self, sub, rng, cur_seq):
        self.calls.append((rng.event.name, rng.start, rng.end, rng.owner, rng.blockable, cur_seq))
        if not rng.blockable and self.refuse_nonblock:
            return False
        hmmsim.mmu_interval_set_seq(sub, cur_seq)
        return True


def _ev(log: EventLog):
    return [(e.event, e.start, e.end, e.owner, e.blockable) for e in log.events]


def test_populating_empty_slots_emits_nothing(proc, events):
    a = proc.mmap(16 * PAGE, RW, ANON | MAP_POPULATE)
    proc.write(a + 20, b"x")
    proc.read(a + 5 * PAGE, 10)
    assert events.events == []


def test_munmap_emits_unmap_over_exactly_the_range_per_vma(proc, events):
    a = proc.mmap(8 * PAGE, RW, ANON)
    proc.mprotect(a + 4 * PAGE, 4 * PAGE, PROT_READ)  # two VMAs
    events.clear()
    proc.munmap(a + PAGE, 6 * PAGE)
    assert _ev(events) == [
        ("UNMAP", a + PAGE, a + 4 * PAGE, None, True),
        ("UNMAP", a + 4 * PAGE, a + 7 * PAGE, None, True),
    ]


def test_interval_notifier_receives_overlapping_events_only(proc):
    a = proc.mmap(8 * PAGE, RW, ANON)
    rec_in, rec_out = Recorder(), Recorder()
    mmu_interval_notifier_insert(proc.mm, a, 2 * PAGE, rec_in)
    mmu_interval_notifier_insert(proc.mm, a + 6 * PAGE, 2 * PAGE, rec_out)
    proc.munmap(a + PAGE, 2 * PAGE)
    assert [c[:5] for c in rec_in.calls] == [("UNMAP", a + PAGE, a + 3 * PAGE, None, True)]
    assert rec_in.calls[0][5] % 2 == 1
    assert rec_out.calls == []


def test_exit_emits_release_then_unmap_of_each_whole_vma(machine, events):
    p = machine.spawn()
    a = p.mmap(4 * PAGE, RW, ANON)
    b = p.mmap(2 * PAGE, PROT_READ, ANON)
    rec = Recorder()
    mmu_interval_notifier_insert(p.mm, 0, 1 << 47, rec)
    events.clear()
    p.exit()
    assert _ev(events) == [
        ("RELEASE", 0, ULONG_MAX, None, True),
        ("UNMAP", b, b + 2 * PAGE, None, True),
        ("UNMAP", a, a + 4 * PAGE, None, True),
    ] or _ev(events) == [
        ("RELEASE", 0, ULONG_MAX, None, True),
        ("UNMAP", a, a + 4 * PAGE, None, True),
        ("UNMAP", b, b + 2 * PAGE, None, True),
    ]
    assert rec.calls[0][0] == "RELEASE"


def test_mremap_move_emits_unmap_of_the_old_range(proc, events):
    a = proc.mmap(4 * PAGE, RW, ANON)
    proc.write(a, b"x")
    proc.mmap(PAGE, RW, ANON | hmmsim.MAP_FIXED, addr=a + 4 * PAGE)  # block growth in place
    proc.mprotect(a + 4 * PAGE, PAGE, PROT_READ)
    events.clear()
    new = proc.mremap(a, 4 * PAGE, 8 * PAGE, MREMAP_MAYMOVE)
    assert new != a
    assert _ev(events) == [("UNMAP", a, a + 4 * PAGE, None, True)]


def test_hugetlb_munmap_emits_unmap(make_machine):
    m = make_machine(hugetlb_pages={2 << 20: 2})
    log = EventLog(m)
    p = m.spawn()
    a = p.mmap(2 * MB2, RW, ANON | MAP_HUGETLB)
    p.write(a, b"h")
    log.clear()
    p.munmap(a, MB2)
    assert _ev(log) == [("UNMAP", a, a + MB2, None, True)]


def test_oom_reaper_unmaps_without_blocking_and_skips_refused_vmas(machine, events):
    p = machine.spawn()
    a = p.mmap(4 * PAGE, RW, ANON | MAP_POPULATE)
    # Not adjacent to a: it would merge with it before populating, as in Linux.
    b = p.mmap(4 * PAGE, RW, ANON | MAP_POPULATE, addr=a - 8 * PAGE)
    refuser = Recorder(refuse_nonblock=True)
    mmu_interval_notifier_insert(p.mm, a, 4 * PAGE, refuser)
    events.clear()
    machine.oom_kill(p)
    nonblock = [e for e in _ev(events) if not e[4]]
    assert ("UNMAP", a, a + 4 * PAGE, None, False) in nonblock
    assert ("UNMAP", b, b + 4 * PAGE, None, False) in nonblock
    assert len(p.oom_reap_skipped) == 1 and f"{a:#x}" in p.oom_reap_skipped[0]
    # The VMA the notifier refused was torn down later, blockably, at exit.
    assert ("UNMAP", a, a + 4 * PAGE, None, True) in _ev(events)
    assert p.mm.unstable


def test_madv_dontneed_emits_clear(proc, events):
    a = proc.mmap(4 * PAGE, RW, ANON | MAP_POPULATE)
    events.clear()
    proc.madvise(a + PAGE, 2 * PAGE, MADV_DONTNEED)
    assert _ev(events) == [("CLEAR", a + PAGE, a + 3 * PAGE, None, True)]
    assert proc.read(a + PAGE, 1) == b"\0"


def test_madv_free_emits_clear(proc, events):
    a = proc.mmap(4 * PAGE, RW, ANON | MAP_POPULATE)
    events.clear()
    proc.madvise(a, 4 * PAGE, MADV_FREE)
    assert _ev(events) == [("CLEAR", a, a + 4 * PAGE, None, True)]


def test_truncate_and_hole_punch_emit_clear_on_mapped_pages(machine, proc, events):
    f = machine.create_file(4 * PAGE)
    a = proc.mmap(4 * PAGE, RW, MAP_SHARED, file=f)
    proc.write(a, b"x" * 4 * PAGE)
    events.clear()
    f.punch_hole(PAGE, PAGE)
    f.truncate(2 * PAGE + 100)
    assert _ev(events) == [
        ("CLEAR", a + PAGE, a + 2 * PAGE, None, True),
        ("CLEAR", a + 3 * PAGE, a + 4 * PAGE, None, True),
    ]
    assert proc.read(a + PAGE, 1) == b"\0"
    assert proc.read(a + 2 * PAGE + 99, 2) == b"x\0"
    with pytest.raises(hmmsim.BusError):
        proc.read(a + 3 * PAGE, 1)


def test_cow_write_fault_emits_clear_on_one_page(proc, events):
    a = proc.mmap(4 * PAGE, RW, ANON)
    proc.write(a, b"x" * 4 * PAGE)
    child = proc.fork()
    events.clear()
    child.write(a + 2 * PAGE + 7, b"y")
    assert _ev(events) == [("CLEAR", a + 2 * PAGE, a + 3 * PAGE, None, True)]
    assert events.events[0].mm == child.mm.id


def test_hugetlb_cow_emits_clear_on_the_huge_page(make_machine):
    m = make_machine(hugetlb_pages={2 << 20: 3})
    log = EventLog(m)
    p = m.spawn()
    a = p.mmap(MB2, RW, ANON | MAP_HUGETLB)
    p.write(a, b"h")
    c = p.fork()
    log.clear()
    c.write(a + 100, b"c")
    assert _ev(log) == [("CLEAR", a, a + MB2, None, True)]


def test_fork_write_protects_parent_with_protection_page_over_the_vma(proc, events):
    a = proc.mmap(8 * PAGE, RW, ANON)
    proc.write(a, b"x")
    events.clear()
    proc.fork()
    assert _ev(events) == [("PROTECTION_PAGE", a, a + 8 * PAGE, None, True)]
    assert events.events[0].mm == proc.mm.id


def test_fork_of_untouched_or_shared_mappings_emits_nothing(proc, events):
    proc.mmap(8 * PAGE, RW, ANON)  # no anon_vma yet
    b = proc.mmap(8 * PAGE, RW, MAP_SHARED | hmmsim.MAP_ANONYMOUS)
    proc.write(b, b"s")
    events.clear()
    proc.fork()
    assert events.events == []


def test_hugetlb_fork_emits_clear(make_machine):
    m = make_machine(hugetlb_pages={2 << 20: 2})
    log = EventLog(m)
    p = m.spawn()
    a = p.mmap(MB2, RW, ANON | MAP_HUGETLB)
    p.write(a, b"h")
    log.clear()
    p.fork()
    assert _ev(log) == [("CLEAR", a, a + MB2, None, True)]


def test_writeback_emits_protection_page_per_dirty_page(machine, proc, events):
    f = machine.create_file(4 * PAGE)
    a = proc.mmap(4 * PAGE, RW, MAP_SHARED, file=f)
    proc.write(a + PAGE, b"dirty")
    proc.read(a + 2 * PAGE, 1)
    events.clear()
    assert f.sync() == 1
    assert _ev(events) == [("PROTECTION_PAGE", a + PAGE, a + 2 * PAGE, None, True)]
    assert not proc.pagemap(a + PAGE, 1)[0].writable
    proc.write(a + PAGE, b"again")
    assert f.sync() == 1 and f.pread(PAGE, 5) == b"again"


def test_mprotect_emits_protection_vma_only_over_populated_ranges(proc, events):
    a = proc.mmap(4 * PAGE, RW, ANON)
    proc.mprotect(a, 4 * PAGE, PROT_READ)
    assert events.events == []
    proc.mprotect(a, 4 * PAGE, RW)
    proc.write(a, b"x")
    events.clear()
    proc.mprotect(a, 2 * PAGE, PROT_READ)
    assert _ev(events) == [("PROTECTION_VMA", a, a + 2 * PAGE, None, True)]


def test_hugetlb_mprotect_emits_protection_vma(make_machine):
    m = make_machine(hugetlb_pages={2 << 20: 2})
    log = EventLog(m)
    p = m.spawn()
    a = p.mmap(MB2, RW, ANON | MAP_HUGETLB)
    p.write(a, b"h")
    log.clear()
    p.mprotect(a, MB2, PROT_READ)
    assert _ev(log) == [("PROTECTION_VMA", a, a + MB2, None, True)]


def test_swap_out_emits_clear_per_mapping(make_machine):
    m = make_machine(swap_bytes=8 << 20)
    log = EventLog(m)
    p = m.spawn()
    a = p.mmap(2 * PAGE, RW, ANON)
    p.write(a, b"x")
    c = p.fork()
    log.clear()
    m.reclaim(PAGE)
    assert sorted((e.mm, e.event, e.start, e.end) for e in log.events) == sorted(
        [(p.mm.id, "CLEAR", a, a + PAGE), (c.mm.id, "CLEAR", a, a + PAGE)]
    )


def test_pageout_emits_clear(make_machine):
    m = make_machine(swap_bytes=8 << 20)
    log = EventLog(m)
    p = m.spawn()
    a = p.mmap(2 * PAGE, RW, ANON | MAP_POPULATE)
    log.clear()
    p.madvise(a, 2 * PAGE, MADV_PAGEOUT)
    assert _ev(log) == [
        ("CLEAR", a, a + PAGE, None, True),
        ("CLEAR", a + PAGE, a + 2 * PAGE, None, True),
    ]


def test_memory_failure_emits_clear_and_poisons(proc, machine, events):
    a = proc.mmap(2 * PAGE, RW, ANON)
    proc.write(a, b"x")
    pfn = proc.pagemap(a, 1)[0].pfn
    events.clear()
    machine.memory_failure(pfn)
    assert _ev(events) == [("CLEAR", a, a + PAGE, None, True)]
    assert proc.pagemap(a, 1)[0].kind == "hwpoison"
    with pytest.raises(hmmsim.BusError):
        proc.read(a, 1)


def test_move_pages_emits_clear_not_migrate(proc, events):
    a = proc.mmap(2 * PAGE, RW, ANON)
    proc.write(a, b"move me")
    old = proc.pagemap(a, 1)[0].pfn
    events.clear()
    assert proc.move_pages(a, 2) == [0, -2]  # second page not present: -ENOENT
    assert _ev(events) == [("CLEAR", a, a + PAGE, None, True)]
    assert proc.pagemap(a, 1)[0].pfn != old
    assert proc.read(a, 7) == b"move me"


def test_thp_split_emits_clear_over_the_aligned_2mb(make_machine):
    m = make_machine(thp="always")
    log = EventLog(m)
    p = m.spawn()
    a = p.mmap(MB2, RW, ANON | MAP_POPULATE)
    log.clear()
    p.madvise(a + PAGE, PAGE, MADV_DONTNEED)
    assert _ev(log) == [
        ("CLEAR", a + PAGE, a + 2 * PAGE, None, True),
        ("CLEAR", a, a + MB2, None, True),
    ]


def test_madv_collapse_emits_clear(make_machine):
    m = make_machine(thp="never")
    log = EventLog(m)
    p = m.spawn()
    a = p.mmap(MB2, RW, ANON | MAP_POPULATE)
    p.write(a + 3 * PAGE, b"c")
    log.clear()
    p.madvise(a, MB2, MADV_COLLAPSE)
    assert _ev(log) == [("CLEAR", a, a + MB2, None, True)]
    assert p.pagemap(a, 1)[0].order == 9
    assert p.read(a + 3 * PAGE, 1) == b"c"
