"""GUP takes the pages that need nothing in one vectorised step: same outcome as page by page.

``get_user_pages``/``pin_user_pages`` follow every page that is already
mapped as asked (and fault in a leading run of empty anonymous pages with
``populate_range``) in one step, and fall back to the page-by-page
``follow_page`` + ``faultin_page`` loop at the first page that needs a write
fault, an unshare, a PMD split, a device or special page, or fails. These
tests run random memory layouts through both paths (the page-by-page one by
disabling the vectorised step) and want the same pages, the same error, the
same page tables, references and pins.
"""

from __future__ import annotations

import random
from typing import Any

import hmmsim
import pytest
from hmmsim import (
    MADV_DONTNEED,
    MADV_HUGEPAGE,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    PROT_READ,
    PROT_WRITE,
    Machine,
    MachineConfig,
)
from hmmsim.gup import (
    FOLL_DUMP,
    FOLL_FORCE,
    FOLL_LONGTERM,
    FOLL_SPLIT_PMD,
    FOLL_WRITE,
    get_user_pages,
    pin_user_pages,
)
from hmmsim.mm.debug import verify_machine

PAGE = 4096
HUGE = 2 << 20
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS


def _scenario(seed: int, batched: bool, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    rng = random.Random(seed)
    with monkeypatch.context() as mp:
        if not batched:
            mp.setattr(hmmsim.gup, "_follow_run", lambda *a, **k: 0)
        thp = rng.choice(["madvise", "always", "never"])
        m = Machine(MachineConfig(ram_bytes=64 << 20, thp=thp))
        p = m.spawn()
        size = 4 * HUGE
        a = p.mmap(size + HUGE, RW, ANON)
        a = (a + HUGE - 1) & ~(HUGE - 1)
        npages = size // PAGE
        if rng.random() < 0.5:
            p.madvise(a, size, MADV_HUGEPAGE)
        out: list[Any] = []
        for _ in range(12):
            op = rng.randrange(7)
            off = rng.randrange(npages) * PAGE
            n = rng.randint(1, 700)
            ln = min(n * PAGE, a + size - (a + off))
            if op in (0, 1):
                try:
                    if op == 0:
                        p.write(a + off, b"x" * min(ln, 3 * PAGE))
                    else:
                        p.read(a + off, min(ln, 3 * PAGE))
                except OSError as exc:  # a store to a page made read-only
                    out.append(("cpu-error", type(exc).__name__))
            elif op == 2:
                p.madvise(a + off, ln, MADV_DONTNEED)
            elif op == 3 and rng.random() < 0.3:
                child = p.fork()
                out.append(("fork", child.pid is not None))
            elif op == 4 and rng.random() < 0.3:
                p.mprotect(a + off, ln, PROT_READ if rng.random() < 0.7 else RW)
            else:
                flags = rng.choice(
                    [0, FOLL_WRITE, FOLL_WRITE | FOLL_FORCE, FOLL_DUMP, FOLL_SPLIT_PMD]
                )
                pin = rng.random() < 0.5
                if pin and rng.random() < 0.3:
                    flags |= FOLL_LONGTERM
                start = a + off - (PAGE * rng.randrange(3) if rng.random() < 0.1 else 0)
                count = rng.randint(1, 900)
                try:
                    with p.mm.mmap_lock.read():
                        fn = pin_user_pages if pin else get_user_pages
                        got = fn(p.mm, start, count, flags & ~(FOLL_LONGTERM if not pin else 0))
                    out.append(("gup", pin, flags, got))
                except OSError as exc:
                    out.append(("gup-error", type(exc).__name__))
        pm = p.pagemap(a, npages)
        out.append([(e.present, e.pfn, e.writable, e.order, str(e.kind), e.exclusive) for e in pm])
        phys = m.phys
        out.append(sorted(phys.extra_refs.items()))
        out.append(sorted(phys.pins.items()))
        out.append(phys.refcount.tolist())
        out.append(m.costs.faults)
        verify_machine(m)
        return out


@pytest.mark.parametrize("seed", range(40))
def test_gup_batched_follow_gives_the_page_by_page_outcome(
    monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    assert _scenario(seed, True, monkeypatch) == _scenario(seed, False, monkeypatch)


def test_gup_of_16_mib_unpopulated_faults_every_page_once_and_references_it() -> None:
    m = Machine(MachineConfig(ram_bytes=64 << 20))
    p = m.spawn()
    n = (16 << 20) // PAGE
    a = p.mmap(n * PAGE, RW, ANON)
    with p.mm.mmap_lock.read():
        got = get_user_pages(p.mm, a, n, FOLL_WRITE)
    assert len(got) == n and len(set(got)) == n
    assert [e.pfn for e in p.pagemap(a, n)] == got
    assert m.costs.faults == n
    assert all(m.phys.extra_refs[pfn] == 1 for pfn in got)
    assert all(int(m.phys.refcount[pfn]) == 2 for pfn in got)
    for pfn in got:
        hmmsim.gup.put_page(m, pfn)
    verify_machine(m)
