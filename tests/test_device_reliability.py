"""Device memory under stress: eviction with RAM exhausted, exclusive access to
sub-pages of a THP, migration back to RAM running out of memory half-way,
device stores into shmem, and sub-page device stores racing CPU stores."""

from __future__ import annotations

import hmmsim
import pytest
from helpers import ANON, PAGE, RW
from hmmsim.drivers.dmirror import HMM_DMIRROR_RELEASE, DmirrorCmd
from hmmsim.mm.pagetable import KIND_MIGRATION, entry_kind
from hmmsim.testing.invariants import check_no_leaks

PATTERN = bytes(range(256)) * (64 * PAGE // 256)


def _migration_entries(p: hmmsim.Process, addr: int, npages: int) -> int:
    walk = p.mm.pt.walk(addr // PAGE, npages)
    return int((entry_kind(walk.entries) == KIND_MIGRATION).sum())


def _fill_ram(m: hmmsim.Machine) -> tuple[hmmsim.Process, int]:
    """Another process that takes every free page of RAM (and where)."""
    hog = m.spawn()
    n = m.phys.allocator.nr_free
    b = hog.mmap(n * PAGE, RW, ANON)
    hog.madvise(b, n * PAGE, hmmsim.MADV_NOHUGEPAGE)  # small pages, to free them one by one
    hog.write(b, b"h" * (n * PAGE))
    assert m.phys.allocator.nr_free == 0
    return hog, b


@pytest.fixture
def exhausted(make_machine):
    """16 MiB RAM, no swap, 64 pages in dmirror memory, then RAM filled by a hog."""
    m = make_machine(ram_bytes=16 << 20)
    dev = m.probe("dmirror")
    p = m.spawn()
    fd = dev.open(p)
    a = p.mmap(64 * PAGE, RW, ANON)
    p.write(a, PATTERN)
    assert fd.migrate_to_device(a, 64) == 64
    hog, _ = _fill_ram(m)
    return m, dev, p, fd, a, hog


def _evict(how: str, dev, fd) -> None:
    if how == "close":
        fd.close()
    elif how == "release":
        fd.ioctl(HMM_DMIRROR_RELEASE, DmirrorCmd(0, 1, None))
    else:
        dev.remove()


@pytest.mark.parametrize("how", ["close", "release", "remove"])
def test_eviction_with_ram_exhausted_oom_kills_the_hog_and_keeps_the_data(exhausted, how):
    m, dev, p, fd, a, hog = exhausted
    _evict(how, dev, fd)
    assert hog.exited and hog not in m.processes
    assert _migration_entries(p, a, 64) == 0
    assert {e.kind for e in p.pagemap(a, 64)} == {"anon"}
    assert p.read(a, 64 * PAGE) == PATTERN
    if how == "close":
        dev.remove()
    elif how == "release":
        fd.close()
    assert dev.chunks == [] and dev.calloc == dev.cfree
    p.munmap(a, 64 * PAGE)
    p.exit()
    check_no_leaks(m)


@pytest.mark.parametrize("how", ["close", "release", "remove"])
def test_eviction_with_ram_exhausted_by_the_owner_kills_the_owner(make_machine, how):
    m = make_machine(ram_bytes=16 << 20)
    dev = m.probe("dmirror")
    p = m.spawn()
    fd = dev.open(p)
    a = p.mmap(64 * PAGE, RW, ANON)
    p.write(a, PATTERN)
    assert fd.migrate_to_device(a, 64) == 64
    n = m.phys.allocator.nr_free
    b = p.mmap(n * PAGE, RW, ANON)
    p.write(b, b"o" * (n * PAGE))  # the owner itself is now the largest process
    bystander = m.spawn()
    c = bystander.mmap(PAGE, RW, ANON)
    _evict(how, dev, fd)
    assert p.exited and not bystander.exited
    bystander.write(c, b"still here")  # RAM is free again: no Deadlock, no OOM
    assert bystander.read(c, 10) == b"still here"
    if how != "remove":
        dev.remove()
    assert dev.chunks == [] and dev.calloc == dev.cfree
    bystander.exit()
    check_no_leaks(m)


def test_process_exit_after_exhausted_eviction_leaves_nothing_behind(exhausted):
    m, _dev, p, fd, a, _hog = exhausted
    fd.ioctl(HMM_DMIRROR_RELEASE, DmirrorCmd(0, 1, None))
    p.munmap(a, 32 * PAGE)
    p.exit()
    fd.close()
    check_no_leaks(m)


def test_evicting_a_device_thp_without_a_free_pmd_block_moves_all_512_pages(make_machine):
    m = make_machine(ram_bytes=16 << 20, thp="always")
    dev = m.probe("dmirror")
    p = m.spawn()
    fd = dev.open(p)
    size = 2 << 20
    raw = p.mmap(2 * size, RW, ANON)
    a = (raw + size - 1) & ~(size - 1)
    data = bytes(range(251)) * (size // 251) + bytes(size % 251)
    p.write(a, data)
    assert p.pagemap(a, 1)[0].order == 9
    assert fd.migrate_to_device(a, 512) == 512
    entry = p.pagemap(a, 1)[0]
    assert entry.kind == "device_private" and entry.order == 9  # one device THP
    hog, b = _fill_ram(m)
    for k in range(0, 1024, 2):  # 512 free pages, no free 2 MiB block
        hog.munmap(b + k * PAGE, PAGE)
    assert m.phys.allocator.nr_free == 512
    fd.close()
    assert not hog.exited and not p.exited
    assert {e.kind for e in p.pagemap(a, 512)} == {"anon"}
    assert p.read(a, size) == data
    dev.remove()
    assert dev.chunks == [] and dev.calloc == dev.cfree
    p.exit()
    hog.exit()
    check_no_leaks(m)


def test_exclusive_subpage_of_a_pte_mapped_thp_maps_that_page(make_machine):
    m = make_machine(thp="always")
    dev = m.probe("dmirror")
    p = m.spawn()
    fd = dev.open(p)
    size = 2 << 20
    raw = p.mmap(2 * size, RW, ANON)
    a = (raw + size - 1) & ~(size - 1)
    data = b"".join(bytes([k % 256]) * PAGE for k in range(512))
    p.write(a, data)
    p.mprotect(a + size - PAGE, PAGE, hmmsim.PROT_READ)  # the THP is now PTE-mapped
    p.mprotect(a + size - PAGE, PAGE, RW)
    cpu = p.pagemap(a + 5 * PAGE, 1)[0]
    assert cpu.order == 0 and m.phys.order[cpu.pfn] == 9  # a PTE-mapped large folio
    fd.make_exclusive(a + 5 * PAGE, 1)
    (dpte,) = fd.device_ptes(a + 5 * PAGE, 1)
    assert dpte is not None and dpte.atomic and dpte.pfn == cpu.pfn
    assert p.pagemap(a + 5 * PAGE, 1)[0].kind == "device_exclusive"
    assert fd.read(a + 5 * PAGE, PAGE) == bytes([5]) * PAGE
    assert p.read(a + 5 * PAGE, PAGE) == bytes([5]) * PAGE
    fd.close()
    p.exit()
    check_no_leaks(m)


def _hog_leaving(m: hmmsim.Machine, free: int) -> tuple[hmmsim.Process, int, int]:
    """A process that takes all but ``free`` pages of RAM, in small pages."""
    hog = m.spawn()
    n = m.phys.allocator.nr_free - free
    b = hog.mmap(n * PAGE, RW, ANON)
    hog.madvise(b, n * PAGE, hmmsim.MADV_NOHUGEPAGE)
    hog.write(b, b"h" * (n * PAGE))
    return hog, b, n


def _kinds(p: hmmsim.Process, a: int, npages: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in p.pagemap(a, npages):
        out[e.kind] = out.get(e.kind, 0) + 1
    return out


def test_migrate_to_system_out_of_ram_half_way_keeps_every_page_whole(make_machine):
    m = make_machine(ram_bytes=16 << 20, swap_bytes=8 << 20)
    dev = m.probe("dmirror")
    p = m.spawn()
    fd = dev.open(p)
    a = p.mmap(64 * PAGE, RW, ANON)
    p.write(a, PATTERN)
    assert fd.migrate_to_device(a, 64) == 64
    hog, b, n = _hog_leaving(m, 10)
    with pytest.raises(hmmsim.OutOfMemory):
        fd.migrate_to_system(a, 64)
    assert _kinds(p, a, 64) == {"anon": 10, "device_private": 54}
    assert _migration_entries(p, a, 64) == 0
    hog.munmap(b, n * PAGE)
    assert m.reclaim(64 * PAGE) == 10 * PAGE  # the 10 moved pages swap out like any others
    assert p.read(a, 64 * PAGE) == PATTERN
    fd.close()
    p.exit()
    hog.exit()
    check_no_leaks(m)


def test_cpu_fault_on_a_device_thp_out_of_ram_half_way_keeps_every_page_whole(make_machine):
    m = make_machine(ram_bytes=16 << 20, thp="always", swap_bytes=8 << 20)
    dev = m.probe("dmirror")
    p = m.spawn()
    fd = dev.open(p)
    size = 2 << 20
    raw = p.mmap(2 * size, RW, ANON)
    a = (raw + size - 1) & ~(size - 1)
    data = bytes(range(251)) * (size // 251) + bytes(size % 251)
    p.write(a, data)
    assert fd.migrate_to_device(a, 512) == 512
    hog, b, n = _hog_leaving(m, 100)  # 100 small pages, no PMD block
    with pytest.raises(hmmsim.OutOfMemory):
        p.read(a, 1)  # migrate_to_ram of the whole PMD-mapped folio fails half-way
    assert _kinds(p, a, 512) == {"anon": 100, "device_private": 412}  # the fault page too
    assert _migration_entries(p, a, 512) == 0
    hog.munmap(b, n * PAGE)
    assert m.reclaim(512 * PAGE) == 100 * PAGE
    assert p.read(a, size) == data
    fd.close()
    p.exit()
    hog.exit()
    check_no_leaks(m)


def test_cpu_fault_on_a_device_thp_without_a_pmd_block_moves_the_faulting_page_too(
    make_machine,
):
    m = make_machine(ram_bytes=16 << 20, thp="always")
    dev = m.probe("dmirror")
    p = m.spawn()
    fd = dev.open(p)
    size = 2 << 20
    raw = p.mmap(2 * size, RW, ANON)
    a = (raw + size - 1) & ~(size - 1)
    data = bytes(range(251)) * (size // 251) + bytes(size % 251)
    p.write(a, data)
    assert fd.migrate_to_device(a, 512) == 512
    hog, b = _fill_ram(m)
    for k in range(0, 1024, 2):  # 512 free pages, no free 2 MiB block
        hog.munmap(b + k * PAGE, PAGE)
    assert p.read(a + 7 * PAGE, 3) == data[7 * PAGE : 7 * PAGE + 3]
    assert _kinds(p, a, 512) == {"anon": 512}
    assert m.phys.allocator.nr_free == 0  # every destination page is in use
    assert p.read(a, size) == data
    fd.close()
    p.exit()
    hog.exit()
    check_no_leaks(m)
