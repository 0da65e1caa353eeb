"""dmirror's CHECK_EXCLUSIVE and SNAPSHOT, asserted byte for byte: the check
fails while a page is still atomic, and the snapshot encodes the zero pages,
THPs and local/remote device pages as lib/test_hmm.c does."""

from __future__ import annotations

import hmmsim
import pytest
from hmmsim import MADV_HUGEPAGE, MAP_ANONYMOUS, MAP_PRIVATE, PROT_READ, PROT_WRITE
from hmmsim.drivers.dmirror import (
    HMM_DMIRROR_CHECK_EXCLUSIVE,
    HMM_DMIRROR_EXCLUSIVE,
    HMM_DMIRROR_MIGRATE_TO_DEV,
    HMM_DMIRROR_SNAPSHOT,
    DmirrorCmd,
)
from hmmsim.drivers.dmirror.uapi import (
    HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL,
    HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE,
    HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL,
    HMM_DMIRROR_PROT_NONE,
    HMM_DMIRROR_PROT_PMD,
    HMM_DMIRROR_PROT_READ,
    HMM_DMIRROR_PROT_WRITE,
    HMM_DMIRROR_PROT_ZERO,
)
from hmmsim.mm.debug import verify_machine

PAGE = 4096
MB2 = 2 << 20
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS
R, W, PMD, ZERO = (
    HMM_DMIRROR_PROT_READ,
    HMM_DMIRROR_PROT_WRITE,
    HMM_DMIRROR_PROT_PMD,
    HMM_DMIRROR_PROT_ZERO,
)


@pytest.fixture(params=["private", "coherent"])
def env(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    m = hmmsim.Machine(hmmsim.MachineConfig(ram_bytes=256 << 20, thp="madvise"))
    devs = [m.probe("dmirror", memory=request.param) for _ in range(2)]
    p = m.spawn()
    fds = [d.open(p) for d in devs]
    yield m, p, fds, request.param
    for fd in fds:
        fd.close()


def _snapshot(fd, a: int, n: int) -> list[int]:  # type: ignore[no-untyped-def]
    cmd = DmirrorCmd(a, n, bytearray(n))
    assert fd.ioctl(HMM_DMIRROR_SNAPSHOT, cmd) == 0
    assert cmd.cpages == n
    return list(cmd.buf)


def test_check_exclusive_fails_while_a_page_is_still_atomic(env) -> None:  # type: ignore[no-untyped-def]
    m, p, (fd, _), _ = env
    a = p.mmap(4 * PAGE, RW, ANON)
    p.write(a, b"x" * (4 * PAGE))
    cmd = DmirrorCmd(a, 4, bytearray(4 * PAGE))
    assert fd.ioctl(HMM_DMIRROR_EXCLUSIVE, cmd) == 0 and cmd.cpages == 4
    assert [e.kind for e in p.pagemap(a, 4)] == ["device_exclusive"] * 4
    with pytest.raises(hmmsim.NotPermitted):
        fd.ioctl(HMM_DMIRROR_CHECK_EXCLUSIVE, DmirrorCmd(a, 4, None))
    # The CPU takes back page 0. The invalidation of [a, a + PAGE) drops
    # mirror entries 0 and 1 (dmirror_do_update's xarray walk includes its
    # last index, as in the kernel); 2 and 3 stay atomic.
    p.write(a, b"y")
    assert [e.kind for e in p.pagemap(a, 4)] == ["anon"] + ["device_exclusive"] * 3
    assert fd.ioctl(HMM_DMIRROR_CHECK_EXCLUSIVE, DmirrorCmd(a, 2, None)) == 0
    for start, n in ((a, 4), (a + 2 * PAGE, 1), (a + 3 * PAGE, 1)):
        with pytest.raises(hmmsim.NotPermitted):
            fd.ioctl(HMM_DMIRROR_CHECK_EXCLUSIVE, DmirrorCmd(start, n, None))
    assert p.read(a + 2 * PAGE, 2 * PAGE) == b"x" * (2 * PAGE)
    assert fd.ioctl(HMM_DMIRROR_CHECK_EXCLUSIVE, DmirrorCmd(a, 4, None)) == 0
    verify_machine(m)


def test_snapshot_of_zero_pages_and_huge_zero_page(env) -> None:  # type: ignore[no-untyped-def]
    _m, p, (fd, _), _ = env
    a = p.mmap(MB2, RW, ANON)
    p.madvise(a, MB2, MADV_HUGEPAGE)
    p.read(a, 1)  # the huge zero page
    assert p.pagemap(a, 1)[0].order == 9
    # is_zero_pfn() matches only the 4 KiB zero page: the huge zero page is
    # an ordinary read-only PMD.
    assert _snapshot(fd, a, 3) == [R | PMD] * 3
    b = p.mmap(2 * PAGE, RW, ANON)
    p.read(b, 1)
    assert _snapshot(fd, b, 2) == [ZERO | R, HMM_DMIRROR_PROT_NONE]


def test_snapshot_of_thp_and_read_only_thp(env) -> None:  # type: ignore[no-untyped-def]
    _m, p, (fd, _), _ = env
    a = p.mmap(MB2, RW, ANON)
    p.madvise(a, MB2, MADV_HUGEPAGE)
    p.write(a, b"t")
    assert _snapshot(fd, a + 9 * PAGE, 2) == [W | PMD] * 2
    p.mprotect(a, MB2, PROT_READ)
    assert _snapshot(fd, a, 2) == [R | PMD] * 2


def test_snapshot_of_local_and_remote_device_pages(env) -> None:  # type: ignore[no-untyped-def]
    _m, p, (fd0, fd1), memory = env
    a = p.mmap(4 * PAGE, RW, ANON)
    p.write(a, b"z" * (4 * PAGE))
    assert fd0.ioctl(HMM_DMIRROR_MIGRATE_TO_DEV, DmirrorCmd(a, 2, bytearray(2 * PAGE))) == 0
    assert fd1.ioctl(HMM_DMIRROR_MIGRATE_TO_DEV, DmirrorCmd(a + 2 * PAGE, 1, bytearray(PAGE))) == 0
    snap = _snapshot(fd0, a, 4)
    if memory == "coherent":
        assert snap == [
            HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL | W,
            HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL | W,
            HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE | W,
            W,
        ]
    else:
        # Another device's private page is not faulted by a snapshot: none.
        assert snap == [
            HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | W,
            HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | W,
            HMM_DMIRROR_PROT_NONE,
            W,
        ]
    # Seen from the other device, local and remote swap.
    snap1 = _snapshot(fd1, a, 4)
    if memory == "coherent":
        assert snap1[:3] == [
            HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE | W,
            HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE | W,
            HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL | W,
        ]
    else:
        assert snap1[:3] == [
            HMM_DMIRROR_PROT_NONE,
            HMM_DMIRROR_PROT_NONE,
            HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | W,
        ]
