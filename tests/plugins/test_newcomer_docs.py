"""docs/writing-a-driver.md, run as written: every ``sh`` block, command by command.

Each command runs in a fresh directory with this environment's ``bin`` first
on PATH (what activating the venv does). A trailing ``# exit N`` gives the
exit status the document promises (0 otherwise). One change only: ``pip
install`` gets ``--no-build-isolation --no-deps`` (no index needed, and fast).
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "writing-a-driver.md"


def commands(text: str) -> list[tuple[str, int]]:
    out = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            m = re.search(r"\s+# exit (\d+)$", line)
            out.append((line[: m.start()] if m else line, int(m.group(1)) if m else 0))
    return out


def test_the_guide_has_the_steps_it_promises():
    cmds = [c for c, _ in commands(GUIDE.read_text())]
    assert cmds[0] == "hmmsim new-driver mydev"
    assert any(c.startswith("hmmsim explore") and "--replay" in c for c in cmds)
    assert any("hmmsim.bench" in c and "--hmmsim-driver mydev" in c for c in cmds)


@pytest.mark.slow  # about a minute: two installs, four suite runs, the benchmarks
def test_every_command_of_the_driver_guide_runs_as_written(tmp_path):
    env = dict(os.environ)
    env["PATH"] = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("PYTHONPATH", None)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    try:
        for cmd, status in commands(GUIDE.read_text()):
            run = cmd
            if cmd.startswith("pip install"):
                run = cmd.replace("pip install", "pip install -q --no-build-isolation --no-deps")
            proc = subprocess.run(
                ["bash", "-c", run],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            said = proc.stdout + proc.stderr
            assert proc.returncode == status, f"{cmd}\n{said}"
            assert "Traceback" not in said, f"{cmd}\n{said}"
            if cmd == "hmmsim drivers":
                assert re.search(r"^mydev +hmmsim-mydev 0\.1\.0 ", proc.stdout, re.M), said
            if "--replay 0x2.1x6" in cmd:
                assert "   >>> FAILED   invariant violated: device maps" in proc.stdout
                assert "read_begin MydevMirror[0x0, 0xfffffffffffff000): seq 1" in proc.stdout
            if cmd.startswith("python -m pytest -q --pyargs hmmsim.bench"):
                assert "test_first_touch_read_4mib[mydev]" in proc.stdout
                assert "test_first_touch_read_4mib[dmirror]" in proc.stdout
        assert (tmp_path / "mydev.json").exists() and (tmp_path / "mydev.xml").exists()
    finally:
        subprocess.run([*pip, "uninstall", "-q", "-y", "hmmsim-mydev"], capture_output=True)


@pytest.mark.parametrize("path", ["README.md", "docs/writing-a-driver.md", "docs/hmm-protocol.md"])
def test_docs_point_only_at_files_in_the_repository(path):
    text = (ROOT / path).read_text()
    assert "shared/" not in text
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert (ROOT / path).parent.joinpath(target).exists(), target
    for name in re.findall(r"`((?:core|drivers|bench|tests|docs)/[\w./-]+)`", text):
        assert (ROOT / name).exists(), name


def test_docstrings_point_at_no_missing_document():
    missing = []
    for p in [*ROOT.joinpath("core").rglob("*.py"), *ROOT.joinpath("drivers").rglob("*.py")]:
        for m in re.finditer(
            r"(\.\./shared/|DESIGN\.md|hmm-core\.md|hmm-selftests\.md)", p.read_text()
        ):
            missing.append(f"{p.relative_to(ROOT)}: {m.group(1)}")
    assert missing == []


def test_readme_keeps_exactly_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", setup, re.S)
    assert [b.strip() for b in blocks] == [
        "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/hmmsim check",
        "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && "
        ".venv/bin/python -m pytest -q",
    ]
    assert shlex.split(blocks[0])  # parses as one shell line


def test_ci_runs_the_readmes_main_job_on_a_plain_install():
    ci = (ROOT / ".ci" / "run").read_text()
    line = next(ln for ln in ci.splitlines() if ln.startswith("main_job=$("))
    awk = re.search(r"awk '([^']*)' README\.md", line)
    assert awk is not None
    proc = subprocess.run(
        ["awk", awk.group(1), "README.md"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert proc.stdout.strip() == (
        "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/hmmsim check"
    )
    plain = ci.index('bash -c "$main_job"')
    assert ci.index("rm -rf .venv") < plain < ci.index("pip install -q -e '.[test]'")
