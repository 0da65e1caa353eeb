"""A page that migrate_vma_setup collects but cannot unmap is given back whole.

``migrate_vma_collect`` takes a page that holds an extra (non-pin) reference,
such as a ``get_user_pages`` reference taken by someone else: only a pinned
exclusive page is left alone at collect. ``migrate_device_unmap`` then finds
the reference too many and restores the page: its migration entry becomes
the old PTE again, the folio is unlocked, the collect reference is dropped
and its ``src`` entry becomes 0, so neither the driver nor
``migrate_vma_pages``/``migrate_vma_finalize`` touch it again.
"""

from __future__ import annotations

import hmmsim
import numpy as np
from helpers import ANON, PAGE, RW
from hmmsim.gup import get_user_pages, put_page
from hmmsim.migrate import (
    MIGRATE_PFN_MIGRATE,
    MIGRATE_PFN_SHIFT,
    MIGRATE_PFN_VALID,
    MIGRATE_VMA_SELECT_SYSTEM,
    MigrateVma,
    migrate_vma_finalize,
    migrate_vma_pages,
    migrate_vma_setup,
)
from hmmsim.mm.debug import verify_machine
from hmmsim.testing.devmem import Device

U64 = np.uint64


def test_referenced_page_is_collected_then_restored_with_src_zero(migrate_path) -> None:
    m = hmmsim.Machine(hmmsim.MachineConfig(ram_bytes=64 << 20))
    dev = Device(m)
    p = m.spawn()
    n = 4
    a = p.mmap(n * PAGE, RW, ANON)
    for i in range(n):
        p.write(a + i * PAGE, bytes([0x31 + i]) * PAGE)
    before = p.pagemap(a, n)
    held = 2
    with p.mm.mmap_lock.read():
        (ref,) = get_user_pages(p.mm, a + held * PAGE, 1, 0)  # a plain reference, not a pin
    assert ref == before[held].pfn
    refcount0 = int(m.phys.refcount[ref])
    src = np.zeros(n, dtype=U64)
    dst = np.zeros(n, dtype=U64)
    args = MigrateVma(
        p.mm.find_vma(a), a, a + n * PAGE, src, dst, pgmap_owner=dev,
        flags=MIGRATE_VMA_SELECT_SYSTEM,
    )  # fmt: skip
    with p.mm.mmap_lock.read():
        migrate_vma_setup(args)
        # The held page was restored: no entry for it, and it is mapped,
        # unlocked and referenced exactly as before.
        assert int(src[held]) == 0
        assert args.cpages == n - 1
        moving = [i for i in range(n) if i != held]
        assert [int(src[i]) & MIGRATE_PFN_MIGRATE for i in moving] == [MIGRATE_PFN_MIGRATE] * 3
        assert [int(src[i]) >> MIGRATE_PFN_SHIFT for i in moving] == [before[i].pfn for i in moving]
        assert not m.phys.folio_locked(ref)
        assert int(m.phys.refcount[ref]) == refcount0
        assert int(m.phys.mapcount[ref]) == 1
        entry = p.pagemap(a + held * PAGE, 1)[0]
        assert (entry.kind, entry.pfn, entry.writable) == ("anon", ref, True)
        # The driver copies and fills dst only for the entries still migrating.
        new = dev.alloc_pages(len(moving))
        m.phys.copy_pages(new, np.array([before[i].pfn for i in moving], dtype=np.int64))
        dst[moving] = (new.astype(U64) << U64(MIGRATE_PFN_SHIFT)) | U64(MIGRATE_PFN_VALID)
        migrate_vma_pages(args)
        migrate_vma_finalize(args)
    after = p.pagemap(a, n)
    assert [e.kind for e in after] == ["device_private"] * 2 + ["anon"] + ["device_private"]
    assert (after[held].pfn, after[held].writable) == (ref, True)
    assert int(m.phys.refcount[ref]) == refcount0
    put_page(m, ref)
    for i in range(n):
        assert p.read(a + i * PAGE, PAGE) == bytes([0x31 + i]) * PAGE
    verify_machine(m)
