"""Race exploration throughput, and the cost of the scheduling primitives outside it.

* ``scheduler``: a 2-actor scenario of 50 steps with a trivial check — the
  scheduler's own overhead (greenlet switches, strategy, trace);
* ``race``: every race scenario on dmirror, its whole bounded-DFS (k = 2)
  space (at most 400 schedules), invariants checked after every step —
  schedules per second and steps per schedule are in ``extra_info``. The
  ~50-step, 2-actor scenario the speed target names is
  ``write_vs_second_device_migration`` (53 steps);
* ``race, 2 jobs``: the same spaces explored by two worker processes
  (``explore(..., jobs=2)``), one per core of the 2-core target machine,
  fork and work stealing included;
* ``primitives A/B``: a device fault path (first-touch read of 1 MiB through
  dmirror) with the real ``sched`` primitives and with them replaced by bare
  no-ops, in the same process: the difference is what the scheduling hooks
  cost when no scheduler runs.
"""

from __future__ import annotations

from typing import Any

import hmmsim
import pytest
from hmmsim import MAP_ANONYMOUS, MAP_PRIVATE, PROT_READ, PROT_WRITE, sched
from hmmsim.explore import ScenarioRun, explore
from hmmsim.sched import BoundedDFS, RandomWalk
from hmmsim.testing.checks import DriverSpec
from hmmsim.testing.races import RACES, race_by_name, race_scenario

PAGE = 4096


def _fifty_step_scenario() -> ScenarioRun:
    state = {"n": 0}

    def actor() -> None:
        for _ in range(24):
            state["n"] += 1
            sched.point("step")

    def check() -> None:
        assert state["n"] <= 48

    return ScenarioRun([("a", actor), ("b", actor)], check=check)


def test_bench_scheduler_two_actors_fifty_steps(benchmark: Any) -> None:
    result = benchmark(lambda: explore(_fifty_step_scenario, RandomWalk(seed=1), 200))
    assert result.schedules == 200 and not result.failures
    assert result.steps == 200 * 50
    benchmark.extra_info["schedules_per_second"] = result.schedules_per_second


@pytest.mark.parametrize("jobs", [1, 2])
@pytest.mark.parametrize("race", [r.name for r in RACES])
def test_bench_race_dfs_space(benchmark: Any, race: str, jobs: int) -> None:
    spec = DriverSpec.parse("dmirror")
    scenario = race_scenario(spec, race_by_name(race))
    result = benchmark(lambda: explore(scenario, BoundedDFS(2), 400, jobs=jobs))
    # A race dmirror declares as an expected failure (test_hmm.c's own
    # behaviour) must fail; every other must pass.
    declared = f"races/{race}" in spec.driver().expected_failures(**dict(spec.params))
    assert bool(result.failures) == declared
    benchmark.extra_info["schedules"] = result.schedules
    benchmark.extra_info["steps_per_schedule"] = result.steps / result.schedules
    benchmark.extra_info["schedules_per_second"] = result.schedules_per_second


class _NoOpMutex:
    holder: str | None = None

    def acquire(self) -> None:
        self.holder = "main"

    def release(self) -> None:
        self.holder = None


def _fault_path() -> Any:
    m = hmmsim.Machine(hmmsim.MachineConfig(ram_bytes=64 << 20))
    dev = m.probe("dmirror")
    proc = m.spawn()
    mirror = dev.open(proc)
    a = proc.mmap(1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
    proc.write(a, b"x" * (1 << 20))

    def run() -> None:
        mirror.read(a, 1 << 20)
        proc.madvise(a, 1 << 20, hmmsim.MADV_DONTNEED)  # next round faults again
        proc.write(a, b"x" * (1 << 20))

    return run


@pytest.mark.parametrize("primitives", ["real", "no-op"])
def test_bench_primitives_outside_a_scheduler(
    benchmark: Any, primitives: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _fault_path()
    if primitives == "no-op":
        monkeypatch.setattr(sched, "point", lambda label: None)
        monkeypatch.setattr(sched.Mutex, "acquire", _NoOpMutex.acquire)
        monkeypatch.setattr(sched.Mutex, "release", _NoOpMutex.release)
    benchmark(run)
