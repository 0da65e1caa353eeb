"""The hugetlb versions of the size and OOM checks, for drivers claiming HUGE_ONLY."""

from __future__ import annotations

from hmmsim.driver import Mutant
from hmmsim.testing.bugzoo import run_mutant
from hmmsim.testing.checks import CHECKS, DriverSpec, check_name, run_check

HUGE_ODP = DriverSpec("odp", (("era", "hmm"), ("hugetlb", "1")))


def _check(area: str, name: str):
    return next(c for c in CHECKS[area] if check_name(c) == name)


LARGE = _check("sizes", "large_hugetlb_range_one_invalidation")
OOM = _check("oom", "oom_reap_skips_hugetlb_device_mappings")


def test_a_huge_only_odp_runs_and_passes_both_hugetlb_checks():
    assert run_check(HUGE_ODP, "sizes", LARGE).outcome == "passed"
    assert run_check(HUGE_ODP, "oom", OOM).outcome == "passed"
    # Their 4 KiB versions still skip it, saying why.
    four_k = run_check(HUGE_ODP, "sizes", _check("sizes", "large_range_one_invalidation"))
    assert (four_k.outcome, four_k.message) == (
        "skipped",
        "odp:era=hmm,hugetlb=1 claims HUGE_ONLY: the range is cut at 4 KiB",
    )


def test_a_driver_taking_small_pages_is_left_to_the_4k_versions():
    for check, area in ((LARGE, "sizes"), (OOM, "oom")):
        r = run_check(DriverSpec("dmirror"), area, check)
        assert (r.outcome, r.message) == (
            "skipped",
            "dmirror does not claim HUGE_ONLY: the 4 KiB version of this check covers it",
        )


def test_an_invalidation_lost_past_the_first_huge_page_is_caught_by_the_large_range():
    # odp registers an MR per 2 MiB of hugetlb memory: an invalidation that
    # starts before an MR is dropped, which only a range over several huge
    # pages shows (the other checks cut one 2 MiB page per CPU operation).
    first_only = Mutant(
        "zoo_test_odp_drops_ranges_from_before_the_mr",
        "hmmsim.drivers.odp.driver:OdpHugetlbHmm",
        "hmmsim.drivers.odp.mr",
        (
            (
                "        start = max(umem.start, start)\n",
                "        if start < umem.start:  # mutant: a range from before the MR is dropped\n"
                "            return\n",
            ),
        ),
        "An invalidation must zap every device entry its range covers, clamped to the MR, "
        "also when the range starts before the MR.",
        area="invalidation",
    )
    r = run_mutant(first_only)
    assert r.status == "caught", r
    assert r.check == "sizes/large_hugetlb_range_one_invalidation", r
    assert "device-writable after one mprotect" in r.message
