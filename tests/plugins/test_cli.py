"""The ``hmmsim`` command: drivers, check, new-driver (end to end), bad input."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from hmmsim.cli import main
from hmmsim.testing.checks import all_checks

#: How many checks the suite has (it grows; the tests count it, never pin it).
N_CHECKS = len(list(all_checks()))


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out), out.getvalue()


def test_drivers_lists_dmirror_with_capabilities():
    rc, out = run("drivers")
    assert rc == 0
    line = next(ln for ln in out.splitlines() if ln.startswith("dmirror"))
    assert "hmmsim" in line and "MIGRATE" in line and "memory=coherent" in line
    assert "Capability" not in out  # names, never enum reprs
    param = next(ln for ln in out.splitlines() if ln.strip().startswith("memory="))
    assert "private|coherent" in param and "default private" in param


# hmmsim check end to end, --json and --junit-xml: tests/plugins/test_newcomer_report.py.


@pytest.mark.parametrize(
    "argv",
    [
        ["check", "--driver", "nosuch"],
        ["check", "--driver", "dmirror:memory"],
        ["check", "--driver", "dmirror:colour=red"],
        ["frobnicate"],
        ["new-driver", "Not-A-Name"],
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(argv):
    proc = subprocess.run(
        [sys.executable, "-m", "hmmsim", *argv], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("hmmsim")


def test_new_driver_installs_and_passes_check(tmp_path):
    name = "genmirror"
    rc, _ = run("new-driver", name, "--dir", str(tmp_path))
    assert rc == 0
    pkg = tmp_path / f"hmmsim-{name}"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "install", "-q", "--no-build-isolation", "--no-deps", "-e", str(pkg)],
        check=True,
        capture_output=True,
    )
    try:
        check = subprocess.run(
            [sys.executable, "-m", "hmmsim", "check", "--driver", name],
            capture_output=True,
            text=True,
            check=False,
        )
        assert check.returncode == 0, check.stdout + check.stderr
        assert (
            f"{name} coherence " in check.stdout
            and f"{N_CHECKS} checks: " in check.stdout
            and " 0 failed" in check.stdout
        )
        tests = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(pkg / "tests")],
            capture_output=True,
            text=True,
            check=False,
            cwd=pkg,
        )
        assert tests.returncode == 0, tests.stdout
    finally:
        subprocess.run(
            [*pip, "uninstall", "-q", "-y", f"hmmsim-{name}"], check=False, capture_output=True
        )
