"""``hmmsim explore`` for a newcomer: ids checked, usage errors, traces that explain."""

from __future__ import annotations

import io
import re

import pytest
from hmmsim.cli import main
from hmmsim.explore import explore
from hmmsim.plugins import BUGZOO_GROUP
from hmmsim.sched import BoundedDFS
from hmmsim.testing.checks import DriverSpec
from hmmsim.testing.races import explore_race, race_by_name, race_scenario


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = main(list(argv), out, err)
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("schedule", ["7", "0x30", "0x3.1x5", "0x7.1"])
def test_replay_rejects_a_schedule_outside_the_space(schedule):
    rc, out, err = run("explore", "read_vs_munmap", "--replay", schedule)
    assert rc == 2 and out == ""
    assert f"schedule {schedule} is not a schedule of read_vs_munmap on dmirror" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bound", "-1"], "--bound must be 0 or more, not -1"),
        (["--schedules", "0"], "--schedules must be 1 or more, not 0"),
        (["--strategy", "pct", "--depth", "0"], "--depth must be 1 or more, not 0"),
        (["--replay", "x7"], "not a schedule id: 'x7'"),
    ],
)
def test_bad_explore_numbers_are_usage_errors(argv, message):
    rc, out, err = run("explore", "read_vs_munmap", *argv)
    assert rc == 2 and out == "" and message in err


def test_help_text_explains_schedule_ids(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["explore", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "0x3.1x5 is actor 0 three times, then actor 1 five times" in text


def test_replay_trace_shows_the_hmm_protocol_and_names_subscribers_stably():
    rc, out, _ = run("explore", "read_vs_munmap", "--replay", "0x3.1x5.0x3")
    assert rc == 0
    assert "object at 0x" not in out
    assert re.search(r"device hmm +read_begin DmirrorFile\(.*\): seq 1$", out, re.M)
    assert re.search(r"hmm_range_fault \[0x[0-9a-f]+, 0x[0-9a-f]+\) seq 1: ok, 4 page", out)
    assert re.search(r"read_retry DmirrorFile\(.*\): seq 1: retry \(seq now 3\)$", out, re.M)
    assert re.search(r"hmm_range_fault .* seq 3: BadAddress$", out, re.M)
    # Twice the same replay: the same trace, word for word.
    assert run("explore", "read_vs_munmap", "--replay", "0x3.1x5.0x3")[1] == out


def test_a_failing_trace_marks_the_failing_step():
    spec = DriverSpec("zoo_dmirror_no_read_retry", (), BUGZOO_GROUP)
    result = explore_race(spec, race_by_name("read_vs_munmap"))
    assert result.failures
    last = result.failures[0].trace.splitlines()[-1]
    assert re.match(r"\s*\d+ +>>> FAILED +invariant violated: ", last), last


def test_template_subscribers_are_named_by_class_and_interval():
    from hmmsim.notifier import IntervalNotifier, subscriber_name

    class Plain:
        pass

    sub = IntervalNotifier(mm=None, start=0x1000, last=0x1FFF, ops=Plain())  # type: ignore[arg-type]
    assert subscriber_name(sub) == "Plain[0x1000, 0x2000)"


def test_explore_reports_progress_after_every_run():
    seen: list[int] = []
    scenario = race_scenario(DriverSpec("dmirror"), race_by_name("read_vs_munmap"))
    res = explore(scenario, BoundedDFS(2), 20, progress=lambda r: seen.append(r.schedules))
    assert seen == list(range(1, res.schedules + 1)) and res.schedules == 20
