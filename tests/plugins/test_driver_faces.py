"""A driver imports only hmmsim's public faces, as a kernel driver includes only headers.

A module under ``drivers/`` may import ``hmmsim`` and the faces below, and its
own package by relative import. It never imports ``hmmsim.mm.<module>`` (the
model's internals): ``hmmsim.mm`` is the ``linux/mm.h`` subset a driver may use.
Type-only imports (under ``if TYPE_CHECKING:``) count too: a type a driver
names is part of the contract it is written against.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: The public faces (DESIGN §1, §4).
FACES = frozenset(
    {
        "hmmsim",
        "hmmsim.mm",
        "hmmsim.hmm",
        # The v5.7 hmm_range_fault API, for drivers that model that era.
        "hmmsim.hmm_legacy",
        "hmmsim.notifier",
        "hmmsim.migrate",
        "hmmsim.exclusive",
        "hmmsim.memremap",
        "hmmsim.gup",
        "hmmsim.dma",
        "hmmsim.pci",
        "hmmsim.driver",
        "hmmsim.sched",
        "hmmsim.errors",
        "hmmsim.trace",
    }
)

#: Imports of internals that are being removed (the dmirror split moves them to
#: the faces). This list only shrinks: a new entry is a regression.
KNOWN_OFFENDERS: frozenset[tuple[str, str]] = frozenset()


def hmmsim_imports(path: Path) -> set[str]:
    """Every absolute ``hmmsim`` module that ``path`` imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "hmmsim")
        elif (
            isinstance(node, ast.ImportFrom)
            and not node.level
            and node.module
            and node.module.split(".")[0] == "hmmsim"
        ):
            found.add(node.module)
    return found


def offenders() -> set[tuple[str, str]]:
    """(file, module) for every import of something that is not a public face."""
    out = set()
    for path in sorted((REPO / "drivers").rglob("*.py")):
        rel = str(path.relative_to(REPO))
        for module in hmmsim_imports(path):
            if module not in FACES:
                out.add((rel, module))
    return out


def test_drivers_import_only_public_faces() -> None:
    assert offenders() - KNOWN_OFFENDERS == set()


def test_known_offenders_list_only_shrinks() -> None:
    # A fixed import must leave the list, so that it cannot come back unnoticed.
    assert KNOWN_OFFENDERS - offenders() == set()


def test_the_check_sees_type_only_and_function_local_imports(tmp_path: Path) -> None:
    mod = tmp_path / "m.py"
    mod.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from hmmsim.mm.vma import Vma\n"
        "def f():\n"
        "    import hmmsim.mm.fault\n"
        "from . import uapi\n"
        "from hmmsim.mm import Vma as V\n"
    )
    assert hmmsim_imports(mod) == {"hmmsim.mm.vma", "hmmsim.mm.fault", "hmmsim.mm"}


def test_mm_face_exports_what_it_lists() -> None:
    import hmmsim.mm

    assert len(set(hmmsim.mm.__all__)) == len(hmmsim.mm.__all__)
    for name in hmmsim.mm.__all__:
        assert hasattr(hmmsim.mm, name), name
    # The faces drivers used to reach into mm modules for.
    for name in ("VmFault", "VM_FAULT_SIGBUS", "Vma", "AddressSpace", "Process", "PAGE_SIZE"):
        assert name in hmmsim.mm.__all__
