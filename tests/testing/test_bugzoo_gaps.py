"""The mutants the conformance suite misses are real bugs: each scenario here fails
on the mutant and passes on the unmutated driver.

Every mutant with a ``suite_gap`` note has a scenario below, so a gap in the
suite is never a mutant that is merely harmless.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable

import hmmsim
import pytest
from hmmsim import MAP_ANONYMOUS, MAP_PRIVATE, MAP_SHARED, PROT_READ, PROT_WRITE
from hmmsim.driver import Mirror, Mutant
from hmmsim.mm.exit import oom_reap
from hmmsim.testing.bugzoo import all_mutants, build

PAGE = 4096
RW = PROT_READ | PROT_WRITE


def _mutant(name: str) -> Mutant:
    return next(m for m in all_mutants() if m.name == name)


def _open(driver: hmmsim.Driver, **params: object) -> tuple[hmmsim.Process, Mirror]:
    m = hmmsim.Machine(hmmsim.MachineConfig(ram_bytes=32 << 20, thp="always"))
    p = m.spawn()
    return p, driver.probe(m, **params).open(p)


def store_after_read_of_untouched_page(driver: hmmsim.Driver) -> bool:
    """A device read maps the zero page read-only; a device store must not write it."""
    p, fd = _open(driver)
    a = p.mmap(PAGE, RW, MAP_PRIVATE | MAP_ANONYMOUS)
    b = p.mmap(PAGE, RW, MAP_PRIVATE | MAP_ANONYMOUS)
    assert fd.read(a, 4) == bytes(4)
    fd.write(a, b"dev!")
    return p.read(a, 4) == b"dev!" and p.read(b, 4) == bytes(4)


def store_to_page_migrated_from_read_only_mapping(driver: hmmsim.Driver) -> bool:
    """A page migrated out of a read-only mapping is device-read-only."""
    p, fd = _open(driver)
    a = p.mmap(PAGE, RW, MAP_PRIVATE | MAP_ANONYMOUS)
    p.write(a, b"cpu!")
    p.mprotect(a, PAGE, PROT_READ)
    fd.migrate_to_device(a, 1)
    with contextlib.suppress(hmmsim.BadAddress):  # the fault path refuses it (EFAULT)
        fd.write(a, b"dev!")
    pte = fd.device_ptes(a, 1)[0]
    return pte is not None and not pte.writable and p.read(a, 4) == b"cpu!"


def device_store_survives_reclaim(driver: hmmsim.Driver) -> bool:
    """A device store into a clean shmem page is still there after reclaim."""
    p, fd = _open(driver)
    a = p.mmap(PAGE, RW, MAP_SHARED | MAP_ANONYMOUS)
    assert p.read(a, 4) == bytes(4)  # mapped writable and clean
    fd.write(a + 10, b"dev!")
    p.madvise(a, PAGE, hmmsim.MADV_PAGEOUT)
    return p.read(a + 8, 8) == b"\0\0dev!\0\0"


def nonblockable_invalidation_with_lock_taken(driver: hmmsim.Driver) -> bool:
    """The OOM reaper's invalidation is refused, not slept on, while the lock is held."""
    p, fd = _open(driver)
    a = p.mmap(PAGE, RW, MAP_PRIVATE | MAP_ANONYMOUS)
    fd.read(a, 4)
    lock = fd.mutex if hasattr(fd, "mutex") else fd.lock
    lock.acquire()
    try:
        skipped = oom_reap(p.mm)  # raises Deadlock if the driver sleeps on its lock
    finally:
        lock.release()
    return len(skipped) == 1 and fd.device_ptes(a, 1)[0] is not None


def no_notifier_after_close(driver: hmmsim.Driver) -> bool:
    """After close() none of the mirror's notifiers is left on the mm."""
    p, fd = _open(driver)
    a = p.mmap(PAGE, RW, MAP_PRIVATE | MAP_ANONYMOUS)
    fd.read(a, 4)
    fd.close()
    subs = p.mm.notifier_subscriptions
    return subs is None or (len(subs.itree) == 0 and not subs.classic)


def no_device_page_after_close(driver: hmmsim.Driver) -> bool:
    """close() brings the device memory it migrated in back to RAM."""
    p, fd = _open(driver)
    a = p.mmap(PAGE, RW, MAP_PRIVATE | MAP_ANONYMOUS)
    p.write(a, b"cpu!")
    fd.migrate_to_device(a, 1)
    fd.close()
    return p.pagemap(a, 1)[0].kind == "anon" and p.read(a, 4) == b"cpu!"


def huge_mapping_where_the_cpu_maps_huge(driver: hmmsim.Driver) -> bool:
    """A driver claiming HUGE_MAPPINGS maps a PMD-mapped THP with one 2 MiB entry."""
    p, fd = _open(driver)
    a = p.mmap(4 << 20, RW, MAP_PRIVATE | MAP_ANONYMOUS)
    base = (a + (2 << 20) - 1) & ~((2 << 20) - 1)
    p.write(base, b"\x01" * PAGE)
    assert p.pagemap(base, 1)[0].order == 9  # the CPU maps a PMD
    fd.read(base, PAGE)
    pte = fd.device_ptes(base, 1)[0]
    return pte is not None and pte.order == 9


def nonblockable_invalidation_is_refused_not_ignored(driver: hmmsim.Driver) -> bool:
    """An invalidation the driver cannot do without sleeping is refused: the OOM
    reaper then skips the VMA; it must not claim success and keep the mapping."""
    p, fd = _open(driver)
    a = p.mmap(PAGE, RW, MAP_PRIVATE | MAP_ANONYMOUS)
    fd.read(a, 4)
    skipped = oom_reap(p.mm)
    return len(skipped) == 1 or fd.device_ptes(a, 1)[0] is None


def device_maps_only_what_migrated(driver: hmmsim.Driver) -> bool:
    """A page that gains a reference between migrate_vma_setup and migrate_vma_pages
    (a PFN walker's speculative get, as compaction takes) does not move: the core
    clears MIGRATE_PFN_MIGRATE, and the driver must not map its destination."""
    from hmmsim.explore import ScenarioRun, explore
    from hmmsim.sched import BoundedDFS

    def scenario() -> ScenarioRun:
        p, fd = _open(driver)
        a = p.mmap(PAGE, RW, MAP_PRIVATE | MAP_ANONYMOUS)
        p.write(a, b"cpu!")
        phys = p.mm.machine.phys
        spfn = p.pagemap(a, 1)[0].pfn

        took: list[int] = []

        def speculative_get() -> None:
            if phys.refcount[spfn] > 0:  # folio_try_get: never a freed page
                phys.get_page(spfn)
                took.append(spfn)

        def migrate() -> None:
            # The page may stay in RAM: the read-back then finds no device entry.
            with contextlib.suppress(hmmsim.NoEntry):
                fd.migrate_to_device(a, 1)

        def final(_result: object) -> None:
            for pfn in took:
                phys.put_page(pfn)
            pte = fd.device_ptes(a, 1)[0]
            cpu = p.pagemap(a, 1)[0]
            if pte is not None and cpu.kind == "anon":
                assert pte.pfn == cpu.pfn, "the device maps a page the CPU does not"

        return ScenarioRun([("device", migrate), ("walker", speculative_get)], final=final)

    result = explore(scenario, BoundedDFS(2), 200)
    return not result.failures


SCENARIOS: dict[str, Callable[[hmmsim.Driver], bool]] = {
    "zoo_dmirror_write_through_read_only_entry": store_after_read_of_untouched_page,
    "zoo_dmirror_migrated_page_mapped_writable": store_to_page_migrated_from_read_only_mapping,
    "zoo_dmirror_no_dirty_on_device_write": device_store_survives_reclaim,
    "zoo_template_no_dirty_on_device_write": device_store_survives_reclaim,
    "zoo_dmirror_sleeps_in_nonblockable_invalidate": nonblockable_invalidation_with_lock_taken,
    "zoo_dmirror_close_keeps_notifier": no_notifier_after_close,
    "zoo_template_close_keeps_notifier": no_notifier_after_close,
    "zoo_dmirror_close_leaves_device_pages": no_device_page_after_close,
    "zoo_dmirror_maps_entries_that_did_not_migrate": device_maps_only_what_migrated,
    "zoo_nouveau_fini_keeps_notifier": no_notifier_after_close,
    "zoo_template_stores_through_read_only_entry": store_after_read_of_untouched_page,
    "zoo_nouveau_drops_huge_order": huge_mapping_where_the_cpu_maps_huge,
    "zoo_nouveau_nonblockable_claims_success": nonblockable_invalidation_is_refused_not_ignored,
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_the_scenario_passes_on_the_driver_and_fails_on_the_mutant(name):
    mutant = _mutant(name)
    mutant_cls = build(mutant)
    module, cls = mutant.driver.split(":")
    control_cls = getattr(importlib.import_module(module), cls)
    scenario = SCENARIOS[name]
    assert scenario(control_cls()) is True
    try:
        outcome = scenario(mutant_cls())
    except (AssertionError, hmmsim.errors.Deadlock) as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    assert outcome is not True


def test_every_documented_suite_gap_has_a_scenario():
    # The scenarios stay after the suite learns to catch a mutant: they show
    # each of these mutants is a real bug, independently of the suite.
    gaps = {m.name for m in all_mutants() if m.suite_gap}
    assert gaps <= set(SCENARIOS)
    assert set(SCENARIOS) <= {m.name for m in all_mutants()}
