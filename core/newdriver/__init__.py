"""``hmmsim new-driver NAME``: write a small installable driver plugin package.

The driver module is ``hmmsim.newdriver.template`` (a real, importable
driver named ``skel``, never registered as an installed one) rendered by
name substitution; its bug-zoo mutants are in ``hmmsim.newdriver.mutants``.

The generated driver follows the mirror pattern of docs/hmm-protocol.md §4:
an interval notifier over the whole address space, a device page table
under a mutex, faults through ``mmu_interval_read_begin`` →
``hmm_range_fault`` → driver lock → ``mmu_interval_read_retry``, and an
``invalidate`` that takes the same lock, calls ``mmu_interval_set_seq`` and
drops the range. It passes ``hmmsim check --driver NAME`` as generated.
"""

from __future__ import annotations

import importlib.util
import keyword
import pathlib
import re

# Absolute imports: the bug zoo runs this package's body again in a private
# copy when it builds the template's mutants (testing/bugzoo.py), where a
# relative import could not reach beyond the copy.
from hmmsim.errors import AlreadyExists, InvalidArgument
from hmmsim.plugins import driver_classes, get_plugin_manager, plugin_distribution

PYPROJECT = """[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "hmmsim-{name}"
version = "0.1.0"
description = "A hmmsim driver plugin: {name}"
requires-python = ">=3.11"
dependencies = ["hmmsim"]

[project.entry-points."hmmsim.drivers"]
{name} = "hmmsim_{name}"

[tool.setuptools]
py-modules = ["hmmsim_{name}"]

[tool.pytest.ini_options]
# `pytest --pyargs hmmsim.testing.suite` run here tests this driver only.
hmmsim_drivers = ["{name}"]
"""

TEST = '''"""The hmmsim conformance suite against the {name} driver, one test per check.

Each test is named after its check (``coherence/read_anonymous``); a failure
says which check failed and why, with the driver's traceback, or for a race
the command that replays the failing interleaving.
"""

import pytest
from hmmsim.testing.checks import CHECKS, DriverSpec, check_id, run_check

DRIVER = DriverSpec("{name}")
CASES = [(area, check) for area, checks in CHECKS.items() for check in checks]


@pytest.mark.parametrize(("area", "check"), CASES, ids=[check_id(a, c) for a, c in CASES])
def test_conformance(area, check):
    r = run_check(DRIVER, area, check)
    if r.outcome == "skipped":
        pytest.skip(r.message)
    if r.outcome == "failed":
        if r.replay:
            detail = f"replay: {{r.replay}}\\n{{r.trace}}"
        else:
            detail = r.traceback
        pytest.fail(f"{{DRIVER}} fails {{r.id}}: {{r.message}}\\n\\n{{detail}}", pytrace=False)
'''


def class_name(name: str) -> str:
    """The driver class name for a driver name: ``my_gpu`` → ``MyGpu``."""
    return "".join(part.capitalize() for part in name.split("_"))


#: The template: a real driver module (linted, typed, tested and mutated like
#: any driver), named ``skel``; rendering substitutes the new name.
TEMPLATE = "hmmsim.newdriver.template"
_TEMPLATE_NAME = "skel"


def template_source() -> str:
    """The template module's source text."""
    spec = importlib.util.find_spec(TEMPLATE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the new-driver template {TEMPLATE} is not installed")
    return pathlib.Path(spec.origin).read_text()


def render_module(name: str) -> str:
    """The source of the generated driver module for ``name``: the template
    with its name (``skel``) and class prefix (``Skel``) replaced."""
    source = re.sub(r"\bSkel", class_name(name), template_source())
    return re.sub(rf"\b{_TEMPLATE_NAME}\b", name, source)


def write_driver_package(name: str, directory: str) -> pathlib.Path:
    """Write ``hmmsim-NAME/`` under ``directory``; returns its path."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or keyword.iskeyword(name):
        raise InvalidArgument(f"driver name {name!r} must be a lower-case Python identifier")
    installed = driver_classes(get_plugin_manager(), warn=False)
    if name in installed:
        dist, version = plugin_distribution(get_plugin_manager(), installed[name])
        raise AlreadyExists(
            f"a driver named {name!r} is already installed (from {dist} {version}); "
            "choose another name"
        )
    root = pathlib.Path(directory) / f"hmmsim-{name}"
    if root.exists():
        raise AlreadyExists(f"{root} already exists")
    (root / "tests").mkdir(parents=True)
    (root / "pyproject.toml").write_text(PYPROJECT.format(name=name))
    (root / f"hmmsim_{name}.py").write_text(render_module(name))
    (root / "tests" / f"test_{name}.py").write_text(TEST.format(name=name))
    (root / "README.md").write_text(
        f"# hmmsim-{name}\n\nA hmmsim driver plugin. "
        f"`hmmsim check --driver {name}` runs the conformance suite; "
        "`python -m pytest tests` runs it as one test per check.\n"
    )
    return root
