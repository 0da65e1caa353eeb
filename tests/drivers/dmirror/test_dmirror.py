"""dmirror's UAPI details beyond the kernel tests: argument checks, buffers,
counters on failure, the 1 s retry deadline on the virtual clock, eviction."""

from __future__ import annotations

import hmmsim
import pytest
from helpers import ANON, PAGE, RW
from hmmsim import sched
from hmmsim.drivers.dmirror import (
    HMM_DMIRROR_CHECK_EXCLUSIVE,
    HMM_DMIRROR_FLAGS,
    HMM_DMIRROR_MIGRATE_TO_DEV,
    HMM_DMIRROR_READ,
    HMM_DMIRROR_RELEASE,
    HMM_DMIRROR_WRITE,
    DmirrorCmd,
)
from hmmsim.testing.invariants import check_no_leaks


@pytest.fixture
def env(make_machine):
    m = make_machine(ram_bytes=128 << 20)
    dev = m.probe("dmirror")
    p = m.spawn()
    fd = dev.open(p)
    return m, dev, p, fd


def test_argument_checks(env):
    _m, _dev, p, fd = env
    a = p.mmap(4 * PAGE, RW, ANON)
    for cmd, code in (
        (DmirrorCmd(a + 1, 1, bytearray(PAGE)), HMM_DMIRROR_READ),
        (DmirrorCmd(a, 0, bytearray(PAGE)), HMM_DMIRROR_READ),
        (DmirrorCmd((1 << 64) - PAGE, 2, bytearray(2 * PAGE)), HMM_DMIRROR_READ),
        (DmirrorCmd(a, 1, bytearray(PAGE)), 0xC0284877),
    ):
        with pytest.raises(hmmsim.InvalidArgument):
            fd.ioctl(code, cmd)
    with pytest.raises(hmmsim.BadAddress):  # buffer too small: copy_to_user fails
        fd.ioctl(HMM_DMIRROR_READ, DmirrorCmd(a, 2, bytearray(PAGE)))


def test_buffers_may_be_larger_or_absent(env):
    _m, _dev, p, fd = env
    a = p.mmap(4 * PAGE, RW, ANON)
    p.write(a, b"abc")
    cmd = DmirrorCmd(a, 1, bytearray(3 * PAGE))
    fd.ioctl(HMM_DMIRROR_READ, cmd)
    assert bytes(cmd.buf[:3]) == b"abc" and (cmd.cpages, cmd.faults) == (1, 1)
    for code, npages in (
        (HMM_DMIRROR_FLAGS, 0x1),
        (HMM_DMIRROR_CHECK_EXCLUSIVE, 4),
        (HMM_DMIRROR_RELEASE, 4),
    ):
        cmd = DmirrorCmd(a, npages, None)
        assert fd.ioctl(code, cmd) == 0 and (cmd.cpages, cmd.faults) == (0, 0)


def test_failure_leaves_buffer_and_counters_untouched(env):
    _m, _dev, p, fd = env
    a = p.mmap(4 * PAGE, RW, ANON)
    p.write(a, b"x" * 4 * PAGE)
    p.munmap(a + 3 * PAGE, PAGE)
    buf = bytearray(b"\xee" * 4 * PAGE)
    cmd = DmirrorCmd(a, 4, buf, cpages=77, faults=88)
    with pytest.raises(hmmsim.BadAddress):
        fd.ioctl(HMM_DMIRROR_READ, cmd)
    assert buf == bytearray(b"\xee" * 4 * PAGE) and (cmd.cpages, cmd.faults) == (77, 88)


def test_retry_deadline_runs_on_the_virtual_clock(env):
    m, _dev, p, fd = env
    a = p.mmap(4 * PAGE, RW, ANON)
    p.write(a, b"x")

    class Storm:
        """Another CPU that invalidates the range every time the driver looks away."""

        def current(self):
            return "device"

        def point(self, label):
            if label == "dmirror:after_range_fault":
                prev = sched.set_active(None)
                try:
                    p.mprotect(a, PAGE, hmmsim.PROT_READ)
                    p.mprotect(a, PAGE, RW)
                    m.clock.advance(50_000_000)  # 50 ms of the other CPU's time
                finally:
                    sched.set_active(prev)

        def block(self, reason, ready):
            raise AssertionError(reason)

    before = m.clock.now_ns
    prev = sched.set_active(Storm())
    try:
        with pytest.raises(hmmsim.Busy):
            fd.ioctl(HMM_DMIRROR_READ, DmirrorCmd(a, 1, bytearray(PAGE)))
    finally:
        sched.set_active(prev)
    assert m.clock.now_ns - before > 1_000_000_000
    assert fd.stats.retries >= 20


def test_close_evicts_every_device_page_of_the_device(env):
    m, dev, p, fd = env
    other = dev.open(p)
    a = p.mmap(8 * PAGE, RW, ANON)
    p.write(a, b"y" * 8 * PAGE)
    other.ioctl(HMM_DMIRROR_MIGRATE_TO_DEV, DmirrorCmd(a, 8, bytearray(8 * PAGE)))
    assert {e.kind for e in p.pagemap(a, 8)} == {"device_private"}
    fd.close()  # the other fd's pages go back too
    assert {e.kind for e in p.pagemap(a, 8)} == {"anon"}
    assert p.read(a, 8 * PAGE) == b"y" * 8 * PAGE
    other.close()
    p.exit()
    check_no_leaks(m)


def test_device_write_after_exit_of_the_process_does_nothing(env):
    _m, _dev, p, fd = env
    a = p.mmap(PAGE, RW, ANON)
    p.exit()
    cmd = DmirrorCmd(a, 1, bytearray(PAGE))
    with pytest.raises(hmmsim.BadAddress):  # the fault does nothing; no entry appears
        fd.ioctl(HMM_DMIRROR_WRITE, cmd)
