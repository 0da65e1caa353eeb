"""``hmmsim check --jobs N``: the suite over forked workers gives the one-process run's report."""

from __future__ import annotations

import io
import multiprocessing

import pytest
from hmmsim.cli import main, usable_cores
from hmmsim.testing.checks import CHECKS, DriverSpec
from hmmsim.testing.report import Progress, run_suite

#: Fast checks of every outcome (passed, skipped) plus a short race.
SOME = [
    *[("coherence", c) for c in CHECKS["coherence"][:3]],
    ("device-memory", CHECKS["device-memory"][1]),
    *[("races", c) for c in CHECKS["races"][:2]],
    ("teardown", CHECKS["teardown"][0]),
]
SPECS = [DriverSpec("dmirror"), DriverSpec("dmirror", (("memory", "coherent"),))]


def _strip_times(text: str) -> list[str]:
    return [line.rsplit(" (", 1)[0] for line in text.splitlines()]


def test_two_workers_report_what_one_process_reports_in_the_same_order():
    one, two = io.StringIO(), io.StringIO()
    serial = run_suite(SPECS, Progress(one, live=False), SOME)
    parallel = run_suite(SPECS, Progress(two, live=False), SOME, jobs=2)
    key = [(r.driver, r.id, r.outcome, r.message) for r in serial.results]
    assert [(r.driver, r.id, r.outcome, r.message) for r in parallel.results] == key
    assert len(key) == len(SPECS) * len(SOME)
    assert "skipped" in {r.outcome for r in serial.results}
    assert _strip_times(two.getvalue()) == _strip_times(one.getvalue())


def test_a_failing_check_in_a_worker_is_reported_with_its_message_and_traceback():
    def check_fails_here(spec: DriverSpec) -> None:
        raise AssertionError(f"broken on {spec}")

    run = run_suite(SPECS, None, [("coherence", check_fails_here), *SOME[:1]], jobs=2)
    failed = [r for r in run.results if r.outcome == "failed"]
    assert [(r.driver, r.id, r.message) for r in failed] == [
        (str(s), "coherence/fails_here", f"AssertionError: broken on {s}") for s in SPECS
    ]
    assert all("check_fails_here" in r.traceback for r in failed)


def test_jobs_below_one_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        run_suite(SPECS, None, SOME, jobs=0)
    err = io.StringIO()
    assert main(["check", "--jobs", "-1"], io.StringIO(), err) == 2
    assert "--jobs must be 0 (one per core) or more, not -1" in err.getvalue()


def test_usable_cores_follows_the_affinity_mask():
    import os

    assert usable_cores() == len(os.sched_getaffinity(0))


def test_an_interrupt_in_a_worker_ends_the_run_with_the_results_so_far():
    def check_interrupted(spec: DriverSpec) -> None:
        raise KeyboardInterrupt

    out = io.StringIO()
    run = run_suite(
        SPECS[:1], Progress(out, live=False), [*SOME[:1], ("teardown", check_interrupted)], jobs=2
    )
    assert run.interrupted
    # What finished before the interrupt is kept (whether the other check
    # finished first depends on timing); the interrupted check is no result.
    assert [(r.id, r.outcome) for r in run.results] in (
        [],
        [("coherence/read_anonymous", "passed")],
    )
    assert multiprocessing.active_children() == []  # no worker left running


def test_a_refused_fork_runs_the_checks_in_this_process(monkeypatch):
    # Under memory pressure fork fails with ENOMEM: the run must still report
    # every check, as the one-process run does, not die of an OSError.
    import errno
    import os

    def no_fork() -> int:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    one, two = io.StringIO(), io.StringIO()
    serial = run_suite(SPECS, Progress(one, live=False), SOME)
    monkeypatch.setattr(os, "fork", no_fork)
    parallel = run_suite(SPECS, Progress(two, live=False), SOME, jobs=2)
    key = [(r.driver, r.id, r.outcome, r.message) for r in serial.results]
    assert [(r.driver, r.id, r.outcome, r.message) for r in parallel.results] == key


def test_workers_that_cannot_be_forked_leave_the_work_to_this_process(monkeypatch):
    import concurrent.futures

    def no_fork(self, *args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(concurrent.futures.ProcessPoolExecutor, "submit", no_fork)
    one = run_suite(SPECS, None, SOME[:3])
    two = run_suite(SPECS, None, SOME[:3], jobs=2)
    key = [(r.driver, r.id, r.outcome) for r in one.results]
    assert [(r.driver, r.id, r.outcome) for r in two.results] == key
    assert not two.interrupted
