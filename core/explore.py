"""Exploring the interleavings of a scenario, and replaying one exactly.

A *scenario* is a callable that builds fresh state and returns a
``ScenarioRun``: the actors (``(name, callable)`` pairs) and optionally a check
to run after every step and one to run at the end. ``explore`` runs it under
many schedules (a ``BoundedDFS`` until exhausted, or ``RandomWalk``/``PCT``
for ``max_schedules`` runs) and returns the failing schedule ids with a
readable trace; ``replay`` reruns one id.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import attrs

from .sched import (
    DEFAULT_STEP_BUDGET,
    BoundedDFS,
    Replay,
    RunResult,
    Scheduler,
    Strategy,
)


@attrs.define
class ScenarioRun:
    """One instance of a scenario, ready to run."""

    actors: list[tuple[str, Callable[[], Any]]]
    #: Invariants checked after every step (raise AssertionError).
    check: Callable[[], None] | None = None
    #: Checked once at the end, with the run's result (raise AssertionError).
    final: Callable[[RunResult], None] | None = None
    #: Anything the scenario wants to keep (for debugging a failure).
    state: Any = None


Scenario = Callable[[], ScenarioRun]


@attrs.frozen
class Failure:
    schedule: str
    run: int
    description: str
    trace: str


@attrs.define
class ExploreResult:
    schedules: int = 0
    steps: int = 0
    seconds: float = 0.0
    failures: list[Failure] = attrs.field(factory=list)
    exhausted: bool = False

    @property
    def first_failure_at(self) -> int | None:
        return self.failures[0].run + 1 if self.failures else None

    @property
    def schedules_per_second(self) -> float:
        return self.schedules / self.seconds if self.seconds else float("inf")


def run_one(
    scenario: Scenario,
    strategy: Strategy,
    run: int,
    check: Callable[[], None] | None,
    step_budget: int,
) -> RunResult:
    """One fresh instance of ``scenario`` under ``strategy``, checked at every step and the end."""
    inst = scenario()

    def every_step() -> None:
        if inst.check is not None:
            inst.check()
        if check is not None:
            check()

    result = Scheduler(strategy, step_budget=step_budget, run_index=run).run(
        *inst.actors, check=every_step
    )
    if not result.failed and inst.final is not None:
        try:
            inst.final(result)
        except AssertionError as exc:
            result.violation = exc
    return result


def explore(
    scenario: Scenario,
    strategy: Strategy,
    max_schedules: int,
    check: Callable[[], None] | None = None,
    *,
    stop_at_first: bool = False,
    step_budget: int = DEFAULT_STEP_BUDGET,
    jobs: int = 1,
    progress: Callable[[ExploreResult], None] | None = None,
) -> ExploreResult:
    """Run ``scenario`` under up to ``max_schedules`` schedules of ``strategy``.

    ``jobs`` > 1 runs the schedules in that many forked worker processes
    (``hmmsim.parallel``); an exhaustive DFS, or any budget of a seeded
    strategy, then returns what one process returns, only sooner.
    ``progress`` is called with the result so far after every run of a
    single-process exploration (it decides itself how often to say so).
    """
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, not {jobs}")
    if jobs > 1 and max_schedules > 1:
        from .parallel import explore_parallel

        return explore_parallel(
            scenario,
            strategy,
            max_schedules,
            check,
            stop_at_first=stop_at_first,
            step_budget=step_budget,
            jobs=jobs,
        )
    out = ExploreResult()
    t0 = time.perf_counter()
    for run in range(max_schedules):
        result = run_one(scenario, strategy, run, check, step_budget)
        out.schedules += 1
        out.steps += result.steps
        if result.failed:
            out.failures.append(
                Failure(result.schedule, run, result.describe(), result.format_trace())
            )
            if stop_at_first:
                break
        if progress is not None:
            progress(out)
        if isinstance(strategy, BoundedDFS) and not strategy.advance():
            out.exhausted = True
            break
    out.seconds = time.perf_counter() - t0
    return out


def replay(
    scenario: Scenario,
    schedule: str,
    check: Callable[[], None] | None = None,
    step_budget: int = DEFAULT_STEP_BUDGET,
) -> RunResult:
    """Rerun ``scenario`` along the schedule id ``schedule``."""
    return run_one(scenario, Replay(schedule), 0, check, step_budget)
