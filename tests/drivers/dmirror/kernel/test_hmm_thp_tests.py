"""The device THP tests of hmm-tests.c (T30-T38), ported step by step.

Each test keeps the kernel test's name, mappings, madvise calls, loops and
oracles: the mirror buffer is pre-filled with 0xFF so that a missing
copy-out is caught, buffers are freed as the kernel frees them (the whole
reservation), and the ioctls must return what the kernel test asserts.
Oracles the kernel test does not have are marked "extra".

Notation as in hmmtest.py: P = page size, H = the PMD size (2 MiB).
"""

from __future__ import annotations

import errno

import hmmsim
import numpy as np
import pytest
from hmmsim.drivers.dmirror import (
    HMM_DMIRROR_FLAG_FAIL_ALLOC,
    HMM_DMIRROR_FLAGS,
    HMM_DMIRROR_MIGRATE_TO_DEV,
    HMM_DMIRROR_MIGRATE_TO_SYS,
    HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL,
    HMM_DMIRROR_PROT_PMD,
    HMM_DMIRROR_PROT_WRITE,
    HMM_DMIRROR_SNAPSHOT,
)
from hmmsim.mm.debug import verify_machine
from hmmtest import ANON, RW, H, HmmBuffer, P, dmirror_cmd, iota

NPAGES = H // P
RO = hmmsim.PROT_READ
ENOMEM = -errno.ENOMEM


def align(addr: int, size: int) -> int:
    return (addr + size - 1) & ~(size - 1)


def thp_buffer(
    proc: hmmsim.Process,
    prot: int = RW,
    advice: int | None = hmmsim.MADV_HUGEPAGE,
    reserve: int = 2,
    mirror_size: int = H,
) -> tuple[int, HmmBuffer]:
    """mmap ``reserve`` * H, round up to an H boundary, madvise that window.

    Returns the reservation's address (the kernel's ``old_ptr``) and the
    buffer over the aligned window, its mirror filled with 0xFF.
    """
    old_ptr = proc.mmap(reserve * H, prot, ANON)
    ptr = align(old_ptr, H)
    if advice is not None:
        proc.madvise(ptr, H, advice)
    return old_ptr, HmmBuffer(proc, ptr, H, bytearray(b"\xff" * mirror_size))


def migrate(hmm, buf: HmmBuffer, npages: int = NPAGES) -> int:
    return dmirror_cmd(hmm.fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf, npages)


def fail_alloc(hmm, buf: HmmBuffer) -> None:
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_FLAGS, buf, HMM_DMIRROR_FLAG_FAIL_ALLOC) == 0


def mirror_ints(buf: HmmBuffer, n: int = H // 4) -> np.ndarray:
    return buf.mirror_ints()[:n]


def test_migrate_anon_huge_empty(hmm):
    """T30: a read-only, untouched THP window migrates as a zero-filled hole."""
    old_ptr, buf = thp_buffer(hmm.proc, prot=RO)
    assert migrate(hmm, buf) == 0
    assert buf.cpages == NPAGES
    assert (mirror_ints(buf) == 0).all()
    hmm.proc.munmap(old_ptr, 2 * H)
    verify_machine(hmm.machine)  # extra


def test_migrate_anon_huge_zero(hmm):
    """T31: the huge zero page of a read-only window migrates and faults back as zeros."""
    old_ptr, buf = thp_buffer(hmm.proc, prot=RO)
    assert buf.ints(1)[0] == 0  # maps the huge zero page
    assert hmm.proc.pagemap(buf.ptr, 1)[0].kind == "zero"  # extra
    assert hmm.proc.pagemap(buf.ptr, 1)[0].order == 9  # extra
    assert migrate(hmm, buf) == 0
    assert buf.cpages == NPAGES
    assert (mirror_ints(buf) == 0).all()
    assert (buf.ints() == 0).all()
    hmm.proc.munmap(old_ptr, 2 * H)
    verify_machine(hmm.machine)  # extra


def test_migrate_anon_huge_free(hmm):
    """T32: MADV_FREE of a THP that lives on the device returns 0."""
    old_ptr, buf = thp_buffer(hmm.proc)
    i = iota(H // 4)
    buf.fill(i)
    assert migrate(hmm, buf) == 0
    assert buf.cpages == NPAGES
    assert (mirror_ints(buf) == i).all()
    hmm.proc.madvise(buf.ptr, H, hmmsim.MADV_FREE)
    # extra: MADV_FREE leaves device entries alone, so the data survives.
    assert (buf.ints() == i).all()
    hmm.proc.munmap(old_ptr, 2 * H)


def test_migrate_anon_huge_fault(hmm):
    """T33: a THP made by MADV_COLLAPSE migrates whole and faults back.

    The private variant checks the device PMD (DEV_PRIVATE_LOCAL|WRITE|PMD
    for every page) and /proc/self/pagemap (swap, not present).
    """
    old_ptr, buf = thp_buffer(hmm.proc, advice=None)
    i = iota(H // 4)
    buf.fill(i)
    hmm.proc.madvise(buf.ptr, H, hmmsim.MADV_COLLAPSE)  # must succeed (return 0)
    assert hmm.proc.pagemap(buf.ptr, 1)[0].order == 9  # extra
    assert migrate(hmm, buf) == 0
    assert buf.cpages == NPAGES
    assert (mirror_ints(buf) == i).all()
    if not hmm.coherent:
        assert dmirror_cmd(hmm.fd, HMM_DMIRROR_SNAPSHOT, buf, NPAGES) == 0
        assert buf.cpages == NPAGES
        want = HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | HMM_DMIRROR_PROT_WRITE | HMM_DMIRROR_PROT_PMD
        assert set(buf.mirror[:NPAGES]) == {want}
        entries = hmm.proc.pagemap(buf.ptr, NPAGES)
        assert all(e.swapped and not e.present for e in entries)
    assert (buf.ints() == i).all()
    hmm.proc.munmap(old_ptr, 2 * H)
    verify_machine(hmm.machine)  # extra


def test_migrate_partial_unmap_fault(hmm):
    """T34: unmap H/2 of a migrated range at 0, H/4 or H/2, with and without THP,
    then fault back and check every int outside the hole (6 rounds)."""
    unmap_size = H // 2
    i = iota(H // 4)
    for use_thp in (False, True):
        advice = hmmsim.MADV_HUGEPAGE if use_thp else hmmsim.MADV_NOHUGEPAGE
        for offset in (0, H // 4, H // 2):
            old_ptr, buf = thp_buffer(hmm.proc, advice=advice)
            buf.fill(i)
            assert migrate(hmm, buf) == 0
            assert buf.cpages == NPAGES
            assert (mirror_ints(buf) == i).all()
            hmm.proc.munmap(buf.ptr + offset, unmap_size)
            if offset:
                assert (buf.ints(offset // 4) == i[: offset // 4]).all(), (use_thp, offset)
            tail = offset + unmap_size
            if tail < H:
                assert (buf.ints(offset=tail) == i[tail // 4 :]).all(), (use_thp, offset)
            hmm.proc.munmap(old_ptr, 2 * H)
            verify_machine(hmm.machine)  # extra


def test_migrate_remap_fault(hmm):
    """T35: mremap (MAYMOVE|FIXED, with and without DONTUNMAP) a range before or
    after migrating it, to map + H + {0, H/4, H/2}, with and without THP, then
    fault everything back (24 rounds)."""
    i = iota(H // 4)
    for before in (False, True):
        for dont_unmap in (False, True):
            for use_thp in (False, True):
                advice = hmmsim.MADV_HUGEPAGE if use_thp else hmmsim.MADV_NOHUGEPAGE
                for offset in (0, H // 4, H // 2):
                    case = (before, dont_unmap, use_thp, offset)
                    flags = hmmsim.MREMAP_MAYMOVE | hmmsim.MREMAP_FIXED
                    if dont_unmap:
                        flags |= hmmsim.MREMAP_DONTUNMAP
                    old_ptr, buf = thp_buffer(hmm.proc, advice=advice, reserve=8)
                    mapped = buf.ptr
                    hmm.proc.munmap(mapped + H, 2 * H)  # the window mremap moves into
                    buf.fill(i)
                    target = mapped + H + offset
                    new_ptr = 0
                    if before:
                        new_ptr = hmm.proc.mremap(mapped, H, H, flags, new_addr=target)
                        assert new_ptr == target, case
                        buf.ptr = new_ptr
                    assert migrate(hmm, buf) == 0, case
                    assert buf.cpages == NPAGES, case
                    assert (mirror_ints(buf) == i).all(), case
                    if not before:
                        new_ptr = hmm.proc.mremap(mapped, H, H, flags, new_addr=target)
                        assert new_ptr == target, case
                        buf.ptr = new_ptr
                    if use_thp and not offset and not hmm.coherent:
                        # extra: an aligned move keeps the device THP one PMD entry
                        e = hmm.proc.pagemap(new_ptr, 1)[0]
                        assert (e.kind, e.order) == ("device_private", 9), case
                    assert (buf.ints() == i).all(), case
                    hmm.proc.munmap(new_ptr, H)
                    hmm.proc.munmap(old_ptr, 8 * H)
                    verify_machine(hmm.machine)  # extra


def test_migrate_anon_huge_err(hmm):
    """T36: FAIL_ALLOC both ways.

    To the device: no device folio, so the THP moves as 512 device pages and
    one int faults back alone. Back to RAM: MIGRATE_TO_SYS of a device THP
    with FAIL_ALLOC returns it as base pages.

    The coherent variant differs from the kernel test's expectation: a
    coherent device has no folios, so the THP went to 512 single coherent
    pages, and FAIL_ALLOC on an order-0 page on the way back is a failed
    allocation: -ENOMEM (the kernel test's ASSERT_EQ(ret, 0) fails there
    too), and the flag is spent, so the retry moves every page.
    """
    old_ptr, buf = thp_buffer(hmm.proc, mirror_size=2 * H)
    i = iota(H // 4)
    buf.fill(i)
    fail_alloc(hmm, buf)
    assert migrate(hmm, buf) == 0
    assert buf.cpages == NPAGES
    assert (mirror_ints(buf) == i).all()
    assert buf.ints(1, offset=2048 * 4)[0] == 2048  # faults back a single page
    e = hmm.proc.pagemap(buf.ptr + 2 * P, 1)[0]  # extra: only that page came back
    assert e.kind == ("device_coherent" if hmm.coherent else "anon") and e.order == 0

    hmm.proc.munmap(old_ptr, 2 * H)
    old_ptr, buf = thp_buffer(hmm.proc, mirror_size=2 * H)
    buf.fill(i)
    assert migrate(hmm, buf) == 0
    assert buf.cpages == NPAGES
    fail_alloc(hmm, buf)
    if hmm.coherent:
        assert dmirror_cmd(hmm.fd, HMM_DMIRROR_MIGRATE_TO_SYS, buf, NPAGES) == ENOMEM
        assert hmm.proc.pagemap(buf.ptr, 1)[0].kind == "device_coherent"
        assert dmirror_cmd(hmm.fd, HMM_DMIRROR_MIGRATE_TO_SYS, buf, NPAGES) == 0
        assert buf.cpages == NPAGES
    else:
        assert dmirror_cmd(hmm.fd, HMM_DMIRROR_MIGRATE_TO_SYS, buf, NPAGES) == 0
        assert buf.cpages == NPAGES  # extra
        assert {e.order for e in hmm.proc.pagemap(buf.ptr, NPAGES)} == {0}  # extra
    assert buf.ints(1, offset=2048 * 4)[0] == 2048
    assert (buf.ints() == i).all()  # extra
    hmm.proc.munmap(old_ptr, 2 * H)
    verify_machine(hmm.machine)  # extra


def test_migrate_anon_huge_zero_err(hmm):
    """T37: FAIL_ALLOC while migrating a read-only hole, then the huge zero page.

    The compound hole falls back to 512 zero-filled device pages. The second
    half reads through the first mapping's pointer: the kernel test relies on
    the new mmap returning the same address, and so does this port.
    """
    old_ptr, buf = thp_buffer(hmm.proc, prot=RO, mirror_size=2 * H)
    fail_alloc(hmm, buf)
    assert migrate(hmm, buf) == 0
    assert buf.cpages == NPAGES
    assert (mirror_ints(buf) == 0).all()
    ptr = buf.ptr
    assert buf.ints(1, offset=2048 * 4)[0] == 0  # faults back a single page

    hmm.proc.munmap(old_ptr, 2 * H)
    new_old_ptr, buf = thp_buffer(hmm.proc, prot=RO, mirror_size=2 * H)
    assert buf.ptr == ptr  # what the kernel test's read through the old pointer needs
    assert np.frombuffer(hmm.proc.read(ptr, 4), dtype=np.int32)[0] == 0  # huge zero page
    assert hmm.proc.pagemap(ptr, 1)[0].kind == "zero"  # extra
    fail_alloc(hmm, buf)
    assert migrate(hmm, buf) == 0
    assert buf.cpages == NPAGES
    assert (buf.ints() == 0).all()
    hmm.proc.munmap(new_old_ptr, 2 * H)
    verify_machine(hmm.machine)  # extra


def test_migrate_anon_huge_collapse(hmm):
    """Not a kernel test: a THP that went to the device and back collapses again."""
    _old, buf = thp_buffer(hmm.proc)
    buf.fill(iota(H // 4))
    assert migrate(hmm, buf) == 0
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_MIGRATE_TO_SYS, buf, NPAGES) == 0
    # A device THP moved whole is one src entry (VALID|MIGRATE|COMPOUND, the
    # other 511 zero), so the driver counts 1; a coherent device's 512 pages, 512.
    assert buf.cpages == (NPAGES if hmm.coherent else 1)
    hmm.proc.madvise(buf.ptr, H, hmmsim.MADV_COLLAPSE)
    assert hmm.proc.pagemap(buf.ptr, 1)[0].order == 9
    assert (buf.ints() == iota(H // 4)).all()


#: T38's buffer sizes: H/4, H/2, H, 2H, 4H, 8H and 128H (a whole 256 MiB chunk).
BENCHMARK_SIZES = (H // 4, H // 2, H, 2 * H, 4 * H, 8 * H)
BENCHMARK_ITERATIONS = 5


def run_migration_round_trips(hmm, use_thp: bool, size: int, iterations: int) -> None:
    """``run_migration_benchmark`` without the clock: an unaligned anonymous
    mapping, MADV_HUGEPAGE or MADV_NOHUGEPAGE, filled with ``i & 0xFF``, then a
    warm-up round trip and ``iterations`` round trips, each ioctl returning 0.

    Extra: after every round trip the device's read-back (the mirror) and the
    CPU's view must hold the data.
    """
    proc = hmm.proc
    npages = size // P
    ptr = proc.mmap(size, RW, ANON)
    proc.madvise(ptr, size, hmmsim.MADV_HUGEPAGE if use_thp else hmmsim.MADV_NOHUGEPAGE)
    buf = HmmBuffer(proc, ptr, size, bytearray(b"\xff" * size))
    data = iota(size // 4) & 0xFF
    buf.fill(data)
    for _ in range(1 + iterations):
        assert dmirror_cmd(hmm.fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf, npages) == 0
        assert (buf.mirror_ints() == data).all()
        assert dmirror_cmd(hmm.fd, HMM_DMIRROR_MIGRATE_TO_SYS, buf, npages) == 0
        assert (buf.ints() == data).all()
    buf.free()


def test_benchmark_thp_migration(hmm):
    """T38's functional part, sizes up to 8H: every migration succeeds, with THP
    and without; the timing is in bench/test_bench_thp_migration.py."""
    for size in BENCHMARK_SIZES:
        run_migration_round_trips(hmm, True, size, BENCHMARK_ITERATIONS)
        run_migration_round_trips(hmm, False, size, BENCHMARK_ITERATIONS)
    verify_machine(hmm.machine)  # extra


@pytest.mark.slow
def test_benchmark_thp_migration_whole_chunk(hmm):
    """T38's last size, 128H = 256 MiB: one whole device chunk (a second, folio
    chunk on a private device with THP; all of the coherent device's memory)."""
    run_migration_round_trips(hmm, True, 128 * H, BENCHMARK_ITERATIONS)
    run_migration_round_trips(hmm, False, 128 * H, BENCHMARK_ITERATIONS)
    verify_machine(hmm.machine)
