"""hmm_range_fault over a missing page table: one pte_hole for the whole span."""

from __future__ import annotations

import numpy as np
from helpers import ANON, PAGE, RW, EventLog
from hmmsim import (
    Machine,
    MachineConfig,
    mmu_interval_notifier_insert,
    mmu_interval_read_begin,
    mmu_interval_set_seq,
)
from hmmsim.hmm import (
    HMM_PFN_REQ_FAULT,
    HMM_PFN_REQ_WRITE,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    HmmRange,
    hmm_range_fault,
)

REQ = HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE


class Ops:
    def invalidate(self, sub, rng, cur_seq):  # type: ignore[no-untyped-def]
        mmu_interval_set_seq(sub, cur_seq)
        return True


def fault(p, a, requests):  # type: ignore[no-untyped-def]
    n = len(requests)
    sub = mmu_interval_notifier_insert(p.mm, a, n * PAGE, Ops())
    pfns = np.array(requests, dtype=np.uint64)
    rng = HmmRange(sub, a, a + n * PAGE, pfns, pfn_flags_mask=REQ)
    rng.notifier_seq = mmu_interval_read_begin(sub)
    with p.mm.mmap_lock.read():
        hmm_range_fault(rng)
    return pfns


def test_missing_table_ors_the_needs_and_write_faults_every_page_of_the_span():
    m = Machine(MachineConfig(ram_bytes=32 << 20))
    p = m.spawn()
    a = p.mmap(8 * PAGE, RW, ANON)
    log = EventLog(m)
    out = fault(p, a, [HMM_PFN_REQ_FAULT, 0, HMM_PFN_REQ_FAULT, 0, REQ, 0])
    # One write fault over the whole hole: no zero page, no COW, no invalidation.
    assert [e.kind for e in p.pagemap(a, 8)] == ["anon"] * 6 + ["none"] * 2
    assert all(
        int(x) & (HMM_PFN_VALID | HMM_PFN_WRITE) == HMM_PFN_VALID | HMM_PFN_WRITE for x in out
    )
    assert log.events == []


def test_existing_table_faults_from_the_first_pte_that_needs_it_with_its_own_need():
    m = Machine(MachineConfig(ram_bytes=32 << 20))
    p = m.spawn()
    a = p.mmap(8 * PAGE, RW, ANON)
    p.write(a + 7 * PAGE, b"t")  # the PTE table now exists
    out = fault(p, a, [0, HMM_PFN_REQ_FAULT, 0, 0, 0, 0])
    # From page 1 to the end of the walk, read faults: zero pages; page 0 is untouched.
    assert [e.kind for e in p.pagemap(a, 6)] == ["none"] + ["zero"] * 5
    assert int(out[0]) == 0 and int(out[1]) & HMM_PFN_VALID
