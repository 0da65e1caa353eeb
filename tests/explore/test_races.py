"""Race scenarios: the reference driver survives every explored interleaving;
a broken one is reported with a schedule id that replays the failure."""

from __future__ import annotations

import pytest
from hmmsim.explore import explore, replay
from hmmsim.plugins import BUGZOO_GROUP
from hmmsim.sched import BoundedDFS
from hmmsim.testing.checks import CHECKS, DriverSpec
from hmmsim.testing.races import RACES, explore_race, race_by_name, race_scenario

DMIRROR = DriverSpec.parse("dmirror")
NO_RETRY = DriverSpec("zoo_dmirror_no_read_retry", (), BUGZOO_GROUP)


def test_every_race_is_a_conformance_check():
    names = [c.__name__ for c in CHECKS["races"]]
    assert names == [f"check_race_{r.name}" for r in RACES]


def _survived_by(spec: str) -> list[str]:
    """The races ``spec`` does not declare as expected failures."""
    s = DriverSpec.parse(spec)
    declared = s.driver().expected_failures(**dict(s.params))
    return [r.name for r in RACES if f"races/{r.name}" not in declared]


@pytest.mark.parametrize("race", _survived_by("dmirror"))
def test_dmirror_race_space_is_small_enough_for_exhaustive_dfs(race):
    result = explore_race(DMIRROR, race_by_name(race))
    assert result.exhausted, f"{race}: {result.schedules} schedules, not exhausted"
    assert not result.failures
    assert result.schedules >= 9


def test_a_failing_schedule_replays_to_the_same_failure_and_trace():
    scenario = race_scenario(NO_RETRY, race_by_name("read_vs_munmap"))
    result = explore(scenario, BoundedDFS(2), 1000, stop_at_first=True)
    (failure,) = result.failures
    assert "but the CPU maps nothing there" in failure.description
    again = replay(scenario, failure.schedule)
    assert again.describe() == failure.description
    assert again.format_trace() == failure.trace


def test_the_race_check_names_the_replay_command():
    check = next(c for c in CHECKS["races"] if c.__name__ == "check_race_read_vs_munmap")
    with pytest.raises(AssertionError) as info:
        check(NO_RETRY)
    text = str(info.value)
    assert "hmmsim explore read_vs_munmap --driver zoo_dmirror_no_read_retry --replay " in text
    assert " dpte " in text  # the trace shows the stale device PTE being written


@pytest.mark.slow
@pytest.mark.parametrize(
    ("spec", "race"),
    [(s, r) for s in ("dmirror", "dmirror:memory=coherent") for r in _survived_by(s)],
)
def test_dmirror_survives_every_schedule_with_three_preemptions(spec, race):
    scenario = race_scenario(DriverSpec.parse(spec), race_by_name(race))
    result = explore(scenario, BoundedDFS(3), 20_000)
    assert result.exhausted and not result.failures, result.failures[:1]


def test_mirror_watch_reverifies_whenever_either_page_table_changes():
    from hmmsim.testing.env import close_environment, open_environment
    from hmmsim.testing.invariants import MirrorWatch

    env = open_environment(DMIRROR, small=True)
    a = env.mmap(4 * 4096)
    env.proc.write(a, b"x" * 4 * 4096)
    env.mirror.read(a, 4 * 4096)
    watch = MirrorWatch(env.mirror, a, 4)
    watch.check()
    watch.check()  # unchanged: nothing to re-verify, still passes
    pt = env.proc.mm.pt
    loc0, e0, _ = pt.lookup(a >> 12)
    loc1, e1, _ = pt.lookup((a >> 12) + 1)
    # The CPU side changes under the device (a missed invalidation): caught.
    pt.set(loc0, e1)
    pt.set(loc1, e0)
    with pytest.raises(AssertionError, match="device maps pfn"):
        watch.check()
    pt.set(loc0, e0)
    pt.set(loc1, e1)
    watch.check()
    # The device side changes (a stale entry written): caught as well.
    vpn = a >> 12
    pfn, tag = env.mirror.pt[vpn]
    env.mirror.pt[vpn] = (env.mirror.pt[vpn + 1][0], tag)
    with pytest.raises(AssertionError, match="device maps pfn"):
        watch.check()
    env.mirror.pt[vpn] = (pfn, tag)
    watch.check()
    close_environment(env)


def test_dmirror_fingerprint_changes_exactly_when_its_device_entries_do():
    from hmmsim import MADV_DONTNEED
    from hmmsim.driver import Mirror
    from hmmsim.testing.env import close_environment, open_environment

    env = open_environment(DMIRROR, small=True)
    a = env.mmap(4 * 4096)
    m = env.mirror
    steps = [
        lambda: None,  # nothing mapped on the device
        lambda: env.proc.write(a, b"x" * 4 * 4096),  # CPU only: still nothing
        lambda: m.read(a, 2 * 4096),  # two pages
        lambda: m.read(a, 4 * 4096),  # all four
        lambda: m.read(a, 4 * 4096),  # the same again
        lambda: env.proc.madvise(a + 4096, 4096, MADV_DONTNEED),  # some dropped
    ]
    own, generic = [], []
    for step in steps:
        step()
        own.append(m.device_pte_state(a, 4))
        generic.append(Mirror.device_pte_state(m, a, 4))
    assert own[0] is None and own[1] is None and generic[:2] == [None, None]
    assert all(x is not None for x in own[2:])
    for i in range(len(steps)):
        for j in range(len(steps)):
            assert (own[i] == own[j]) == (generic[i] == generic[j]), (i, j)
    assert own[3] == own[4] and len(set(own)) == 4
    close_environment(env)
