"""The bug zoo: every mutant is caught, and none of them leaks into the default run."""

from __future__ import annotations

import io

import pytest
from hmmsim.cli import main
from hmmsim.plugins import BUGZOO_GROUP, driver_classes, get_plugin_manager
from hmmsim.testing.bugzoo import Mutant, all_mutants, build, run_zoo
from hmmsim.testing.checks import DriverSpec
from hmmsim.testing.races import explore_race, race_by_name

DMIRROR = "hmmsim.drivers.dmirror.driver:Dmirror"
TEMPLATE = "hmmsim.newdriver.template:Skel"


def test_there_are_at_least_twelve_mutants_of_both_bases_each_documented():
    mutants = [m for m in all_mutants() if m.driver in (DMIRROR, TEMPLATE)]
    assert len(mutants) >= 12
    assert {m.driver for m in mutants} == {DMIRROR, TEMPLATE}
    for m in mutants:
        cls = build(m)
        assert cls.name == m.name
        assert cls.__doc__ == m.rule and len(m.rule) > 40


def test_mutants_are_registered_only_in_their_own_group():
    zoo = driver_classes(get_plugin_manager(group=BUGZOO_GROUP))
    assert set(zoo) == {m.name for m in all_mutants()}
    assert {m.name for m in all_mutants() if m.driver == DMIRROR} < set(zoo)
    default = driver_classes(get_plugin_manager())
    assert not any(name.startswith("zoo_") for name in default)


def test_a_mutation_whose_text_is_not_in_the_base_is_refused():
    bad = Mutant(
        "zoo_bad",
        DMIRROR,
        "hmmsim.drivers.dmirror.mirror",
        (("no such text", "x"),),
        "never applies",
    )
    with pytest.raises(AssertionError, match="occurs 0 times"):
        build(bad)


def test_every_mutant_is_caught():
    results = list(run_zoo())
    missed = [r.mutant for r in results if not r.caught]
    assert missed == []
    by_name = {r.mutant: r for r in results}
    # The retry-protocol bugs need an interleaving: only the race checks see them.
    for name in (
        "zoo_dmirror_no_read_retry",
        "zoo_dmirror_retry_outside_lock",
        "zoo_dmirror_no_set_seq",
        "zoo_template_no_read_retry",
        "zoo_template_invalidate_without_lock",
    ):
        assert by_name[name].check.startswith("races/"), by_name[name]
        assert by_name[name].schedules is not None and by_name[name].schedules > 1
    assert by_name["zoo_dmirror_stale_req_bits_after_busy"].check == "races/read_vs_mprotect"
    assert "EPERM" in by_name["zoo_dmirror_stale_req_bits_after_busy"].message


def test_a_lock_held_across_hmm_range_fault_deadlocks_against_munmap():
    spec = DriverSpec("zoo_dmirror_lock_held_across_fault", (), BUGZOO_GROUP)
    result = explore_race(spec, race_by_name("read_vs_munmap"), stop_at_first=False)
    deadlocks = [f for f in result.failures if f.description.startswith("deadlock")]
    assert deadlocks
    d = deadlocks[0].description
    assert "waits for RwSem('mm" in d and "waits for Mutex('dmirror" in d


def test_check_bugzoo_prints_the_table_and_the_kill_rate():
    out = io.StringIO()
    rc = main(["check", "--bugzoo", "--driver", "zoo_dmirror_no_read_retry"], out)
    text = out.getvalue()
    assert rc == 0
    assert "zoo_dmirror_no_read_retry: caught by races/read_vs_munmap" in text
    assert "kill rate: 1/1" in text


def test_check_bugzoo_with_an_unknown_mutant_is_a_usage_error(capsys):
    assert main(["check", "--bugzoo", "--driver", "zoo_nope"], io.StringIO()) == 2
    assert "no mutant named 'zoo_nope'" in capsys.readouterr().err
