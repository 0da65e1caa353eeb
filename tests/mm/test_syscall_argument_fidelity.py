"""Syscall arguments as Linux 6.18 takes them (each checked on the 6.18 host).

- ``MAP_SHARED_VALIDATE`` of a regular file accepts the ``MAP_HUGE_2MB`` and
  ``MAP_HUGE_1GB`` size bits, which ``LEGACY_MAP_MASK`` includes (bits 26-30;
  the host returned a mapping for ``21 << 26``; bit 31 stays EOPNOTSUPP).
- An argument a C caller could only pass as an integer is ``InvalidArgument``
  when it is not one, never a bare ``TypeError``.
"""

from __future__ import annotations

import hmmsim
import pytest
from hmmsim import InvalidArgument, Machine, MachineConfig, NotSupported
from hmmsim.mm.uapi import MAP_SHARED_VALIDATE

PAGE = 4096
RW = hmmsim.PROT_READ | hmmsim.PROT_WRITE
ANON = hmmsim.MAP_PRIVATE | hmmsim.MAP_ANONYMOUS


@pytest.fixture
def machine() -> Machine:
    return Machine(MachineConfig(ram_bytes=16 << 20))


@pytest.mark.parametrize("size_bits", [21 << 26, 30 << 26, 1 << 26, 31 << 26])
def test_shared_validate_of_a_file_accepts_the_map_huge_size_bits(machine, size_bits):
    p = machine.spawn()
    f = machine.create_file(PAGE)
    a = p.mmap(PAGE, RW, MAP_SHARED_VALIDATE | size_bits, file=f)
    p.write(a, b"v")
    assert p.read(a, 1) == b"v"
    with pytest.raises(NotSupported):
        p.mmap(PAGE, RW, MAP_SHARED_VALIDATE | (1 << 31), file=f)


@pytest.mark.parametrize(
    "call",
    [
        lambda p: p.mmap(1.5, RW, ANON),
        lambda p: p.mmap(PAGE, "rw", ANON),
        lambda p: p.mmap(PAGE, RW, ANON, offset=None),
        lambda p: p.munmap("0x1000", PAGE),
        lambda p: p.mprotect(0x10000, PAGE, 1.0),
        lambda p: p.madvise(0x10000, PAGE, None),
        lambda p: p.mremap(0x10000, PAGE, 2.0 * PAGE),
        lambda p: p.mremap(0x10000, PAGE, PAGE, 3, new_addr=[0x20000]),
    ],
)
def test_a_non_integer_syscall_argument_is_einval_and_changes_nothing(machine, call):
    p = machine.spawn()
    a = p.mmap(PAGE, RW, ANON, addr=0x10000)
    p.write(a, b"k")
    with pytest.raises(InvalidArgument) as info:
        call(p)
    assert info.value.errno == 22
    assert [(v.start, v.end) for v in p.mm.vmas] == [(0x10000, 0x10000 + PAGE)]
    assert p.read(a, 1) == b"k"


def test_numpy_integers_are_integers(machine):
    import numpy as np

    p = machine.spawn()
    a = p.mmap(np.int64(PAGE), np.int32(RW), ANON)
    p.munmap(a, np.uint64(PAGE))
    assert len(p.mm.vmas) == 0


def test_mmap_min_addr_is_a_machine_setting():
    """``vm.mmap_min_addr`` is 4096 on the 6.18 host these tests were written on,
    where MAP_FIXED at 0x1000 works; 65536 (the model's default) refuses it."""
    low = Machine(MachineConfig(ram_bytes=16 << 20, mmap_min_addr=PAGE)).spawn()
    assert low.mmap(PAGE, RW, ANON | hmmsim.MAP_FIXED, addr=0x1000) == 0x1000
    with pytest.raises(hmmsim.NotPermitted):
        low.mmap(PAGE, RW, ANON | hmmsim.MAP_FIXED, addr=0)
    high = Machine(MachineConfig(ram_bytes=16 << 20)).spawn()
    with pytest.raises(hmmsim.NotPermitted):
        high.mmap(PAGE, RW, ANON | hmmsim.MAP_FIXED, addr=0x1000)
    with pytest.raises(InvalidArgument):
        MachineConfig(mmap_min_addr=100)
