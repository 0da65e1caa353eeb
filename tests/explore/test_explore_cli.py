"""``hmmsim explore``: exploring and replaying one race scenario from the command line."""

from __future__ import annotations

import io
import re

import pytest
from hmmsim.cli import main
from hmmsim.testing.races import RACES


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out), out.getvalue()


def test_list_names_every_race():
    rc, text = run("explore", "--list")
    assert rc == 0
    for race in RACES:
        assert race.name in text


def test_explore_runs_the_whole_bounded_space_and_passes():
    rc, text = run("explore", "read_vs_munmap", "--driver", "dmirror")
    assert rc == 0
    assert "read_vs_munmap on dmirror: 51 schedules (the whole space)" in text
    assert "0 failing" in text


def test_replay_prints_the_trace_of_that_schedule():
    rc, text = run("explore", "read_vs_munmap", "--replay", "0x7")
    assert rc == 0
    lines = text.splitlines()
    assert lines[-1] == "read_vs_munmap on dmirror, schedule 0x7: ok"
    # The device maps the pages, then munmap's invalidation reaches the mirror.
    assert any(" dpte " in line and "maps 4 page(s)" in line for line in lines)
    assert any(" notify " in line and line.strip().endswith(": ok") for line in lines)
    assert any(re.search(r"cpu lock +mm\d+\.mmap_lock \(write\)$", line) for line in lines)


def test_jobs_explore_the_same_space_in_worker_processes():
    head = "read_vs_munmap on dmirror: 51 schedules (the whole space), 598 steps"
    _, alone = run("explore", "read_vs_munmap")
    rc, text = run("explore", "read_vs_munmap", "--jobs", "2")
    assert rc == 0
    assert head in alone and head in text


def test_pct_and_random_strategies_run_a_budget():
    for strategy in ("pct", "random"):
        rc, text = run("explore", "read_vs_dontneed", "--strategy", strategy, "--schedules", "7")
        assert rc == 0 and ": 7 schedules, " in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["explore", "nope"], "no race named 'nope'"),
        (["explore"], "name a scenario"),
        (["explore", "read_vs_munmap", "--replay", "0x"], "not a schedule id"),
        (["explore", "read_vs_munmap", "--driver", "nosuch"], "no driver named 'nosuch'"),
        (["explore", "read_vs_munmap", "--jobs", "-1"], "--jobs must be 0"),
    ],
)
def test_bad_explore_input_is_a_usage_error(argv, message, capsys):
    rc, _ = run(*argv)
    assert rc == 2
    assert message in capsys.readouterr().err
