"""Exploring on several cores gives the result one process gives.

Splitting a bounded DFS into subtrees must cover every schedule exactly once;
``explore(..., jobs=N)`` must return the same schedules, steps and failures
(with their sequential run indices) as ``jobs=1``.
"""

from __future__ import annotations

import random

import pytest
from hmmsim import sched
from hmmsim.explore import ScenarioRun, explore
from hmmsim.plugins import BUGZOO_GROUP
from hmmsim.sched import PCT, BoundedDFS, RandomWalk, Scheduler
from hmmsim.testing.checks import DriverSpec
from hmmsim.testing.races import explore_race, race_by_name


def _lost_update():
    """Two actors each read a counter, yield, then write it back plus one: a lost update."""
    state = {"n": 0}

    def scenario() -> ScenarioRun:
        state["n"] = 0

        def incr() -> None:
            for _ in range(2):
                sched.point("load")
                seen = state["n"]
                sched.point("store")
                state["n"] = seen + 1

        def final(_result: object) -> None:
            assert state["n"] == 4, f"lost update: counter is {state['n']}"

        return ScenarioRun([("a", incr), ("b", incr)], final=final)

    return scenario


def _leaves(search: BoundedDFS, scenario, split_every: int | None, rng: random.Random):
    """Run ``search`` to its end; every ``split_every`` runs give work away (returned too)."""
    leaves, given = [], []
    runs = 0
    while True:
        Scheduler(search).run(*scenario().actors)
        leaves.append(search.leaf_key())
        if not search.advance():
            return leaves, given
        runs += 1
        if split_every and runs % split_every == 0 and rng.random() < 0.7:
            given.extend(search.split())


def test_splitting_a_dfs_covers_every_schedule_exactly_once():
    scenario = _lost_update()
    whole, _ = _leaves(BoundedDFS(2), scenario, None, random.Random(0))
    assert len(whole) == len(set(whole)) > 20
    assert whole == sorted(whole), "DFS runs schedules in key order"
    for seed in range(5):
        rng = random.Random(seed)
        pending: list = [[]]
        covered = []
        while pending:
            prefix = pending.pop(rng.randrange(len(pending)))
            leaves, given = _leaves(BoundedDFS.below(2, prefix), scenario, 2, rng)
            covered.extend(leaves)
            pending.extend(given)
        assert sorted(covered) == whole


def test_a_search_below_a_prefix_replays_it_first():
    scenario = _lost_update()
    whole, _ = _leaves(BoundedDFS(2), scenario, None, random.Random(0))
    search = BoundedDFS(2)
    Scheduler(search).run(*scenario().actors)
    search.advance()
    (given,) = search.split()  # the first decision's other option
    below, _ = _leaves(BoundedDFS.below(2, given), scenario, None, random.Random(0))
    first = tuple(idx for _, idx in given)
    assert below == [k for k in whole if k[: len(first)] == first]


def test_parallel_dfs_returns_every_failure_with_its_sequential_run_index():
    scenario = _lost_update()
    one = explore(scenario, BoundedDFS(2), 10_000)
    two = explore(scenario, BoundedDFS(2), 10_000, jobs=2)
    assert one.exhausted and two.exhausted
    assert (two.schedules, two.steps) == (one.schedules, one.steps)
    assert len(one.failures) > 3
    assert two.failures == one.failures


def test_parallel_dfs_stops_at_the_first_failure_in_dfs_order():
    scenario = _lost_update()
    one = explore(scenario, BoundedDFS(2), 10_000, stop_at_first=True)
    three = explore(scenario, BoundedDFS(2), 10_000, stop_at_first=True, jobs=3)
    assert three.failures == one.failures
    assert three.first_failure_at == one.first_failure_at == 2


@pytest.mark.parametrize("strategy", [lambda: RandomWalk(seed=4), lambda: PCT(seed=4, steps=8)])
def test_parallel_seeded_strategies_run_the_same_runs(strategy):
    scenario = _lost_update()
    one = explore(scenario, strategy(), 50)
    two = explore(scenario, strategy(), 50, jobs=2)
    assert two.schedules == one.schedules == 50
    assert two.steps == one.steps
    assert two.failures == one.failures and one.failures
    first = explore(scenario, strategy(), 50, jobs=2, stop_at_first=True)
    assert first.failures == one.failures[:1]


def test_a_budget_smaller_than_the_space_is_kept_and_not_exhausted():
    scenario = _lost_update()
    whole = explore(scenario, BoundedDFS(2), 10_000)
    part = explore(scenario, BoundedDFS(2), 10, jobs=2)
    assert part.schedules == 10 < whole.schedules
    assert not part.exhausted


def test_a_race_explored_on_two_cores_matches_one_core():
    race = race_by_name("read_vs_munmap")
    spec = DriverSpec("zoo_dmirror_no_read_retry", (), BUGZOO_GROUP)
    one = explore_race(spec, race, stop_at_first=False)
    two = explore_race(spec, race, stop_at_first=False, jobs=2)
    assert (two.schedules, two.steps, two.exhausted) == (one.schedules, one.steps, True)
    assert two.failures == one.failures and one.failures


def test_an_error_in_a_worker_is_raised_with_its_traceback():
    def scenario() -> ScenarioRun:
        raise ValueError("set-up broke")

    with pytest.raises(ValueError, match="set-up broke") as info:
        explore(scenario, BoundedDFS(2), 100, jobs=2)
    assert any("raised in exploration worker" in note for note in info.value.__notes__)


class _Unpicklable(Exception):
    def __init__(self, a: int, b: int) -> None:  # pickling passes only args
        super().__init__(f"{a}+{b}")


def test_an_error_the_parent_cannot_rebuild_arrives_as_text():
    from hmmsim.explore import WorkerFailed

    def scenario() -> ScenarioRun:
        raise _Unpicklable(1, 2)

    with pytest.raises(WorkerFailed, match=r"_Unpicklable: 1\+2"):
        explore(scenario, BoundedDFS(2), 100, jobs=2)


def test_a_worker_that_dies_is_reported_with_its_exit_code():
    import os

    from hmmsim.explore import WorkerFailed

    def scenario() -> ScenarioRun:
        return ScenarioRun([("a", lambda: os._exit(3)), ("b", lambda: None)])

    with pytest.raises(WorkerFailed, match=r"exploration worker \d exited \(exit code 3\)"):
        explore(scenario, BoundedDFS(2), 100, jobs=2)


def test_jobs_must_be_positive():
    with pytest.raises(ValueError, match="jobs must be at least 1, not 0"):
        explore(_lost_update(), BoundedDFS(2), 10, jobs=0)
