"""tools/testing/selftests/mm/hmm-tests.c, ported onto dmirror (hmm-selftests.md §2).

Each test keeps the kernel test's name and runs in both variants of its
fixture (device-private and device-coherent), with the same expected return
codes, cpages, faults, data and snapshot bytes.
"""

from __future__ import annotations

import errno

import hmmsim
import numpy as np
import pytest
from hmmsim.drivers.dmirror import (
    HMM_DMIRROR_CHECK_EXCLUSIVE,
    HMM_DMIRROR_EXCLUSIVE,
    HMM_DMIRROR_MIGRATE_TO_DEV,
    HMM_DMIRROR_MIGRATE_TO_SYS,
    HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL,
    HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE,
    HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL,
    HMM_DMIRROR_PROT_ERROR,
    HMM_DMIRROR_PROT_NONE,
    HMM_DMIRROR_PROT_PMD,
    HMM_DMIRROR_PROT_PUD,
    HMM_DMIRROR_PROT_READ,
    HMM_DMIRROR_PROT_WRITE,
    HMM_DMIRROR_PROT_ZERO,
    HMM_DMIRROR_READ,
    HMM_DMIRROR_RELEASE,
    HMM_DMIRROR_SNAPSHOT,
    HMM_DMIRROR_WRITE,
)
from hmmsim.explore import ScenarioRun, explore
from hmmsim.gup import (
    FOLL_LONGTERM,
    FOLL_WRITE,
    get_user_pages,
    pin_user_pages,
    put_page,
    unpin_user_page,
)
from hmmsim.sched import PCT, BoundedDFS
from hmmsim.testing.invariants import check_mirror
from hmmtest import ANON, NTIMES, RW, H, HmmBuffer, N, P, dmirror_cmd, iota, new_buffer

EINVAL, EFAULT, EPERM, ENOENT = -errno.EINVAL, -errno.EFAULT, -errno.EPERM, -errno.ENOENT


def migrate(fd, buf, npages):
    return dmirror_cmd(fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf, npages)


def thp_window(proc, size):
    """mmap 2*size, round up to an H boundary, MADV_HUGEPAGE that window."""
    base = proc.mmap(2 * size, RW, ANON)
    ptr = (base + H - 1) & ~(H - 1)
    proc.madvise(ptr, size, hmmsim.MADV_HUGEPAGE)
    return base, ptr


def test_open_close(hmm):
    assert not hmm.fd.closed


def test_anon_read(hmm):
    buf = new_buffer(hmm.proc, N)
    i = iota(N * P // 4)
    buf.fill(i[2 * P // 4 :], offset=2 * P)  # never touch page 0
    hmm.proc.mprotect(buf.ptr, buf.size, hmmsim.PROT_READ)
    assert buf.ints(1, offset=P)[0] == 0  # maps the zero page
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_READ, buf, N) == 0
    assert (buf.cpages, buf.faults) == (N, 1)
    m = buf.mirror_ints()
    assert (m[: 2 * P // 4] == 0).all() and (m[2 * P // 4 :] == i[2 * P // 4 :]).all()


def test_anon_read_prot(hmm):
    buf = new_buffer(hmm.proc, N)
    i = iota(N * P // 4)
    buf.fill(i)
    buf.set_mirror(-i)
    hmm.proc.mprotect(buf.ptr, buf.size, hmmsim.PROT_NONE)
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_READ, buf, N) == EFAULT
    hmm.proc.mprotect(buf.ptr, buf.size, hmmsim.PROT_READ)
    assert (buf.ints() == i).all()
    assert (buf.mirror_ints() == -i).all()  # nothing copied out on failure


def test_anon_write(hmm):
    buf = new_buffer(hmm.proc, N)
    i = iota(N * P // 4)
    buf.set_mirror(i)
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_WRITE, buf, N) == 0
    assert (buf.cpages, buf.faults) == (N, 1)
    assert (buf.ints() == i).all()


def test_anon_write_prot(hmm):
    buf = new_buffer(hmm.proc, N, prot=hmmsim.PROT_READ)
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_READ, buf, 1) == 0
    assert (buf.cpages, buf.faults) == (1, 1)
    i = iota(N * P // 4)
    buf.set_mirror(i)
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_WRITE, buf, N) == EPERM
    assert (buf.ints() == 0).all()
    hmm.proc.mprotect(buf.ptr, buf.size, RW)
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_WRITE, buf, N) == 0
    assert (buf.cpages, buf.faults) == (N, 1)
    assert (buf.ints() == i).all()


def _device0(hmm):
    """/dev/hmm_dmirror0: always a private device, whatever the variant."""
    if not hmm.coherent:
        return hmm.devices[0]
    return hmm.machine.probe("dmirror", memory="private")


@pytest.mark.parametrize("use_thp", [False, True])
@pytest.mark.parametrize("do_migrate", [False, True])
def test_anon_write_child(hmm, do_migrate, use_thp):
    proc = hmm.proc
    npages = H // P if use_thp else N
    size = npages * P
    if use_thp:
        _base, ptr = thp_window(proc, size)
    else:
        ptr = proc.mmap(2 * size, RW, ANON)
    buf = HmmBuffer(proc, ptr, size, bytearray(size))
    i = iota(size // 4)
    buf.fill(i)
    buf.set_mirror(-i)
    if do_migrate:
        assert migrate(hmm.fd, buf, npages) == 0
        assert buf.cpages == npages
    child = proc.fork()
    cbuf = HmmBuffer(child, ptr, size, bytearray(buf.mirror))
    # Child: CPU reads pull device-private pages back; then device 0 writes.
    assert (cbuf.ints() == i).all()
    if not do_migrate:
        assert (cbuf.mirror_ints() == -i).all()
    child_fd = _device0(hmm).open(child)
    assert dmirror_cmd(child_fd, HMM_DMIRROR_WRITE, cbuf, npages) == 0
    assert (cbuf.cpages, cbuf.faults) == (npages, 1)
    if not do_migrate:
        assert (cbuf.ints() == -i).all()
    child_fd.close()
    child.exit()
    # Parent: its own data is untouched (COW).
    assert (buf.ints() == i).all()


def test_anon_write_child_shared(hmm):
    proc = hmm.proc
    buf = new_buffer(proc, N, flags=hmmsim.MAP_SHARED | hmmsim.MAP_ANONYMOUS)
    i = iota(N * P // 4)
    buf.fill(i)
    buf.set_mirror(-i)
    child = proc.fork()
    cbuf = HmmBuffer(child, buf.ptr, buf.size, bytearray(buf.mirror))
    assert (cbuf.ints() == i).all() and (cbuf.mirror_ints() == -i).all()
    child_fd = _device0(hmm).open(child)
    assert dmirror_cmd(child_fd, HMM_DMIRROR_WRITE, cbuf, N) == 0
    assert (cbuf.cpages, cbuf.faults) == (N, 1)
    assert (cbuf.ints() == -i).all()
    child_fd.close()
    child.exit()
    assert (buf.ints() == -i).all()  # shared memory: no COW


def test_anon_write_huge(hmm):
    _base, ptr = thp_window(hmm.proc, H)
    buf = HmmBuffer(hmm.proc, ptr, H, bytearray(H))
    npages = H // P
    i = iota(H // 4)
    buf.set_mirror(i)
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_WRITE, buf, npages) == 0
    assert (buf.cpages, buf.faults) == (npages, 1)
    assert (buf.ints() == i).all()
    assert hmm.proc.pagemap(ptr, 1)[0].order == 9


def test_anon_write_hugetlbfs(hmm):
    size = H
    npages = size // P
    buf = new_buffer(hmm.proc, npages, flags=ANON | hmmsim.MAP_HUGETLB)
    i = iota(size // 4)
    buf.set_mirror(i)
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_WRITE, buf, npages) == 0
    assert (buf.cpages, buf.faults) == (npages, 1)
    assert (buf.ints() == i).all()


def test_file_read(hmm):
    f = hmm.machine.create_file(N * P)
    i = iota(N * P // 4)
    assert f.pwrite(0, i.tobytes()) == N * P
    buf = new_buffer(hmm.proc, N, prot=hmmsim.PROT_READ, flags=hmmsim.MAP_SHARED, file=f)
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_READ, buf, N) == 0
    assert (buf.cpages, buf.faults) == (N, 1)
    assert (buf.mirror_ints() == i).all()


def test_file_write(hmm):
    f = hmm.machine.create_file(N * P)
    buf = new_buffer(hmm.proc, N, flags=hmmsim.MAP_SHARED, file=f)
    i = iota(N * P // 4)
    buf.set_mirror(i)
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_WRITE, buf, N) == 0
    assert (buf.cpages, buf.faults) == (N, 1)
    assert (buf.ints() == i).all()
    assert (np.frombuffer(f.pread(0, N * P), dtype=np.int32) == i).all()


def test_migrate(hmm):
    buf = new_buffer(hmm.proc, N)
    i = iota(N * P // 4)
    buf.fill(i)
    assert migrate(hmm.fd, buf, N) == 0
    assert buf.cpages == N
    assert (buf.mirror_ints() == i).all()


def test_migrate_file_private(hmm):
    f = hmm.machine.create_file(N * P)
    buf = new_buffer(hmm.proc, N, flags=hmmsim.MAP_PRIVATE, file=f)
    i = iota(N * P // 4)
    buf.fill(i)  # private anonymous COW copies inside a file-backed VMA
    assert migrate(hmm.fd, buf, N) == 0
    assert buf.cpages == N
    assert (buf.mirror_ints() == i).all()
    buf.free()


def test_migrate_fault(hmm):
    buf = new_buffer(hmm.proc, N)
    i = iota(N * P // 4)
    buf.fill(i)
    assert migrate(hmm.fd, buf, N) == 0 and buf.cpages == N
    assert (buf.mirror_ints() == i).all()
    half = N * P // 8
    assert (buf.ints(half) == i[:half]).all()  # private: faults those pages back
    assert migrate(hmm.fd, buf, N) == 0 and buf.cpages == N
    assert (buf.mirror_ints() == i).all()


def test_migrate_release(hmm):
    buf = new_buffer(hmm.proc, N)
    i = iota(N * P // 4)
    buf.fill(i)
    assert migrate(hmm.fd, buf, N) == 0 and buf.cpages == N
    assert (buf.mirror_ints() == i).all()
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_RELEASE, buf, N) == 0
    half = N * P // 8
    assert (buf.ints(half) == i[:half]).all()
    assert hmm.proc.pagemap(buf.ptr, 1)[0].kind == "anon"


def test_migrate_shared(hmm):
    buf = new_buffer(hmm.proc, N, flags=hmmsim.MAP_SHARED | hmmsim.MAP_ANONYMOUS)
    assert migrate(hmm.fd, buf, N) == ENOENT


def test_migrate_mixed(hmm2):
    proc = hmm2.proc
    buf = new_buffer(proc, 6, prot=hmmsim.PROT_NONE)
    p = buf.ptr
    assert migrate(hmm2.fd1, buf, 6) == EINVAL
    proc.munmap(p + P, P)
    assert migrate(hmm2.fd1, buf, 3) == EINVAL
    proc.mprotect(p + 2 * P, P, hmmsim.PROT_READ)
    val = int(np.frombuffer(proc.read(p + 2 * P, 4), np.int32)[0]) + 3
    assert val == 3
    proc.mprotect(p + 3 * P, P, RW)
    proc.write(p + 3 * P, np.int32(val).tobytes())
    proc.mprotect(p + 3 * P, P, hmmsim.PROT_READ)
    proc.mprotect(p + 4 * P, 2 * P, RW)
    proc.write(p + 4 * P, np.int32(val).tobytes())
    proc.write(p + 5 * P, np.int32(val).tobytes())
    b2 = HmmBuffer(proc, p + 2 * P, 4 * P, bytearray(4 * P))
    assert migrate(hmm2.fd1, b2, 4) == 0 and b2.cpages == 4
    b5 = HmmBuffer(proc, p + 5 * P, P, bytearray(P))
    assert migrate(hmm2.fd0, b5, 1) == ENOENT


def test_migrate_multiple(hmm):
    for _ in range(NTIMES):
        buf = new_buffer(hmm.proc, N)
        i = iota(N * P // 4)
        buf.fill(i)
        assert migrate(hmm.fd, buf, N) == 0 and buf.cpages == N
        assert (buf.mirror_ints() == i).all()
        if hmm.coherent:
            assert dmirror_cmd(hmm.fd, HMM_DMIRROR_MIGRATE_TO_SYS, buf, N) == 0
            assert buf.cpages == N
        assert (buf.ints() == i).all()
        buf.free()


def test_anon_read_multiple(hmm):
    for c in range(NTIMES):
        buf = new_buffer(hmm.proc, N)
        i = iota(N * P // 4) + c
        buf.fill(i)
        assert dmirror_cmd(hmm.fd, HMM_DMIRROR_READ, buf, N) == 0
        assert (buf.cpages, buf.faults) == (N, 1)
        assert (buf.mirror_ints() == i).all()
        buf.free()


def _anon_teardown_scenario(hmm, outcomes: dict[int, int]):
    """A munmap of the second half races a device READ of the whole buffer."""
    proc = hmm.proc
    mirror = hmm.fd  # the open dmirror file is its Mirror

    def scenario() -> ScenarioRun:
        c = sum(outcomes.values()) % NTIMES
        buf = new_buffer(proc, N)
        i = iota(N * P // 4) + c
        buf.fill(i)
        half = buf.size // 2
        got: dict[str, int] = {}

        def reader() -> None:
            got["ret"] = dmirror_cmd(hmm.fd, HMM_DMIRROR_READ, buf, N)

        def unmapper() -> None:
            proc.munmap(buf.ptr + half, half)

        def check() -> None:
            # The half being unmapped is where a stale device entry would be.
            check_mirror(mirror, buf.ptr + half, N // 2, data=False)

        def final(_result: object) -> None:
            ret = got["ret"]
            lock = proc.mm.mmap_lock
            assert not lock.readers and lock.writer is None
            check_mirror(mirror, buf.ptr, N)
            if ret == 0:
                assert (buf.cpages, buf.faults) == (N, 1)
                assert (buf.mirror_ints() == i).all()
            else:
                assert ret == EFAULT
            outcomes[ret] = outcomes.get(ret, 0) + 1
            proc.munmap(buf.ptr, half)

        return ScenarioRun([("reader", reader), ("munmap", unmapper)], check=check, final=final)

    return scenario


def test_anon_teardown(hmm):
    """The kernel test relies on random sleeps; here PCT (depth 3) picks the
    interleavings, deterministically, with the invariants checked at every step."""
    outcomes: dict[int, int] = {}
    result = explore(_anon_teardown_scenario(hmm, outcomes), PCT(seed=1, depth=3, steps=150), 30)
    assert not result.failures, result.failures[:1]
    assert set(outcomes) == {0, EFAULT}


def test_anon_teardown_at_every_single_preemption(hmm):
    """Bounded DFS, k = 1: the munmap lands at every preemption point of the
    READ (and the READ at every point of the munmap)."""
    outcomes: dict[int, int] = {}
    result = explore(_anon_teardown_scenario(hmm, outcomes), BoundedDFS(bound=1), 5000)
    assert result.exhausted and not result.failures, result.failures[:1]
    assert result.schedules > 50
    assert set(outcomes) == {0, EFAULT}


def test_mixedmap(hmm):
    buf = HmmBuffer(hmm.proc, 0, P, bytearray(1))
    buf.ptr = hmm.proc.mmap(P, RW, hmmsim.MAP_PRIVATE, file=hmm.fd)
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_SNAPSHOT, buf, 1) == 0
    assert buf.cpages == 1
    assert buf.mirror[0] == HMM_DMIRROR_PROT_READ


def test_snapshot(hmm2):
    proc = hmm2.proc
    p = proc.mmap(7 * P, hmmsim.PROT_NONE, ANON)
    proc.munmap(p + P, P)
    proc.mprotect(p + 2 * P, P, hmmsim.PROT_READ)
    assert proc.read(p + 2 * P, 4) == bytes(4)
    proc.mprotect(p + 3 * P, P, RW)
    proc.write(p + 3 * P, np.int32(3).tobytes())
    proc.mprotect(p + 3 * P, P, hmmsim.PROT_READ)
    proc.mprotect(p + 4 * P, 3 * P, RW)
    proc.write(p + 4 * P, np.int32(3).tobytes())
    assert migrate(hmm2.fd0, HmmBuffer(proc, p + 5 * P, P, bytearray(P)), 1) == 0
    assert migrate(hmm2.fd1, HmmBuffer(proc, p + 6 * P, P, bytearray(P)), 1) == 0
    buf = HmmBuffer(proc, p, 7 * P, bytearray(7))
    assert dmirror_cmd(hmm2.fd0, HMM_DMIRROR_SNAPSHOT, buf, 7) == 0
    assert buf.cpages == 7
    m = list(buf.mirror)
    assert m[:5] == [
        HMM_DMIRROR_PROT_ERROR,
        HMM_DMIRROR_PROT_ERROR,
        HMM_DMIRROR_PROT_ZERO | HMM_DMIRROR_PROT_READ,
        HMM_DMIRROR_PROT_READ,
        HMM_DMIRROR_PROT_WRITE,
    ]
    if hmm2.coherent:
        assert m[5:] == [
            HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL | HMM_DMIRROR_PROT_WRITE,
            HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE | HMM_DMIRROR_PROT_WRITE,
        ]
    else:
        assert m[5:] == [
            HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | HMM_DMIRROR_PROT_WRITE,
            HMM_DMIRROR_PROT_NONE,
        ]


def test_compound(hmm):
    npages = H // P
    buf = new_buffer(hmm.proc, npages, flags=ANON | hmmsim.MAP_HUGETLB, mirror_bytes=npages)
    buf.fill(iota(H // 4))
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_SNAPSHOT, buf, npages) == 0
    assert buf.cpages == npages
    level = HMM_DMIRROR_PROT_PUD if buf.mirror[0] & HMM_DMIRROR_PROT_PUD else HMM_DMIRROR_PROT_PMD
    assert set(buf.mirror) == {HMM_DMIRROR_PROT_WRITE | level}
    hmm.proc.mprotect(buf.ptr, buf.size, hmmsim.PROT_READ)
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_SNAPSHOT, buf, npages) == 0
    assert set(buf.mirror) == {HMM_DMIRROR_PROT_READ | level}


def test_double_map(hmm2):
    buf = new_buffer(hmm2.proc, 6)
    i = iota(6 * P // 4)
    buf.fill(i)
    hmm2.proc.mprotect(buf.ptr, buf.size, hmmsim.PROT_READ)
    for fd in (hmm2.fd0, hmm2.fd1):
        assert dmirror_cmd(fd, HMM_DMIRROR_READ, buf, 6) == 0
        assert (buf.cpages, buf.faults) == (6, 1)
        assert (buf.mirror_ints() == i).all()
    assert migrate(hmm2.fd1, buf, 6) == 0 and buf.cpages == 6
    assert dmirror_cmd(hmm2.fd0, HMM_DMIRROR_READ, buf, 6) == 0
    assert (buf.cpages, buf.faults) == (6, 1)
    assert (buf.mirror_ints() == i).all()


def test_exclusive(hmm):
    buf = new_buffer(hmm.proc, N)
    i = iota(N * P // 4)
    buf.fill(i)
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_EXCLUSIVE, buf, N) == 0
    assert buf.cpages == N and (buf.mirror_ints() == i).all()
    got = buf.ints()
    assert (got == i).all()
    buf.fill(got + 1)  # the CPU takes the pages back
    assert (buf.ints() == i + 1).all()
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_CHECK_EXCLUSIVE, buf, N) == 0


def test_exclusive_mprotect(hmm):
    buf = new_buffer(hmm.proc, N)
    i = iota(N * P // 4)
    buf.fill(i)
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_EXCLUSIVE, buf, N) == 0
    assert buf.cpages == N and (buf.mirror_ints() == i).all()
    hmm.proc.mprotect(buf.ptr, buf.size, hmmsim.PROT_READ)
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_WRITE, buf, N) == EPERM


def test_exclusive_cow(hmm):
    buf = new_buffer(hmm.proc, N)
    i = iota(N * P // 4)
    buf.fill(i)
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_EXCLUSIVE, buf, N) == 0
    assert buf.cpages == N
    child = hmm.proc.fork()
    cbuf = HmmBuffer(child, buf.ptr, buf.size, bytearray(buf.size))
    got = cbuf.ints()
    assert (got == i).all()
    cbuf.fill(got + 1)
    assert (cbuf.ints() == i + 1).all()
    child.exit()
    got = buf.ints()
    assert (got == i).all()
    buf.fill(got + 1)
    assert (buf.ints() == i + 1).all()


def test_hmm_gup_test(hmm):
    proc, machine = hmm.proc, hmm.machine
    buf = new_buffer(proc, 4, mirror_bytes=4 * P)
    i = iota(4 * P // 4)
    buf.fill(i)
    assert migrate(hmm.fd, buf, 4) == 0 and buf.cpages == 4
    assert (buf.mirror_ints() == i).all()
    with proc.mm.mmap_lock.read():
        # GUP_BASIC_TEST, GUP_FAST_BENCHMARK: get, FOLL_WRITE
        for k in (0, 1):
            (pfn,) = get_user_pages(proc.mm, buf.ptr + k * P, 1, FOLL_WRITE)
            put_page(machine, pfn)
        # PIN_FAST_BENCHMARK + FOLL_LONGTERM, PIN_LONGTERM_BENCHMARK
        for k in (2, 3):
            (pfn,) = pin_user_pages(proc.mm, buf.ptr + k * P, 1, FOLL_WRITE | FOLL_LONGTERM)
            unpin_user_page(machine, pfn)
    snap = HmmBuffer(proc, buf.ptr, 4 * P, bytearray(4))
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_SNAPSHOT, snap, 4) == 0 and snap.cpages == 4
    w = HMM_DMIRROR_PROT_WRITE
    if hmm.coherent:
        assert list(snap.mirror) == [HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL | w] * 2 + [w] * 2
    else:
        assert list(snap.mirror) == [w] * 4
    assert (buf.ints() == i).all()


def test_hmm_cow_in_device(hmm):
    proc = hmm.proc
    buf = new_buffer(proc, 4, mirror_bytes=4 * P)
    i = iota(4 * P // 4)
    buf.fill(i)
    assert migrate(hmm.fd, buf, 4) == 0 and buf.cpages == 4
    child = proc.fork()  # the child just spins
    buf.fill(i)  # breaks COW (private: each page faults back to RAM first)
    child.exit()  # SIGKILL
    snap = HmmBuffer(proc, buf.ptr, 4 * P, bytearray(4))
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_SNAPSHOT, snap, 4) == 0 and snap.cpages == 4
    assert list(snap.mirror) == [HMM_DMIRROR_PROT_WRITE] * 4
