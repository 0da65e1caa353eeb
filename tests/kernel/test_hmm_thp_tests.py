"""The device-private THP tests of hmm-tests.c (T30-T38; hmm-selftests.md §2 names
their behaviours without their steps): empty, huge-zero and populated PMD
ranges, MADV_FREE and MADV_COLLAPSE on device THPs, partial munmap and mremap
of device-private PMD entries, FAIL_ALLOC fallback both ways, round trips.
"""

from __future__ import annotations

import hmmsim
import numpy as np
from hmmsim.drivers.dmirror import (
    HMM_DMIRROR_FLAG_FAIL_ALLOC,
    HMM_DMIRROR_FLAGS,
    HMM_DMIRROR_MIGRATE_TO_DEV,
    HMM_DMIRROR_MIGRATE_TO_SYS,
    HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL,
    HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL,
    HMM_DMIRROR_PROT_PMD,
    HMM_DMIRROR_PROT_WRITE,
    HMM_DMIRROR_SNAPSHOT,
)
from hmmsim.mm.debug import verify_machine
from hmmtest import ANON, RW, H, HmmBuffer, P, dmirror_cmd, iota

NPAGES = H // P


def huge_buffer(proc, touch=None):
    base = proc.mmap(2 * H, RW, ANON)
    ptr = (base + H - 1) & ~(H - 1)
    proc.madvise(ptr, H, hmmsim.MADV_HUGEPAGE)
    buf = HmmBuffer(proc, ptr, H, bytearray(H))
    if touch == "write":
        buf.fill(iota(H // 4))
    elif touch == "read":
        proc.read(ptr, 1)
    return buf


def local(hmm):
    return (
        HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL if hmm.coherent else HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL
    )


def snapshot(hmm, buf):
    snap = HmmBuffer(buf.proc, buf.ptr, buf.size, bytearray(buf.size // P))
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_SNAPSHOT, snap, buf.size // P) == 0
    return set(snap.mirror)


def huge_on_device(hmm, buf):
    """What the snapshot shows after a THP-sized range moved to the device.

    Private devices get PMD-sized device folios (a fresh chunk with folios);
    a coherent device has only its first chunk of single pages, so the THP
    is split into base pages.
    """
    pmd = 0 if hmm.coherent else HMM_DMIRROR_PROT_PMD
    return {local(hmm) | HMM_DMIRROR_PROT_WRITE | pmd}


def test_migrate_anon_huge_empty(hmm):
    buf = huge_buffer(hmm.proc)
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf, NPAGES) == 0
    assert buf.cpages == NPAGES
    assert (buf.mirror_ints() == 0).all()
    assert snapshot(hmm, buf) == huge_on_device(hmm, buf)
    assert (buf.ints() == 0).all()
    verify_machine(hmm.machine)


def test_migrate_anon_huge_zero(hmm):
    buf = huge_buffer(hmm.proc, touch="read")  # the huge zero page
    assert hmm.proc.pagemap(buf.ptr, 1)[0].kind == "zero"
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf, NPAGES) == 0
    assert buf.cpages == NPAGES
    assert snapshot(hmm, buf) == huge_on_device(hmm, buf)
    assert (buf.ints() == 0).all()


def test_migrate_anon_huge_fault(hmm):
    buf = huge_buffer(hmm.proc, touch="write")
    i = iota(H // 4)
    assert hmm.proc.pagemap(buf.ptr, 1)[0].order == 9
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf, NPAGES) == 0
    assert (buf.mirror_ints() == i).all()
    assert snapshot(hmm, buf) == huge_on_device(hmm, buf)
    assert (buf.ints() == i).all()  # private: one PMD fault brings the whole folio back
    e = hmm.proc.pagemap(buf.ptr, 1)[0]
    assert e.kind == ("device_coherent" if hmm.coherent else "anon")
    if not hmm.coherent:
        assert e.order == 9
    verify_machine(hmm.machine)


def test_migrate_anon_huge_free(hmm):
    buf = huge_buffer(hmm.proc, touch="write")
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf, NPAGES) == 0
    hmm.proc.madvise(buf.ptr, H, hmmsim.MADV_FREE)  # device entries are left alone
    assert snapshot(hmm, buf) == huge_on_device(hmm, buf)
    assert (buf.ints() == iota(H // 4)).all()


def test_migrate_anon_huge_collapse(hmm):
    buf = huge_buffer(hmm.proc, touch="write")
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf, NPAGES) == 0
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_MIGRATE_TO_SYS, buf, NPAGES) == 0
    hmm.proc.madvise(buf.ptr, H, hmmsim.MADV_COLLAPSE)
    assert hmm.proc.pagemap(buf.ptr, 1)[0].order == 9
    assert (buf.ints() == iota(H // 4)).all()


def test_migrate_partial_unmap_fault(hmm):
    buf = huge_buffer(hmm.proc, touch="write")
    i = iota(H // 4)
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf, NPAGES) == 0
    hmm.proc.munmap(buf.ptr + H // 2, P)  # splits the device PMD
    got = np.concatenate([buf.ints(H // 8), buf.ints(offset=H // 2 + P)])
    want = np.concatenate([i[: H // 8], i[(H // 2 + P) // 4 :]])
    assert (got == want).all()
    verify_machine(hmm.machine)


def test_migrate_remap_fault(hmm):
    buf = huge_buffer(hmm.proc, touch="write")
    i = iota(H // 4)
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf, NPAGES) == 0
    target = hmm.proc.mmap(4 * H, RW, ANON)
    hmm.proc.munmap(target, 4 * H)
    new = hmm.proc.mremap(
        buf.ptr, H, H, hmmsim.MREMAP_MAYMOVE | hmmsim.MREMAP_FIXED, new_addr=target + P
    )  # unaligned: the PMD is split on the way
    moved = HmmBuffer(hmm.proc, new, H, bytearray(H))
    assert (moved.ints() == i).all()
    verify_machine(hmm.machine)


def test_migrate_anon_huge_err(hmm):
    """FAIL_ALLOC: no device folio, so the THP is split into device base pages."""
    buf = huge_buffer(hmm.proc, touch="write")
    flags = HmmBuffer(hmm.proc, buf.ptr, 0, bytearray(0))
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_FLAGS, flags, HMM_DMIRROR_FLAG_FAIL_ALLOC) == 0
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf, NPAGES) == 0
    assert buf.cpages == NPAGES
    assert snapshot(hmm, buf) == {local(hmm) | HMM_DMIRROR_PROT_WRITE}  # no PMD bit
    assert (buf.ints() == iota(H // 4)).all()
    verify_machine(hmm.machine)


def test_migrate_anon_huge_zero_err(hmm):
    """FAIL_ALLOC on the way back: the device THP returns as base pages."""
    buf = huge_buffer(hmm.proc, touch="write")
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf, NPAGES) == 0
    flags = HmmBuffer(hmm.proc, buf.ptr, 0, bytearray(0))
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_FLAGS, flags, HMM_DMIRROR_FLAG_FAIL_ALLOC) == 0
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_MIGRATE_TO_SYS, buf, NPAGES) == 0
    assert buf.cpages == NPAGES
    assert {e.order for e in hmm.proc.pagemap(buf.ptr, NPAGES)} == {0}
    assert (buf.ints() == iota(H // 4)).all()
    verify_machine(hmm.machine)


def test_benchmark_thp_migration(hmm):
    """Round trips of THP-sized buffers all succeed (the throughput test, untimed)."""
    for _ in range(4):
        buf = huge_buffer(hmm.proc, touch="write")
        assert dmirror_cmd(hmm.fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf, NPAGES) == 0
        assert dmirror_cmd(hmm.fd, HMM_DMIRROR_MIGRATE_TO_SYS, buf, NPAGES) == 0
        assert buf.cpages >= 1
        assert (buf.ints() == iota(H // 4)).all()
    verify_machine(hmm.machine)
