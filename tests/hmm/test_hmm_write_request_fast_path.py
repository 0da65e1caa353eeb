"""hmm_range_fault's fast path also serves write requests over writable PTEs.

A range whose every page is a normal present PTE needs no walk decision when
nothing can fault; with write requests that holds when every PTE is also
writable (an ODP MR's page faults ask for write). These tests compare the
outputs, page tables and fault counts of random ranges against the general
walk (the fast path disabled).
"""

from __future__ import annotations

import random
from typing import Any

import hmmsim
import numpy as np
import pytest
from hmmsim import MAP_ANONYMOUS, MAP_PRIVATE, PROT_READ, PROT_WRITE, Machine, MachineConfig
from hmmsim.hmm import HMM_PFN_REQ_FAULT, HMM_PFN_REQ_WRITE, HmmRange, hmm_range_fault

PAGE = 4096
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS


class _Mirror:
    def invalidate(self, sub: Any, rng: Any, cur_seq: int) -> bool:
        hmmsim.mmu_interval_set_seq(sub, cur_seq)
        return True


def _run(seed: int, fast: bool, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    rng = random.Random(seed)
    with monkeypatch.context() as mp:
        if not fast:
            mp.setattr(hmmsim.hmm, "_fast_path", lambda *a, **k: False)
        m = Machine(MachineConfig(ram_bytes=32 << 20))
        p = m.spawn()
        n = 64
        a = p.mmap(n * PAGE, RW, ANON)
        out: list[Any] = []
        for _ in range(10):
            op = rng.randrange(5)
            i = rng.randrange(n)
            k = rng.randint(1, n - i)
            if op == 0:
                p.write(a + i * PAGE, b"w" * (k * PAGE))
            elif op == 1:
                p.read(a + i * PAGE, k * PAGE)
            elif op == 2 and rng.random() < 0.3:
                p.fork()  # write-protects the private pages (COW)
            else:
                flags = HMM_PFN_REQ_FAULT | (HMM_PFN_REQ_WRITE if rng.random() < 0.7 else 0)
                sub = hmmsim.mmu_interval_notifier_insert(p.mm, a, n * PAGE, _Mirror())
                arr = np.zeros(k, np.uint64)
                r = HmmRange(sub, a + i * PAGE, a + (i + k) * PAGE, arr, default_flags=flags)
                while True:
                    r.notifier_seq = hmmsim.mmu_interval_read_begin(sub)
                    try:
                        with p.mm.mmap_lock.read():
                            hmm_range_fault(r)
                    except hmmsim.Busy:  # its own write fault invalidated the range
                        continue
                    if not hmmsim.mmu_interval_read_retry(sub, r.notifier_seq):
                        break
                hmmsim.mmu_interval_notifier_remove(sub)
                out.append(arr.tolist())
        out.append([(e.present, e.pfn, e.writable, str(e.kind)) for e in p.pagemap(a, n)])
        out.append(m.costs.faults)
        return out


@pytest.mark.parametrize("seed", range(40))
def test_write_request_fast_path_gives_the_general_walk_output(
    monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    assert _run(seed, True, monkeypatch) == _run(seed, False, monkeypatch)
