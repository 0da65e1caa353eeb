"""Exploring one scenario on several cores: forked workers, work-stealing DFS.

Kernel counterpart: none; this is how ``explore(..., jobs=N)`` uses more than
one core. Each worker is a forked copy of this process, so the scenario (a
closure) and the check need no pickling; it runs whole schedules on its own,
one at a time, exactly as a single-process exploration does. The parent only
hands out work and collects what every run found.

Bounded DFS is split by subtrees. A unit of work is a prefix of decisions;
the worker explores every schedule below it (``BoundedDFS.below``). When a
worker runs out of work, the parent asks the busy ones to give some away, and
a busy worker hands over the shallowest alternative it has not started yet,
the largest subtree it holds (work stealing, as parallel model checkers do).
Every schedule of the space is run exactly once whatever the timing, and a
schedule's key (the option indices it took) sorts it where the sequential DFS
would run it. So an exhaustive exploration returns what a single-process one
returns: the same schedules, steps and failures, each failure with the run
index it has sequentially. With ``stop_at_first`` a failure bounds the
search: schedules after it in DFS order are no longer started, the ones
before it still run, so the failure reported is the first in DFS order, as
sequentially (more schedules than sequentially may have run by then, and
``schedules`` counts them all). A ``max_schedules`` budget smaller than the
space runs that many schedules, not necessarily the first ones in DFS order.

Other strategies (seeded random walk, PCT, replay) set themselves up from the
run index at ``begin``, so run indices are dealt out in blocks and the result
is that of a single-process run with the same budget.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import pickle
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

from ..sched import BoundedDFS, RunResult, Strategy, prefix_key
from .run import ExploreResult, Failure, Scenario, run_one

#: Runs per block handed to a worker by seeded strategies (small enough to
#: balance the last blocks, large enough that messages cost nothing).
RUN_BLOCK = 8

Key = Any  # a DFS key (tuple of option indices) or a run index (int)
Prefix = list[tuple[list[int], int]]


class WorkerFailed(RuntimeError):
    """A worker died or its scenario raised outside a run (the run's own errors are reported)."""


def explore_parallel(
    scenario: Scenario,
    strategy: Strategy,
    max_schedules: int,
    check: Callable[[], None] | None,
    *,
    stop_at_first: bool,
    step_budget: int,
    jobs: int,
) -> ExploreResult:
    """``explore`` with ``jobs`` worker processes (see the module docstring)."""
    ctx = multiprocessing.get_context("fork")
    # Output buffered now would be written again by every child at its exit.
    sys.stdout.flush()
    sys.stderr.flush()
    t0 = time.perf_counter()
    conns: list[multiprocessing.connection.Connection] = []
    procs = []
    finished = False
    try:
        for _ in range(jobs):
            here, there = ctx.Pipe()
            worker = _Worker(there, scenario, strategy, check, step_budget, stop_at_first)
            proc = ctx.Process(target=worker.main, daemon=True)
            proc.start()
            there.close()
            conns.append(here)
            procs.append(proc)
        out = _Coordinator(conns, procs, strategy, max_schedules, stop_at_first).run()
        finished = True
    finally:
        for conn, proc in zip(conns, procs, strict=True):
            if not finished:
                proc.kill()  # a failed exploration does not wait for the others' runs
                continue
            with contextlib.suppress(OSError):  # that worker is gone already
                conn.send(("exit",))
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in conns:
            conn.close()
    out.seconds = time.perf_counter() - t0
    if isinstance(strategy, BoundedDFS):
        strategy.exhausted = out.exhausted
    return out


class _Coordinator:
    """The parent's side: hand out units, answer idleness with steals, collect leaves."""

    def __init__(
        self,
        conns: list[multiprocessing.connection.Connection],
        procs: list[Any],
        strategy: Strategy,
        max_schedules: int,
        stop_at_first: bool,
    ) -> None:
        self.conns = conns
        self.procs = procs
        self.dfs = isinstance(strategy, BoundedDFS)
        self.max_schedules = max_schedules
        self.stop_at_first = stop_at_first
        self.queue: deque[Any] = deque()
        if self.dfs:
            self.queue.append(("unit", []))
        else:
            for start in range(0, max_schedules, RUN_BLOCK):
                self.queue.append(("runs", start, min(start + RUN_BLOCK, max_schedules)))
        self.idle = set(range(len(conns)))
        self.busy: set[int] = set()
        #: Busy workers asked to give work away, and those that had none to give
        #: (not asked again until they finish another run).
        self.asked: set[int] = set()
        self.dry: set[int] = set()
        self.leaves: dict[Key, tuple[int, tuple[str, str, str] | None]] = {}
        self.bound: Key | None = None
        self.budget_spent = False
        #: Some part of the space was left out (budget, bound, a unit cut short).
        self.cut = False

    def run(self) -> ExploreResult:
        while True:
            self._dispatch()
            if not self.busy:
                break
            if self.dfs and self.idle and not self.budget_spent:
                for w in sorted(self.busy - self.asked - self.dry):
                    self._send(w, ("split",))
                    self.asked.add(w)
            waiting = [self.conns[w] for w in sorted(self.busy | self.asked)]
            for conn in multiprocessing.connection.wait(waiting):
                w = self.conns.index(conn)  # type: ignore[arg-type]
                self._receive(w, conn)  # type: ignore[arg-type]
        return self._result()

    def _dispatch(self) -> None:
        while self.idle and self.queue and not self.budget_spent:
            unit = self.queue.popleft()
            if self.bound is not None and _first_key(unit) > self.bound:
                self.cut = True  # entirely after the first failure: not needed
                continue
            w = min(self.idle)
            self.idle.discard(w)
            self.busy.add(w)
            self._send(w, unit)
        if self.budget_spent and self.queue:
            self.queue.clear()
            self.cut = True

    def _gone(self, w: int) -> WorkerFailed:
        self.procs[w].join(timeout=5)
        code = self.procs[w].exitcode
        return WorkerFailed(f"exploration worker {w} exited (exit code {code})")

    def _send(self, w: int, msg: tuple[Any, ...]) -> None:
        try:
            self.conns[w].send(msg)
        except OSError:
            # The worker is gone; what it said last (an error, usually) explains why.
            conn = self.conns[w]
            while conn.poll():
                self._receive(w, conn)
            raise self._gone(w) from None

    def _receive(self, w: int, conn: multiprocessing.connection.Connection) -> None:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            raise self._gone(w) from None
        kind = msg[0]
        if kind == "leaf":
            self.dry.discard(w)
            self._leaf(msg[1], msg[2], msg[3])
        elif kind == "units":
            self.asked.discard(w)
            if msg[1]:
                self.queue.extend(("unit", prefix) for prefix in msg[1])
            elif w in self.busy:
                self.dry.add(w)
        elif kind == "done":
            self.busy.discard(w)
            self.idle.add(w)
            self.dry.discard(w)
            if not msg[1]:
                self.cut = True
        elif kind == "error":
            exc, text = msg[1], msg[2]
            exc.add_note(f"raised in exploration worker {w}:\n{text}")
            raise exc
        else:
            raise WorkerFailed(f"exploration worker {w} sent {kind!r}")

    def _leaf(self, key: Key, steps: int, failure: tuple[str, str, str] | None) -> None:
        if self.budget_spent:
            self.cut = True  # ran past the budget while the stop was on its way
            return
        self.leaves[key] = (steps, failure)
        if failure is not None and self.stop_at_first and (self.bound is None or key < self.bound):
            self.bound = key
            for w in range(len(self.conns)):
                self._send(w, ("bound", key))
        if len(self.leaves) >= self.max_schedules:
            self.budget_spent = True
            for b in sorted(self.busy):
                self._send(b, ("stop",))

    def _result(self) -> ExploreResult:
        out = ExploreResult()
        order = sorted(self.leaves)
        out.schedules = len(order)
        out.steps = sum(steps for steps, _ in self.leaves.values())
        for rank, key in enumerate(order):
            failure = self.leaves[key][1]
            if failure is None:
                continue
            schedule, description, trace = failure
            out.failures.append(Failure(schedule, rank, description, trace))
            if self.stop_at_first:
                break
        # The space is exhausted when every unit ran to its end and nothing
        # was left in the queue: whether the budget was reached on the last
        # schedule or earlier makes no difference then.
        out.exhausted = self.dfs and not self.cut and not self.queue
        return out


def _first_key(unit: tuple[Any, ...]) -> Key:
    return prefix_key(unit[1]) if unit[0] == "unit" else unit[1]


class _Worker:
    """A worker's side: take units until told to exit; report every run."""

    def __init__(
        self,
        conn: multiprocessing.connection.Connection,
        scenario: Scenario,
        strategy: Strategy,
        check: Callable[[], None] | None,
        step_budget: int,
        stop_at_first: bool,
    ) -> None:
        self.conn = conn
        self.scenario = scenario
        self.strategy = strategy
        self.check = check
        self.step_budget = step_budget
        self.stop_at_first = stop_at_first
        self.bound: Key | None = None
        self.stopped = False
        self.search: BoundedDFS | None = None

    def main(self) -> None:
        """The process's target: serve, and hand any error to the parent, which raises it."""
        try:
            self.serve()
        except BaseException as exc:
            text = traceback.format_exc()
            try:
                pickle.loads(pickle.dumps(exc))  # the parent must be able to rebuild it
            except Exception:
                exc = WorkerFailed(f"{type(exc).__name__}: {exc}")
            self.conn.send(("error", exc, text))
        finally:
            self.conn.close()

    def serve(self) -> None:
        while True:
            msg = self.conn.recv()
            kind = msg[0]
            if kind == "exit":
                return
            if kind == "unit":
                self.stopped = False
                self.conn.send(("done", self._explore_subtree(msg[1])))
            elif kind == "runs":
                self.stopped = False
                self.conn.send(("done", self._run_block(msg[1], msg[2])))
            else:
                self._control(msg)

    def _control(self, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "split":
            self.conn.send(("units", self.search.split() if self.search is not None else []))
        elif kind == "bound":
            self._lower_bound(msg[1])
        elif kind == "stop":
            self.stopped = True
        else:
            raise WorkerFailed(f"unexpected message {kind!r}")

    def _poll(self) -> None:
        while self.conn.poll():
            self._control(self.conn.recv())

    def _report(self, key: Key, result: RunResult) -> None:
        failure = None
        if result.failed:
            failure = (result.schedule, result.describe(), result.format_trace())
            if self.stop_at_first:
                self._lower_bound(key)
        self.conn.send(("leaf", key, result.steps, failure))

    def _lower_bound(self, key: Key) -> None:
        """Schedules after ``key`` (a failure) in DFS order are no longer needed."""
        if self.bound is None or key < self.bound:
            self.bound = key

    def _explore_subtree(self, prefix: Prefix) -> bool:
        assert isinstance(self.strategy, BoundedDFS)
        search = self.search = BoundedDFS.below(self.strategy.bound, prefix)
        try:
            while True:
                result = run_one(self.scenario, search, 0, self.check, self.step_budget)
                self._report(search.leaf_key(), result)
                if not search.advance():
                    return True
                self._poll()
                if self.stopped or (self.bound is not None and search.next_key() > self.bound):
                    return False
        finally:
            self.search = None

    def _run_block(self, start: int, stop: int) -> bool:
        for run in range(start, stop):
            self._poll()
            if self.stopped or (self.bound is not None and run > self.bound):
                return False
            result = run_one(self.scenario, self.strategy, run, self.check, self.step_budget)
            self._report(run, result)
        return True
