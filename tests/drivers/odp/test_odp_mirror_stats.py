"""odp's ``MirrorStats``: counted on the native path (QP stalls, umem faults,
UMRs, DMA maps, notifier callbacks) in the units ``hmmsim.driver`` fixes."""

from __future__ import annotations

import pytest
from hmmsim import MAP_ANONYMOUS, MAP_PRIVATE, PROT_READ, PROT_WRITE, Machine, MachineConfig

PAGE = 4096
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS


def _env(era: str):  # type: ignore[no-untyped-def]
    m = Machine(MachineConfig(ram_bytes=64 << 20))
    p = m.spawn()
    return m, p, m.probe("odp", era=era).open(p)


@pytest.fixture
def fault_calls(monkeypatch):  # type: ignore[no-untyped-def]
    """The default flags of every hmm_range_fault call (0: a snapshot)."""
    import hmmsim.hmm as hmm

    calls: list[int] = []
    real = hmm._hmm_range_fault

    def counted(rng):  # type: ignore[no-untyped-def]
        calls.append(rng.default_flags)
        return real(rng)

    monkeypatch.setattr(hmm, "_hmm_range_fault", counted)
    return calls


@pytest.mark.parametrize("era", ["mainline", "hmm"])
def test_a_first_read_is_one_fault_event_and_one_faulting_hmm_range_fault(era, fault_calls):
    m, p, mirror = _env(era)
    a = p.mmap(64 * PAGE, RW, ANON)
    assert mirror.read(a, 64 * PAGE) == bytes(64 * PAGE)
    s = mirror.stats
    # Registration's snapshot pass (flags 0) is no fault round; the RDMA READ
    # stalls once, and its work item faults the whole message in one call.
    assert [f != 0 for f in fault_calls] == [False, True]
    assert (s.faults, s.fault_rounds, s.retries) == (1, 1, 0)
    assert (s.pages_mapped, s.dma_maps) == (64, 64)
    assert m.devices[0].stats.page_faults == 1


def test_the_gup_era_faults_without_hmm_range_fault(fault_calls):
    _m, p, mirror = _env("gup")
    a = p.mmap(64 * PAGE, RW, ANON)
    mirror.read(a, 64 * PAGE)
    s = mirror.stats
    assert fault_calls == []  # v5.3 pins with get_user_pages
    assert (s.faults, s.fault_rounds, s.pages_mapped, s.dma_maps) == (1, 0, 64, 64)


@pytest.mark.parametrize("era", ["mainline", "hmm", "gup"])
def test_populated_memory_is_mapped_by_registration_without_a_fault(era):
    _m, p, mirror = _env(era)
    a = p.mmap(64 * PAGE, RW, ANON)
    p.write(a, b"\x11" * 64 * PAGE)
    mirror.read(a, 64 * PAGE)
    s = mirror.stats
    # mainline and hmm: registration's SNAPSHOT|ENABLE pass maps what the CPU
    # maps; v5.3 registers nothing and the READ faults once.
    assert s.faults == {"mainline": 0, "hmm": 0, "gup": 1}[era]
    assert s.pages_mapped == 64


@pytest.mark.parametrize("era", ["mainline", "hmm", "gup"])
def test_a_zap_counts_the_whole_aligned_run_it_clears_and_close_the_rest(era):
    _m, p, mirror = _env(era)
    a = p.mmap(64 * PAGE, RW, ANON)
    p.write(a, b"\x11" * 64 * PAGE)
    mirror.read(a, 64 * PAGE)
    p.munmap(a + 4 * PAGE, 4 * PAGE)
    s = mirror.stats
    # The UMR zaps whole 8-entry runs: entries 0-3, still mapped by the CPU,
    # go with 4-7 (the device faults them again).
    assert (s.invalidations, s.pages_unmapped) == (1, 8)
    mirror.close()
    assert s.pages_unmapped == 64
