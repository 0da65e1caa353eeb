"""Bad input raises the documented error and changes nothing."""

from __future__ import annotations

import hmmsim
import pytest
from helpers import ANON, PAGE, RW
from hmmsim import (
    MADV_DONTNEED,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_HUGETLB,
    MAP_PRIVATE,
    MAP_SHARED,
    MREMAP_DONTUNMAP,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PROT_READ,
)


def snapshot(proc):
    return [(v.start, v.end, v.flags) for v in proc.mm.vmas], proc.machine.phys.allocator.nr_free


@pytest.fixture
def mapped(proc):
    a = proc.mmap(4 * PAGE, RW, ANON)
    proc.write(a, b"data")
    return a


@pytest.mark.parametrize(
    ("call", "exc"),
    [
        (lambda p, a: p.mmap(0, RW, ANON), hmmsim.InvalidArgument),
        (lambda p, a: p.mmap(-1, RW, ANON), hmmsim.InvalidArgument),
        (lambda p, a: p.mmap(PAGE, RW, ANON | 0x1), hmmsim.InvalidArgument),  # SHARED_VALIDATE
        (lambda p, a: p.mmap(PAGE, RW, MAP_PRIVATE), hmmsim.errors.BadFileDescriptor),
        (lambda p, a: p.mmap(PAGE, RW, hmmsim.MAP_ANONYMOUS), hmmsim.InvalidArgument),
        (lambda p, a: p.mmap(PAGE, RW, ANON | MAP_FIXED, addr=a + 1), hmmsim.InvalidArgument),
        (lambda p, a: p.mmap(1 << 50, RW, ANON), hmmsim.OutOfMemory),
        (lambda p, a: p.mmap(PAGE, RW, ANON | MAP_FIXED_NOREPLACE, addr=a), hmmsim.AlreadyExists),
        (lambda p, a: p.mmap(PAGE, RW, ANON | MAP_HUGETLB | (25 << 26)), hmmsim.InvalidArgument),
        (lambda p, a: p.mmap(PAGE, RW, ANON | MAP_HUGETLB), hmmsim.OutOfMemory),  # empty pool
        (lambda p, a: p.munmap(a + 1, PAGE), hmmsim.InvalidArgument),
        (lambda p, a: p.munmap(a, 0), hmmsim.InvalidArgument),
        (lambda p, a: p.munmap((1 << 47) - PAGE, 4 * PAGE), hmmsim.InvalidArgument),
        (lambda p, a: p.mprotect(a + 3, PAGE, PROT_READ), hmmsim.InvalidArgument),
        (lambda p, a: p.mprotect(a, PAGE, 0x100), hmmsim.InvalidArgument),
        # A hole after the mapping: ENOMEM (with an unchanged protection, since
        # Linux keeps a changed one on the VMAs before the hole).
        (lambda p, a: p.mprotect(a, 8 * PAGE, RW), hmmsim.OutOfMemory),
        (lambda p, a: p.madvise(a + 1, PAGE, MADV_DONTNEED), hmmsim.InvalidArgument),
        (lambda p, a: p.madvise(a, PAGE, 999), hmmsim.InvalidArgument),
        (lambda p, a: p.madvise(0x10000, PAGE, MADV_DONTNEED), hmmsim.OutOfMemory),
        (lambda p, a: p.madvise(a, PAGE, 5), hmmsim.InvalidArgument),  # no such advice
        (lambda p, a: p.mremap(a + 1, PAGE, PAGE), hmmsim.InvalidArgument),
        (lambda p, a: p.mremap(a, PAGE, 0), hmmsim.InvalidArgument),
        (lambda p, a: p.mremap(a, PAGE, PAGE, 0x40), hmmsim.InvalidArgument),
        (
            lambda p, a: p.mremap(a, PAGE, PAGE, MREMAP_FIXED, new_addr=a + 8 * PAGE),
            hmmsim.InvalidArgument,
        ),
        (
            lambda p, a: p.mremap(a, PAGE, 2 * PAGE, MREMAP_MAYMOVE | MREMAP_DONTUNMAP),
            hmmsim.InvalidArgument,
        ),
        (
            lambda p, a: p.mremap(a, PAGE, PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, new_addr=a),
            hmmsim.InvalidArgument,
        ),
        (
            lambda p, a: p.mremap(a + 3 * PAGE, 2 * PAGE, 4 * PAGE, MREMAP_MAYMOVE),
            hmmsim.BadAddress,
        ),
        (lambda p, a: p.mremap(0x10000, PAGE, 2 * PAGE, MREMAP_MAYMOVE), hmmsim.BadAddress),
        (lambda p, a: p.read(a + 4 * PAGE - 2, 4), hmmsim.SegmentationFault),
        (lambda p, a: p.write(0x10000, b"x"), hmmsim.SegmentationFault),
        (lambda p, a: p.read(a, -1), hmmsim.InvalidArgument),
        (lambda p, a: p.pagemap(a + 1, 1), hmmsim.InvalidArgument),
        (lambda p, a: p.move_pages(a + 1, 1), hmmsim.InvalidArgument),
    ],
)
def test_bad_input_raises_and_changes_nothing(proc, mapped, call, exc):
    before = snapshot(proc)
    with pytest.raises(exc) as info:
        call(proc, mapped)
    assert info.value.errno == exc.errno_value
    assert str(info.value)  # a message naming what was wrong
    assert snapshot(proc) == before
    assert proc.read(mapped, 4) == b"data"


def test_write_to_read_only_mapping_is_segv_and_writes_nothing(proc):
    a = proc.mmap(2 * PAGE, PROT_READ, ANON)
    with pytest.raises(hmmsim.SegmentationFault, match=hex(a)):
        proc.write(a, b"x")
    assert proc.read(a, 1) == b"\0"


def test_store_spanning_into_a_hole_stores_up_to_the_hole_then_faults(proc):
    # As a CPU's store loop (memset, rep stosb) does: the bytes before the
    # faulting address land, then SIGSEGV.
    a = proc.mmap(2 * PAGE, RW, ANON)
    proc.munmap(a + PAGE, PAGE)
    with pytest.raises(hmmsim.SegmentationFault):
        proc.write(a + PAGE - 2, b"abcd")
    assert proc.read(a + PAGE - 2, 2) == b"ab"


def test_mprotect_and_madvise_of_zero_length_succeed_like_linux(proc, mapped):
    proc.mprotect(mapped, 0, PROT_READ)
    proc.madvise(mapped, 0, MADV_DONTNEED)
    assert proc.read(mapped, 4) == b"data"


def test_syscalls_after_exit_raise_no_process(machine):
    p = machine.spawn()
    p.exit()
    with pytest.raises(hmmsim.NoProcess):
        p.mmap(PAGE, RW, ANON)
    with pytest.raises(hmmsim.NoProcess):
        p.exit()


def test_unknown_thp_mode_and_hugetlb_size_are_rejected():
    with pytest.raises(hmmsim.InvalidArgument):
        hmmsim.MachineConfig(thp="sometimes")  # type: ignore[arg-type]
    with pytest.raises(hmmsim.InvalidArgument):
        hmmsim.MachineConfig(hugetlb_pages={4 << 20: 1})


def test_hugetlb_munmap_must_be_huge_aligned(make_machine):
    m = make_machine(hugetlb_pages={2 << 20: 1})
    p = m.spawn()
    a = p.mmap(2 << 20, RW, ANON | MAP_HUGETLB)
    p.write(a, b"h")
    with pytest.raises(hmmsim.InvalidArgument):
        p.munmap(a, PAGE)
    assert p.read(a, 1) == b"h"


def test_file_mapping_flag_combinations(machine, proc):
    f = machine.create_file(PAGE)
    with pytest.raises(hmmsim.InvalidArgument):
        proc.mmap(PAGE, RW, MAP_PRIVATE | hmmsim.MAP_ANONYMOUS, file=f)
    with pytest.raises(hmmsim.InvalidArgument):
        proc.mmap(PAGE, RW, MAP_SHARED, file=f, offset=100)
    with pytest.raises(hmmsim.InvalidArgument):
        proc.mmap(PAGE, RW, MAP_SHARED | MAP_HUGETLB, file=f)
    assert len(proc.mm.vmas) == 0
