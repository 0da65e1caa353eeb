"""do_fault_around's window on a shmem read fault, as Linux 6.18 computes it.

Checked on the host: the 16-page window starts at the aligned start below
the fault or at the VMA's start if that is later (shifted, not clipped), and
is cut at the end of its page table (and of the VMA).
"""

from __future__ import annotations

from helpers import PAGE, RW
from hmmsim import (
    MADV_DONTNEED,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_POPULATE,
    MAP_SHARED,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
)

BASE = 0x4000_0000


def test_fault_around_window_shifts_to_the_vma_start(proc) -> None:
    a = proc.mmap(64 * PAGE, RW, MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED, addr=BASE)
    proc.write(a, b"\x05" * (64 * PAGE))
    b = BASE + 0x200000 + 3 * PAGE  # three pages into a 16-page window
    assert proc.mremap(a, 64 * PAGE, 64 * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, b) == b
    proc.madvise(b, 64 * PAGE, MADV_DONTNEED)  # the pages stay in the shmem cache
    assert proc.read(b + 5 * PAGE, 1) == b"\x05"
    assert [i for i, e in enumerate(proc.pagemap(b, 64)) if e.present] == list(range(16))
    assert proc.read(b + 60 * PAGE, 1) == b"\x05"
    present = [i for i, e in enumerate(proc.pagemap(b, 64)) if e.present]
    assert present == list(range(16)) + list(range(45, 61))


def test_a_read_over_cached_pages_faults_only_where_a_window_ends(proc, machine) -> None:
    """Differential seed 70001: the read's second fault is past the first window."""
    a = BASE + 0x5D7000
    proc.mmap(100 * PAGE, RW, MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED | MAP_POPULATE, addr=a)
    child = proc.fork()  # a shared mapping: the child has no page tables
    child.read(a + 4 * PAGE, 8 * PAGE)
    present = [i for i, e in enumerate(child.pagemap(a, 100)) if e.present]
    assert present == list(range(16))  # [a, a + 16 pages): one fault, one window
