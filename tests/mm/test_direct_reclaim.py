"""A CPU fault that finds RAM exhausted reclaims before it fails.

The kernel's page allocator reclaims directly (``__alloc_pages_direct_reclaim``)
before it fails a user page, so a store never sees ENOMEM while other memory
can go to swap. The model reclaims when a fault returns ``VM_FAULT_OOM``
after an order-0 allocation failed, then retries the fault. Where reclaim
frees nothing the kernel would OOM-kill; the model raises ``OutOfMemory``
(documented in ``hmmsim.mm.process.direct_reclaim``).
"""

from __future__ import annotations

import pytest
from hmmsim import (
    MADV_NOHUGEPAGE,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    PROT_READ,
    PROT_WRITE,
    Machine,
    MachineConfig,
    OutOfMemory,
)
from hmmsim.mm.debug import verify_machine

PAGE = 4096
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS


def hog_all_ram(m: Machine):  # type: ignore[no-untyped-def]
    hog = m.spawn()
    n = m.phys.allocator.nr_free
    b = hog.mmap(n * PAGE, RW, ANON)
    hog.madvise(b, n * PAGE, MADV_NOHUGEPAGE)
    hog.write(b, bytes([7]) * (n * PAGE))
    assert m.phys.allocator.nr_free == 0
    return hog, b, n


def test_a_store_with_ram_full_of_swappable_pages_swaps_them_out_and_succeeds():
    m = Machine(MachineConfig(ram_bytes=16 << 20, swap_bytes=8 << 20, thp="never"))
    p = m.spawn()
    a = p.mmap(4 * PAGE, RW, ANON)
    hog, b, n = hog_all_ram(m)
    p.write(a, b"x" * (4 * PAGE))
    assert p.read(a, 4 * PAGE) == b"x" * (4 * PAGE)
    swapped = [i for i, e in enumerate(hog.pagemap(b, n)) if e.swapped]
    assert len(swapped) >= 4
    for i in swapped:  # and back in, page by page, reclaiming other pages each time
        assert hog.read(b + i * PAGE, PAGE) == bytes([7]) * PAGE
    assert p.read(a, 4 * PAGE) == b"x" * (4 * PAGE)
    verify_machine(m)


def test_a_store_with_ram_full_and_no_swap_is_out_of_memory_and_changes_nothing():
    m = Machine(MachineConfig(ram_bytes=16 << 20, thp="never"))
    p = m.spawn()
    a = p.mmap(PAGE, RW, ANON)
    hog, _b, _n = hog_all_ram(m)
    with pytest.raises(OutOfMemory):
        p.write(a, b"x")
    assert not p.pagemap(a, 1)[0].present and not hog.exited
    verify_machine(m)
