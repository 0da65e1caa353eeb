"""The interval-notifier sequence protocol (hmm-core.md §2.4–2.5)."""

from __future__ import annotations

import random
from collections.abc import Callable

import hmmsim
import pytest
from helpers import ANON, PAGE, RW
from hmmsim import (
    KernelBug,
    mmu_interval_check_retry,
    mmu_interval_notifier_insert,
    mmu_interval_notifier_remove,
    mmu_interval_read_begin,
    mmu_interval_read_retry,
    mmu_interval_set_seq,
    sched,
)
from hmmsim.notifier import (
    MMU_NOTIFY_CLEAR,
    IntervalTree,
    MmuNotifier,
    NotifierRange,
    invalidate_range_end,
    invalidate_range_start,
)


class Ops:
    def __init__(self, on_invalidate: Callable[..., None] | None = None, set_seq: bool = True):
        self.calls = 0
        self.on_invalidate = on_invalidate
        self.set_seq = set_seq

    def invalidate(self, sub, rng, cur_seq):
        self.calls += 1
        if self.set_seq:
            mmu_interval_set_seq(sub, cur_seq)
        if self.on_invalidate:
            self.on_invalidate(sub, rng, cur_seq)
        return True


class OtherCpu:
    """A stand-in scheduler: when someone must sleep, "another CPU" runs ``then``."""

    def __init__(self, then: Callable[[], None]) -> None:
        self.then = then
        self.blocked: list[object] = []

    def current(self) -> object:
        return "cpu0"

    def point(self, label: str) -> None:
        return None

    def block(self, reason: object, ready: Callable[[], bool]) -> None:
        self.blocked.append(reason)
        self.then()
        assert ready(), "the other CPU did not make the sleeper runnable"


def _range(mm, start, end):
    return NotifierRange(mm, start, end, MMU_NOTIFY_CLEAR)


def test_global_seq_starts_at_two_and_new_subscription_is_odd_below_it(proc):
    sub = mmu_interval_notifier_insert(proc.mm, 0x10000, PAGE, Ops())
    assert proc.mm.notifier_subscriptions.invalidate_seq == 2
    assert sub.invalidate_seq == 1
    assert mmu_interval_read_begin(sub) == 1


def test_read_retry_sees_an_invalidation_after_read_begin(proc):
    a = proc.mmap(4 * PAGE, RW, ANON)
    sub = mmu_interval_notifier_insert(proc.mm, a, 4 * PAGE, Ops())
    seq = mmu_interval_read_begin(sub)
    assert not mmu_interval_read_retry(sub, seq)
    proc.munmap(a, PAGE)
    assert mmu_interval_read_retry(sub, seq)
    assert mmu_interval_check_retry(sub, seq)
    assert sub.invalidate_seq == 3  # cur_seq of that invalidation
    assert proc.mm.notifier_subscriptions.invalidate_seq == 4
    seq2 = mmu_interval_read_begin(sub)
    assert seq2 == 3 and not mmu_interval_read_retry(sub, seq2)


def test_non_overlapping_invalidation_leaves_seq_even_and_reader_alone(proc):
    a = proc.mmap(8 * PAGE, RW, ANON)
    sub = mmu_interval_notifier_insert(proc.mm, a, PAGE, Ops())
    seq = mmu_interval_read_begin(sub)
    proc.munmap(a + 4 * PAGE, PAGE)
    subs = proc.mm.notifier_subscriptions
    assert subs.invalidate_seq == 2 and subs.active_invalidate_ranges == 0
    assert not mmu_interval_read_retry(sub, seq)


def test_without_set_seq_read_retry_misses_the_invalidation(proc):
    a = proc.mmap(PAGE, RW, ANON)
    sub = mmu_interval_notifier_insert(proc.mm, a, PAGE, Ops(set_seq=False))
    seq = mmu_interval_read_begin(sub)
    proc.munmap(a, PAGE)
    assert not mmu_interval_read_retry(sub, seq)  # the bug set_seq prevents


def test_set_seq_rejects_even_values(proc):
    sub = mmu_interval_notifier_insert(proc.mm, 0x10000, PAGE, Ops())
    with pytest.raises(KernelBug, match="even"):
        mmu_interval_set_seq(sub, 4)


def test_read_begin_sleeps_while_an_overlapping_invalidation_runs(proc):
    mm = proc.mm
    sub = mmu_interval_notifier_insert(mm, 0x10000, PAGE, Ops())
    rng = _range(mm, 0x10000, 0x11000)
    invalidate_range_start(rng)
    assert mm.notifier_subscriptions.invalidate_seq == 3
    # Sequentially, nobody could end the invalidation: sleeping is a deadlock.
    with pytest.raises(hmmsim.Deadlock):
        mmu_interval_read_begin(sub)
    other = OtherCpu(lambda: invalidate_range_end(rng))
    prev = sched.set_active(other)
    try:
        seq = mmu_interval_read_begin(sub)
    finally:
        sched.set_active(prev)
    assert other.blocked and seq == 3
    assert mm.notifier_subscriptions.invalidate_seq == 4
    assert not mmu_interval_read_retry(sub, seq)


def test_read_begin_does_not_wait_for_a_non_colliding_invalidation(proc):
    mm = proc.mm
    sub = mmu_interval_notifier_insert(mm, 0x10000, PAGE, Ops())
    mmu_interval_notifier_insert(mm, 0x40000, PAGE, Ops())
    rng = _range(mm, 0x40000, 0x41000)
    invalidate_range_start(rng)
    seq = mmu_interval_read_begin(sub)  # global odd, but sub's seq differs
    invalidate_range_end(rng)
    # That invalidation never touched this subscription: nothing to retry.
    assert seq == 1 and not mmu_interval_read_retry(sub, seq)


def test_insert_during_invalidation_is_deferred_to_the_last_end(proc):
    mm = proc.mm
    mmu_interval_notifier_insert(mm, 0x10000, PAGE, Ops())
    rng = _range(mm, 0x10000, 0x11000)
    invalidate_range_start(rng)
    late = Ops()
    sub = mmu_interval_notifier_insert(mm, 0x10000, PAGE, late)
    assert not sub.in_tree and sub.invalidate_seq == 3
    nested = _range(mm, 0x10000, 0x11000)
    invalidate_range_start(nested)
    assert late.calls == 0  # not in the tree yet: not called
    invalidate_range_end(nested)
    assert not sub.in_tree  # an invalidation is still active
    invalidate_range_end(rng)
    assert sub.in_tree and mm.notifier_subscriptions.invalidate_seq == 4
    seq = mmu_interval_read_begin(sub)
    assert seq == 3 and not mmu_interval_read_retry(sub, seq)


def test_insert_during_non_colliding_invalidation_forces_seq_odd(proc):
    mm = proc.mm
    rng = _range(mm, 0x90000, 0x91000)
    mmu_interval_notifier_insert(mm, 0x10000, PAGE, Ops())
    invalidate_range_start(rng)
    assert mm.notifier_subscriptions.invalidate_seq == 2
    sub = mmu_interval_notifier_insert(mm, 0x20000, PAGE, Ops())
    assert sub.in_tree and sub.invalidate_seq == 3
    assert mm.notifier_subscriptions.invalidate_seq == 3
    invalidate_range_end(rng)
    assert mm.notifier_subscriptions.invalidate_seq == 4


def test_remove_during_invalidation_is_deferred_and_waits(proc):
    mm = proc.mm
    keep = Ops()
    sub = mmu_interval_notifier_insert(mm, 0x10000, PAGE, keep)
    rng = _range(mm, 0x10000, 0x11000)
    invalidate_range_start(rng)
    state = {}

    def other_cpu_finishes():
        state["deferred"] = [(s is sub, ins) for s, ins in mm.notifier_subscriptions.deferred]
        state["in_tree"] = sub.in_tree
        invalidate_range_end(rng)

    prev = sched.set_active(OtherCpu(other_cpu_finishes))
    try:
        mmu_interval_notifier_remove(sub)
    finally:
        sched.set_active(prev)
    assert state == {"deferred": [(True, False)], "in_tree": True}
    assert not sub.in_tree
    invalidate_range_start(_range(mm, 0x10000, 0x11000))
    assert keep.calls == 1  # only the first invalidation reached it


def test_remove_of_a_pending_insert_just_cancels_it(proc):
    mm = proc.mm
    mmu_interval_notifier_insert(mm, 0x10000, PAGE, Ops())
    rng = _range(mm, 0x10000, 0x11000)
    invalidate_range_start(rng)
    sub = mmu_interval_notifier_insert(mm, 0x10000, PAGE, Ops())
    mmu_interval_notifier_remove(sub)  # no wait needed
    invalidate_range_end(rng)
    assert not sub.in_tree and mm.notifier_subscriptions.deferred == []


def test_insert_rejects_empty_or_wrapping_intervals(proc):
    with pytest.raises(hmmsim.Overflow):
        mmu_interval_notifier_insert(proc.mm, 0x1000, 0, Ops())
    with pytest.raises(hmmsim.Overflow):
        mmu_interval_notifier_insert(proc.mm, (1 << 64) - PAGE, 2 * PAGE, Ops())


def test_blockable_refusal_is_recorded_as_a_warning(proc, machine):
    class Refuser:
        def invalidate(self, sub, rng, cur_seq):
            return False

    a = proc.mmap(PAGE, RW, ANON)
    mmu_interval_notifier_insert(proc.mm, a, PAGE, Refuser())
    proc.munmap(a, PAGE)
    assert len(machine.notifier_warnings) == 1


def test_two_pass_notifiers_finish_after_all_first_passes(proc):
    order: list[str] = []

    class TwoPass:
        def __init__(self, name):
            self.name = name

        def invalidate_start(self, sub, rng, cur_seq):
            mmu_interval_set_seq(sub, cur_seq)
            order.append(f"start {self.name}")
            return True, self.name

        def invalidate_finish(self, finish):
            order.append(f"finish {finish}")

    a = proc.mmap(2 * PAGE, RW, ANON)
    mmu_interval_notifier_insert(proc.mm, a, PAGE, TwoPass("A"))
    mmu_interval_notifier_insert(proc.mm, a + PAGE, PAGE, TwoPass("B"))
    proc.munmap(a, 2 * PAGE)
    assert order == ["start A", "start B", "finish A", "finish B"]


def test_classic_notifier_sees_start_end_and_release(machine):
    p = machine.spawn()
    seen: list[str] = []

    class Classic(MmuNotifier):
        def invalidate_range_start(self, rng):
            seen.append(f"start {rng.event.name}")
            return 0

        def invalidate_range_end(self, rng):
            seen.append(f"end {rng.event.name}")

        def release(self, mm):
            seen.append("release")

    a = p.mmap(PAGE, RW, ANON)
    hmmsim.mmu_notifier_register(Classic(), p.mm)
    p.munmap(a, PAGE)
    p.exit()
    assert seen == ["start UNMAP", "end UNMAP", "release"]


def test_interval_tree_lookup_matches_brute_force():
    rnd = random.Random(7)

    class Fake:
        users = 1

    tree = IntervalTree()
    subs = []
    for _ in range(300):
        start = rnd.randrange(0, 1 << 20) * PAGE
        length = rnd.choice([PAGE, 4 * PAGE, 1 << 20, 1 << 30])
        sub = hmmsim.IntervalNotifier(Fake(), start, start + length - 1, None)  # type: ignore[arg-type]
        tree.insert(sub)
        subs.append(sub)
    for s in subs[::3]:
        tree.remove(s)
    live = [s for i, s in enumerate(subs) if i % 3]
    for _ in range(200):
        qs = rnd.randrange(0, 1 << 20) * PAGE
        qe = qs + rnd.choice([PAGE, 64 * PAGE, 1 << 28])
        got = tree.overlapping(qs, qe)
        want = sorted((s for s in live if s.overlaps(qs, qe)), key=lambda s: (s.start, s.id))
        assert [s.id for s in got] == [s.id for s in want]
