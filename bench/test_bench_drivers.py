"""Driver hot paths, for every installed driver (or ``--hmmsim-driver NAME``).

* first-touch device read of 4 MiB (the fault path);
* re-read of a range the device already maps (the no-fault path);
* munmap of a device-mapped 64 MiB range (the invalidation path).

``pytest --pyargs hmmsim.bench --hmmsim-driver NAME`` benchmarks any
installed driver; the cost counters of each run are in ``extra_info``.
"""

from __future__ import annotations

from typing import Any

import hmmsim
import pytest
from hmmsim import MAP_ANONYMOUS, MAP_HUGETLB, MAP_POPULATE, MAP_PRIVATE, PROT_READ, PROT_WRITE
from hmmsim.driver import Capability
from hmmsim.testing.checks import DriverSpec

from .conftest import costs_of

PAGE = 4096
HUGE = 2 << 20
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS


def _setup(spec: DriverSpec, size: int) -> dict[str, Any]:
    caps = spec.capabilities()
    if not Capability.READ & caps:
        pytest.skip(f"{spec} cannot read")
    flags = ANON | MAP_POPULATE
    config = hmmsim.MachineConfig(ram_bytes=512 << 20, store_data=False)
    if Capability.HUGE_ONLY & caps:
        # A driver that refuses 4 KiB memory gets hugetlb memory, as in the suite.
        flags |= MAP_HUGETLB
        config = hmmsim.MachineConfig(
            ram_bytes=512 << 20, store_data=False, hugetlb_pages={HUGE: size // HUGE}
        )
    m = hmmsim.Machine(config)
    dev = m.probe(spec.name, **dict(spec.params))
    p = m.spawn()
    mirror = dev.open(p)
    a = p.mmap(size, RW, flags)
    return {"m": m, "p": p, "mirror": mirror, "a": a, "before": m.costs.snapshot()}


@pytest.mark.benchmark(group="driver-fault")
def test_first_touch_read_4mib(benchmark: Any, hmmsim_driver: DriverSpec) -> None:
    size = 4 << 20
    state: dict[str, Any] = {}

    def setup() -> tuple[tuple[()], dict[str, Any]]:
        state.update(_setup(hmmsim_driver, size))
        return (), {}

    def run() -> None:
        state["mirror"].read(state["a"], size)

    benchmark.pedantic(run, setup=setup, rounds=3, iterations=1)
    costs_of(state["m"], state["before"], benchmark, size // PAGE)
    benchmark.extra_info["fault_rounds"] = state["mirror"].stats.fault_rounds


@pytest.mark.benchmark(group="driver-reread")
def test_reread_of_mapped_range(benchmark: Any, hmmsim_driver: DriverSpec) -> None:
    size = 4 << 20
    state = _setup(hmmsim_driver, size)
    state["mirror"].read(state["a"], size)
    rounds = state["mirror"].stats.fault_rounds
    before = state["m"].costs.snapshot()

    def run() -> None:
        state["mirror"].read(state["a"], size)

    benchmark.pedantic(run, rounds=5, iterations=1)
    assert state["mirror"].stats.fault_rounds == rounds  # no fault on a mapped range
    costs_of(state["m"], before, benchmark, size // PAGE)


@pytest.mark.benchmark(group="driver-invalidate")
def test_munmap_of_device_mapped_64mib(benchmark: Any, hmmsim_driver: DriverSpec) -> None:
    size = 64 << 20
    state: dict[str, Any] = {}

    def setup() -> tuple[tuple[()], dict[str, Any]]:
        state.update(_setup(hmmsim_driver, size))
        state["mirror"].read(state["a"], size)
        state["before"] = state["m"].costs.snapshot()
        return (), {}

    def run() -> None:
        state["p"].munmap(state["a"], size)

    benchmark.pedantic(run, setup=setup, rounds=2, iterations=1)
    assert all(e is None for e in state["mirror"].device_ptes(state["a"], 16))
    costs_of(state["m"], state["before"], benchmark, size // PAGE)
    benchmark.extra_info["invalidations"] = state["mirror"].stats.invalidations
