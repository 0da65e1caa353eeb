"""A broken kernel contract travels one of two ways: ``KernelBug`` or a ``KernelWarning``.

Where the kernel BUG()s the model raises ``KernelBug`` (an ``AssertionError``);
where it WARN()s and carries on, the model carries on and appends one
``KernelWarning`` record to ``Machine.kernel_warnings``.
"""

from __future__ import annotations

import ast
import pathlib

import attrs
import pytest
from hmmsim import (
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    PROT_READ,
    PROT_WRITE,
    KernelBug,
    KernelWarning,
    Machine,
    MachineConfig,
    mmu_interval_notifier_insert,
)
from hmmsim.mm.debug import verify_machine
from hmmsim.testing.invariants import check_notifier_contract
from hmmsim.trace import Clock

PAGE = 4096
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS
ROOT = pathlib.Path(__file__).resolve().parents[2]


class Refuser:
    """An interval notifier that refuses every invalidation (a driver bug)."""

    def invalidate(self, sub, rng, cur_seq):  # type: ignore[no-untyped-def]
        return False


@pytest.fixture
def machine() -> Machine:
    return Machine(MachineConfig(ram_bytes=32 << 20))


def test_blockable_refusal_is_one_kernel_warning_record(machine):
    p = machine.spawn()
    a = p.mmap(PAGE, RW, ANON)
    mmu_interval_notifier_insert(p.mm, a, PAGE, Refuser())
    p.munmap(a, PAGE)
    [w] = machine.kernel_warnings
    assert isinstance(w, KernelWarning)
    assert (w.source, w.where) == ("mmu_notifier", "mn_itree_invalidate")
    assert "blockable" in w.rule
    assert w.what.startswith(f"UNMAP [{a:#x}, {a + PAGE:#x})")
    # The old attribute stays readable: the notifier core's records, as text.
    assert machine.notifier_warnings == [str(w)]
    assert str(w).startswith("WARNING in mn_itree_invalidate (mmu_notifier): ")


def test_refused_release_is_a_kernel_warning_from_mn_itree_release(machine):
    p = machine.spawn()
    a = p.mmap(PAGE, RW, ANON)
    mmu_interval_notifier_insert(p.mm, a, PAGE, Refuser())
    p.exit()
    # exit_mmap: RELEASE first, then the unmap of the VMAs (still a blockable
    # invalidation the refuser refuses).
    wheres = [w.where for w in machine.kernel_warnings]
    assert wheres == ["mn_itree_release", "mn_itree_invalidate"]
    assert machine.kernel_warnings[0].what == f"Refuser[{a:#x}, {a + PAGE:#x})"


def test_machine_warn_records_in_order_and_returns_the_record(machine):
    w1 = machine.warn("dmirror", "dmirror_do_fault", "hmm_range_fault gave an error pfn", "x")
    w2 = machine.warn("mmu_notifier", "mn_itree_release", "RELEASE refused")
    assert machine.kernel_warnings == [w1, w2]
    assert machine.notifier_warnings == [str(w2)]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        w1.rule = "other"  # type: ignore[misc]


def test_invariant_6_fails_on_any_kernel_warning_with_the_first_one(machine):
    check_notifier_contract(machine)  # nothing recorded: passes
    machine.warn("dmirror", "dmirror_do_fault", "hmm_range_fault gave an invalid pfn", "0x10")
    with pytest.raises(AssertionError, match=r"1 kernel warning\(s\), first: WARNING in dmirror"):
        check_notifier_contract(machine)


def test_nouveau_dropping_an_entry_without_its_valid_bit_is_a_kernel_warning(machine):
    from hmmsim.drivers.nouveau.svm import FAULT_ACCESS_READ, FaultEntry

    drm = machine.probe("nouveau")
    chan = drm.open(machine.spawn()).channel
    drm.svm.buffer.push(FaultEntry(chan.inst, 0x1000, 0, 0, 0, 0, FAULT_ACCESS_READ, 0, 0), False)
    drm.svm.fault()
    [w] = machine.kernel_warnings
    assert (w.source, w.where, w.what) == ("nouveau", "nouveau_svm_fault_cache", "entry 0")
    assert drm.svm.warnings == []  # its own log holds only the driver's messages


def test_overlapping_vma_insert_is_a_kernel_bug(machine):
    p = machine.spawn()
    a = p.mmap(2 * PAGE, RW, ANON)
    vma = p.mm.find_vma(a)
    with pytest.raises(KernelBug, match="overlaps"):
        p.mm.vmas.insert(vma)


def test_clock_running_backwards_is_a_kernel_bug():
    with pytest.raises(KernelBug, match="backwards"):
        Clock().advance(-1)


def test_allocation_of_an_impossible_order_is_a_kernel_bug(machine):
    with pytest.raises(KernelBug, match="order 40 outside"):
        machine.phys.alloc(40)


def test_debug_vm_inconsistency_is_a_kernel_bug_not_a_bare_assert(machine):
    p = machine.spawn()
    a = p.mmap(PAGE, RW, ANON)
    p.write(a, b"x")
    pfn = p.pagemap(a, 1)[0].pfn
    machine.phys.mapcount[pfn] += 1  # an rmap accounting bug
    with pytest.raises(KernelBug, match=f"folio {pfn:#x}: mapcount 2 but 1 mapping"):
        verify_machine(machine)
    machine.phys.mapcount[pfn] -= 1
    verify_machine(machine)


def test_ram_below_the_minimum_is_an_errno_error_not_a_value_error():
    from hmmsim import InvalidArgument
    from hmmsim.mm.physmem import PhysMem
    from hmmsim.trace import Costs

    with pytest.raises(InvalidArgument, match="at least 16 MiB"):
        PhysMem(1 << 20, True, Costs())


#: Modules where a broken rule is the kernel's: the CPU memory model, the HMM
#: layer, time and locks. (The conformance checks and the explorer raise
#: AssertionError by design; the CLI and the scheduler's schedule-id parser
#: answer user input.)
KERNEL_MODULES = [
    *sorted((ROOT / "core" / "mm").glob("*.py")),
    *[
        ROOT / "core" / f"{m}.py"
        for m in ("notifier", "hmm", "migrate", "gup", "dma", "pci", "memremap", "trace", "sched")
        if (ROOT / "core" / f"{m}.py").exists()
    ],
    *sorted((ROOT / "drivers").rglob("*.py")),
]


@pytest.mark.parametrize("path", KERNEL_MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_kernel_code_raises_kernel_bug_not_bare_builtin_errors(path):
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id in (
                "AssertionError",
                "ValueError",
                "RuntimeError",
            ):
                bad.append(f"line {node.lineno}: raise {exc.id}")
    assert bad == []


def test_kernel_bug_is_an_assertion_error_so_checks_count_it_failed():
    assert issubclass(KernelBug, AssertionError)
