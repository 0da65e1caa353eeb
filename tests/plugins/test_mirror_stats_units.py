"""``MirrorStats`` counters mean the same in every driver (the units in ``hmmsim.driver``).

Each test pins one counter's unit on the shipped drivers (the template's are
pinned by its own tests).
"""

from __future__ import annotations

import pytest
from hmmsim import (
    MADV_HUGEPAGE,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    PROT_READ,
    PROT_WRITE,
    Machine,
    MachineConfig,
)

PAGE = 4096
HUGE = 2 << 20
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS


def _env(name: str):  # type: ignore[no-untyped-def]
    m = Machine(MachineConfig(ram_bytes=64 << 20))
    p = m.spawn()
    return m, p, m.probe(name).open(p)


def _filled(p, npages: int) -> int:  # type: ignore[no-untyped-def]
    a = p.mmap(npages * PAGE, RW, ANON)
    p.write(a, b"\x11" * npages * PAGE)
    return a


@pytest.mark.parametrize(
    "name",
    [
        "dmirror",
        "nouveau",
    ],
)
def test_faults_count_fault_events_not_pages(name):
    _m, p, mirror = _env(name)
    a = _filled(p, 64)
    mirror.read(a, 64 * PAGE)
    # dmirror: one stop of the READ command at the first unmapped page, one
    # dmirror_fault over all 64 (cmd.faults == 1). nouveau: one GPU fault per
    # page accessed, each a fault-buffer entry.
    assert mirror.stats.faults == {"dmirror": 1, "nouveau": 64}[name]


def test_nouveau_counts_a_fault_the_full_ring_dropped_once():
    m, p, mirror = _env("nouveau")
    n = 300  # more than the 255 entries the ring holds at once
    a = _filled(p, n)
    mirror.channel.run([(a + i * PAGE, "read", None, 1) for i in range(n)])
    # 255 entries in the first batch, the other 45 fault again after the
    # replay: every access is reported exactly once.
    assert mirror.stats.faults == n
    assert mirror.channel.faults == n
    assert m.devices[0].svm.batches == 2


@pytest.mark.parametrize(
    "name",
    [
        "dmirror",
        "nouveau",
    ],
)
def test_fault_rounds_count_hmm_range_fault_calls(name, monkeypatch):
    import hmmsim.hmm as hmm

    calls = []
    real = hmm._hmm_range_fault

    def counted(rng):  # type: ignore[no-untyped-def]
        calls.append(rng.start)
        return real(rng)

    monkeypatch.setattr(hmm, "_hmm_range_fault", counted)
    _m, p, mirror = _env(name)
    a = _filled(p, 64)
    mirror.read(a, 64 * PAGE)
    assert len(calls) > 1
    assert mirror.stats.fault_rounds == len(calls)


@pytest.mark.parametrize("name", ["dmirror", "nouveau"])
def test_pages_mapped_and_unmapped_are_4k_pages(name):
    _m, p, mirror = _env(name)
    a = _filled(p, 8)
    mirror.read(a, 8 * PAGE)
    assert mirror.stats.pages_mapped == 8
    # The last four: dmirror's invalidation also erases the page just past
    # the range (lib/test_hmm.c's inclusive xarray walk), unmapped here.
    p.munmap(a + 4 * PAGE, 4 * PAGE)
    assert mirror.stats.pages_unmapped == 4
    assert mirror.stats.invalidations >= 1


@pytest.mark.parametrize("name", ["dmirror", "nouveau"])
def test_a_huge_device_entry_counts_its_512_pages(name):
    _m, p, mirror = _env(name)
    a = (p.mmap(2 * HUGE, RW, ANON) + HUGE - 1) & ~(HUGE - 1)
    p.madvise(a, HUGE, MADV_HUGEPAGE)
    p.write(a, b"h" * HUGE)
    mirror.read(a, HUGE)
    assert mirror.stats.pages_mapped == 512  # one PD0 entry (nouveau) or 512 PTEs (dmirror)


@pytest.mark.parametrize("name", ["dmirror", "nouveau"])
def test_close_counts_the_pages_it_unmaps(name):
    _m, p, mirror = _env(name)
    a = _filled(p, 8)
    mirror.read(a, 8 * PAGE)
    before = mirror.stats.pages_unmapped
    mirror.close()
    assert mirror.stats.pages_unmapped - before == 8


@pytest.mark.parametrize(
    "name",
    ["dmirror", "nouveau"],
)
def test_exclusive_access_counts_the_pages_it_maps(name):
    _m, p, mirror = _env(name)
    a = _filled(p, 4)
    mirror.make_exclusive(a, 4)
    assert mirror.stats.pages_mapped == 4


@pytest.mark.parametrize("name", ["dmirror", "nouveau"])
def test_dma_maps_count_mapping_calls(name):
    _m, p, mirror = _env(name)
    a = _filled(p, 8)
    mirror.read(a, 8 * PAGE)
    # nouveau DMA-maps each HOST entry it writes; dmirror is a CPU-side device.
    assert mirror.stats.dma_maps == {"dmirror": 0, "nouveau": 8}[name]


@pytest.mark.parametrize("name", ["dmirror", "nouveau"])
def test_migrations_count_migrate_vma_sequences(name):
    _m, p, mirror = _env(name)
    a = _filled(p, 8)
    assert mirror.migrate_to_device(a, 8) == 8
    assert mirror.stats.migrations_to_device == 1  # one window
    assert mirror.migrate_to_system(a, 8) == 8
    # dmirror moves the window back in one sequence; nouveau has no ioctl for
    # it and each CPU touch migrates one page (migrate_to_ram).
    assert mirror.stats.migrations_to_system == {"dmirror": 1, "nouveau": 8}[name]


@pytest.mark.parametrize(
    "name",
    ["dmirror", "nouveau"],
)
def test_a_migration_that_collects_nothing_is_not_counted(name):
    _m, p, mirror = _env(name)
    a = _filled(p, 8)
    mirror.migrate_to_device(a, 8)
    before = mirror.stats.migrations_to_device
    mirror.migrate_to_device(a, 8)  # already in device memory: cpages == 0
    assert mirror.stats.migrations_to_device == before


@pytest.mark.parametrize("name", ["dmirror", "nouveau"])
def test_a_snapshot_an_invalidation_made_stale_is_one_retry_and_one_more_round(name, monkeypatch):
    from hmmsim import sched

    _m, p, mirror = _env(name)
    a = _filled(p, 4)
    real = sched.point
    raced = []

    def racing(label: str) -> None:
        # Between hmm_range_fault and read_retry the CPU changes the range once.
        if label.endswith(":after_range_fault") and not raced:
            raced.append(label)
            p.mprotect(a, PAGE, PROT_READ)  # the faulting page: nouveau's
            p.mprotect(a, PAGE, RW)  # notifier covers only its fault window
        real(label)

    monkeypatch.setattr(sched, "point", racing)
    before = (mirror.stats.retries, mirror.stats.fault_rounds)
    assert mirror.read(a, PAGE) == b"\x11" * PAGE
    assert raced
    assert (mirror.stats.retries - before[0], mirror.stats.fault_rounds - before[1]) == (1, 2)
