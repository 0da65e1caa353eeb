"""The virtual-time watchdog, and the liveness race explored at length (slow)."""

from __future__ import annotations

import pytest
from hmmsim import Machine, MachineConfig
from hmmsim.explore import explore
from hmmsim.sched import RandomWalk
from hmmsim.testing import races
from hmmsim.testing.checks import DriverSpec
from hmmsim.testing.races import race_by_name, race_scenario
from hmmsim.testing.watchdog import VIRTUAL_TIME_BUDGET_NS, Livelock, install_watchdog


def test_watchdog_raises_once_the_budget_is_spent_and_only_then():
    m = Machine(MachineConfig(ram_bytes=16 << 20))
    m.clock.advance(123)
    clock = install_watchdog(m, budget_ns=1000)
    assert m.clock is clock and clock.now_ns == 123
    m.clock.advance(1000)  # exactly at the deadline: fine
    with pytest.raises(Livelock, match="budget of 0 ms"):
        m.clock.advance(1)
    m.clock.advance(10**9)  # reported once: the check is already failing
    with pytest.raises(ValueError, match="backwards"):
        m.clock.advance(-1)


def test_the_default_budget_is_far_below_the_hmm_timeout_and_far_above_any_check():
    from hmmsim.hmm import HMM_RANGE_DEFAULT_TIMEOUT

    assert VIRTUAL_TIME_BUDGET_NS * 50 <= HMM_RANGE_DEFAULT_TIMEOUT * 1_000_000
    assert VIRTUAL_TIME_BUDGET_NS >= 10 * 530_000  # the slowest check uses 0.53 ms


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["dmirror", "dmirror:memory=coherent", "nouveau"])
def test_a_device_read_ends_against_a_long_invalidation_stream(spec, monkeypatch):
    """Eight invalidations, random (fair) schedules: every run ends, with the
    data or Busy, and the device reads the data afterwards."""
    monkeypatch.setattr(races, "STREAM", 4)
    scenario = race_scenario(DriverSpec.parse(spec), race_by_name("read_vs_invalidation_stream"))
    result = explore(scenario, RandomWalk(seed=13), 150)
    assert not result.failures, result.failures[0].description
    assert result.schedules == 150
