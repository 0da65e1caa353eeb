"""Invariant 8 (the zero pages stay zero) and the non-blocking sections of
non-blockable MMU-notifier callbacks, each with a state that breaks it."""

from __future__ import annotations

import hmmsim
import numpy as np
import pytest
from hmmsim import sched
from hmmsim.errors import KernelBug
from hmmsim.mm import PMD_PAGES
from hmmsim.mm.physmem import HUGE_ZERO_PFN, ZERO_PFN
from hmmsim.notifier import (
    MMU_NOTIFY_UNMAP,
    NotifierRange,
    invalidate_range_end,
    invalidate_range_start_nonblock,
    mmu_interval_notifier_insert,
    mmu_interval_notifier_remove,
    mmu_interval_set_seq,
)
from hmmsim.testing.invariants import check_zero_pages

PAGE = 4096


def _machine() -> hmmsim.Machine:
    return hmmsim.Machine(hmmsim.MachineConfig(ram_bytes=16 << 20))


def test_untouched_zero_pages_pass():
    check_zero_pages(_machine())


def test_a_byte_stored_in_the_zero_page_fails_invariant_8():
    m = _machine()
    m.phys.write(ZERO_PFN, PAGE - 1, b"\x01")
    with pytest.raises(AssertionError, match="the zero page was written"):
        check_zero_pages(m)


def test_a_store_into_the_huge_zero_page_names_the_subpage():
    m = _machine()
    m.phys.write_pages(
        np.array([HUGE_ZERO_PFN + PMD_PAGES - 1], dtype=np.int64),
        np.full((1, PAGE), 7, dtype=np.uint8),
    )
    with pytest.raises(AssertionError, match=f"subpage {PMD_PAGES - 1}"):
        check_zero_pages(m)


class _Ops:
    """An interval notifier whose invalidate takes a sleeping lock, blockable or not."""

    def __init__(self, trylock: bool) -> None:
        self.lock = sched.Mutex("drv.lock")
        self.trylock = trylock
        self.calls = 0

    def invalidate(self, sub, rng, cur_seq) -> bool:
        self.calls += 1
        if not rng.blockable and self.trylock:
            if not self.lock.try_acquire():
                return False
        else:
            self.lock.acquire()
        try:
            mmu_interval_set_seq(sub, cur_seq)
        finally:
            self.lock.release()
        return True


def _oom_reap_range(trylock: bool) -> tuple[hmmsim.Process, _Ops, object, NotifierRange]:
    m = _machine()
    p = m.spawn()
    a = p.mmap(
        4 * PAGE, hmmsim.PROT_READ | hmmsim.PROT_WRITE, hmmsim.MAP_PRIVATE | hmmsim.MAP_ANONYMOUS
    )
    ops = _Ops(trylock)
    sub = mmu_interval_notifier_insert(p.mm, a, 4 * PAGE, ops)
    rng = NotifierRange(p.mm, a, a + 4 * PAGE, MMU_NOTIFY_UNMAP, None, False)
    return p, ops, sub, rng


def test_a_mutex_taken_in_a_non_blockable_invalidation_is_a_kernel_bug():
    _p, ops, _sub, rng = _oom_reap_range(trylock=False)
    with pytest.raises(KernelBug, match="sleeping function called from invalid context"):
        invalidate_range_start_nonblock(rng)
    assert ops.calls == 1
    assert ops.lock.holder is None  # the splat came before the lock was taken
    sched.might_sleep("mutex_lock(drv.lock)")  # the section ended with the callback


def test_a_trylock_in_a_non_blockable_invalidation_is_allowed():
    _p, ops, sub, rng = _oom_reap_range(trylock=True)
    invalidate_range_start_nonblock(rng)
    assert ops.calls == 1
    invalidate_range_end(rng)
    mmu_interval_notifier_remove(sub)


def test_non_block_end_without_start_is_a_kernel_bug():
    with pytest.raises(KernelBug, match="non_block_end without non_block_start"):
        sched.non_block_end()


def test_might_sleep_outside_a_non_blocking_section_is_quiet():
    sched.might_sleep("mutex_lock(x)")
    sched.non_block_start()
    try:
        with pytest.raises(KernelBug):
            sched.might_sleep("mutex_lock(x)")
    finally:
        sched.non_block_end()
