"""Fixtures of hmm-tests.c (`hmm` and `hmm2`), on dmirror, private and coherent.

Notation as in hmm-selftests.md §2.0: P = page size, N = HMM_BUFFER_SIZE / P
= 1024 pages, H = the THP PMD size.
"""

from __future__ import annotations

import attrs
import hmmsim
import numpy as np
import pytest
from hmmsim.drivers.dmirror import DmirrorCmd
from hmmsim.errors import HmmsimError

P = 4096
N = 1024
H = 2 << 20
NTIMES = 10
RW = hmmsim.PROT_READ | hmmsim.PROT_WRITE
ANON = hmmsim.MAP_PRIVATE | hmmsim.MAP_ANONYMOUS


@attrs.define
class HmmBuffer:
    """``struct hmm_buffer``: the CPU mapping ``ptr`` and the device-side ``mirror``."""

    proc: hmmsim.Process
    ptr: int
    size: int
    mirror: bytearray
    cpages: int = 0
    faults: int = 0

    def ints(self, n: int | None = None, offset: int = 0) -> np.ndarray:
        """The ints of ``ptr`` as the CPU reads them."""
        length = self.size - offset if n is None else n * 4
        return np.frombuffer(self.proc.read(self.ptr + offset, length), dtype=np.int32)

    def fill(self, values: np.ndarray, offset: int = 0) -> None:
        """CPU stores of int32 values from ``ptr + offset``."""
        self.proc.write(self.ptr + offset, values.astype(np.int32).tobytes())

    def mirror_ints(self) -> np.ndarray:
        return np.frombuffer(bytes(self.mirror), dtype=np.int32)

    def set_mirror(self, values: np.ndarray) -> None:
        self.mirror[:] = values.astype(np.int32).tobytes()

    def free(self) -> None:
        self.proc.munmap(self.ptr, self.size)


def dmirror_cmd(fd, request: int, buf: HmmBuffer, npages: int, addr: int | None = None) -> int:
    """``hmm_dmirror_cmd``: 0 or -errno; on success cpages/faults land in ``buf``."""
    cmd = DmirrorCmd(addr=buf.ptr if addr is None else addr, npages=npages, buf=buf.mirror)
    try:
        fd.ioctl(request, cmd)
    except HmmsimError as exc:
        return -exc.errno
    buf.cpages = cmd.cpages
    buf.faults = cmd.faults
    return 0


def new_buffer(
    proc, npages: int, prot: int = RW, flags: int = ANON, mirror_bytes=None, **kw
) -> HmmBuffer:
    size = npages * P
    ptr = proc.mmap(size, prot, flags, **kw)
    return HmmBuffer(proc, ptr, size, bytearray(size if mirror_bytes is None else mirror_bytes))


def iota(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int32)


@pytest.fixture(params=["private", "coherent"])
def variant(request):
    return request.param


@pytest.fixture
def machine():
    return hmmsim.Machine(
        hmmsim.MachineConfig(ram_bytes=512 << 20, thp="madvise", hugetlb_pages={2 << 20: 1})
    )


@attrs.define
class Hmm:
    machine: hmmsim.Machine
    proc: hmmsim.Process
    variant: str
    devices: list
    fds: list

    @property
    def fd(self):
        return self.fds[0]

    @property
    def fd0(self):
        return self.fds[0]

    @property
    def fd1(self):
        return self.fds[1]

    @property
    def coherent(self) -> bool:
        return self.variant == "coherent"


def _fixture(machine, variant, ndev):
    proc = machine.spawn()
    devices = [machine.probe("dmirror", memory=variant) for _ in range(ndev)]
    fds = [d.open(proc) for d in devices]
    state = Hmm(machine, proc, variant, devices, fds)
    yield state
    for fd in fds:
        fd.close()  # teardown asserts close(fd) == 0: it must not raise


@pytest.fixture
def hmm(machine, variant):
    yield from _fixture(machine, variant, 1)


@pytest.fixture
def hmm2(machine, variant):
    yield from _fixture(machine, variant, 2)
