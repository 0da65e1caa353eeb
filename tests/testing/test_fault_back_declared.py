"""dmirror's race between a device fault and migrate_to_ram is in the suite, declared as
test_hmm.c's own behaviour (an expected failure of the private variant), not pending."""

from __future__ import annotations

from hmmsim.testing.checks import CHECKS, DriverSpec, check_name, run_check
from hmmsim.testing.races import PENDING_RACES, RACES

NAME = "read_device_memory_vs_cpu_fault_back"
RACE = next(c for c in CHECKS["races"] if check_name(c) == NAME)


def test_the_fault_back_race_is_a_suite_race_and_nothing_is_pending():
    assert NAME in [r.name for r in RACES]
    assert PENDING_RACES == []


def test_dmirror_private_fails_it_as_declared_with_the_rule():
    r = run_check(DriverSpec("dmirror", (("memory", "private"),)), "races", RACE)
    assert r.outcome == "xfailed", r.message
    assert r.message.startswith("expected: dmirror_interval_invalidate returns at once")
    assert "mmu_interval_set_seq" in r.message and "lib/test_hmm.c; not fixed" in r.message
    assert "Rule: an invalidation that can change what a concurrent hmm_range_fault" in r.message


def test_dmirror_coherent_passes_it_and_declares_nothing():
    spec = DriverSpec("dmirror", (("memory", "coherent"),))
    assert spec.driver().expected_failures(memory="coherent") == {}
    assert run_check(spec, "races", RACE).outcome == "passed"
