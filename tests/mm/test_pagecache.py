"""The page cache: sparse, bounded by ``s_maxbytes``, and dirtied by every CPU store.

Limits as observed on a 6.18 host: ext4 (4 KiB blocks) stops at
2**44 - 4096 bytes, tmpfs/memfd at 2**63 - 1; ``pwrite`` crossing the limit
is short, starting at it is EFBIG; offset + length past 2**63 - 1 is EINVAL.
"""

from __future__ import annotations

import errno

import hmmsim
import numpy as np
import pytest
from helpers import PAGE, RW
from hmmsim import MADV_DONTNEED, MAP_ANONYMOUS, MAP_SHARED
from hmmsim.mm.file import EXT4_MAXBYTES, MAX_LFS_FILESIZE


def test_pwrite_far_into_a_shmem_object_costs_one_page(machine):
    f = machine.create_shmem(0)
    free = machine.phys.allocator.nr_free
    assert f.pwrite(1 << 36, b"far") == 3
    assert f.size == (1 << 36) + 3
    assert machine.phys.allocator.nr_free == free - 1
    assert len(f.cache.chunks) == 1
    assert f.pread((1 << 36) - 2, 8) == b"\0\0far"


def test_pwrite_at_2_pow_62_of_a_shmem_object_works(machine):
    f = machine.create_shmem(0)
    assert f.pwrite(1 << 62, b"x") == 1
    assert f.pread(1 << 62, 4) == b"x"
    assert f.lookup((1 << 62) // PAGE) >= 0
    f.truncate(0)
    assert f.cache.count() == 0 and f.size == 0


def test_pwrite_overflowing_loff_t_is_einval(machine):
    f = machine.create_shmem(0)
    with pytest.raises(hmmsim.InvalidArgument):
        f.pwrite(MAX_LFS_FILESIZE - 1, b"abcd")
    assert f.size == 0
    assert f.pwrite(MAX_LFS_FILESIZE - 1, b"a") == 1
    assert f.size == MAX_LFS_FILESIZE


def test_pwrite_at_ext4_limit_is_efbig(machine):
    f = machine.create_file(0)
    with pytest.raises(hmmsim.FileTooLarge) as exc:
        f.pwrite(EXT4_MAXBYTES, b"x")
    assert exc.value.errno == errno.EFBIG
    with pytest.raises(hmmsim.FileTooLarge):
        f.pwrite(1 << 62, b"x")
    assert f.size == 0 and f.cache.count() == 0


def test_pwrite_crossing_ext4_limit_is_short(machine):
    f = machine.create_file(0)
    assert f.pwrite(EXT4_MAXBYTES - 1, b"xy") == 1
    assert f.size == EXT4_MAXBYTES
    assert f.pread(EXT4_MAXBYTES - 1, 4) == b"x"


def test_truncate_or_create_past_the_limit_is_efbig(machine):
    f = machine.create_file(0)
    f.truncate(EXT4_MAXBYTES)
    with pytest.raises(hmmsim.FileTooLarge):
        f.truncate(EXT4_MAXBYTES + 1)
    assert f.size == EXT4_MAXBYTES
    with pytest.raises(hmmsim.FileTooLarge):
        machine.create_file(1 << 44)
    s = machine.create_shmem(0)
    s.truncate(MAX_LFS_FILESIZE)
    assert s.size == MAX_LFS_FILESIZE


def test_empty_pwrite_past_eof_does_not_extend_the_file(machine):
    f = machine.create_file(PAGE)
    assert f.pwrite(10 * PAGE, b"") == 0
    assert f.size == PAGE


def test_shmem_pread_of_a_hole_allocates_nothing(machine):
    f = machine.create_shmem(1 << 30)
    free = machine.phys.allocator.nr_free
    assert f.pread(5 * PAGE, 3 * PAGE) == bytes(3 * PAGE)
    assert machine.phys.allocator.nr_free == free and f.cache.count() == 0


def test_regular_file_pread_reads_pages_into_the_cache(machine):
    f = machine.create_file(8 * PAGE)
    assert f.pread(PAGE, 2 * PAGE) == bytes(2 * PAGE)
    assert f.cache.count() == 2


def test_mapping_far_into_a_sparse_file(machine, proc):
    off = 1 << 40
    f = machine.create_file(off + 4 * PAGE)
    a = proc.mmap(4 * PAGE, RW, MAP_SHARED, f, off)
    proc.write(a + PAGE + 5, b"deep")
    assert f.pread(off + PAGE + 5, 4) == b"deep"
    assert proc.pagemap(a + PAGE, 1)[0].pfn == f.lookup(off // PAGE + 1)
    f.truncate(off)
    assert not proc.pagemap(a + PAGE, 1)[0].present and f.cache.count() == 0


def test_page_cache_lookup_of_unsorted_indices_across_chunks(machine):
    f = machine.create_shmem(1 << 40)
    idx = [(1 << 27) + 3, 7, (1 << 14) + 1, 7, 1 << 20]
    for i in idx:
        f.pwrite(i * PAGE, i.to_bytes(8, "little"))
    pfns = f.get_pages(np.array(idx, dtype=np.int64))
    assert [f.lookup(i) for i in idx] == pfns.tolist()
    assert len(set(pfns.tolist())) == 4
    for i in idx:
        assert f.pread(i * PAGE, 8) == i.to_bytes(8, "little")
    assert len(f.cache.chunks) == 4
    f.punch_hole(7 * PAGE, PAGE)
    assert f.lookup(7) == -1 and len(f.cache.chunks) == 3


# ----- a CPU store always dirties; reclaim keeps dirty shmem, drops clean ------------


def test_cpu_store_into_read_faulted_shmem_page_survives_reclaim(machine, proc):
    a = proc.mmap(4 * PAGE, RW, MAP_SHARED | MAP_ANONYMOUS)
    assert proc.read(a, 1) == b"\0"
    e = proc.pagemap(a, 1)[0]
    assert e.writable and not e.dirty  # shmem: read fault maps writable, clean
    proc.write(a + 10, b"kept")  # no fault: the store itself dirties the PTE
    assert proc.pagemap(a, 1)[0].dirty
    machine.reclaim(64 << 20)
    assert not proc.pagemap(a, 1)[0].present
    assert proc.read(a + 10, 4) == b"kept"


def test_reclaim_drops_a_clean_shmem_page_and_it_reads_back_as_before(machine, proc):
    a = proc.mmap(2 * PAGE, RW, MAP_SHARED | MAP_ANONYMOUS)
    proc.write(a, b"old")
    proc.madvise(a, 2 * PAGE, MADV_DONTNEED)
    machine.reclaim(64 << 20)  # dirty: written back, then freed
    assert proc.read(a + PAGE, 1) == b"\0"  # a clean page of a hole
    pfn = proc.pagemap(a + PAGE, 1)[0].pfn
    machine.reclaim(64 << 20)
    assert not proc.pagemap(a + PAGE, 1)[0].present
    assert machine.phys.refcount[pfn] == 0  # clean: dropped without writeback
    assert proc.read(a, 3) == b"old" and proc.read(a + PAGE, 1) == b"\0"
