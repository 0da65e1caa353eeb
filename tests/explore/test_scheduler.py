"""The deterministic scheduler: strategies, schedule ids, replay, deadlock and livelock reports."""

from __future__ import annotations

import itertools
from math import comb

import pytest
from hmmsim import sched
from hmmsim.errors import Deadlock
from hmmsim.explore import ScenarioRun, explore, replay
from hmmsim.sched import (
    PCT,
    BoundedDFS,
    RandomWalk,
    Replay,
    Scheduler,
    decode_schedule,
    encode_schedule,
)


def _stepper(log: list[str], name: str, steps: int):
    """An actor that logs ``steps`` entries with a preemption point between each."""

    def body() -> None:
        for i in range(steps):
            if i:
                sched.point(f"{name}{i}")
            log.append(f"{name}{i}")

    return name, body


def _two_steppers(a: int, b: int):
    log: list[str] = []

    def scenario() -> ScenarioRun:
        log.clear()
        return ScenarioRun([_stepper(log, "a", a), _stepper(log, "b", b)], state=log)

    return scenario, log


def test_schedule_id_round_trips_and_is_short():
    choices = [0] * 40 + [1] * 3 + [0, 1, 1]
    sid = encode_schedule(choices)
    assert sid == "0x40.1x3.0.1x2"
    assert decode_schedule(sid) == choices
    assert encode_schedule([]) == "-" and decode_schedule("-") == []


def test_bad_schedule_id_is_rejected():
    with pytest.raises(ValueError, match="not a schedule id"):
        decode_schedule("0x.1")


def test_actors_run_one_at_a_time_to_completion():
    log: list[str] = []
    result = Scheduler(RandomWalk(seed=3)).run(_stepper(log, "a", 4), _stepper(log, "b", 4))
    assert not result.failed and result.describe() == "ok"
    assert sorted(log) == sorted([f"a{i}" for i in range(4)] + [f"b{i}" for i in range(4)])
    assert [x for x in log if x[0] == "a"] == ["a0", "a1", "a2", "a3"]
    assert result.steps == 8
    assert sched.active() is None


def test_dfs_without_bound_enumerates_every_interleaving_once():
    scenario, log = _two_steppers(3, 3)
    seen = []
    strategy = BoundedDFS(bound=100)
    while True:
        Scheduler(strategy).run(*scenario().actors)
        seen.append(tuple(log))
        if not strategy.advance():
            break
    assert len(seen) == comb(6, 3) == len(set(seen))


@pytest.mark.parametrize(("bound", "expected"), [(0, 2), (1, 6), (2, 14)])
def test_dfs_counts_schedules_with_at_most_k_preemptions(bound, expected):
    # Two actors of three steps: 0 preemptions = 2 serial orders; 1 = a+b = 6;
    # 2 adds each way of switching out and back again.
    scenario, _ = _two_steppers(3, 3)
    out = explore(scenario, BoundedDFS(bound=bound), max_schedules=10_000)
    assert out.exhausted and out.schedules == expected and not out.failures


def _preemptions(order: tuple[str, ...]) -> int:
    switches = sum(1 for x, y in itertools.pairwise(order) if x[0] != y[0])
    finished_first = 1  # one switch happens because an actor finished
    return switches - finished_first


def test_dfs_bound_two_is_exactly_the_interleavings_with_two_preemptions_or_fewer():
    scenario, log = _two_steppers(3, 3)
    strategy = BoundedDFS(bound=2)
    seen = set()
    while True:
        Scheduler(strategy).run(*scenario().actors)
        seen.add(tuple(log))
        if not strategy.advance():
            break
    every = {
        tuple(o)
        for o in itertools.permutations(["a0", "a1", "a2", "b0", "b1", "b2"])
        if [x for x in o if x[0] == "a"] == ["a0", "a1", "a2"]
        and [x for x in o if x[0] == "b"] == ["b0", "b1", "b2"]
    }
    assert seen == {o for o in every if _preemptions(o) <= 2}


def test_replay_of_a_schedule_id_reruns_exactly_that_interleaving():
    scenario, log = _two_steppers(5, 5)
    for seed in range(5):
        first = Scheduler(RandomWalk(seed=seed)).run(*scenario().actors)
        order = list(log)
        again = replay(scenario, first.schedule)
        assert list(log) == order
        assert again.schedule == first.schedule


def test_random_walk_is_reproducible_from_its_seed():
    scenario, _log = _two_steppers(6, 6)
    ids = [
        Scheduler(RandomWalk(seed=9), run_index=2).run(*scenario().actors).schedule
        for _ in range(2)
    ]
    assert ids[0] == ids[1]


def test_pct_finds_a_depth_two_ordering_bug():
    # b must not run its second step between a's two steps: needs one
    # well-placed preemption of a (depth 2).
    state = {"open": False, "bad": 0}

    def scenario() -> ScenarioRun:
        state.update(open=False, bad=0)

        def a() -> None:
            sched.point("a:start")
            state["open"] = True
            sched.point("a:window")
            state["open"] = False

        def b() -> None:
            for _ in range(3):
                sched.point("b")
            if state["open"]:
                state["bad"] += 1

        def check() -> None:
            assert not state["bad"], "b saw the window open"

        return ScenarioRun([("a", a), ("b", b)], check=check)

    out = explore(scenario, PCT(seed=1, depth=2, steps=8), max_schedules=200)
    assert out.failures
    failing = out.failures[0]
    assert "b saw the window open" in failing.description
    assert replay(scenario, failing.schedule).violation is not None


def test_deadlock_is_reported_with_holders_and_waiters():
    def scenario() -> ScenarioRun:
        m1, m2 = sched.Mutex("m1"), sched.Mutex("m2")

        def ab() -> None:
            with m1:
                sched.point("ab:holding m1")
                with m2:
                    pass

        def ba() -> None:
            with m2:
                sched.point("ba:holding m2")
                with m1:
                    pass

        return ScenarioRun([("ab", ab), ("ba", ba)])

    out = explore(scenario, BoundedDFS(bound=2), max_schedules=1000)
    assert out.exhausted
    deadlocks = [f for f in out.failures if f.description.startswith("deadlock")]
    assert deadlocks
    d = deadlocks[0].description
    assert "ab waits for Mutex('m2', holder='ba')" in d
    assert "ba waits for Mutex('m1', holder='ab')" in d
    assert "block" in deadlocks[0].trace


def test_rwsem_writer_waits_for_readers_under_the_scheduler():
    order: list[str] = []

    def reader() -> None:
        with lock.read():
            order.append("r:in")
            sched.point("r:holding")
            order.append("r:out")

    def writer() -> None:
        sched.point("w:start")
        with lock.write():
            order.append("w")

    lock = sched.RwSem("mmap_lock")
    result = Scheduler(Replay("0.1x5")).run(("r", reader), ("w", writer))
    assert not result.failed
    assert order == ["r:in", "r:out", "w"]


def test_livelock_is_cut_at_the_step_budget():
    def spinner() -> None:
        while True:
            sched.point("retry")

    result = Scheduler(RandomWalk(), step_budget=50).run(("spin", spinner))
    assert result.livelock and result.steps == 50
    assert result.describe() == "livelock: no progress after 50 steps"


def test_an_actor_exception_is_reported_not_raised():
    def boom() -> None:
        sched.point("x")
        raise ValueError("kaput")

    result = Scheduler(RandomWalk()).run(("boom", boom), ("idle", lambda: None))
    assert result.failed
    assert isinstance(result.errors["boom"], ValueError)
    assert "boom: ValueError: kaput" in result.describe()


def test_cut_off_actors_are_unwound_and_release_their_locks():
    m = sched.Mutex("m")

    def holder() -> None:
        with m:
            while True:
                sched.point("spin")

    result = Scheduler(RandomWalk(), step_budget=10).run(("h", holder))
    assert result.livelock
    assert m.holder is None
    assert sched.active() is None


def test_wait_queue_sleep_hands_over_to_the_waker():
    wq = sched.WaitQueue("wq")
    flag = {"set": False}
    order: list[str] = []

    def sleeper() -> None:
        wq.wait_event(lambda: flag["set"])
        order.append("woken")

    def waker() -> None:
        order.append("wake")
        flag["set"] = True
        wq.wake_up_all()

    result = Scheduler(Replay("0")).run(("s", sleeper), ("w", waker))
    assert not result.failed and order == ["wake", "woken"]


def test_primitives_outside_a_scheduler_stay_sequential():
    m = sched.Mutex("m")
    m.acquire()
    assert m.holder == sched.MAIN_ACTOR
    with pytest.raises(Deadlock, match="recursive"):
        m.acquire()
    m.release()
    sched.point("nothing happens")
    with pytest.raises(Deadlock, match="would sleep forever"):
        sched.WaitQueue("wq").wait_event(lambda: False)


def test_a_check_must_not_sleep_on_an_actor_lock():
    m = sched.Mutex("m")

    def holder() -> None:
        with m:
            sched.point("holding")

    def check() -> None:
        if m.holder is not None:
            m.acquire()

    # A check that sleeps is a bug in the check, not in the code under test.
    with pytest.raises(Deadlock, match="the scheduler itself would sleep"):
        Scheduler(RandomWalk()).run(("h", holder), check=check)
    assert sched.active() is None
    assert m.holder is None
