"""What ``hmmsim check`` tells a person and a CI: progress, totals, JSON, JUnit XML."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from hmmsim.cli import main
from hmmsim.plugins import BUGZOO_GROUP
from hmmsim.testing.checks import CHECKS, DriverSpec, all_checks, check_id, check_name, run_check
from hmmsim.testing.checks_hugeonly import HUGE_ONLY_OOM_CHECKS, HUGE_ONLY_SIZE_CHECKS
from hmmsim.testing.races import race_by_name
from hmmsim.testing.report import SCHEMA_VERSION, Progress, run_suite, to_json, to_junit

#: How many checks the suite has (it grows; the tests count it, never pin it).
N_CHECKS = len(list(all_checks()))

FAST = [(a, c) for a, cs in CHECKS.items() if a != "races" for c in cs]
#: Checks coherent dmirror skips: those of capabilities it does not claim, the
#: hugetlb-only sizes and OOM checks of HUGE_ONLY drivers among them.
SKIPS = 4 + len(HUGE_ONLY_SIZE_CHECKS) + len(HUGE_ONLY_OOM_CHECKS)


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_output_is_one_line_per_driver_and_area_then_totals():
    out = io.StringIO()
    run = run_suite(
        [DriverSpec("dmirror", (("memory", "coherent"),))], Progress(out, live=False), FAST
    )
    lines = out.getvalue().splitlines()
    dots = "." * len(CHECKS["coherence"])  # the suite grows: counted, never pinned
    assert lines[0].startswith(f"dmirror:memory=coherent coherence     {dots} (")
    assert "\r" not in out.getvalue()
    # Skips give their reason, capabilities by name.
    assert (
        "  skipped device-memory/cpu_fault_on_device_memory: "
        "dmirror:memory=coherent does not claim DEVICE_PRIVATE" in lines
    )
    assert run.totals() == {
        "passed": len(FAST) - SKIPS,
        "failed": 0,
        "skipped": SKIPS,
        "xfailed": 0,
    }


def test_a_terminal_gets_a_live_line_naming_the_running_check():
    out = Tty()
    run_suite([DriverSpec("dmirror")], Progress(out, live=True), FAST[:2])
    text = out.getvalue()
    assert "[0/2] dmirror coherence/read_anonymous ..." in text
    assert "[1/2] dmirror coherence/write_anonymous ..." in text
    assert ("\r\x1b[K" in text and text.endswith("(0.0s)\n")) or text.endswith("s)\n")


def test_one_name_per_check_everywhere():
    race = next(c for c in CHECKS["races"] if check_name(c) == "read_vs_munmap")
    assert check_id("races", race) == "races/read_vs_munmap"
    assert check_id("coherence", CHECKS["coherence"][0]) == "coherence/read_anonymous"
    r = run_check(DriverSpec("dmirror"), "coherence", CHECKS["coherence"][0])
    assert (r.check, r.id) == ("read_anonymous", "coherence/read_anonymous")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "--pyargs",
            "hmmsim.testing.suite",
            "--hmmsim-driver",
            "dmirror",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "test_conformance[dmirror-coherence/read_anonymous]" in proc.stdout
    assert "test_conformance[dmirror-races/read_vs_munmap]" in proc.stdout


def test_a_race_failure_keeps_schedule_replay_and_trace_as_fields():
    spec = DriverSpec("zoo_dmirror_no_read_retry", (), BUGZOO_GROUP)
    check = next(c for c in CHECKS["races"] if c.race is race_by_name("read_vs_munmap"))
    r = run_check(spec, "races", check)
    assert r.outcome == "failed"
    assert "\n" not in r.message and "replay" not in r.message
    assert r.message.startswith("RaceFailure: read_vs_munmap: invariant violated")
    assert r.replay == (
        f"hmmsim explore read_vs_munmap --driver zoo_dmirror_no_read_retry --replay {r.schedule}"
    )
    assert r.trace and "FAILED" in r.trace.splitlines()[-1]
    from hmmsim.testing.report import SuiteRun

    run = SuiteRun([spec], [r], 1.5)
    data = to_json(run)
    (res,) = data["results"]
    assert res["schedule"] == r.schedule and res["replay"] == r.replay and res["trace"] == r.trace
    case = ET.fromstring(to_junit(run)).find("testsuite/testcase")
    assert case is not None and case.get("name") == "races/read_vs_munmap"
    failure = case.find("failure")
    assert failure is not None and r.replay in (failure.text or "")


def test_json_has_schema_versions_durations_and_totals(tmp_path):
    """Also: a repeated --driver is checked once, and the run ends with totals and time."""
    path, xml = tmp_path / "r.json", tmp_path / "r.xml"
    out = io.StringIO()
    rc = main(
        [
            "check",
            "--driver",
            "dmirror:memory=coherent",
            "--driver",
            "dmirror:memory=coherent",
            "--json",
            str(path),
            "--junit-xml",
            str(xml),
        ],
        out,
    )
    assert rc == 0
    last = out.getvalue().splitlines()[-1]
    assert last.startswith(
        f"1 driver spec(s), {N_CHECKS} checks: {N_CHECKS - SKIPS} passed, 0 failed, "
        f"{SKIPS} skipped, "
        "0 expected failures in "
    )
    data = json.loads(path.read_text())
    assert data["schema"] == SCHEMA_VERSION
    assert data["hmmsim_version"] == "0.1.0"
    assert data["plugins"] == {"dmirror": {"distribution": "hmmsim", "version": "0.1.0"}}
    assert (
        data["totals"]["passed"] + data["totals"]["skipped"] == data["totals"]["checks"] == N_CHECKS
    )
    assert data["totals"]["seconds"] > 0
    assert all(r["seconds"] >= 0 for r in data["results"])
    assert data["drivers"] == ["dmirror:memory=coherent"]
    assert "passed/failed/skipped" in out.getvalue()
    assert any(
        r["check"] == "migration_round_trip"
        and r["id"] == "device-memory/migration_round_trip"
        and r["outcome"] == "passed"
        for r in data["results"]
    )
    root = ET.parse(xml).getroot()
    assert root.tag == "testsuites" and root.get("tests") == str(N_CHECKS)
    (suite,) = root
    assert suite.get("name") == "dmirror:memory=coherent" and len(suite) == N_CHECKS
    assert sum(1 for c in suite if c.find("skipped") is not None) == int(suite.get("skipped"))


@pytest.mark.parametrize("option", ["--json", "--junit-xml"])
def test_an_unwritable_report_path_fails_before_the_run(option, tmp_path, capsys):
    out = io.StringIO()
    rc = main(["check", option, str(tmp_path / "no" / "such" / "r.json")], out)
    assert rc == 2 and out.getvalue() == ""
    assert f"hmmsim: error: {option}" in capsys.readouterr().err
    rc = main(["check", option, str(tmp_path)], out)
    assert rc == 2 and out.getvalue() == ""


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == "hmmsim 0.1.0"
    import hmmsim

    assert hmmsim.__version__ == "0.1.0"


def test_an_interrupted_run_keeps_the_results_so_far():
    def check_stops(spec):
        raise KeyboardInterrupt

    out = io.StringIO()
    run = run_suite(
        [DriverSpec("dmirror")],
        Progress(out, live=False),
        [*FAST[:2], ("teardown", check_stops), *FAST[2:]],
    )
    assert run.interrupted and [r.check for r in run.results] == [
        "read_anonymous",
        "write_anonymous",
    ]
    data = to_json(run)
    assert data["interrupted"] is True and data["totals"]["passed"] == 2
