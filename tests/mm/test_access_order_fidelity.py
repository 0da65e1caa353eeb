"""CPU accesses that fault part-way, and shmem reclaim without swap, as on Linux 6.18.

Found by the differential test (seeds 50421, 51130, 50181) and checked on
the host: a copy loop runs in address order, so a store stores the pages
before its fault and a load raises the fault of the first page it cannot
read (SIGBUS past the end of a shmem object before SIGSEGV at a later hole);
MADV_PAGEOUT of shmem with no swap unmaps the pages and leaves them cached,
so a later fault-around finds them.
"""

from __future__ import annotations

import hmmsim
import pytest
from helpers import PAGE, RW
from hmmsim import MADV_PAGEOUT, MAP_ANONYMOUS, MAP_FIXED, MAP_SHARED, MREMAP_FIXED, MREMAP_MAYMOVE
from hmmsim.mm.debug import verify_machine

BASE = 0x4000_0000
SHARED = MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED


def test_store_past_the_end_of_shmem_stores_the_pages_before_it(proc, machine) -> None:
    a = proc.mmap(4 * PAGE, RW, SHARED, addr=BASE)
    child = proc.fork()
    b = BASE + 64 * PAGE
    assert child.mremap(a, 4 * PAGE, 5 * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, b) == b
    with pytest.raises(hmmsim.BusError):
        child.write(b + PAGE, b"s" * (4 * PAGE))  # the 4th page is past the object
    assert proc.read(a + PAGE, 3 * PAGE) == b"s" * (3 * PAGE)
    verify_machine(machine)


def test_load_faults_sigbus_past_eof_before_sigsegv_at_a_later_hole(proc) -> None:
    a = proc.mmap(4 * PAGE, RW, SHARED | MAP_FIXED, addr=BASE)
    assert proc.mremap(a, 4 * PAGE, 5 * PAGE) == a  # grows in place, the object does not
    assert proc.mremap(a + 3 * PAGE, 2 * PAGE, 2 * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, a) == a
    # [a, a+2p) maps pages 3 and 4 (4 is past EOF), [a+2p, a+3p) page 2, then a hole.
    with pytest.raises(hmmsim.BusError):
        proc.read(a, 4 * PAGE)
    assert proc.pagemap(a, 1)[0].present  # the page before the fault was faulted in


def test_pageout_of_shmem_without_swap_unmaps_and_keeps_the_page_cached(proc, machine) -> None:
    a = proc.mmap(32 * PAGE, RW, SHARED, addr=BASE)
    proc.write(a, b"p" * (32 * PAGE))
    pfns = [e.pfn for e in proc.pagemap(a, 32)]
    proc.madvise(a, 16 * PAGE, MADV_PAGEOUT)
    assert [e.present for e in proc.pagemap(a, 32)] == [False] * 16 + [True] * 16
    proc.read(a + 3 * PAGE, 1)  # fault-around maps the cached neighbours again
    assert [e.present for e in proc.pagemap(a, 16)] == [True] * 16
    assert [e.pfn for e in proc.pagemap(a, 16)] == pfns[:16]
    verify_machine(machine)
