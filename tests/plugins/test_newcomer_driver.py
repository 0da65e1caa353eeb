"""A driver author's path: new-driver, its own tests, pinning the suite to one driver."""

from __future__ import annotations

import io
import os
import pathlib
import subprocess
import sys

import pytest
from hmmsim.cli import main
from hmmsim.testing.checks import all_checks

#: How many checks the suite has (it grows; the tests count it, never pin it).
N_CHECKS = len(list(all_checks()))


def pytest_run(*args: str, cwd: pathlib.Path, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        check=False,
    )


def test_new_driver_refuses_the_name_of_an_installed_driver(tmp_path, capsys):
    rc = main(["new-driver", "dmirror", "--dir", str(tmp_path)], io.StringIO())
    assert rc == 2
    err = capsys.readouterr().err
    assert "a driver named 'dmirror' is already installed (from hmmsim 0.1.0)" in err
    assert list(tmp_path.iterdir()) == []


def _generated(tmp_path: pathlib.Path, name: str) -> tuple[pathlib.Path, dict[str, str]]:
    """Write the package and make its entry point visible without pip."""
    assert main(["new-driver", name, "--dir", str(tmp_path)], io.StringIO()) == 0
    pkg = tmp_path / f"hmmsim-{name}"
    info = pkg / f"hmmsim_{name}-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: hmmsim-{name}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[hmmsim.drivers]\n{name} = hmmsim_{name}\n")
    return pkg, dict(os.environ, PYTHONPATH=str(pkg))


def test_the_generated_test_fails_with_a_readable_message(tmp_path):
    pkg, env = _generated(tmp_path, "flaky")
    module = pkg / "hmmsim_flaky.py"
    src = module.read_text()
    broken = src.replace(
        "    def read(self, addr: int, length: int) -> bytes:\n",
        "    def read(self, addr: int, length: int) -> bytes:\n"
        "        raise RuntimeError('flaky: DMA engine hung')\n",
    )
    assert broken != src
    module.write_text(broken)
    proc = pytest_run("-q", "-k", "read_anonymous or write_anonymous", "tests", cwd=pkg, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    # The write check fails too: its data invariant reads back through the device.
    assert "2 failed" in out
    assert "flaky fails coherence/read_anonymous: RuntimeError: flaky: DMA engine hung" in out
    assert "raise RuntimeError('flaky: DMA engine hung')" in out  # the driver's own line
    assert "assert [" not in out  # no list diff to decode


def test_the_generated_package_pins_the_suite_to_its_driver(tmp_path):
    pkg, env = _generated(tmp_path, "pinned")
    proc = pytest_run("--collect-only", "-q", "--pyargs", "hmmsim.testing.suite", cwd=pkg, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = [ln for ln in proc.stdout.splitlines() if "test_conformance[" in ln]
    assert len(ids) == N_CHECKS and all("[pinned-" in ln for ln in ids)


def test_a_test_that_parametrizes_the_driver_itself_does_not_clash(tmp_path):
    (tmp_path / "test_mine.py").write_text(
        "import pytest\n"
        "pytestmark = pytest.mark.parametrize('hmmsim_driver', ['dmirror:memory=coherent'])\n"
        "\n"
        "def test_env(hmmsim_env, hmmsim_driver):\n"
        "    assert str(hmmsim_env.spec) == 'dmirror:memory=coherent'\n"
    )
    proc = pytest_run("-q", "test_mine.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout


@pytest.mark.parametrize(
    "flag", ["--hmmsim-driver=dmirror", "--hmmsim-driver=dmirror:memory=private"]
)
def test_a_repeated_pytest_driver_is_tested_once(tmp_path, flag):
    proc = pytest_run(
        "--collect-only", "-q", "--pyargs", "hmmsim.testing.suite", flag, flag, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sum("test_conformance[" in ln for ln in proc.stdout.splitlines()) == N_CHECKS
