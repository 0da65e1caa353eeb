"""The conformance suite and drivers that claim HUGE_ONLY (they refuse memory that is not huge)."""

from __future__ import annotations

import pytest
from hmmsim.testing.checks import (
    CHECKS,
    HUGE_ONLY_RACES,
    check_hugetlb,
    check_invalidate_on_munmap,
    run_check,
)
from hmmsim.testing.env import HUGE, PAGE, CheckSkipped, DriverSpec, environment

HUGE_ODP = DriverSpec.parse("odp:hugetlb=1,era=hmm")


def test_env_mmap_gives_2mib_hugetlb_memory_to_a_huge_only_driver():
    with environment(HUGE_ODP) as env:
        a = env.mmap(4 * PAGE)
        vma = env.proc.mm.find_vma(a)
        assert vma is not None and vma.is_hugetlb
        assert a % HUGE == 0 and vma.end - vma.start == HUGE
        env.proc.write(a, b"x")
        assert env.proc.pagemap(a, 1)[0].order == 9
        with pytest.raises(CheckSkipped, match="HUGE_ONLY"):
            env.thp_region()


def test_env_mmap_is_unchanged_for_other_drivers():
    with environment(DriverSpec.parse("odp")) as env:
        a = env.mmap(4 * PAGE)
        vma = env.proc.mm.find_vma(a)
        assert vma is not None and not vma.is_hugetlb and vma.end - vma.start == 4 * PAGE


def test_the_hugetlb_check_passes_for_huge_only_and_for_others():
    assert run_check(HUGE_ODP, "coherence", check_hugetlb).outcome == "passed"
    assert run_check(DriverSpec.parse("odp"), "coherence", check_hugetlb).outcome == "passed"


def test_the_hugetlb_check_fails_a_huge_only_driver_that_maps_small_pages(
    monkeypatch,
):
    from hmmsim.drivers.odp import umem

    monkeypatch.setattr(umem.IbUmemOdp, "_first_too_small", lambda self, entries: len(entries))
    result = run_check(HUGE_ODP, "coherence", check_hugetlb)
    assert result.outcome == "failed" and "device read of 4 KiB pages succeeded" in result.message


def test_sub_huge_scenarios_skip_naming_the_capability():
    result = run_check(HUGE_ODP, "invalidation", check_invalidate_on_munmap)
    assert result.outcome == "skipped" and "HUGE_ONLY" in result.message
    races = {c.race.name: c for c in CHECKS["races"]}  # type: ignore[attr-defined]
    skipped = run_check(HUGE_ODP, "races", races["read_vs_munmap"])
    assert skipped.outcome == "skipped" and "HUGE_ONLY" in skipped.message
    assert set(HUGE_ONLY_RACES) <= set(races)
