"""The IOVA allocator keeps its ranges in sorted chunks: same answers as one sorted list.

``IommuDomain`` used to keep its allocated ranges in two flat sorted lists;
a top-down allocator inserts every new range in front of all others, so a
1 GiB MR of 4 KiB mappings cost a quadratic number of list moves. These
tests drive random allocate/free sequences through the chunked ranges (with
tiny chunks, so chunks split and empty all the time) and through a flat
reference allocator written as the old one was, and want the same IOVA
from every call.
"""

from __future__ import annotations

import bisect
import random

import pytest
from hmmsim import InvalidArgument, Machine, MachineConfig
from hmmsim.iommu import IommuDomain, _IovaRanges


class FlatAllocator:
    """The reference: ``alloc_iova``/``free_iova`` over two flat sorted lists."""

    def __init__(self, aperture: int) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.cached = aperture
        self.aperture = aperture

    def search(self, hi: int, size: int, align: int, floor: int) -> int | None:
        j = bisect.bisect_left(self.starts, hi) - 1
        while hi > floor:
            if j >= 0 and self.ends[j] > hi:
                hi = self.starts[j]
                j -= 1
                continue
            lo = max(floor, self.ends[j] if j >= 0 else 1)
            cand = (hi - size) & ~(align - 1)
            if cand >= lo:
                return cand
            if j < 0:
                return None
            hi = self.starts[j]
            j -= 1
        return None

    def alloc(self, npages: int, limit_pages: int) -> int | None:
        size = npages if npages >= 32 else 1 << (npages - 1).bit_length()
        align = 1 << (size - 1).bit_length()
        limit = min(limit_pages, self.aperture)
        cached = min(limit, self.cached)
        start = self.search(cached, size, align, 1)
        if start is None and cached < limit:
            start = self.search(limit, size, align, cached)
        if start is None:
            return None
        j = bisect.bisect_left(self.starts, start)
        self.starts.insert(j, start)
        self.ends.insert(j, start + size)
        self.cached = start
        return start

    def free(self, start: int) -> None:
        j = bisect.bisect_left(self.starts, start)
        assert self.starts[j] == start
        del self.starts[j], self.ends[j]
        if start >= self.cached:
            self.cached = self.starts[j] if j < len(self.starts) else self.aperture


@pytest.mark.parametrize("seed", range(6))
def test_chunked_iova_ranges_allocate_exactly_as_one_sorted_list(
    monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    monkeypatch.setattr(_IovaRanges, "_LOAD", 2)
    rng = random.Random(seed)
    aperture = 1 << 12  # small, so the allocator fills up and wraps around
    machine = Machine(MachineConfig(ram_bytes=16 << 20))
    dom = IommuDomain(machine, aperture_pages=aperture)
    ref = FlatAllocator(aperture)
    live: list[int] = []
    for _ in range(1500):
        if live and rng.random() < 0.45:
            start = live.pop(rng.randrange(len(live)))
            dom.free_iova(start)
            ref.free(start)
        else:
            npages = rng.choice([1, 1, 1, 2, 3, 8, 33, 64, 100])
            limit = rng.choice([aperture, aperture // 2, aperture - 7])
            got = dom.alloc_iova(npages, limit)
            assert got == ref.alloc(npages, limit)
            if got is not None:
                live.append(got)
        assert dom.iova_allocated() == sum(e - s for s, e in zip(ref.starts, ref.ends, strict=True))
    for start in sorted(live):
        dom.free_iova(start)
    assert dom.iova_allocated() == 0
    with pytest.raises(InvalidArgument):
        dom.free_iova(live[0] if live else 5)


def test_a_quarter_million_single_page_iovas_allocate_and_free_in_address_order() -> None:
    """The shape of a 1 GiB MR of 4 KiB mappings: packed top-down, freed bottom-up."""
    machine = Machine(MachineConfig(ram_bytes=16 << 20))
    dom = IommuDomain(machine)
    limit = 1 << 32
    n = 1 << 18
    starts = [dom.alloc_iova(1, limit) for _ in range(n)]
    assert starts[0] == limit - 1 and starts[-1] == limit - n
    assert dom.iova_allocated() == n
    for s in reversed(starts):
        dom.free_iova(s)  # lowest first: what a teardown in umem order does here
    assert dom.iova_allocated() == 0
    assert dom.alloc_iova(1, limit) == limit - 1
