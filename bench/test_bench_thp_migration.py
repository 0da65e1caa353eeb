"""hmm-tests.c ``benchmark_thp_migration`` (T38), timed: dmirror round trips.

For each buffer size (H/4, H/2, H, 2H, 4H, 8H and 128H = one 256 MiB
device chunk; H = 2 MiB), with MADV_HUGEPAGE and with MADV_NOHUGEPAGE, as
the kernel test does: an unaligned anonymous mapping filled with
``i & 0xFF``, one warm-up round trip (MIGRATE_TO_DEV, MIGRATE_TO_SYS), then
timed round trips. Each round trip's two halves are timed apart as well
(``sys_to_dev_ms``, ``dev_to_sys_ms`` and their GB/s in ``extra_info``, the
numbers the kernel test prints). Every ioctl must succeed and the data must
survive every round trip. ``HMMSIM_BENCH_SMALL=1`` leaves out the 128H size.
"""

from __future__ import annotations

import os
import time
from typing import Any

import hmmsim
import numpy as np
import pytest
from hmmsim import MAP_ANONYMOUS, MAP_PRIVATE, PROT_READ, PROT_WRITE
from hmmsim.drivers.dmirror import (
    HMM_DMIRROR_MIGRATE_TO_DEV,
    HMM_DMIRROR_MIGRATE_TO_SYS,
    DmirrorCmd,
)

from .conftest import costs_of

PAGE = 4096
H = 2 << 20
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS
SMOKE = os.environ.get("HMMSIM_BENCH_SMALL") == "1"
SIZES = [H // 4, H // 2, H, 2 * H, 4 * H, 8 * H] + ([] if SMOKE else [128 * H])
ROUNDS = 5  # the kernel test's iterations


def _gbps(size: int, ms: float) -> float:
    return (size / (1 << 30)) / (ms / 1000.0) if ms > 0 else 0.0


@pytest.mark.benchmark(group="dmirror-thp-round-trip")
@pytest.mark.parametrize("use_thp", [True, False], ids=["thp", "nothp"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s // 1024}KiB")
def test_thp_migration_round_trip(benchmark: Any, size: int, use_thp: bool) -> None:
    m = hmmsim.Machine(hmmsim.MachineConfig(ram_bytes=max(512 << 20, 3 * size), thp="madvise"))
    p = m.spawn()
    fd = m.probe("dmirror", memory="private").open(p)
    npages = size // PAGE
    ptr = p.mmap(size, RW, ANON)
    p.madvise(ptr, size, hmmsim.MADV_HUGEPAGE if use_thp else hmmsim.MADV_NOHUGEPAGE)
    data = (np.arange(size // 4, dtype=np.int32) & 0xFF).tobytes()
    p.write(ptr, data)
    mirror = bytearray(b"\xff" * size)
    times = {"s2d": 0.0, "d2s": 0.0, "n": 0}

    def round_trip() -> None:
        t0 = time.perf_counter()
        to_dev = DmirrorCmd(ptr, npages, mirror)
        fd.ioctl(HMM_DMIRROR_MIGRATE_TO_DEV, to_dev)
        t1 = time.perf_counter()
        fd.ioctl(HMM_DMIRROR_MIGRATE_TO_SYS, DmirrorCmd(ptr, npages))
        t2 = time.perf_counter()
        assert to_dev.cpages == npages
        times["s2d"] += (t1 - t0) * 1000
        times["d2s"] += (t2 - t1) * 1000
        times["n"] += 1

    round_trip()  # warm-up
    assert mirror == data
    times.update(s2d=0.0, d2s=0.0, n=0)
    before = m.costs.snapshot()
    benchmark.pedantic(round_trip, rounds=ROUNDS, iterations=1)
    assert mirror == data
    assert p.read(ptr, size) == data
    n = max(1, int(times["n"]))
    s2d, d2s = times["s2d"] / n, times["d2s"] / n
    benchmark.extra_info.update(
        sys_to_dev_ms=s2d,
        dev_to_sys_ms=d2s,
        sys_to_dev_gbps=_gbps(size, s2d),
        dev_to_sys_gbps=_gbps(size, d2s),
    )
    costs_of(m, before, benchmark, npages)
