"""The bug zoo: every mutant is caught, and none of them leaks into the default run."""

from __future__ import annotations

import io

import pytest
from hmmsim.cli import main
from hmmsim.plugins import BUGZOO_GROUP, driver_classes, get_plugin_manager
from hmmsim.testing.bugzoo import Mutant, all_mutants, build, run_zoo
from hmmsim.testing.checks import DriverSpec
from hmmsim.testing.races import explore_race, race_by_name

DMIRROR = "hmmsim.drivers.dmirror.driver:Dmirror"
TEMPLATE = "hmmsim.newdriver.template:Skel"


def test_there_are_at_least_twelve_mutants_of_both_bases_each_documented():
    mutants = [m for m in all_mutants() if m.driver in (DMIRROR, TEMPLATE)]
    assert len(mutants) >= 12
    assert {m.driver for m in mutants} == {DMIRROR, TEMPLATE}
    for m in mutants:
        cls = build(m)
        assert cls.name == m.name
        assert cls.__doc__ == m.rule and len(m.rule) > 40


def test_every_mutant_of_every_driver_applies_to_its_base():
    # A mutant whose text no longer occurs exactly once (the base moved on)
    # would make its whole group fail to load.
    mutants = all_mutants()
    assert {m.driver.split(":")[0].split(".")[-2] for m in mutants} == {
        "dmirror",
        "nouveau",
        "odp",
        "newdriver",
    }
    for m in mutants:
        assert build(m).name == m.name


def test_mutants_are_registered_only_in_their_own_group():
    zoo = driver_classes(get_plugin_manager(group=BUGZOO_GROUP))
    assert set(zoo) == {m.name for m in all_mutants()}
    assert {m.name for m in all_mutants() if m.driver == DMIRROR} < set(zoo)
    default = driver_classes(get_plugin_manager())
    assert not any(name.startswith("zoo_") for name in default)


def test_a_mutation_whose_text_is_not_in_the_base_is_refused():
    bad = Mutant(
        "zoo_bad",
        DMIRROR,
        "hmmsim.drivers.dmirror.mirror",
        (("no such text", "x"),),
        "never applies",
    )
    with pytest.raises(AssertionError, match="occurs 0 times"):
        build(bad)


#: The check that catches each mutant first (the suite runs in a fixed order
#: and every exploration is seeded, so this is deterministic). A mutant not
#: here documents its suite gap and must be missed.
CAUGHT_BY = {
    "zoo_dmirror_no_read_retry": "races/read_vs_munmap",
    "zoo_dmirror_retry_outside_lock": "races/read_vs_munmap",
    "zoo_dmirror_no_set_seq": "races/read_vs_munmap",
    "zoo_dmirror_keeps_mapping_on_invalidate": "invalidation/invalidate_on_munmap",
    "zoo_dmirror_refuses_blockable_invalidate": "races/read_vs_munmap",
    "zoo_dmirror_skips_foreign_migrate": "races/write_vs_second_device_migration",
    "zoo_dmirror_ignores_write_flag": "coherence/read_anonymous",
    "zoo_dmirror_lock_held_across_fault": "coherence/write_anonymous",
    "zoo_dmirror_stale_req_bits_after_busy": "races/read_vs_mprotect",
    "zoo_dmirror_maps_huge_over_pte_thp": "invalidation/invalidate_on_thp_split",
    "zoo_dmirror_leaks_page_refs": "coherence/read_anonymous",
    "zoo_dmirror_seq_after_the_walk": "races/read_vs_munmap",
    "zoo_dmirror_seq_reused_across_retries": "coherence/write_anonymous",
    "zoo_dmirror_no_dirty_on_device_write": "coherence/shared_anonymous",
    "zoo_dmirror_ignores_clear": "invalidation/invalidate_on_dontneed",
    "zoo_dmirror_invalidate_range_short_by_one_page": "invalidation/invalidate_on_munmap",
    "zoo_dmirror_sleeps_in_nonblockable_invalidate": "races/read_vs_oom_reap",
    "zoo_dmirror_write_through_read_only_entry": "coherence/write_anonymous",
    "zoo_dmirror_migrated_page_mapped_writable": "device-memory/migrate_read_only_source",
    "zoo_dmirror_maps_entries_that_did_not_migrate": "races/migrate_unpopulated_vs_cpu_store",
    "zoo_dmirror_device_page_without_init": "device-memory/migration_round_trip",
    "zoo_dmirror_no_migrate_vma_finalize": "device-memory/migration_round_trip",
    "zoo_dmirror_keeps_device_pte_after_migrating_back": "device-memory/cpu_fault_on_device_memory",
    "zoo_dmirror_migrates_back_without_copying": "device-memory/migration_round_trip",
    "zoo_dmirror_migration_window_short_by_one_page": "device-memory/migration_round_trip",
    "zoo_dmirror_exclusive_entry_not_atomic": "exclusive/exclusive_access",
    "zoo_dmirror_exclusive_keeps_folio_reference": "exclusive/exclusive_access",
    "zoo_dmirror_close_keeps_notifier": "teardown/close_leaves_nothing",
    "zoo_dmirror_close_leaves_device_pages": "teardown/close_drops_everything",
    "zoo_dmirror_evict_without_finalize": "device-memory/cpu_fault_on_device_memory",
    "zoo_nouveau_maps_whole_compound": "invalidation/invalidate_on_thp_split",
    "zoo_nouveau_skips_every_migrate": "races/write_vs_second_device_migration",
    "zoo_nouveau_stale_requests_after_busy": "races/read_vs_mprotect",
    "zoo_nouveau_no_read_retry": "races/read_vs_munmap",
    "zoo_nouveau_transient_no_set_seq": "races/read_vs_munmap",
    "zoo_nouveau_no_pfnclr": "coherence/shared_anonymous",
    "zoo_nouveau_ignores_write_bit": "coherence/read_anonymous",
    "zoo_nouveau_no_dma_unmap": "coherence/read_anonymous",
    "zoo_nouveau_drops_huge_order": "capabilities/huge_mappings",
    "zoo_nouveau_pfnclr_short_by_one_page": "coherence/shared_anonymous",
    "zoo_nouveau_nonblockable_claims_success": "races/read_vs_oom_reap",
    "zoo_nouveau_seq_reused_across_retries": "coherence/write_anonymous",
    "zoo_nouveau_fini_keeps_notifier": "teardown/close_leaves_nothing",
    "zoo_odp_invalidate_without_set_seq": "races/read_vs_munmap",
    "zoo_odp_no_read_retry_under_umem_mutex": "races/read_vs_munmap",
    "zoo_odp_zap_without_dma_unmap": "coherence/write_anonymous",
    "zoo_odp_mtt_writable_regardless_of_cpu": "coherence/read_anonymous",
    "zoo_odp_npages_not_counted": "coherence/write_anonymous",
    "zoo_odp_release_stops_listening_first": "races/notifier_remove_vs_invalidation",
    "zoo_odp_fault_resumed_without_error": "permissions/permission_errors",
    "zoo_odp_hugetlb_map_order_unchecked": "coherence/hugetlb",
    "zoo_odp_gup_no_sequence_check": "races/read_vs_munmap",
    "zoo_template_no_read_retry": "races/read_vs_munmap",
    "zoo_template_invalidate_without_lock": "races/read_vs_munmap",
    "zoo_template_no_set_seq": "races/read_vs_munmap",
    "zoo_template_leaks_page_refs": "coherence/read_anonymous",
    "zoo_template_maps_read_fault_writable": "coherence/read_anonymous",
    "zoo_template_stores_through_read_only_entry": "coherence/write_anonymous",
    "zoo_template_invalidate_range_short_by_one_page": "invalidation/invalidate_on_munmap",
    "zoo_template_refuses_blockable_invalidate": "races/read_vs_munmap",
    "zoo_template_seq_reused_across_retries": "coherence/write_anonymous",
    "zoo_template_no_dirty_on_device_write": "coherence/shared_anonymous",
    "zoo_template_close_keeps_notifier": "teardown/close_leaves_nothing",
}


#: A fast sample of the zoo for the default run: one mutant per driver and
#: kind of catch (a race, a plain check, a detected deadlock, a documented gap).
SAMPLE = (
    "zoo_dmirror_no_read_retry",
    "zoo_dmirror_lock_held_across_fault",
    "zoo_dmirror_keeps_device_pte_after_migrating_back",
    "zoo_nouveau_no_pfnclr",
    "zoo_template_maps_read_fault_writable",
    "zoo_template_close_keeps_notifier",
)


def test_a_sample_of_the_zoo_is_caught_by_the_pinned_checks():
    results = list(run_zoo(list(SAMPLE)))
    assert [r.mutant for r in results] == [m.name for m in all_mutants() if m.name in SAMPLE]
    for r in results:
        assert r.expected, r
        assert r.check == CAUGHT_BY.get(r.mutant, ""), r


@pytest.mark.slow  # the whole zoo: several minutes (the misses run every check)
def test_every_mutant_is_caught_by_its_check_or_documents_its_gap():
    results = list(run_zoo())
    by_name = {r.mutant: r for r in results}
    assert len(results) >= 40
    assert {r.driver for r in results} == {"dmirror", "nouveau", "odp", "skel"}
    assert [r.mutant for r in results if r.status == "crashed"] == []
    assert {r.mutant: r.check for r in results if r.caught} == CAUGHT_BY
    assert {r.mutant for r in results if not r.caught} == {
        m.name for m in all_mutants() if m.suite_gap
    }
    assert all(r.expected for r in results)
    # The retry-protocol bugs need an interleaving: only the race checks see them.
    for name in (
        "zoo_dmirror_no_read_retry",
        "zoo_dmirror_retry_outside_lock",
        "zoo_dmirror_no_set_seq",
        "zoo_template_no_read_retry",
        "zoo_template_invalidate_without_lock",
    ):
        assert by_name[name].schedules is not None and by_name[name].schedules > 1
    assert "EPERM" in by_name["zoo_dmirror_stale_req_bits_after_busy"].message
    # Holding the lock across hmm_range_fault deadlocks on the first COW fault
    # that invalidates: the model's lock reports it (lockdep), a catch.
    assert "Deadlock" in by_name["zoo_dmirror_lock_held_across_fault"].message


def test_a_lock_held_across_hmm_range_fault_deadlocks_against_munmap():
    spec = DriverSpec("zoo_dmirror_lock_held_across_fault", (), BUGZOO_GROUP)
    result = explore_race(spec, race_by_name("read_vs_munmap"), stop_at_first=False)
    deadlocks = [f for f in result.failures if f.description.startswith("deadlock")]
    assert deadlocks
    d = deadlocks[0].description
    assert "waits for RwSem('mm" in d and "waits for Mutex('dmirror" in d


def test_check_bugzoo_prints_the_table_and_the_kill_rate():
    out = io.StringIO()
    rc = main(["check", "--bugzoo", "--driver", "zoo_dmirror_no_read_retry"], out)
    text = out.getvalue()
    assert rc == 0
    assert "zoo_dmirror_no_read_retry: caught by races/read_vs_munmap" in text
    assert "kill rate: 1/1" in text


def test_check_bugzoo_with_an_unknown_mutant_is_a_usage_error(capsys):
    assert main(["check", "--bugzoo", "--driver", "zoo_nope"], io.StringIO()) == 2
    assert "no mutant named 'zoo_nope'" in capsys.readouterr().err
