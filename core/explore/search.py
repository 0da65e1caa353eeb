"""Exploring a scenario's interleavings: in this process, or across forked workers.

Kernel counterpart: none. ``explore`` runs a scenario (:mod:`hmmsim.explore.run`)
under many schedules of one strategy and gathers the failing schedule ids;
with ``jobs`` > 1 it hands the same work to :mod:`hmmsim.explore.parallel`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..sched import DEFAULT_STEP_BUDGET, BoundedDFS, Strategy
from .parallel import explore_parallel
from .run import ExploreResult, Failure, Scenario, run_one


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
    (``hmmsim.explore.parallel``); an exhaustive DFS, or any budget of a seeded
    strategy, then returns what one process returns, only sooner.
    ``progress`` is called with the result so far after every run of a
    single-process exploration (it decides itself how often to say so).
    """
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, not {jobs}")
    if jobs > 1 and max_schedules > 1:
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
