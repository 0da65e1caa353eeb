"""MMU notifiers: invalidation ranges, events, interval notifiers, classic notifiers.

Kernel counterpart: include/linux/mmu_notifier.h and mm/mmu_notifier.c
(mainline 7.1, with the two-pass ``invalidate_start``/``invalidate_finish``).

Every core-mm operation that changes or removes existing translations brackets
the change with ``invalidate_range_start``/``invalidate_range_end`` on a
``NotifierRange`` (see ``invalidation``); the interval notifiers that overlap
the range are called with the current odd sequence number. The sequence
scheme is the kernel's, bit for bit:

* the per-mm ``invalidate_seq`` starts at 2; even means no invalidation that
  matters is running, odd means one is (or a subscription was added during
  one), and the subscription tree is then frozen: inserts and removals are
  deferred to the end of the last running invalidation;
* every subscription's ``invalidate_seq`` is odd; ``mmu_interval_read_begin``
  returns it, sleeping first while an invalidation that collides with the
  subscription is running; ``mmu_interval_read_retry`` compares it again
  (under the driver's lock), ``mmu_interval_check_retry`` without a lock;
* ``invalidate`` callbacks must call ``mmu_interval_set_seq(sub, cur_seq)``.

Lookup of the subscriptions overlapping a range is O(log n + k): a sorted
array of starts with a max-of-last segment tree over it (the kernel's
augmented interval tree, rebuilt lazily after inserts/removals).
"""

from __future__ import annotations

import bisect
import enum
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import numpy as np

from . import sched
from .errors import Again, InvalidArgument, KernelBug, Overflow
from .trace import COST_INVALIDATION_NS

if TYPE_CHECKING:
    from .mm.address_space import AddressSpace

ULONG_MAX = (1 << 64) - 1
MMU_NOTIFIER_RANGE_BLOCKABLE = 1 << 0


class MmuNotifyEvent(enum.IntEnum):
    """``enum mmu_notifier_event``: why a range is being invalidated."""

    UNMAP = 0
    CLEAR = 1
    PROTECTION_VMA = 2
    PROTECTION_PAGE = 3
    SOFT_DIRTY = 4
    RELEASE = 5
    MIGRATE = 6
    EXCLUSIVE = 7


MMU_NOTIFY_UNMAP = MmuNotifyEvent.UNMAP
MMU_NOTIFY_CLEAR = MmuNotifyEvent.CLEAR
MMU_NOTIFY_PROTECTION_VMA = MmuNotifyEvent.PROTECTION_VMA
MMU_NOTIFY_PROTECTION_PAGE = MmuNotifyEvent.PROTECTION_PAGE
MMU_NOTIFY_SOFT_DIRTY = MmuNotifyEvent.SOFT_DIRTY
MMU_NOTIFY_RELEASE = MmuNotifyEvent.RELEASE
MMU_NOTIFY_MIGRATE = MmuNotifyEvent.MIGRATE
MMU_NOTIFY_EXCLUSIVE = MmuNotifyEvent.EXCLUSIVE


@attrs.frozen
class NotifierRange:
    """``struct mmu_notifier_range``: [start, end) of ``mm`` being invalidated."""

    mm: AddressSpace
    start: int
    end: int
    event: MmuNotifyEvent
    owner: object | None = None
    blockable: bool = True

    @property
    def flags(self) -> int:
        return MMU_NOTIFIER_RANGE_BLOCKABLE if self.blockable else 0


def mmu_notifier_range_blockable(rng: NotifierRange) -> bool:
    return rng.blockable


class IntervalNotifierOps(Protocol):
    """``struct mmu_interval_notifier_ops``.

    ``invalidate(sub, range, cur_seq) -> bool`` must stop all device use of
    the range before returning (taking the driver lock, calling
    ``mmu_interval_set_seq``); it returns False only when the range is not
    blockable and it would have to sleep. A two-pass implementation instead
    provides ``invalidate_start(sub, range, cur_seq) -> (bool, finish | None)``
    and ``invalidate_finish(finish)``: every overlapping subscription's first
    pass runs, then the finish passes in the same order, all before the core
    changes the page tables.
    """

    def invalidate(
        self, sub: IntervalNotifier, rng: NotifierRange, cur_seq: int
    ) -> bool:  # pragma: no cover - protocol
        ...


@attrs.define(eq=False)
class IntervalNotifier:
    """``struct mmu_interval_notifier``: a subscription to [start, last]."""

    mm: AddressSpace
    start: int
    last: int
    ops: Any
    invalidate_seq: int = 0
    in_tree: bool = False
    id: int = attrs.field(factory=itertools.count(1).__next__)

    @property
    def end(self) -> int:
        return self.last + 1

    def overlaps(self, start: int, end: int) -> bool:
        return self.start < end and start <= self.last


class MmuNotifier:
    """A classic whole-mm notifier (``struct mmu_notifier`` + its ops).

    Subclass and override what you need. ``invalidate_range_start`` returns 0,
    or -EAGAIN (only when the range is not blockable); a notifier whose start
    can fail must not rely on ``invalidate_range_end``.
    """

    def invalidate_range_start(self, rng: NotifierRange) -> int:
        return 0

    def invalidate_range_end(self, rng: NotifierRange) -> None:
        return None

    def release(self, mm: AddressSpace) -> None:
        return None


class IntervalTree:
    """Subscriptions sorted by start, with a max(last) segment tree for queries."""

    def __init__(self) -> None:
        self._keys: list[tuple[int, int]] = []
        self._subs: list[IntervalNotifier] = []
        self._levels: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self._subs)

    def __iter__(self) -> Iterator[IntervalNotifier]:
        return iter(list(self._subs))

    def insert(self, sub: IntervalNotifier) -> None:
        key = (sub.start, sub.id)
        i = bisect.bisect_left(self._keys, key)
        self._keys.insert(i, key)
        self._subs.insert(i, sub)
        sub.in_tree = True
        self._levels = None

    def remove(self, sub: IntervalNotifier) -> None:
        i = bisect.bisect_left(self._keys, (sub.start, sub.id))
        if i == len(self._subs) or self._subs[i] is not sub:
            raise KernelBug("subscription not in the tree")
        del self._keys[i]
        del self._subs[i]
        sub.in_tree = False
        self._levels = None

    def _build(self) -> list[np.ndarray]:
        n = len(self._subs)
        size = 1
        while size < max(n, 1):
            size *= 2
        base = np.zeros(size, dtype=np.uint64)  # padding is never below ``hi``
        base[:n] = [s.last for s in self._subs]
        levels = [base]
        while len(levels[-1]) > 1:
            prev = levels[-1]
            levels.append(np.maximum(prev[0::2], prev[1::2]))
        return levels

    def overlapping(self, start: int, end: int) -> list[IntervalNotifier]:
        """Subscriptions overlapping [start, end), in start order."""
        if not self._subs or end <= start:
            return []
        hi = bisect.bisect_left(self._keys, (end, 0))  # starts < end
        if hi == 0:
            return []
        if self._levels is None:
            self._levels = self._build()
        levels = self._levels
        top = len(levels) - 1
        found: list[int] = []
        stack = [(top, 0)]
        while stack:
            lvl, idx = stack.pop()
            if idx << lvl >= hi or levels[lvl][idx] < start:
                continue
            if lvl == 0:
                if self._subs[idx].last >= start:
                    found.append(idx)
                continue
            stack.append((lvl - 1, 2 * idx + 1))
            stack.append((lvl - 1, 2 * idx))
        return [self._subs[i] for i in found]


@attrs.define(eq=False)
class Subscriptions:
    """``struct mmu_notifier_subscriptions``: one per mm, made on first use."""

    invalidate_seq: int = 2
    active_invalidate_ranges: int = 0
    itree: IntervalTree = attrs.field(factory=IntervalTree)
    deferred: list[tuple[IntervalNotifier, bool]] = attrs.field(factory=list)
    classic: list[MmuNotifier] = attrs.field(factory=list)
    wq: sched.WaitQueue = attrs.field(factory=lambda: sched.WaitQueue("mmu_notifier wq"))
    released: bool = False

    def invalidating(self) -> bool:
        return bool(self.invalidate_seq & 1)


def _subscriptions(mm: AddressSpace) -> Subscriptions:
    if mm.notifier_subscriptions is None:
        mm.notifier_subscriptions = Subscriptions()
    return mm.notifier_subscriptions


# ----- interval notifier API --------------------------------------------------


def mmu_interval_notifier_insert(
    mm: AddressSpace, start: int, length: int, ops: Any
) -> IntervalNotifier:
    """Subscribe ``ops`` to invalidations of [start, start + length).

    Raises ``Overflow`` for a zero length or one that wraps, and
    ``InvalidArgument`` for an mm that is gone or a two-pass ops object
    without ``invalidate_finish``. The subscription may only join the tree
    when the running invalidations end: callers must use read_begin/retry.
    """
    # start and length are unsigned longs: a negative length is a huge one,
    # and the kernel's check_add_overflow turns any wrap into -EOVERFLOW.
    start &= ULONG_MAX
    length &= ULONG_MAX
    if length == 0 or start + length - 1 > ULONG_MAX:
        raise Overflow(f"interval [{start:#x}, +{length:#x}) is empty or wraps")
    if mm.users <= 0:
        raise InvalidArgument("mmu_interval_notifier_insert on an mm with no users")
    if hasattr(ops, "invalidate_start") != hasattr(ops, "invalidate_finish"):
        raise InvalidArgument("invalidate_start needs invalidate_finish (and vice versa)")
    if not hasattr(ops, "invalidate") and not hasattr(ops, "invalidate_start"):
        raise InvalidArgument("ops must provide invalidate() or invalidate_start()")
    sched.point("notifier_insert")
    if mm.notifier_subscriptions is None:
        # The first subscription of an mm registers its notifier state under
        # mmap_write_lock (__mmu_notifier_register), so it cannot appear in
        # the middle of an invalidation that started without it.
        with mm.mmap_lock.write():
            _subscriptions(mm)
    subs = _subscriptions(mm)
    sub = IntervalNotifier(mm, start, start + length - 1, ops)
    if subs.active_invalidate_ranges:
        if subs.invalidating():
            subs.deferred.append((sub, True))
        else:
            subs.invalidate_seq |= 1
            subs.itree.insert(sub)
        sub.invalidate_seq = subs.invalidate_seq
    else:
        assert not subs.invalidating()
        sub.invalidate_seq = subs.invalidate_seq - 1
        subs.itree.insert(sub)
    mm.machine.trace.log(sched.current(), "notifier_insert", start=start, last=sub.last)
    return sub


def mmu_interval_notifier_insert_locked(
    mm: AddressSpace, start: int, length: int, ops: Any
) -> IntervalNotifier:
    """As ``mmu_interval_notifier_insert``, called with the mmap lock held for write."""
    mm.mmap_lock.assert_held_write()
    _subscriptions(mm)
    return mmu_interval_notifier_insert(mm, start, length, ops)


def mmu_interval_notifier_remove(sub: IntervalNotifier) -> None:
    """Unsubscribe; on return no callback runs on ``sub`` any more (may sleep)."""
    subs = _subscriptions(sub.mm)
    sched.point("notifier_remove")
    seq = 0
    if subs.invalidating():
        pending = [i for i, (s, ins) in enumerate(subs.deferred) if s is sub and ins]
        if pending and not sub.in_tree:
            del subs.deferred[pending[0]]
        else:
            subs.deferred.append((sub, False))
            seq = subs.invalidate_seq
    elif sub.in_tree:
        subs.itree.remove(sub)
    sub.mm.machine.trace.log(sched.current(), "notifier_remove", start=sub.start)
    if seq:
        subs.wq.wait_event(lambda: subs.invalidate_seq != seq)


def subscriber_name(sub: IntervalNotifier) -> str:
    """How traces name a subscription: its ops' repr if the class defines one,
    else the class name and the interval (never an ``object at 0x…`` that
    changes from run to run)."""
    ops = sub.ops
    own_repr: object = type(ops).__repr__
    if own_repr is not object.__repr__:
        return repr(ops)
    return f"{type(ops).__name__}[{sub.start:#x}, {sub.end:#x})"


def mmu_interval_read_begin(sub: IntervalNotifier) -> int:
    """Begin a read-side critical section; returns the (odd) sequence to check."""
    subs = _subscriptions(sub.mm)
    seq = sub.invalidate_seq
    if seq == subs.invalidate_seq:
        # An invalidation colliding with this subscription is running: wait
        # for the final invalidate_range_end, which makes the global seq even.
        subs.wq.wait_event(lambda: subs.invalidate_seq != seq)
    if sched.active() is not None:
        sched.note("hmm", f"read_begin {subscriber_name(sub)}: seq {seq}")
    return seq


def mmu_interval_read_retry(sub: IntervalNotifier, seq: int) -> bool:
    """True if an invalidation ran since ``read_begin``; call under the driver lock."""
    moved = sub.invalidate_seq != seq
    if sched.active() is not None:
        outcome = f"retry (seq now {sub.invalidate_seq})" if moved else "ok"
        sched.note("hmm", f"read_retry {subscriber_name(sub)}: seq {seq}: {outcome}")
    return moved


def mmu_interval_check_retry(sub: IntervalNotifier, seq: int) -> bool:
    """Lockless hint: True is reliable, False may be stale."""
    return sub.invalidate_seq != seq


def mmu_interval_set_seq(sub: IntervalNotifier, cur_seq: int) -> None:
    """Record an invalidation (from ``invalidate``, under the driver lock)."""
    if not cur_seq & 1:
        raise KernelBug(f"mmu_interval_set_seq: cur_seq {cur_seq} is even; invalidations are odd")
    sub.invalidate_seq = cur_seq


# ----- classic notifiers ------------------------------------------------------


def mmu_notifier_register(mn: MmuNotifier, mm: AddressSpace) -> None:
    """Attach a whole-mm notifier (``mmu_notifier_register``)."""
    if mm.users <= 0:
        raise InvalidArgument("mmu_notifier_register on an mm with no users")
    subs = _subscriptions(mm)
    if mn in subs.classic:
        raise InvalidArgument("notifier already registered")
    subs.classic.append(mn)


def mmu_notifier_unregister(mn: MmuNotifier, mm: AddressSpace) -> None:
    """Detach; calls ``release`` if the mm has not been released yet."""
    subs = _subscriptions(mm)
    if mn not in subs.classic:
        return
    subs.classic.remove(mn)
    if not subs.released:
        mn.release(mm)


# ----- the core side: starting and ending invalidations -----------------------


def _itree_invalidate(subs: Subscriptions, rng: NotifierRange) -> bool:
    mm = rng.mm
    subs.active_invalidate_ranges += 1
    hits = subs.itree.overlapping(rng.start, rng.end)
    if hits:
        subs.invalidate_seq |= 1
    cur_seq = subs.invalidate_seq
    ok = True
    finishes: list[tuple[Any, Any]] = []
    costs = mm.machine.trace.costs
    for sub in hits:
        costs.notifier_calls += 1
        mm.machine.trace.clock.advance(COST_INVALIDATION_NS)
        ops = sub.ops
        if not rng.blockable:
            # mn_itree_invalidate brackets a non-blockable callback with
            # non_block_start/end: a sleeping lock inside is a kernel bug.
            sched.non_block_start()
        try:
            if hasattr(ops, "invalidate_start"):
                ret, finish = ops.invalidate_start(sub, rng, cur_seq)
                if finish is not None:
                    finishes.append((ops, finish))
            else:
                ret = ops.invalidate(sub, rng, cur_seq)
        finally:
            if not rng.blockable:
                sched.non_block_end()
        if sched.active() is not None:
            sched.note(
                "notify",
                f"{rng.event.name} [{rng.start:#x}, {rng.end:#x}) -> {subscriber_name(sub)}: "
                f"{'ok' if ret else 'refused'}",
            )
        if not ret:
            if rng.blockable:
                # The kernel WARNs and carries on: a blockable invalidation
                # cannot be refused. Record it so tests can catch the driver.
                mm.machine.warn(
                    "mmu_notifier",
                    "mn_itree_invalidate",
                    "a blockable invalidation was refused (invalidate returned false)",
                    f"{rng.event.name} [{rng.start:#x}, {rng.end:#x}) -> {subscriber_name(sub)}",
                )
            else:
                ok = False
                break
    for ops, finish in finishes:
        ops.invalidate_finish(finish)
    if not ok:
        _itree_inv_end(subs)
    return ok


def _itree_inv_end(subs: Subscriptions) -> None:
    subs.active_invalidate_ranges -= 1
    if subs.active_invalidate_ranges or not subs.invalidating():
        return
    subs.invalidate_seq += 1
    for sub, insert in subs.deferred:
        if insert:
            subs.itree.insert(sub)
        elif sub.in_tree:
            subs.itree.remove(sub)
    subs.deferred.clear()
    subs.wq.wake_up_all()


def invalidate_range_start(rng: NotifierRange) -> bool:
    """Run the start of an invalidation; False if a non-blockable one was refused."""
    mm = rng.mm
    trace = mm.machine.trace
    trace.costs.invalidations += 1
    trace.log(
        sched.current(),
        "invalidate_start",
        event=rng.event.name,
        start=rng.start,
        end=rng.end,
        owner=rng.owner,
        blockable=rng.blockable,
    )
    subs = mm.notifier_subscriptions
    for listener in mm.machine.invalidation_listeners:
        listener(rng)
    if subs is None:
        return True
    if not _itree_invalidate(subs, rng):
        return False
    for i, mn in enumerate(subs.classic):
        if not rng.blockable:
            sched.non_block_start()
        try:
            err = mn.invalidate_range_start(rng)
        finally:
            if not rng.blockable:
                sched.non_block_end()
        if err != 0:
            if rng.blockable:
                mm.machine.warn(
                    "mmu_notifier",
                    "mn_hlist_invalidate_range_start",
                    "a blockable invalidate_range_start failed",
                    f"{rng.event.name} [{rng.start:#x}, {rng.end:#x})",
                )
                continue
            for other in subs.classic[:i]:
                other.invalidate_range_end(rng)
            _itree_inv_end(subs)
            return False
    return True


def invalidate_range_end(rng: NotifierRange) -> None:
    mm = rng.mm
    mm.machine.trace.log(
        sched.current(), "invalidate_end", event=rng.event.name, start=rng.start, end=rng.end
    )
    subs = mm.notifier_subscriptions
    if subs is None:
        return
    _itree_inv_end(subs)
    for mn in subs.classic:
        mn.invalidate_range_end(rng)


@contextmanager
def invalidation(
    mm: AddressSpace,
    event: MmuNotifyEvent,
    start: int,
    end: int,
    owner: object | None = None,
) -> Iterator[NotifierRange]:
    """Bracket a blockable page-table change: start, (change), end.

    The preemption points are where another CPU can run between the
    notifier callbacks and the page-table change.
    """
    rng = NotifierRange(mm, start, end, event, owner, True)
    sched.point(f"{event.name}:before_start")
    invalidate_range_start(rng)
    sched.point(f"{event.name}:after_start")
    try:
        yield rng
    finally:
        sched.point(f"{event.name}:before_end")
        invalidate_range_end(rng)


def invalidate_range_start_nonblock(rng: NotifierRange) -> None:
    """Non-blockable start (OOM reaper); raises ``Again`` if a notifier refuses."""
    if rng.blockable:
        raise KernelBug("use a non-blockable range")
    if not invalidate_range_start(rng):
        raise Again(
            f"a notifier refused the non-blockable {rng.event.name} of "
            f"[{rng.start:#x}, {rng.end:#x})"
        )


def mmu_notifier_release(mm: AddressSpace) -> None:
    """mm teardown: RELEASE to every interval subscription, ``release`` to classic ones."""
    subs = mm.notifier_subscriptions
    if subs is None or subs.released:
        return
    rng = NotifierRange(mm, 0, ULONG_MAX, MMU_NOTIFY_RELEASE, None, True)
    mm.machine.trace.log(
        sched.current(),
        "invalidate_start",
        event="RELEASE",
        start=0,
        end=ULONG_MAX,
        owner=None,
        blockable=True,
    )
    for listener in mm.machine.invalidation_listeners:
        listener(rng)
    subs.active_invalidate_ranges += 1
    subs.invalidate_seq |= 1
    cur_seq = subs.invalidate_seq
    for sub in list(subs.itree):
        ops = sub.ops
        if hasattr(ops, "invalidate_start"):
            ret, finish = ops.invalidate_start(sub, rng, cur_seq)
            if finish is not None:
                ops.invalidate_finish(finish)
        else:
            ret = ops.invalidate(sub, rng, cur_seq)
        if not ret:
            mm.machine.warn(
                "mmu_notifier",
                "mn_itree_release",
                "invalidate returned false for RELEASE",
                subscriber_name(sub),
            )
    _itree_inv_end(subs)
    for mn in list(subs.classic):
        mn.release(mm)
    subs.classic.clear()
    subs.released = True


__all__ = [
    "MMU_NOTIFIER_RANGE_BLOCKABLE",
    "MMU_NOTIFY_CLEAR",
    "MMU_NOTIFY_EXCLUSIVE",
    "MMU_NOTIFY_MIGRATE",
    "MMU_NOTIFY_PROTECTION_PAGE",
    "MMU_NOTIFY_PROTECTION_VMA",
    "MMU_NOTIFY_RELEASE",
    "MMU_NOTIFY_SOFT_DIRTY",
    "MMU_NOTIFY_UNMAP",
    "IntervalNotifier",
    "IntervalNotifierOps",
    "MmuNotifier",
    "MmuNotifyEvent",
    "NotifierRange",
    "invalidate_range_end",
    "invalidate_range_start",
    "invalidate_range_start_nonblock",
    "invalidation",
    "mmu_interval_check_retry",
    "mmu_interval_notifier_insert",
    "mmu_interval_notifier_insert_locked",
    "mmu_interval_notifier_remove",
    "mmu_interval_read_begin",
    "mmu_interval_read_retry",
    "mmu_interval_set_seq",
    "mmu_notifier_range_blockable",
    "mmu_notifier_register",
    "mmu_notifier_release",
    "mmu_notifier_unregister",
]
