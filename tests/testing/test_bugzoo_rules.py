"""What the bug zoo counts as a catch, and how it reports kill rates."""

from __future__ import annotations

import io

import pytest
from hmmsim.cli import main
from hmmsim.driver import Mutant
from hmmsim.testing.bugzoo import (
    ZooResult,
    _race_failure_catches,
    all_mutants,
    kill_rates,
    run_mutant,
)

TEMPLATE = "hmmsim.newdriver.template:Skel"
TEMPLATE_MODULE = "hmmsim.newdriver.template"


def test_a_mutant_that_crashes_with_a_python_error_is_not_caught():
    crashing = Mutant(
        "zoo_test_crashes",
        TEMPLATE,
        TEMPLATE_MODULE,
        (
            (
                '        check_user_range(addr, length, "skel read")',
                "        undefined_name  # noqa: F821\n"
                '        check_user_range(addr, length, "skel read")',
            ),
        ),
        "A mutant that is broken Python, not a driver bug: a NameError in every read.",
    )
    r = run_mutant(crashing)
    assert r.status == "crashed" and not r.caught and not r.expected
    assert r.check == "coherence/read_anonymous"
    assert r.message.startswith("NameError:")


def test_a_mutant_whose_edit_does_not_apply_fails_to_build():
    bad = Mutant("zoo_test_bad", TEMPLATE, TEMPLATE_MODULE, (("no such text", "x"),), "never")
    with pytest.raises(AssertionError, match="occurs 0 times"):
        run_mutant(bad)


@pytest.mark.parametrize(
    ("description", "catches"),
    [
        ("invariant violated: device maps 0x1000 but the CPU maps nothing there", True),
        ("deadlock: device waits for Mutex('x') held by cpu", True),
        ("livelock: no progress after 5000 steps", True),
        ("device: NotPermitted: [EPERM] write to read-only memory", True),
        ("device: KernelBug: put of a free page; cpu: Busy: [EBUSY] timed out", True),
        ("device: NameError: name 'x' is not defined", False),
        ("device: Busy: [EBUSY] x; cpu: TypeError: bad operand", False),
    ],
)
def test_race_failures_catch_only_when_an_oracle_fails(description, catches):
    assert _race_failure_catches(description) is catches


def test_kill_rates_count_caught_of_total_per_driver_and_area():
    results = [
        ZooResult("a", "caught", driver="dmirror", area="fault"),
        ZooResult("b", "missed", driver="dmirror", area="teardown", suite_gap="no check"),
        ZooResult("c", "crashed", driver="skel", area="fault"),
    ]
    assert kill_rates(results, "driver") == {"dmirror": (1, 2), "skel": (0, 1)}
    assert kill_rates(results, "area") == {"fault": (1, 2), "teardown": (0, 1)}
    assert [r.expected for r in results] == [True, True, False]


def test_every_mutant_names_its_area_and_rule():
    areas = {
        "fault",
        "invalidation",
        "permissions",
        "coherence",
        "huge",
        "migration",
        "exclusive",
        "teardown",
        "dma",
    }
    mutants = all_mutants()
    assert len(mutants) >= 40
    assert len({m.name for m in mutants}) == len(mutants)
    for m in mutants:
        assert m.area in areas, m.name
        assert len(m.rule) > 40, m.name


def test_check_bugzoo_reports_rates_per_driver_and_area_and_race_schedules():
    out = io.StringIO()
    names = ["zoo_template_no_set_seq", "zoo_template_maps_read_fault_writable"]
    rc = main(["check", "--bugzoo", "--driver", names[0], "--driver", names[1]], out)
    text = out.getvalue()
    assert rc == 0
    assert "kill rate by driver: skel 2/2" in text
    assert "kill rate by area: invalidation 1/1, permissions 1/1" in text
    assert "schedules to the failing one, 1 race-caught mutant(s)" in text
    assert "kill rate: 2/2" in text
