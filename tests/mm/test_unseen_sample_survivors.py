"""Behaviours a fresh (unseen) mutation sample found unobserved: truncate's
rules for hugetlbfs sizes and for the partial last page of a written-back
file, and fork of a mapping whose page is being migrated.

The truncate outcomes were checked on the host (Linux 6.18): ftruncate of a
MFD_HUGETLB memfd to 4 MiB and to 0 succeeds, to 4 KiB or 2 MiB + 4 KiB is
EINVAL; a file written, fsynced and dropped from the cache, shrunk into its
second page and grown again reads the kept bytes and zeros after them.
"""

from __future__ import annotations

import errno

import hmmsim
import numpy as np
import pytest
from helpers import ANON, PAGE, RW
from hmmsim.migrate import (
    MIGRATE_PFN_MIGRATE,
    MIGRATE_PFN_SHIFT,
    MIGRATE_PFN_VALID,
    migrate_device_finalize,
    migrate_device_pages,
    migrate_device_range,
)
from hmmsim.mm.debug import verify_machine
from hmmsim.mm.reclaim import reclaim_folio
from hmmsim.testing.devmem import Device

MB2 = 2 << 20
U64 = np.uint64


def test_hugetlbfs_truncate_takes_only_multiples_of_the_huge_page(
    machine: hmmsim.Machine,
) -> None:
    f = machine.create_hugetlbfs_file(0, 9)
    f.truncate(2 * MB2)
    assert f.size == 2 * MB2
    for bad in (PAGE, MB2 + PAGE, 3 * MB2 - PAGE):
        with pytest.raises(hmmsim.InvalidArgument) as exc:
            f.truncate(bad)
        assert exc.value.errno == errno.EINVAL
        assert f.size == 2 * MB2
    f.truncate(0)
    assert f.size == 0


def test_truncate_into_an_evicted_page_zeroes_its_tail_on_disk(
    machine: hmmsim.Machine,
) -> None:
    f = machine.create_file(0, name="data")
    assert f.pwrite(0, b"\xaa" * (2 * PAGE)) == 2 * PAGE
    assert f.sync() == 2
    second = f.lookup(1)
    assert reclaim_folio(machine, second) == 1
    assert f.lookup(1) == -1  # only the disk copy is left
    f.truncate(PAGE + 100)
    f.truncate(2 * PAGE)
    assert f.pread(PAGE, PAGE) == b"\xaa" * 100 + bytes(PAGE - 100)
    assert f.pread(0, PAGE) == b"\xaa" * PAGE
    verify_machine(machine)


def test_fork_during_device_eviction_write_protects_both_sides(
    machine: hmmsim.Machine,
) -> None:
    """``migrate_device_range`` runs without the mmap lock, so a fork can copy
    the migration entries it installed. In a private mapping a writable
    migration entry is copied as a read one and the parent's becomes read
    too (``copy_nonpresent_pte``): when the migration ends both map the new
    page read-only, and a write on either side gets its own copy."""
    dev = Device(machine)
    p = machine.spawn()
    n = 4
    a = p.mmap(n * PAGE, RW, ANON)
    for i in range(n):
        p.write(a + i * PAGE, bytes([0x61 + i]) * PAGE)
    moved, _ = dev.migrate_to_device(p, a, n)
    assert moved == n
    size = len(dev.range)
    src = np.zeros(size, dtype=U64)
    dst = np.zeros(size, dtype=U64)
    migrate_device_range(machine, src, dev.range.start, size)
    sel = np.flatnonzero((src & U64(MIGRATE_PFN_MIGRATE)) != 0)
    assert len(sel) == n
    assert all(e.kind == "migration" for e in p.pagemap(a, n))
    child = p.fork()
    assert all(e.kind == "migration" for e in child.pagemap(a, n))
    phys = machine.phys
    new = phys.alloc(0, n)
    phys.flags[new] |= np.uint16(hmmsim.mm.PG_locked)
    phys.copy_pages(new, (src[sel] >> U64(MIGRATE_PFN_SHIFT)).astype(np.int64))
    dst[sel] = (new.astype(U64) << U64(MIGRATE_PFN_SHIFT)) | U64(MIGRATE_PFN_VALID)
    migrate_device_pages(machine, src, dst, size)
    migrate_device_finalize(machine, src, dst, size)
    for proc in (p, child):
        entries = proc.pagemap(a, n)
        assert [(e.kind, e.pfn, e.writable) for e in entries] == [
            ("anon", int(x), False) for x in new
        ]
    assert [int(phys.mapcount[x]) for x in new] == [2] * n
    child.write(a, b"C" * 8)
    assert child.pagemap(a, 1)[0].pfn != int(new[0])
    assert p.read(a, 8) == b"a" * 8
    p.write(a + PAGE, b"P" * 8)
    assert child.read(a + PAGE, 8) == b"b" * 8
    for i in range(n):
        assert child.read(a + i * PAGE + 8, 8) == bytes([0x61 + i]) * 8
    verify_machine(machine)


def test_store_running_off_the_top_of_user_space_keeps_its_prefix(
    machine: hmmsim.Machine,
) -> None:
    """The last mappable page ends at TASK_SIZE, one page below 2**47. A
    store from it that runs on to exactly 2**47 faults on the unmappable last
    page after the bytes below it were stored, as a CPU's copy loop does."""
    from hmmsim.mm.uapi import TASK_SIZE

    p = machine.spawn()
    a = p.mmap(PAGE, RW, ANON | hmmsim.MAP_FIXED, addr=TASK_SIZE - PAGE)
    assert a + 2 * PAGE == 1 << 47
    with pytest.raises(hmmsim.SegmentationFault):
        p.write(a, b"\x77" * (2 * PAGE))
    assert p.read(a, PAGE) == b"\x77" * PAGE
    with pytest.raises(hmmsim.SegmentationFault):
        p.read(a, 2 * PAGE)
    verify_machine(machine)


def test_move_pages_of_a_cow_shared_page_keeps_both_mappings_read_only(
    machine: hmmsim.Machine,
) -> None:
    """``try_to_migrate_one`` makes a writable migration entry only from a
    writable PTE: a page shared read-only by a parent and its fork child
    comes back read-only on both sides, so a write still copies it."""
    p = machine.spawn()
    a = p.mmap(2 * PAGE, RW, ANON)
    p.write(a, b"\x11" * (2 * PAGE))
    child = p.fork()
    old = p.pagemap(a, 1)[0].pfn
    assert p.move_pages(a, 1) == [0]
    new = p.pagemap(a, 1)[0].pfn
    assert new != old
    for proc in (p, child):
        e = proc.pagemap(a, 1)[0]
        assert (e.kind, e.pfn, e.writable) == ("anon", new, False)
    assert int(machine.phys.mapcount[new]) == 2
    child.write(a, b"\x22" * 8)
    assert child.pagemap(a, 1)[0].pfn != new
    assert p.read(a, 8) == b"\x11" * 8
    assert p.pagemap(a, 1)[0].pfn == new
    verify_machine(machine)


def test_freeing_a_folio_that_is_still_mapped_is_a_bad_page(machine: hmmsim.Machine) -> None:
    """``free_page_is_bad``: a folio whose last reference goes while its
    mapcount is not zero is ``BUG: Bad page state`` (a mapping count never
    dropped, as a collapse that forgot the old pages' mappings would leave)."""
    phys = machine.phys
    free0 = phys.allocator.nr_free
    (pfn,) = phys.alloc(0, 1).tolist()
    phys.mapcount[pfn] = 1
    with pytest.raises(hmmsim.KernelBug, match="Bad page state"):
        phys.put_one(pfn)
    assert phys.allocator.nr_free == free0 - 1  # not freed
    phys.mapcount[pfn] = 0
    phys.release(np.array([pfn], dtype=np.int64))
    assert phys.allocator.nr_free == free0
