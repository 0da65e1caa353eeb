"""GUP and hmm_range_fault faults reclaim before they fail, as the allocator does.

With RAM full of another process's pages and swap free, the kernel's page
allocator reclaims directly and the fault succeeds; the model retries a
fault that failed an order-0 allocation once reclaim has freed something.
"""

from __future__ import annotations

import numpy as np
from hmmsim import (
    MADV_NOHUGEPAGE,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    PROT_READ,
    PROT_WRITE,
    Machine,
    MachineConfig,
    mmu_interval_notifier_insert,
    mmu_interval_read_begin,
    mmu_interval_set_seq,
)
from hmmsim.gup import FOLL_WRITE, pin_user_pages, unpin_user_pages
from hmmsim.hmm import (
    HMM_PFN_REQ_FAULT,
    HMM_PFN_REQ_WRITE,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    HmmRange,
    hmm_range_fault,
)
from hmmsim.mm.debug import verify_machine

PAGE = 4096
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS


class _Seq:
    def invalidate(self, sub, rng, cur_seq):  # type: ignore[no-untyped-def]
        mmu_interval_set_seq(sub, cur_seq)
        return True


def full_machine():  # type: ignore[no-untyped-def]
    m = Machine(MachineConfig(ram_bytes=16 << 20, swap_bytes=8 << 20, thp="never"))
    p = m.spawn()
    a = p.mmap(8 * PAGE, RW, ANON)
    hog = m.spawn()
    n = m.phys.allocator.nr_free
    b = hog.mmap(n * PAGE, RW, ANON)
    hog.madvise(b, n * PAGE, MADV_NOHUGEPAGE)
    hog.write(b, bytes([9]) * (n * PAGE))
    assert m.phys.allocator.nr_free == 0
    return m, p, a, hog, b, n


def test_pin_user_pages_with_ram_full_of_swappable_pages_reclaims_and_pins():
    m, p, a, hog, b, n = full_machine()
    with p.mm.mmap_lock.read():
        pfns = pin_user_pages(p.mm, a, 8, FOLL_WRITE)
    assert len(pfns) == 8
    assert sum(e.swapped for e in hog.pagemap(b, n)) >= 8
    unpin_user_pages(m, pfns)
    verify_machine(m)


def test_hmm_range_fault_with_ram_full_of_swappable_pages_reclaims_and_faults():
    m, p, a, hog, b, n = full_machine()
    sub = mmu_interval_notifier_insert(p.mm, a, 8 * PAGE, _Seq())
    pfns = np.zeros(8, np.uint64)
    rng = HmmRange(sub, a, a + 8 * PAGE, pfns, default_flags=HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE)
    rng.notifier_seq = mmu_interval_read_begin(sub)
    with p.mm.mmap_lock.read():
        hmm_range_fault(rng)
    assert all(int(e) & HMM_PFN_VALID and int(e) & HMM_PFN_WRITE for e in pfns)
    assert sum(e.swapped for e in hog.pagemap(b, n)) >= 8
    verify_machine(m)
