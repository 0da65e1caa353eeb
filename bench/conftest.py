"""Fixtures shared by the benchmarks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import hmmsim
import pytest


@pytest.fixture
def record_costs(benchmark: Any) -> Iterator[hmmsim.Machine]:
    """Yields nothing itself; use ``costs_of(machine, benchmark)`` after a run."""
    yield benchmark


def costs_of(machine: hmmsim.Machine, before: dict[str, int], benchmark: Any, npages: int) -> None:
    """Store the cost counters of one run, and per-page time, in ``extra_info``."""
    for key, value in machine.costs.since(before).items():
        benchmark.extra_info[key] = value
    benchmark.extra_info["pages"] = npages
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["ns_per_page_min"] = stats.stats.min * 1e9 / npages
