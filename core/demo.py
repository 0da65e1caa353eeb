"""A short tour of the model, printed: ``python -m hmmsim demo``.

It maps memory, writes through the CPU, forks, breaks COW, splits a THP and
swaps a page out and in, printing the page-table state and the MMU-notifier
events each step produced. It exercises only the public API.
"""

from __future__ import annotations

from collections.abc import Callable

from .machine import Machine, MachineConfig
from .mm.process import Process
from .mm.uapi import (
    MADV_DONTNEED,
    MADV_PAGEOUT,
    MAP_ANONYMOUS,
    MAP_POPULATE,
    MAP_PRIVATE,
    PROT_READ,
    PROT_WRITE,
)
from .notifier import NotifierRange

PAGE = 4096


def _describe(p: Process, addr: int, npages: int = 1) -> str:
    out = []
    for e in p.pagemap(addr, npages):
        if e.present:
            out.append(f"{e.kind} pfn={e.pfn:#x} order={e.order} {'rw' if e.writable else 'ro'}")
        else:
            out.append(e.kind)
    return "; ".join(out)


def run_demo(echo: Callable[[str], None] = print) -> int:
    """Run the tour; returns 0 (the process exit status)."""
    m = Machine(MachineConfig(ram_bytes=256 << 20, swap_bytes=64 << 20, thp="always"))
    seen: list[NotifierRange] = []
    m.invalidation_listeners.append(seen.append)

    def step(title: str, action: Callable[[], object]) -> None:
        seen.clear()
        action()
        echo(f"* {title}")
        for rng in seen:
            echo(
                f"    notifier: {rng.event.name:16s} mm{rng.mm.id} "
                f"[{rng.start:#x}, {rng.end:#x}) blockable={rng.blockable}"
            )

    rw = PROT_READ | PROT_WRITE
    p = m.spawn()
    a = p.mmap(4 << 20, rw, MAP_PRIVATE | MAP_ANONYMOUS)
    echo(f"mapped 4 MiB of anonymous memory at {a:#x} (THP mode 'always')")
    step("read faults map the huge zero page", lambda: p.read(a, 8))
    echo(f"    {_describe(p, a)}")
    step("a write splits the huge zero PMD and COWs one page", lambda: p.write(a, b"hello"))
    echo(f"    {_describe(p, a)}")
    step(
        "touching the second 2 MiB with a write maps a THP", lambda: p.write(a + (2 << 20), b"huge")
    )
    echo(f"    {_describe(p, a + (2 << 20))}")
    child: list[Process] = []
    step("fork write-protects the parent (PROTECTION_PAGE)", lambda: child.append(p.fork()))
    c = child[0]
    step("the child writes: COW gives it its own copy (CLEAR)", lambda: c.write(a, b"child"))
    echo(f"    parent reads {p.read(a, 5)!r}, child reads {c.read(a, 5)!r}")
    step(
        "MADV_DONTNEED of one page inside the THP splits its PMD",
        lambda: p.madvise(a + (2 << 20) + PAGE, PAGE, MADV_DONTNEED),
    )
    echo(f"    {_describe(p, a + (2 << 20), 2)}")
    b = p.mmap(4 * PAGE, rw, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE)
    p.write(b, b"swap me")
    step("MADV_PAGEOUT swaps the page out", lambda: p.madvise(b, PAGE, MADV_PAGEOUT))
    echo(f"    {_describe(p, b)}")
    step("reading it swaps it back in", lambda: p.read(b, 7))
    echo(f"    {_describe(p, b)}, contents {p.read(b, 7)!r}")
    step("exit releases the notifiers and unmaps every VMA", c.exit)
    costs = m.costs
    echo(
        f"cost counters: faults={costs.faults} pte_writes={costs.pte_writes} "
        f"invalidations={costs.invalidations} pages_copied={costs.pages_copied} "
        f"swap_outs={costs.swap_outs} swap_ins={costs.swap_ins}"
    )
    echo(f"virtual time: {m.clock.now_ns} ns")
    return 0
