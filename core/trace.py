"""Deterministic cost counters, the virtual clock, and an optional event log.

Kernel counterpart: tracepoints and vmstat counters. Times measured on a noisy
machine wander; these counts do not, so benchmarks report them next to times
and tests can assert them.

``Clock`` is the machine's only notion of time: operations advance it by
modelled costs and every timeout in the model (e.g. a driver's
``HMM_RANGE_DEFAULT_TIMEOUT`` retry deadline) reads it, never the wall clock,
so that a run replays exactly.
"""

from __future__ import annotations

from typing import Any

import attrs

from .errors import KernelBug

#: Modelled costs in virtual nanoseconds. Rough orders of magnitude of the
#: real operations; what matters is that they are deterministic.
COST_FAULT_NS = 1_000
COST_PAGE_COPY_NS = 250
COST_INVALIDATION_NS = 500
COST_SWAP_IO_NS = 10_000
COST_HMM_PASS_NS = 200
COST_HMM_PAGE_NS = 1


@attrs.define(eq=False)
class Clock:
    """Virtual time in nanoseconds, advanced only by the model."""

    now_ns: int = 0

    def advance(self, ns: int) -> None:
        if ns < 0:
            raise KernelBug("time does not run backwards")
        self.now_ns += ns

    @property
    def now_ms(self) -> float:
        return self.now_ns / 1e6


@attrs.define(eq=False)
class Costs:
    """Counters of the model's deterministic work."""

    pte_writes: int = 0
    pages_walked: int = 0
    faults: int = 0
    pages_allocated: int = 0
    pages_freed: int = 0
    pages_copied: int = 0
    bytes_copied: int = 0
    invalidations: int = 0
    notifier_calls: int = 0
    swap_outs: int = 0
    swap_ins: int = 0
    thp_splits: int = 0
    tlb_flushes: int = 0
    device_tlb_flushes: int = 0
    #: DMA API map and unmap calls (streaming maps, sg tables, IOVA links).
    dma_maps: int = 0
    dma_unmaps: int = 0
    #: IOVA space allocated, in bytes (``alloc_iova``).
    iova_bytes: int = 0
    #: IOMMU page-table entries written, and IOTLB flushes.
    iommu_ptes: int = 0
    iotlb_flushes: int = 0
    #: Bytes devices moved by DMA (``dma_read``/``dma_write``).
    dma_bytes: int = 0

    def snapshot(self) -> dict[str, int]:
        return attrs.asdict(self)

    def since(self, before: dict[str, int]) -> dict[str, int]:
        now = self.snapshot()
        return {k: now[k] - before.get(k, 0) for k in now if now[k] != before.get(k, 0)}


@attrs.frozen
class TraceEvent:
    """One entry of the event log: when, who, what, and details."""

    time_ns: int
    actor: str
    kind: str
    detail: dict[str, Any]


@attrs.define(eq=False)
class Trace:
    """Cost counters plus an event log that is off unless someone listens."""

    clock: Clock = attrs.field(factory=Clock)
    costs: Costs = attrs.field(factory=Costs)
    events: list[TraceEvent] | None = None
    limit: int = 100_000

    def enable_log(self, limit: int = 100_000) -> None:
        self.events = []
        self.limit = limit

    def disable_log(self) -> None:
        self.events = None

    def log(self, actor: object, kind: str, **detail: Any) -> None:
        """Record an event if the log is on (cheap no-op otherwise)."""
        events = self.events
        if events is not None and len(events) < self.limit:
            events.append(TraceEvent(self.clock.now_ns, str(actor), kind, detail))
