"""The ``hmmsim`` command survives what a newcomer's machine throws at it.

A plugin that cannot be imported, a driver that raises a plain exception, a
bad driver parameter, no pytest installed, a clone that shadows the package.
The extra plugins here are installed without pip: a ``*.dist-info`` with an
``entry_points.txt`` on ``PYTHONPATH`` is all ``importlib.metadata`` needs.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from typing import ClassVar

import pytest
from hmmsim.testing.checks import all_checks

#: How many checks the suite has (it grows; the tests count it, never pin it).
N_CHECKS = len(list(all_checks()))


RAISING_DRIVER = '''
"""A driver whose every device read raises RuntimeError (a plain driver bug)."""
from hmmsim import hookimpl
from hmmsim.driver import Capability, Device, Driver, Mirror, MirrorStats


class RaisingMirror(Mirror):
    def __init__(self, process):
        self.process = process
        self.stats = MirrorStats()

    def read(self, addr, length):
        raise RuntimeError("raisy: the device fell over")

    def write(self, addr, data):
        raise RuntimeError("raisy: the device fell over")

    def device_ptes(self, addr, npages):
        return [None] * npages

    def close(self):
        pass


class RaisingDevice(Device):
    def open(self, process):
        return RaisingMirror(process)

    def remove(self):
        pass


class Raisy(Driver):
    name = "raisy"
    capabilities = Capability.MIRROR | Capability.READ

    def probe(self, machine, **params):
        return RaisingDevice(self, machine)


@hookimpl
def hmmsim_register_drivers():
    return [Raisy]
'''


def install_fake_plugin(site: pathlib.Path, dist: str, entry: str, module: str | None) -> None:
    """A distribution ``dist`` whose ``hmmsim.drivers`` entry point is ``entry``."""
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[hmmsim.drivers]\n{entry}\n")
    if module is not None:
        name = entry.split("=")[1].strip()
        (site / f"{name}.py").write_text(module)


def hmmsim(*argv: str, site: pathlib.Path | None = None, cwd: str | None = None):
    env = dict(os.environ)
    if site is not None:
        env["PYTHONPATH"] = str(site)
    return subprocess.run(
        [sys.executable, "-m", "hmmsim", *argv],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        cwd=cwd,
    )


@pytest.fixture
def broken_site(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    install_fake_plugin(site, "hmmsim-ghost", "ghost = hmmsim_ghost_missing", None)
    return site


def test_drivers_lists_a_plugin_that_cannot_be_imported_and_the_others(broken_site):
    proc = hmmsim("drivers", site=broken_site)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stdout.splitlines()
    assert any(ln.startswith("dmirror ") for ln in lines)
    ghost = [ln for ln in lines if ln.startswith("ghost ")]
    assert len(ghost) == 1
    assert "BROKEN" in ghost[0] and "No module named 'hmmsim_ghost_missing'" in ghost[0]


def test_check_goes_on_without_a_plugin_that_cannot_be_imported_nor_pytest(broken_site, tmp_path):
    """The README's main job on a plain install: no pytest, and here a broken plugin."""
    out = tmp_path / "r.json"
    code = (
        "import sys; sys.modules['pytest'] = None  # a plain install has no pytest\n"
        "from hmmsim.cli import main\n"
        f"sys.exit(main(['check', '--driver', 'dmirror:memory=private', '--json', {str(out)!r}]))"
    )
    env = dict(os.environ, PYTHONPATH=str(broken_site))
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    warnings = [ln for ln in proc.stderr.splitlines() if "ghost" in ln]
    assert len(warnings) == 1 and "cannot be loaded" in warnings[0]
    data = json.loads(out.read_text())
    assert (
        data["totals"]["passed"] + data["totals"]["skipped"] + data["totals"]["xfailed"] == N_CHECKS
        and data["totals"]["failed"] == 0
    )
    assert data["broken_plugins"][0]["name"] == "ghost"


def test_probe_and_pytest_work_next_to_a_plugin_that_cannot_be_imported(broken_site):
    code = textwrap.dedent(
        """
        import warnings, hmmsim
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            m = hmmsim.Machine(hmmsim.MachineConfig(ram_bytes=32 << 20))
            m.probe("dmirror")
            m2 = hmmsim.Machine(hmmsim.MachineConfig(ram_bytes=32 << 20))
            m2.probe("dmirror")
        print(len([x for x in w if "ghost" in str(x.message)]))
        """
    )
    env = dict(os.environ, PYTHONPATH=str(broken_site))
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1"  # reported once
    tests = pathlib.Path(__file__).parent
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "probe",
            str(tests / "test_plugins.py"),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_driver_that_raises_fails_its_checks_and_the_run_goes_on(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    install_fake_plugin(site, "hmmsim-raisy", "raisy = hmmsim_raisy", RAISING_DRIVER)
    out, xml = tmp_path / "r.json", tmp_path / "r.xml"
    proc = hmmsim(
        "check",
        "--driver",
        "raisy",
        "--driver",
        "dmirror:memory=private",
        "--json",
        str(out),
        "--junit-xml",
        str(xml),
        site=site,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "FAILED coherence/read_anonymous: RuntimeError: raisy: the device fell over" in (
        proc.stdout
    )
    data = json.loads(out.read_text())
    by = {(r["driver"], r["id"]): r for r in data["results"]}
    bad = by[("raisy", "coherence/read_anonymous")]
    assert bad["outcome"] == "failed" and "RuntimeError" in bad["traceback"]
    assert "Traceback" in bad["traceback"]
    dm = [r for r in data["results"] if r["driver"] == "dmirror:memory=private"]
    # private dmirror declares test_hmm.c's fault-back race an expected failure
    assert len(dm) == N_CHECKS and {r["outcome"] for r in dm} <= {"passed", "skipped", "xfailed"}
    assert data["plugins"]["raisy"] == {"distribution": "hmmsim-raisy", "version": "0.1"}
    suites = {s.get("name"): s for s in ET.parse(xml).getroot()}
    assert int(suites["raisy"].get("failures")) > 0
    assert suites["dmirror:memory=private"].get("failures") == "0"
    verbose = hmmsim("check", "--driver", "raisy", "-v", site=site)
    assert verbose.returncode == 1 and "Traceback" in verbose.stdout


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("dmirror:memory=bogus", "memory=bogus is not one of private, coherent"),
        ("dmirror:colour=red", "has no parameter 'colour'"),
        ("nosuch", "no driver named 'nosuch'"),
    ],
)
def test_bad_driver_spec_is_one_usage_error_before_any_check(spec, why):
    proc = hmmsim("check", "--driver", spec)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and why in proc.stderr


def test_bad_driver_spec_is_a_pytest_usage_error():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--pyargs",
            "hmmsim.testing.suite",
            "--hmmsim-driver",
            "dmirror:memory=bogus",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 4, proc.stdout + proc.stderr  # pytest's usage error
    assert "memory=bogus is not one of private, coherent" in proc.stderr
    assert "passed" not in proc.stdout and "failed" not in proc.stdout


def test_pytest_from_the_folder_holding_a_clone_named_hmmsim_says_why(tmp_path):
    clone = tmp_path / "hmmsim"
    (clone / "tests").mkdir(parents=True)
    (clone / "tests" / "test_x.py").write_text("from hmmsim import MADV_DONTNEED\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "hmmsim/tests"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "hides the installed hmmsim package" in text and str(clone) in text


def test_explore_names_a_broken_plugin_in_one_warning_line(broken_site):
    proc = hmmsim(
        "explore", "read_vs_munmap", "--strategy", "random", "--schedules", "3", site=broken_site
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == (
        "hmmsim: warning: plugin 'ghost' cannot be loaded: "
        "ModuleNotFoundError: No module named 'hmmsim_ghost_missing'\n"
    )
    assert hmmsim("drivers", site=broken_site).stderr == ""  # listed there, not warned


def test_validate_spec_is_a_usage_error_only_for_what_the_user_gave():
    import types

    import hmmsim
    from hmmsim import hookimpl
    from hmmsim.driver import Driver
    from hmmsim.plugins import get_plugin_manager
    from hmmsim.testing.checks import DriverSpec, validate_spec

    class Boom(Driver):
        name = "boom"

        def probe(self, machine, **params):
            raise RuntimeError("boom: firmware missing")

    class Picky(Driver):
        name = "picky"
        parameters: ClassVar = {"speed": "how fast (a bare description, as older plugins give)"}

        def probe(self, machine, **params):
            raise hmmsim.InvalidArgument(f"picky: speed={params['speed']} is not supported")

    pm = get_plugin_manager()
    plugin = types.SimpleNamespace(hmmsim_register_drivers=hookimpl(lambda: [Boom, Picky]))
    pm.register(plugin, name="toys")
    validate_spec(DriverSpec("boom"), pm)  # the driver's own bug: left to the checks
    with pytest.raises(hmmsim.InvalidArgument, match="speed=fast is not supported"):
        validate_spec(DriverSpec("picky", (("speed", "fast"),)), pm)
    assert Picky.parameter("speed").choices == ()
