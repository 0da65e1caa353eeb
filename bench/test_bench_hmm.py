"""HMM hot paths: hmm_range_fault (populated, THP, faulting) and migration.

Targets (issue "hmm_range_fault, device memory…"): snapshot of a populated
1 GiB range of 4 KiB PTEs at <= 10 ns/page (aim 5), over THP <= 2 ns/page;
REQ_FAULT|REQ_WRITE over an empty 1 GiB range <= 150 ns/page; migration of
1 GiB to device-private memory and back reported in pages/s.
"""

from __future__ import annotations

import os
from typing import Any

import hmmsim
import numpy as np
import pytest
from hmmsim import MAP_ANONYMOUS, MAP_POPULATE, MAP_PRIVATE, PROT_READ, PROT_WRITE
from hmmsim.hmm import HMM_PFN_REQ_FAULT, HMM_PFN_REQ_WRITE, HmmRange, hmm_range_fault
from hmmsim.machine import ThpMode
from hmmsim.testing.devmem import Device

from .conftest import costs_of

GIB = 1 << 30
PAGE = 4096
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS
SMOKE = os.environ.get("HMMSIM_BENCH_SMALL") == "1"


def _size() -> int:
    return (64 << 20) if SMOKE else GIB


class Nop:
    def invalidate(self, sub: Any, rng: Any, cur_seq: int) -> bool:
        hmmsim.mmu_interval_set_seq(sub, cur_seq)
        return True


def _setup(thp: ThpMode, populate: bool) -> tuple[hmmsim.Machine, hmmsim.Process, int, Any]:
    m = hmmsim.Machine(hmmsim.MachineConfig(ram_bytes=2 * GIB, thp=thp, store_data=False))
    p = m.spawn()
    size = _size()
    a = p.mmap(size, RW, ANON | (MAP_POPULATE if populate else 0))
    sub = hmmsim.mmu_interval_notifier_insert(p.mm, a, size, Nop())
    return m, p, a, sub


@pytest.mark.benchmark(group="hmm_range_fault")
@pytest.mark.parametrize("thp", ["never", "always"])
def test_snapshot_of_populated_range(benchmark: Any, thp: ThpMode) -> None:
    m, p, a, sub = _setup(thp, populate=True)
    size = _size()
    pfns = np.zeros(size // PAGE, dtype=np.uint64)
    rng = HmmRange(sub, a, a + size, pfns)
    before = m.costs.snapshot()

    def run() -> None:
        rng.notifier_seq = hmmsim.mmu_interval_read_begin(sub)
        with p.mm.mmap_lock.read():
            hmm_range_fault(rng)

    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=1)
    assert int(pfns[0]) >> 63 == 1 and int(pfns[-1]) >> 63 == 1
    costs_of(m, before, benchmark, size // PAGE)


@pytest.mark.benchmark(group="hmm_range_fault")
def test_fault_and_write_an_empty_range(benchmark: Any) -> None:
    size = _size()
    state: dict[str, Any] = {}

    def setup() -> tuple[tuple[()], dict[str, Any]]:
        m, p, a, sub = _setup("never", populate=False)
        state.update(m=m, p=p, a=a, sub=sub, before=m.costs.snapshot())
        return (), {}

    def run() -> None:
        p, a, sub = state["p"], state["a"], state["sub"]
        pfns = np.zeros(size // PAGE, dtype=np.uint64)
        rng = HmmRange(sub, a, a + size, pfns, default_flags=HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE)
        rng.notifier_seq = hmmsim.mmu_interval_read_begin(sub)
        with p.mm.mmap_lock.read():
            hmm_range_fault(rng)
        state["pfns"] = pfns

    benchmark.pedantic(run, setup=setup, rounds=3, iterations=1)
    assert (state["pfns"] >> np.uint64(62) == 3).all()
    costs_of(state["m"], state["before"], benchmark, size // PAGE)


@pytest.mark.benchmark(group="migrate")
@pytest.mark.parametrize("thp", [False, True])
def test_migrate_to_device_private_and_back(benchmark: Any, thp: bool) -> None:
    size = (16 << 20) if SMOKE else (256 << 20 if not thp else GIB)
    npages = size // PAGE
    state: dict[str, Any] = {}

    def setup() -> tuple[tuple[()], dict[str, Any]]:
        m = hmmsim.Machine(
            hmmsim.MachineConfig(
                ram_bytes=2 * GIB, store_data=False, thp="always" if thp else "never"
            )
        )
        dev = Device(m, "private", npages=npages + 1024)
        p = m.spawn()
        a = p.mmap(size, RW, ANON | MAP_POPULATE)
        state.update(m=m, dev=dev, p=p, a=a, before=m.costs.snapshot())
        return (), {}

    def run() -> None:
        dev, p, a = state["dev"], state["p"], state["a"]
        state["to"] = dev.migrate_to_device(p, a, npages, compound=thp)[0]
        state["back"] = dev.migrate_to_system(p, a, npages)

    benchmark.pedantic(run, setup=setup, rounds=1, iterations=1)
    assert state["to"] == (npages // 512 if thp else npages)
    assert state["back"] >= state["to"]
    costs_of(state["m"], state["before"], benchmark, npages)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["pages_per_s_round_trip"] = npages / benchmark.stats.stats.min
