"""The deterministic scheduler: actors as greenlets, one at a time, strategy-driven.

Kernel counterpart: none; this stands in for several CPUs. Each actor (a
device fault through a driver, a CPU munmap, a migration …) runs as a
greenlet; exactly one runs at a time. Control returns to the scheduler at
every ``sched.point(label)``, every contended ``Mutex``/``RwSem`` acquire and
every ``WaitQueue`` sleep, and the strategy picks who runs next. Driver code
stays plain synchronous Python: the switch happens inside the primitives.

Every run is described by its choices (the actor picked at each point where
more than one could run), encoded as a short printable schedule id; replaying
a scenario with that id reruns exactly that interleaving. Nothing reads the
wall clock, so a replay is exact.

A run ends when every actor has finished, when nobody can run (deadlock:
reported with each lock's holder and waiters), when the step budget is spent
(livelock: a retry loop that never ends), or when the ``check`` called after
every step raises.
"""

from __future__ import annotations

import contextlib
import random
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import attrs
import greenlet

from . import sched
from .errors import Deadlock

#: Steps before a run is declared a livelock.
DEFAULT_STEP_BUDGET = 20_000


class Strategy(Protocol):
    """Chooses who runs at each decision point."""

    def begin(self, run: int) -> None:
        """A new run starts (``run`` counts runs of one exploration)."""

    def choose(self, runnable: list[int], current: int | None, step: int) -> int:
        """Pick an actor index among ``runnable`` (sorted); ``current`` just ran."""


@attrs.define(eq=False)
class _Actor:
    index: int
    name: str
    fn: Callable[[], Any]
    g: Any = None
    done: bool = False
    error: BaseException | None = None
    blocked_on: object | None = None
    ready: Callable[[], bool] | None = None


class TraceEntry(NamedTuple):
    """One event of a run (a tuple: dozens are made per run, so they must be cheap)."""

    step: int
    actor: str
    kind: str
    what: str


@attrs.define
class RunResult:
    """What happened in one run."""

    schedule: str
    steps: int
    trace: list[TraceEntry]
    errors: dict[str, BaseException] = attrs.field(factory=dict)
    deadlock: str | None = None
    livelock: bool = False
    violation: BaseException | None = None

    @property
    def failed(self) -> bool:
        return bool(self.deadlock or self.livelock or self.violation is not None or self.errors)

    def describe(self) -> str:
        if self.violation is not None:
            return f"invariant violated: {self.violation}"
        if self.deadlock:
            return f"deadlock: {self.deadlock}"
        if self.livelock:
            return f"livelock: no progress after {self.steps} steps"
        if self.errors:
            return "; ".join(f"{a}: {type(e).__name__}: {e}" for a, e in self.errors.items())
        return "ok"

    def format_trace(self, last: int = 60) -> str:
        """The last ``last`` trace entries; a failed run ends with a ``FAILED``
        line at the step where it failed."""
        lines = [f"{t.step:5d} {t.actor:>10s} {t.kind:8s} {t.what}" for t in self.trace[-last:]]
        if self.failed:
            lines.append(f"{self.steps:5d} {'>>>':>10s} FAILED   {self.describe()}")
        return "\n".join(lines)


def encode_schedule(choices: Sequence[int]) -> str:
    """Choices as a short id: runs of the same actor index, e.g. ``0x5.1x2.0``."""
    if not choices:
        return "-"
    parts = []
    prev, count = choices[0], 0
    for c in choices:
        if c == prev:
            count += 1
        else:
            parts.append(f"{prev}x{count}" if count > 1 else str(prev))
            prev, count = c, 1
    parts.append(f"{prev}x{count}" if count > 1 else str(prev))
    return ".".join(parts)


def decode_schedule(schedule: str) -> list[int]:
    if schedule in ("", "-"):
        return []
    if not re.fullmatch(r"\d+(x\d+)?(\.\d+(x\d+)?)*", schedule):
        raise ValueError(f"not a schedule id: {schedule!r}")
    out: list[int] = []
    for part in schedule.split("."):
        actor, _, count = part.partition("x")
        out.extend([int(actor)] * (int(count) if count else 1))
    return out


class Scheduler:
    """Runs actors one at a time under a strategy (``Scheduler(strategy).run(*actors)``)."""

    def __init__(
        self, strategy: Strategy, step_budget: int = DEFAULT_STEP_BUDGET, run_index: int = 0
    ) -> None:
        self.strategy = strategy
        self.step_budget = step_budget
        self.run_index = run_index
        self._actors: list[_Actor] = []
        self._running: _Actor | None = None
        self._main: Any = None
        self._trace: list[TraceEntry] = []
        self._step = 0
        self._killing = False

    # ----- the hooks sched's primitives call ----------------------------------------------
    def current(self) -> object:
        a = self._running
        return a.name if a is not None and greenlet.getcurrent() is a.g else sched.MAIN_ACTOR

    def point(self, label: str) -> None:
        a = self._running
        if a is None or self._killing or greenlet.getcurrent() is not a.g:
            return  # the scheduler itself (a check), or an actor being unwound
        self._trace.append(TraceEntry(self._step, a.name, "point", label))
        self._main.switch()

    def block(self, reason: object, ready: Callable[[], bool]) -> None:
        a = self._running
        if self._killing:
            raise greenlet.GreenletExit
        if a is None or greenlet.getcurrent() is not a.g:
            raise Deadlock(f"the scheduler itself would sleep on {reason}")
        a.blocked_on, a.ready = reason, ready
        self._trace.append(TraceEntry(self._step, a.name, "block", repr(reason)))
        while not ready():
            self._main.switch()
        a.blocked_on, a.ready = None, None

    def record(self, kind: str, what: str) -> None:
        a = self._running
        if a is None or self._killing or greenlet.getcurrent() is not a.g:
            return
        self._trace.append(TraceEntry(self._step, a.name, kind, what))

    # ----- running -------------------------------------------------------------------------
    def run(
        self,
        *actors: Callable[[], Any] | tuple[str, Callable[[], Any]],
        check: Callable[[], None] | None = None,
    ) -> RunResult:
        """Run ``actors`` (callables, or ``(name, callable)``) to the end; see ``RunResult``."""
        self._actors = []
        for i, spec in enumerate(actors):
            name, fn = (
                spec if isinstance(spec, tuple) else (getattr(spec, "__name__", f"actor{i}"), spec)
            )
            self._actors.append(_Actor(i, f"{name}", fn))
        self._main = greenlet.getcurrent()
        for a in self._actors:
            a.g = greenlet.greenlet(self._body(a), parent=self._main)
        self._trace = []
        self._step = 0
        self.strategy.begin(self.run_index)
        choices: list[int] = []
        result = RunResult("", 0, self._trace)
        previous = sched.set_active(self)
        current: int | None = None
        try:
            while True:
                runnable = [
                    a.index for a in self._actors if not a.done and (a.ready is None or a.ready())
                ]
                if not runnable:
                    waiting = [a for a in self._actors if not a.done]
                    if waiting:
                        result.deadlock = self._describe_deadlock(waiting)
                    break
                if self._step >= self.step_budget:
                    result.livelock = True
                    break
                if len(runnable) == 1:
                    pick = runnable[0]
                else:
                    pick = self.strategy.choose(runnable, current, self._step)
                    if pick not in runnable:
                        raise ValueError(f"strategy picked {pick}, not in {runnable}")
                    choices.append(pick)
                actor = self._actors[pick]
                if current != pick:
                    self._trace.append(TraceEntry(self._step, actor.name, "run", ""))
                current = pick
                self._running = actor
                actor.g.switch()
                self._running = None
                self._step += 1
                if check is not None:
                    try:
                        check()
                    except AssertionError as exc:
                        result.violation = exc
                        break
        finally:
            self._unwind()
            sched.set_active(previous)
        result.schedule = encode_schedule(choices)
        result.steps = self._step
        result.errors = {a.name: a.error for a in self._actors if a.error is not None}
        return result

    def _unwind(self) -> None:
        # Actors cut off by a deadlock, a livelock or a violation are unwound
        # (their ``finally`` blocks and ``with`` exits run, as themselves) so
        # no greenlet outlives the run; what they do meanwhile is not recorded.
        self._killing = True
        try:
            for a in self._actors:
                if not a.done and a.g is not None and not a.g.dead:
                    self._running = a
                    # An error raised while unwinding is a consequence of the cut, not news.
                    with contextlib.suppress(Exception):
                        a.g.throw(greenlet.GreenletExit)
        finally:
            self._running = None
            self._killing = False

    def _body(self, a: _Actor) -> Callable[[], None]:
        def body() -> None:
            try:
                a.fn()
            except greenlet.GreenletExit:
                raise
            except BaseException as exc:  # recorded, reported by the run
                if self._killing:
                    raise
                a.error = exc
                self._trace.append(
                    TraceEntry(self._step, a.name, "error", f"{type(exc).__name__}: {exc}")
                )
            finally:
                a.done = True

        return body

    def _describe_deadlock(self, waiting: list[_Actor]) -> str:
        parts = []
        for a in waiting:
            reason = a.blocked_on
            holder = ""
            if isinstance(reason, sched.Mutex):
                holder = f" held by {reason.holder}"
            elif isinstance(reason, sched.RwSem):
                holder = f" (writer {reason.writer}, readers {sorted(map(str, reason.readers))})"
            parts.append(f"{a.name} waits for {reason!r}{holder}")
        return "; ".join(parts)


# ----- strategies -------------------------------------------------------------------------


class RandomWalk:
    """Pick uniformly among the runnable actors; seeded, so runs replay."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.rng = random.Random(seed)

    def begin(self, run: int) -> None:
        self.rng = random.Random(self.seed * 1_000_003 + run)

    def choose(self, runnable: list[int], current: int | None, step: int) -> int:
        return self.rng.choice(runnable)


class PCT:
    """Probabilistic concurrency testing (Burckhardt et al., ASPLOS 2010).

    Each run gives the actors random distinct priorities and picks ``depth - 1``
    random change points among the first ``steps`` steps; the highest-priority
    runnable actor always runs, and at the i-th change point the running actor
    drops to priority i (below every initial one). A bug of depth d is found
    with probability at least 1 / (n * k^(d-1)) per run.
    """

    def __init__(self, seed: int = 0, depth: int = 2, steps: int = 200) -> None:
        if depth < 1:
            raise ValueError("PCT depth is at least 1")
        self.seed = seed
        self.depth = depth
        self.steps = steps
        self.priorities: dict[int, float] = {}
        self.change_points: list[int] = []
        self.rng = random.Random(seed)

    def begin(self, run: int) -> None:
        self.rng = random.Random(self.seed * 1_000_003 + run)
        self.priorities = {}
        k = max(self.steps, self.depth)
        self.change_points = sorted(self.rng.sample(range(1, k + 1), self.depth - 1))

    def choose(self, runnable: list[int], current: int | None, step: int) -> int:
        for a in runnable:
            if a not in self.priorities:
                self.priorities[a] = self.depth + self.rng.random()
        if self.change_points and step >= self.change_points[0] and current in self.priorities:
            self.change_points.pop(0)
            self.priorities[current] = len(self.change_points) + self.rng.random() * 0.5
        return max(runnable, key=lambda a: self.priorities[a])


class Replay:
    """Follow a recorded schedule id exactly (then the lowest runnable actor)."""

    def __init__(self, schedule: str) -> None:
        self.choices = decode_schedule(schedule)
        self.pos = 0

    def begin(self, run: int) -> None:
        self.pos = 0

    def choose(self, runnable: list[int], current: int | None, step: int) -> int:
        if self.pos < len(self.choices):
            pick = self.choices[self.pos]
            self.pos += 1
            if pick in runnable:
                return pick
        return runnable[0]


def prefix_key(decisions: Sequence[tuple[list[int], int]]) -> tuple[int, ...]:
    """The option indices a sequence of DFS decisions took; keys sort in DFS order."""
    return tuple(idx for _, idx in decisions)


class BoundedDFS:
    """Every schedule with at most ``bound`` preemptions, depth first (as in CHESS).

    A preemption is switching away from an actor that could have gone on.
    Call ``advance()`` after each run; it returns False when all are done.
    """

    def __init__(self, bound: int = 2) -> None:
        self.bound = bound
        #: One entry per decision of the current run: the options there, and
        #: the index of the one taken.
        self.stack: list[tuple[list[int], int]] = []
        #: Entries below this are a fixed prefix: the search covers only the
        #: subtree under it (``below``).
        self.floor = 0
        self.pos = 0
        self.preemptions = 0
        self.exhausted = False

    @classmethod
    def below(cls, bound: int, prefix: list[tuple[list[int], int]]) -> BoundedDFS:
        """A search of only the schedules that start with the decisions ``prefix``."""
        dfs = cls(bound)
        dfs.stack = list(prefix)
        dfs.floor = len(prefix)
        return dfs

    def begin(self, run: int) -> None:
        self.pos = 0
        self.preemptions = 0

    def choose(self, runnable: list[int], current: int | None, step: int) -> int:
        if self.pos < len(self.stack):
            options, idx = self.stack[self.pos]
        else:
            if current in runnable:
                others = [a for a in runnable if a != current]
                options = [current] + (others if self.preemptions < self.bound else [])
            else:
                options = list(runnable)
            idx = 0
            self.stack.append((options, idx))
        pick = options[idx]
        if current in runnable and pick != current:
            self.preemptions += 1
        self.pos += 1
        return pick

    def leaf_key(self) -> tuple[int, ...]:
        """The run just ended, as the indices it took: sorting keys gives DFS order."""
        return prefix_key(self.stack[: self.pos])

    def next_key(self) -> tuple[int, ...]:
        """After ``advance``: every schedule still to come has a key at least this."""
        return prefix_key(self.stack)

    def advance(self) -> bool:
        """Move to the next unexplored schedule; False when the space is exhausted."""
        if self.pos < self.floor:
            raise RuntimeError(
                "the scenario is not deterministic: a run ended inside the prefix it replays"
            )
        del self.stack[self.pos :]
        while len(self.stack) > self.floor:
            options, idx = self.stack[-1]
            if idx + 1 < len(options):
                self.stack[-1] = (options, idx + 1)
                return True
            self.stack.pop()
        self.exhausted = True
        return False

    def split(self) -> list[list[tuple[list[int], int]]]:
        """Give away the shallowest untried alternatives, as prefixes for ``below``.

        Called between runs (after ``advance``). The search keeps the branch
        it is in and drops the alternatives it gave away; together, the
        subtrees it still covers and the ones returned are exactly what it
        covered before. The shallowest branch point holds the largest subtree.
        """
        for p in range(self.floor, len(self.stack)):
            options, idx = self.stack[p]
            if idx + 1 < len(options):
                given = [[*self.stack[:p], (options, j)] for j in range(idx + 1, len(options))]
                self.stack[p] = (options[: idx + 1], idx)
                return given
        return []
