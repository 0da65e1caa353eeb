"""migrate_vma_* and make_device_exclusive: the resulting entries, flags and
bytes, on the vectorised paths (more than SCALAR_MAX_PAGES entries) and the
per-entry ones."""

from __future__ import annotations

import hmmsim
import numpy as np
import pytest
from hmmsim import MADV_FREE, MADV_PAGEOUT, MAP_ANONYMOUS, MAP_PRIVATE, PROT_READ, PROT_WRITE
from hmmsim.exclusive import make_device_exclusive
from hmmsim.gup import FOLL_WRITE, pin_user_pages, unpin_user_page
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
from hmmsim.migrate.args import SCALAR_MAX_PAGES
from hmmsim.mm.debug import verify_machine
from hmmsim.mm.physmem import PG_dirty
from hmmsim.testing.devmem import Device

PAGE = 4096
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS
N = 2 * SCALAR_MAX_PAGES  # takes the vectorised collect and pages phases


@pytest.fixture
def m() -> hmmsim.Machine:
    return hmmsim.Machine(hmmsim.MachineConfig(ram_bytes=64 << 20, swap_bytes=4 << 20))


def _filled(p: hmmsim.Process, n: int) -> int:
    a = p.mmap(n * PAGE, RW, ANON)
    for i in range(n):
        p.write(a + i * PAGE, bytes([i + 1]) * PAGE)
    return a


def _content(n: int) -> bytes:
    return b"".join(bytes([i + 1]) * PAGE for i in range(n))


def test_vectorised_migration_skips_page_referenced_after_setup(m: hmmsim.Machine) -> None:
    dev = Device(m)
    p = m.spawn()
    a = _filled(p, N)
    old = [e.pfn for e in p.pagemap(a, N)]
    src = np.zeros(N, np.uint64)
    dst = np.zeros(N, np.uint64)
    args = MigrateVma(
        p.mm.find_vma(a),
        a,
        a + N * PAGE,
        src,
        dst,
        pgmap_owner=dev,
        flags=MIGRATE_VMA_SELECT_SYSTEM,
    )
    with p.mm.mmap_lock.read():
        migrate_vma_setup(args)
        assert all(int(s) & MIGRATE_PFN_MIGRATE for s in src)
        late = old[3]
        assert late is not None
        m.phys.get_page(late)  # a speculative reference taken after setup
        new = dev.alloc_pages(N)
        spages = (src >> np.uint64(MIGRATE_PFN_SHIFT)).astype(np.int64)
        m.phys.copy_pages(new, spages)
        dst[:] = (new.astype(np.uint64) << np.uint64(MIGRATE_PFN_SHIFT)) | np.uint64(
            MIGRATE_PFN_VALID
        )
        migrate_vma_pages(args)
        assert [bool(int(s) & MIGRATE_PFN_MIGRATE) for s in src] == [i != 3 for i in range(N)]
        migrate_vma_finalize(args)
    pm = p.pagemap(a, N)
    assert [e.kind for e in pm] == ["device_private" if i != 3 else "anon" for i in range(N)]
    assert pm[3].pfn == late and pm[3].present and pm[3].writable
    m.phys.put_page(late)
    assert p.read(a, N * PAGE) == _content(N)
    verify_machine(m)


@pytest.mark.parametrize("n", [2, N])
def test_pinned_page_stays_in_ram_with_its_bytes(m: hmmsim.Machine, n: int) -> None:
    dev = Device(m)
    p = m.spawn()
    a = _filled(p, n)
    with p.mm.mmap_lock.read():
        (pfn,) = pin_user_pages(p.mm, a + PAGE, 1, FOLL_WRITE)
    moved, args = dev.migrate_to_device(p, a, n)
    assert moved == n - 1
    assert int(args.src[1]) == 0
    pm = p.pagemap(a, n)
    assert [e.kind for e in pm] == ["anon" if i == 1 else "device_private" for i in range(n)]
    assert pm[1].pfn == pfn
    # The pinned page is still the process's page: a write through the
    # mapping is seen through the pin.
    p.write(a + PAGE, b"\xee")
    assert m.phys.read(pfn, 0, 2) == b"\xee\x02"
    unpin_user_page(m, pfn)
    p.write(a + PAGE, bytes([2]))
    assert p.read(a, n * PAGE) == _content(n)
    verify_machine(m)


@pytest.mark.parametrize("n", [2, N])
def test_page_migrated_back_into_read_only_mapping_is_read_only(m: hmmsim.Machine, n: int) -> None:
    dev = Device(m)
    p = m.spawn()
    a = _filled(p, n)
    assert dev.migrate_to_device(p, a, n)[0] == n
    p.mprotect(a, n * PAGE, PROT_READ)
    assert dev.migrate_to_system(p, a, n) == n
    pm = p.pagemap(a, n)
    assert [(e.kind, e.present, e.writable) for e in pm] == [("anon", True, False)] * n
    with pytest.raises(hmmsim.SegmentationFault):
        p.write(a, b"x")
    assert p.read(a, n * PAGE) == _content(n)
    verify_machine(m)


def test_page_migrated_to_device_from_read_only_mapping_comes_back_read_only(
    m: hmmsim.Machine,
) -> None:
    dev = Device(m)
    p = m.spawn()
    a = _filled(p, N)
    p.mprotect(a, N * PAGE, PROT_READ)
    assert dev.migrate_to_device(p, a, N)[0] == N
    assert p.read(a, N * PAGE) == _content(N)  # CPU faults bring them back
    assert [(e.kind, e.writable) for e in p.pagemap(a, N)] == [("anon", False)] * N
    verify_machine(m)


def _exclusive(p: hmmsim.Process, a: int) -> int:
    with p.mm.mmap_lock.read():
        page, head = make_device_exclusive(p.mm, a, object())
    p.machine.phys.folio_unlock(head)
    p.machine.phys.put_page(head)
    return page


def test_make_device_exclusive_moves_the_pte_dirty_bit_to_the_folio(m: hmmsim.Machine) -> None:
    p = m.spawn()
    a = p.mmap(PAGE, RW, ANON)
    p.write(a, b"dirty")
    (e,) = p.pagemap(a, 1)
    assert e.dirty and e.pfn is not None
    m.phys.flags[e.pfn] &= np.uint16(~PG_dirty & 0xFFFF)  # only the PTE says dirty
    page = _exclusive(p, a)
    assert page == e.pfn
    assert p.pagemap(a, 1)[0].kind == "device_exclusive"
    assert m.phys.flags[page] & PG_dirty


def test_lazyfree_page_redirtied_then_made_exclusive_survives_pageout(
    m: hmmsim.Machine,
) -> None:
    p = m.spawn()
    a = p.mmap(PAGE, RW, ANON)
    p.write(a, b"first")
    p.madvise(a, PAGE, MADV_FREE)
    p.write(a, b"again")  # dirty again: the page must not be discarded
    _exclusive(p, a)
    p.madvise(a, PAGE, MADV_PAGEOUT)
    assert p.read(a, 5) == b"again"
    verify_machine(m)
