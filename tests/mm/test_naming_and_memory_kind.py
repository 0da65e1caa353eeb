"""One naming rule for scalar/array twins, and one ``MemoryKind`` for pagemap and DevicePte."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import hmmsim
import numpy as np
import pytest
from hmmsim import MAP_ANONYMOUS, MAP_PRIVATE, PROT_READ, PROT_WRITE
from hmmsim.driver import DevicePte
from hmmsim.mm import MemoryKind
from hmmsim.mm.pagetable import (
    KIND_NONE,
    KIND_PRESENT,
    KIND_SWAP,
    make_present,
    make_swap,
    pte_kind,
    pte_kind_array,
    pte_pfn,
    pte_pfn_array,
)

CORE = Path(__file__).resolve().parents[2] / "core"


def test_memory_kind_members_are_todays_strings() -> None:
    assert MemoryKind("anon") is MemoryKind.ANON
    assert MemoryKind.DEVICE_PRIVATE == "device_private"
    assert {"p2p": 1}[MemoryKind.P2P] == 1
    assert f"{MemoryKind.MIGRATION}" == "migration"
    assert json.dumps([MemoryKind.SYSTEM]) == '["system"]'
    assert MemoryKind.ZERO in ("zero", "pfnmap")


def test_pagemap_kind_is_a_memory_kind_that_compares_equal_to_its_string() -> None:
    m = hmmsim.Machine(hmmsim.MachineConfig(ram_bytes=64 << 20))
    p = m.spawn()
    a = p.mmap(3 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
    p.write(a, b"x")
    p.read(a + 4096, 1)
    kinds = [e.kind for e in p.pagemap(a, 3)]
    assert kinds == ["anon", "zero", "none"]
    assert [type(k) for k in kinds] == [MemoryKind] * 3
    assert kinds == [MemoryKind.ANON, MemoryKind.ZERO, MemoryKind.NONE]


def test_device_pte_memory_takes_a_kind_or_its_string_and_rejects_others() -> None:
    pte = DevicePte(addr=0, pfn=1, writable=True, atomic=False, order=0, memory="system")
    assert pte.memory is MemoryKind.SYSTEM
    pte = DevicePte(0, 1, True, False, 0, MemoryKind.DEVICE_COHERENT)
    assert pte.memory == "device_coherent"
    with pytest.raises(ValueError):
        DevicePte(0, 1, True, False, 0, "vram")


def test_dmirror_device_ptes_report_memory_kinds() -> None:
    m = hmmsim.Machine(hmmsim.MachineConfig(ram_bytes=64 << 20))
    p = m.spawn()
    a = p.mmap(4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
    p.write(a, b"x")
    mirror = m.probe("dmirror").open(p)
    assert mirror.read(a, 1) == b"x"
    (pte,) = mirror.device_ptes(a, 1)
    assert pte is not None and pte.memory is MemoryKind.SYSTEM and pte.memory == "system"


def test_scalar_and_array_twins_agree() -> None:
    entries = [0, make_present(7, write=True), make_swap(9)]
    arr = np.array(entries, dtype=np.uint64)
    assert pte_kind_array(arr).tolist() == [pte_kind(e) for e in entries]
    assert [pte_kind(e) for e in entries] == [KIND_NONE, KIND_PRESENT, KIND_SWAP]
    assert pte_pfn_array(arr).tolist() == [pte_pfn(e) for e in entries] == [0, 7, 9]


def test_no_helper_uses_a_retired_twin_name() -> None:
    # Scalar helpers take the kernel's name, vectorised twins add _array.
    retired = {"pfn_of", "kind_of", "entry_pfn", "entry_kind"}
    bad = []
    for path in sorted(CORE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and (
                node.name in retired
                or node.name.endswith(("_vectorised", "_vectorized", "_one_by_one", "_in_place"))
            ):
                bad.append(f"{path.relative_to(CORE)}:{node.lineno} {node.name}")
    assert bad == []
