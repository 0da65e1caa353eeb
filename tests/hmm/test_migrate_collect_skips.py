"""migrate_vma_setup skips an entry it cannot migrate and goes on with the next.

``migrate_vma_collect_pmd`` leaves a swap entry alone (src 0, only
device-private softleaf entries are taken) and collects the pages after it.
"""

from __future__ import annotations

import hmmsim
import numpy as np
from helpers import ANON, PAGE, RW
from hmmsim import MADV_PAGEOUT
from hmmsim.migrate import (
    MIGRATE_PFN_MIGRATE,
    MIGRATE_PFN_SHIFT,
    MIGRATE_VMA_SELECT_SYSTEM,
    MigrateVma,
    migrate_vma_finalize,
    migrate_vma_pages,
    migrate_vma_setup,
)
from hmmsim.mm.debug import verify_machine
from hmmsim.testing.devmem import Device

U64 = np.uint64


def test_collect_skips_a_swap_entry_and_takes_the_page_after_it(migrate_path) -> None:
    m = hmmsim.Machine(hmmsim.MachineConfig(ram_bytes=64 << 20, swap_bytes=16 << 20))
    dev = Device(m)
    p = m.spawn()
    n = 4
    a = p.mmap(n * PAGE, RW, ANON)
    for i in range(n):
        p.write(a + i * PAGE, bytes([0x41 + i]) * PAGE)
    p.madvise(a + PAGE, PAGE, MADV_PAGEOUT)
    before = p.pagemap(a, n)
    assert [e.kind for e in before] == ["anon", "swap", "anon", "anon"]
    src = np.zeros(n, dtype=U64)
    dst = np.zeros(n, dtype=U64)
    args = MigrateVma(
        p.mm.find_vma(a), a, a + n * PAGE, src, dst, pgmap_owner=dev,
        flags=MIGRATE_VMA_SELECT_SYSTEM,
    )  # fmt: skip
    with p.mm.mmap_lock.read():
        migrate_vma_setup(args)
        assert int(src[1]) == 0
        taken = [0, 2, 3]
        assert [int(src[i]) >> MIGRATE_PFN_SHIFT for i in taken] == [before[i].pfn for i in taken]
        assert all(int(src[i]) & MIGRATE_PFN_MIGRATE for i in taken)
        assert args.cpages == 3
        migrate_vma_pages(args)  # no destinations: everything stays
        migrate_vma_finalize(args)
    assert [e.kind for e in p.pagemap(a, n)] == ["anon", "swap", "anon", "anon"]
    for i in range(n):
        assert p.read(a + i * PAGE, 4) == bytes([0x41 + i]) * 4
    verify_machine(m)
