"""The first interval notifier of an mm cannot appear in the middle of an invalidation.

``mmu_interval_notifier_insert`` on an mm without notifier state registers it
under ``mmap_write_lock`` (``__mmu_notifier_register``), so an invalidation
that started before the mm had any notifier has ended before the new
subscription exists; otherwise the subscription would miss that
invalidation's start and a driver could map pages it is about to free.
"""

from __future__ import annotations

import numpy as np
from hmmsim import (
    MADV_DONTNEED,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    PROT_READ,
    PROT_WRITE,
    Machine,
    MachineConfig,
    sched,
)
from hmmsim.explore import ScenarioRun, explore
from hmmsim.hmm import HMM_PFN_REQ_FAULT, HMM_PFN_VALID, HmmRange, hmm_range_fault
from hmmsim.notifier import (
    mmu_interval_notifier_insert,
    mmu_interval_notifier_remove,
    mmu_interval_read_begin,
    mmu_interval_read_retry,
    mmu_interval_set_seq,
)
from hmmsim.sched import BoundedDFS

PAGE = 4096


class _Ops:
    def __init__(self, lock: sched.Mutex) -> None:
        self.lock = lock

    def invalidate(self, sub, rng, cur_seq):  # type: ignore[no-untyped-def]
        with self.lock:
            mmu_interval_set_seq(sub, cur_seq)
        return True


def test_first_notifier_insert_waits_for_a_running_invalidation():
    def scenario() -> ScenarioRun:
        m = Machine(MachineConfig(ram_bytes=16 << 20))
        p = m.spawn()
        a = p.mmap(PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
        p.write(a, b"old")
        assert p.mm.notifier_subscriptions is None
        st: dict[str, object] = {}
        lock = sched.Mutex("driver")

        def device() -> None:
            sub = mmu_interval_notifier_insert(p.mm, a, PAGE, _Ops(lock))
            pfns = np.zeros(1, np.uint64)
            while True:
                rng = HmmRange(sub, a, a + PAGE, pfns, default_flags=HMM_PFN_REQ_FAULT)
                rng.notifier_seq = mmu_interval_read_begin(sub)
                with p.mm.mmap_lock.read():
                    hmm_range_fault(rng)
                with lock:
                    if not mmu_interval_read_retry(sub, rng.notifier_seq):
                        # Under the driver lock, a snapshot that passed read_retry
                        # is what the CPU maps: the invariant a driver relies on.
                        now = p.pagemap(a, 1)[0]
                        st["ok"] = (
                            bool(int(pfns[0]) & HMM_PFN_VALID)
                            and (int(pfns[0]) & ((1 << 53) - 1)) == now.pfn
                        )
                        break
            st["sub"] = sub

        def cpu() -> None:
            p.madvise(a, PAGE, MADV_DONTNEED)

        def final(_result: object) -> None:
            assert st["ok"], "a snapshot that passed read_retry is stale"
            mmu_interval_notifier_remove(st["sub"])  # type: ignore[arg-type]

        return ScenarioRun([("device", device), ("cpu", cpu)], final=final, state=st)

    result = explore(scenario, BoundedDFS(2), 2000, stop_at_first=True)
    assert not result.failures, result.failures[0].description
    assert result.schedules > 1
