"""Running a scenario under one schedule, and replaying one exactly.

A *scenario* is a callable that builds fresh state and returns a
``ScenarioRun``: the actors (``(name, callable)`` pairs) and optionally a check
to run after every step and one to run at the end. ``run_one`` runs it once
under a strategy; ``replay`` reruns one schedule id. Exploring many schedules
is :mod:`hmmsim.explore.search`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from ..sched import (
    DEFAULT_STEP_BUDGET,
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


def replay(
    scenario: Scenario,
    schedule: str,
    check: Callable[[], None] | None = None,
    step_budget: int = DEFAULT_STEP_BUDGET,
) -> RunResult:
    """Rerun ``scenario`` along the schedule id ``schedule``."""
    return run_one(scenario, Replay(schedule), 0, check, step_budget)
