"""The public API surface: names, values, and the import rule of DESIGN.md §1."""

from __future__ import annotations

import ast
import errno
import pathlib

import hmmsim

ROOT = pathlib.Path(__file__).resolve().parents[2]

LINUX_VALUES = {
    "PROT_NONE": 0x0,
    "PROT_READ": 0x1,
    "PROT_WRITE": 0x2,
    "PROT_EXEC": 0x4,
    "MAP_SHARED": 0x01,
    "MAP_PRIVATE": 0x02,
    "MAP_SHARED_VALIDATE": 0x03,
    "MAP_FIXED": 0x10,
    "MAP_ANONYMOUS": 0x20,
    "MAP_NORESERVE": 0x4000,
    "MAP_POPULATE": 0x8000,
    "MAP_NONBLOCK": 0x10000,
    "MAP_HUGETLB": 0x40000,
    "MAP_FIXED_NOREPLACE": 0x100000,
    "MAP_HUGE_SHIFT": 26,
    "MAP_HUGE_2MB": 21 << 26,
    "MAP_HUGE_1GB": 30 << 26,
    "MADV_NORMAL": 0,
    "MADV_RANDOM": 1,
    "MADV_SEQUENTIAL": 2,
    "MADV_WILLNEED": 3,
    "MADV_DONTNEED": 4,
    "MADV_FREE": 8,
    "MADV_HUGEPAGE": 14,
    "MADV_NOHUGEPAGE": 15,
    "MADV_PAGEOUT": 21,
    "MADV_COLLAPSE": 25,
    "MREMAP_MAYMOVE": 1,
    "MREMAP_FIXED": 2,
    "MREMAP_DONTUNMAP": 4,
    "MMU_NOTIFY_UNMAP": 0,
    "MMU_NOTIFY_CLEAR": 1,
    "MMU_NOTIFY_PROTECTION_VMA": 2,
    "MMU_NOTIFY_PROTECTION_PAGE": 3,
    "MMU_NOTIFY_SOFT_DIRTY": 4,
    "MMU_NOTIFY_RELEASE": 5,
    "MMU_NOTIFY_MIGRATE": 6,
    "MMU_NOTIFY_EXCLUSIVE": 7,
}


def test_constants_have_their_linux_names_and_values():
    for name, value in LINUX_VALUES.items():
        assert getattr(hmmsim, name) == value, name


def test_vm_flags_have_kernel_values():
    from hmmsim.mm import vma

    assert (vma.VM_READ, vma.VM_WRITE, vma.VM_SHARED, vma.VM_MAYWRITE) == (1, 2, 8, 0x20)
    assert (vma.VM_PFNMAP, vma.VM_IO, vma.VM_HUGETLB, vma.VM_MIXEDMAP) == (
        0x400,
        0x4000,
        0x400000,
        0x10000000,
    )
    assert (vma.VM_HUGEPAGE, vma.VM_NOHUGEPAGE) == (0x20000000, 0x40000000)


def test_errors_carry_kernel_errnos():
    pairs = {
        hmmsim.Busy: errno.EBUSY,
        hmmsim.BadAddress: errno.EFAULT,
        hmmsim.NotPermitted: errno.EPERM,
        hmmsim.InvalidArgument: errno.EINVAL,
        hmmsim.OutOfMemory: errno.ENOMEM,
        hmmsim.NoEntry: errno.ENOENT,
        hmmsim.Again: errno.EAGAIN,
        hmmsim.Overflow: errno.EOVERFLOW,
        hmmsim.NotSupported: errno.EOPNOTSUPP,
    }
    for cls, code in pairs.items():
        exc = cls("at 0x1000: because")
        assert isinstance(exc, OSError) and exc.errno == code
        assert "0x1000" in str(exc)


def test_machine_config_defaults():
    cfg = hmmsim.MachineConfig()
    assert (cfg.ram_bytes, cfg.swap_bytes, cfg.thp, cfg.hugetlb_pages, cfg.store_data) == (
        1 << 30,
        0,
        "madvise",
        {},
        True,
    )


def test_mmap_lock_is_an_rwsem_with_read_and_write_contexts():
    p = hmmsim.Machine().spawn()
    with p.mm.mmap_lock.read():
        assert p.mm.mmap_lock.held_read()
    with p.mm.mmap_lock.write():
        assert p.mm.mmap_lock.held_write()
    assert not p.mm.mmap_lock.held()


def test_nothing_imports_core_or_drivers_directly():
    offenders = []
    for path in ROOT.rglob("*.py"):
        if ".venv" in path.parts or "build" in path.parts:
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for n in names:
                if n.split(".")[0] in ("core", "drivers", "bench"):
                    offenders.append(f"{path.relative_to(ROOT)}: {n}")
    assert offenders == []
