"""dmirror is laid out the way every driver package is, and imports only public faces."""

from __future__ import annotations

import ast
import importlib.metadata
import pathlib

import hmmsim.drivers.dmirror as dmirror
import pytest
from hmmsim.memremap import VmFault
from hmmsim.plugins import BUGZOO_GROUP

PACKAGE = pathlib.Path(dmirror.__file__).parent
FACES = {
    "hmmsim",
    "hmmsim.mm",
    "hmmsim.hmm",
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


def _hmmsim_imports(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(n for n in names if n == "hmmsim" or n.startswith("hmmsim."))
    return found


def test_the_package_has_the_modules_every_driver_package_has():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules == {"__init__", "driver", "device", "mirror", "migrate", "uapi", "mutants"}


@pytest.mark.parametrize("module", sorted(p.name for p in PACKAGE.glob("*.py")))
def test_each_module_imports_only_public_faces(module):
    imported = _hmmsim_imports(PACKAGE / module)
    assert imported <= FACES, imported - FACES


def test_every_public_name_is_importable_from_the_package():
    for name in dmirror.__all__:
        assert getattr(dmirror, name) is not None
    assert dmirror.Dmirror.name == "dmirror"
    assert dmirror.DmirrorFile.__module__ == "hmmsim.drivers.dmirror.mirror"
    assert dmirror.DmirrorDevice.__module__ == "hmmsim.drivers.dmirror.device"


def test_the_package_registers_its_own_mutants():
    eps = {ep.value for ep in importlib.metadata.entry_points(group=BUGZOO_GROUP)}
    assert "hmmsim.drivers.dmirror.mutants" in eps
    from hmmsim.drivers.dmirror.mutants import MUTANTS

    assert all(m.driver == "hmmsim.drivers.dmirror.driver:Dmirror" for m in MUTANTS)
    assert all(m.module.startswith("hmmsim.drivers.dmirror.") for m in MUTANTS)


def test_migrate_to_ram_reads_the_order_from_the_fault_not_the_cpu_page_table():
    # VmFault carries the order of the faulting CPU entry; dmirror's
    # devmem_fault must not walk the CPU page table to learn it.
    assert "order" in {a.name for a in VmFault.__attrs_attrs__}
    source = (PACKAGE / "migrate.py").read_text()
    assert ".pt.lookup(" not in source and "vmf.order" in source
