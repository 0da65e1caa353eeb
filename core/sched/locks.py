"""Locking primitives and preemption points of the model.

Kernel counterpart: ``struct rw_semaphore`` (the mm's ``mmap_lock``),
``struct mutex`` (a driver's update lock), wait queues, and the places where
another CPU may interleave with the running one.

Every lock in hmmsim is one of these, so that a deterministic scheduler can
take control of interleavings: when a scheduler is active (see
``Scheduler``), ``point()``, a contended acquire, every release (where a
waiter may get the lock first) and a ``WaitQueue`` sleep hand control to it.
Outside a scheduler they are plain, cheap bookkeeping: an
uncontended acquire is a few attribute writes, ``point()`` is one global read,
and a contended acquire or an unsatisfiable wait raises ``Deadlock`` (there is
no other CPU that could ever release it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

from ..errors import Deadlock, KernelBug


class SchedulerHooks(Protocol):
    """What a scheduler must provide to take over the primitives."""

    def current(self) -> object:
        """The running actor (any hashable identity)."""
        ...

    def point(self, label: str) -> None:
        """A preemption point: the strategy may switch to another actor."""
        ...

    def block(self, reason: object, ready: Callable[[], bool]) -> None:
        """Sleep until ``ready()`` is true; others run meanwhile."""
        ...

    # Optional: ``record(kind, what)`` adds an event (a lock taken, a notifier
    # call, a device PTE written) to the run's trace. Hooks without it get none.


#: The active scheduler, or None for plain sequential execution.
_active: SchedulerHooks | None = None

#: Identity of "the only CPU" when no scheduler is active.
MAIN_ACTOR = "main"


def set_active(hooks: SchedulerHooks | None) -> SchedulerHooks | None:
    """Install (or remove, with None) the scheduler; returns the previous one."""
    global _active
    previous, _active = _active, hooks
    return previous


def active() -> SchedulerHooks | None:
    """The scheduler in control, if any."""
    return _active


def current() -> object:
    """Identity of the running actor (``MAIN_ACTOR`` outside a scheduler)."""
    return MAIN_ACTOR if _active is None else _active.current()


def point(label: str) -> None:
    """A place where another CPU may interleave; a no-op outside a scheduler."""
    if _active is not None:
        _active.point(label)


def note(kind: str, what: str) -> None:
    """Record an event in the active scheduler's trace; a no-op outside one.

    Callers pass preformatted text only when ``active()`` is set, so that the
    plain path stays free of formatting work.
    """
    if _active is not None:
        _record(kind, what)


def _record(kind: str, what: str) -> None:
    record = getattr(_active, "record", None)
    if record is not None:
        record(kind, what)


#: Per actor: how deep it is in sections that must not sleep.
_non_block: dict[object, int] = {}


def non_block_start() -> None:
    """Enter a section that must not sleep (``non_block_start``).

    The kernel brackets every non-blockable MMU-notifier callback (the OOM
    reaper's invalidations) with it; a sleeping lock taken inside is the
    ``BUG: sleeping function called from invalid context`` splat of
    ``CONFIG_DEBUG_ATOMIC_SLEEP``.
    """
    me = current()
    _non_block[me] = _non_block.get(me, 0) + 1


def non_block_end() -> None:
    """Leave the section entered by :func:`non_block_start`."""
    me = current()
    depth = _non_block.get(me, 0)
    if depth <= 0:
        raise KernelBug("non_block_end without non_block_start")
    if depth == 1:
        del _non_block[me]
    else:
        _non_block[me] = depth - 1


def might_sleep(what: str) -> None:
    """``might_sleep()``: a sleeping call inside a non-blocking section is a
    kernel bug (raised as :class:`KernelBug`, the splat made fatal) whether or
    not it would have had to wait this time."""
    if _non_block and _non_block.get(current(), 0):
        raise KernelBug(
            f"sleeping function called from invalid context: {what} inside a "
            "non-blockable MMU-notifier callback (non_block_start)"
        )


def _wait(reason: object, ready: Callable[[], bool]) -> None:
    if ready():
        return
    if _active is None:
        raise Deadlock(f"would sleep forever: {reason} (no other CPU can wake this one)")
    _active.block(reason, ready)


class Mutex:
    """A sleeping lock with an owner (``struct mutex``)."""

    __slots__ = ("holder", "name")

    def __init__(self, name: str = "mutex") -> None:
        self.name = name
        self.holder: object | None = None

    def __repr__(self) -> str:
        return f"Mutex({self.name!r}, holder={self.holder!r})"

    def acquire(self) -> None:
        might_sleep(f"mutex_lock({self.name})")
        me = current()
        if self.holder == me:
            raise Deadlock(f"{self.name}: recursive acquire by {me!r}")
        if self.holder is not None:
            _wait(self, lambda: self.holder is None)
        self.holder = me
        if _active is not None:
            _record("lock", self.name)

    def try_acquire(self) -> bool:
        """``mutex_trylock``: take the lock only if it is free."""
        if self.holder is not None:
            return False
        self.holder = current()
        return True

    def release(self) -> None:
        if self.holder is None:
            raise KernelBug(f"{self.name}: release of an unlocked mutex")
        self.holder = None
        if _active is not None:
            _record("unlock", self.name)
            _active.point(f"{self.name}:released")

    def held(self) -> bool:
        """True if the running actor holds the lock (``lockdep_is_held``)."""
        return self.holder is not None and self.holder == current()

    def __enter__(self) -> Mutex:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class RwSem:
    """A reader/writer semaphore (``struct rw_semaphore``), e.g. ``mmap_lock``.

    Readers share it, a writer excludes everybody. Holders are tracked per
    actor so that ``assert_held_read()`` (``mmap_assert_locked``) can check the
    contract of an API that requires the lock.
    """

    __slots__ = ("name", "readers", "writer")

    def __init__(self, name: str = "rwsem") -> None:
        self.name = name
        self.readers: dict[object, int] = {}
        self.writer: object | None = None

    def __repr__(self) -> str:
        return f"RwSem({self.name!r}, readers={list(self.readers)}, writer={self.writer!r})"

    def down_read(self) -> None:
        might_sleep(f"down_read({self.name})")
        me = current()
        if self.writer == me:
            raise Deadlock(f"{self.name}: read acquire by the writer {me!r}")
        if self.writer is not None:
            _wait(self, lambda: self.writer is None)
        self.readers[me] = self.readers.get(me, 0) + 1

    def up_read(self) -> None:
        me = current()
        count = self.readers.get(me, 0)
        if count == 0:
            raise KernelBug(f"{self.name}: up_read by {me!r}, which holds no read lock")
        if count == 1:
            del self.readers[me]
        else:
            self.readers[me] = count - 1
        if _active is not None:
            _active.point(f"{self.name}:up_read")

    def down_write(self) -> None:
        might_sleep(f"down_write({self.name})")
        me = current()
        if self.writer == me or me in self.readers:
            raise Deadlock(f"{self.name}: write acquire by {me!r}, which already holds it")
        if self.writer is not None or self.readers:
            _wait(self, lambda: self.writer is None and not self.readers)
        self.writer = me
        if _active is not None:
            _record("lock", f"{self.name} (write)")

    def up_write(self) -> None:
        if self.writer != current():
            raise KernelBug(f"{self.name}: up_write by a non-holder")
        self.writer = None
        if _active is not None:
            _active.point(f"{self.name}:up_write")

    def held_read(self) -> bool:
        return current() in self.readers

    def held_write(self) -> bool:
        return self.writer is not None and self.writer == current()

    def held(self) -> bool:
        """Held by the running actor in either mode."""
        return self.held_write() or self.held_read()

    def assert_held(self) -> None:
        """``mmap_assert_locked``: the running actor holds the lock (any mode)."""
        if not self.held():
            raise KernelBug(f"{self.name} must be held by {current()!r}")

    def assert_held_write(self) -> None:
        """``mmap_assert_write_locked``."""
        if not self.held_write():
            raise KernelBug(f"{self.name} must be held for write by {current()!r}")

    @contextmanager
    def read(self) -> Iterator[RwSem]:
        self.down_read()
        try:
            yield self
        finally:
            self.up_read()

    @contextmanager
    def write(self) -> Iterator[RwSem]:
        self.down_write()
        try:
            yield self
        finally:
            self.up_write()


class WaitQueue:
    """A wait queue (``wait_event``/``wake_up_all``).

    ``wait_event(cond)`` returns at once if ``cond()`` holds, otherwise sleeps
    until a waker makes it true. Outside a scheduler nobody else can make it
    true, so an unsatisfied wait raises ``Deadlock``.
    """

    __slots__ = ("name", "wakeups")

    def __init__(self, name: str = "waitqueue") -> None:
        self.name = name
        self.wakeups = 0

    def wait_event(self, cond: Callable[[], bool]) -> None:
        might_sleep(f"wait_event({self.name})")
        _wait(self, cond)

    def wake_up_all(self) -> None:
        # The scheduler re-evaluates every blocked actor's condition at each
        # step, so waking is bookkeeping only.
        self.wakeups += 1


__all__ = [
    "MAIN_ACTOR",
    "Mutex",
    "RwSem",
    "SchedulerHooks",
    "WaitQueue",
    "active",
    "current",
    "note",
    "point",
    "set_active",
]
