"""The deterministic scheduler: actors as greenlets, one at a time, strategy-driven.

Kernel counterpart: none; this stands in for several CPUs. Each actor (a
device fault through a driver, a CPU munmap, a migration …) runs as a
greenlet; exactly one runs at a time. Control returns to the scheduler at
every ``locks.point(label)``, every contended ``Mutex``/``RwSem`` acquire and
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
from collections.abc import Callable
from typing import Any, NamedTuple

import attrs
import greenlet

from ..errors import Deadlock
from . import locks
from .strategies import Strategy, encode_schedule

#: Steps before a run is declared a livelock.
DEFAULT_STEP_BUDGET = 20_000


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
        return a.name if a is not None and greenlet.getcurrent() is a.g else locks.MAIN_ACTOR

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
        previous = locks.set_active(self)
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
            locks.set_active(previous)
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
            if isinstance(reason, locks.Mutex):
                holder = f" held by {reason.holder}"
            elif isinstance(reason, locks.RwSem):
                holder = f" (writer {reason.writer}, readers {sorted(map(str, reason.readers))})"
            parts.append(f"{a.name} waits for {reason!r}{holder}")
        return "; ".join(parts)
