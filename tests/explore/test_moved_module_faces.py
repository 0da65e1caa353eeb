"""The packages that replaced sched.py, scheduler.py, explore.py, parallel.py, migrate.py and
memremap.py keep every public name at the paths DESIGN lists; the rest are gone."""

from __future__ import annotations

import importlib

import pytest

#: Face -> names it must keep (what the old modules offered).
FACES = {
    "hmmsim.sched": [
        "Mutex", "RwSem", "WaitQueue", "point", "note", "current", "active", "set_active",
        "MAIN_ACTOR", "SchedulerHooks", "Scheduler", "RunResult", "TraceEntry",
        "DEFAULT_STEP_BUDGET", "Strategy", "RandomWalk", "PCT", "BoundedDFS", "Replay",
        "encode_schedule", "decode_schedule", "prefix_key",
    ],
    "hmmsim.explore": [
        "ScenarioRun", "Scenario", "Failure", "ExploreResult", "run_one", "explore", "replay",
        "explore_parallel", "WorkerFailed",
    ],
    "hmmsim.migrate": [
        "MigrateVma", "MIGRATE_PFN_VALID", "MIGRATE_PFN_MIGRATE", "MIGRATE_PFN_WRITE",
        "MIGRATE_PFN_COMPOUND", "MIGRATE_PFN_SHIFT", "MIGRATE_VMA_SELECT_SYSTEM",
        "MIGRATE_VMA_SELECT_DEVICE_PRIVATE", "MIGRATE_VMA_SELECT_DEVICE_COHERENT",
        "MIGRATE_VMA_SELECT_COMPOUND", "migrate_pfn", "migrate_pfn_to_page",
        "migrate_vma_setup", "migrate_vma_pages", "migrate_vma_finalize",
        "migrate_device_range", "migrate_device_pfns", "migrate_device_pages",
        "migrate_device_finalize", "migrate_device_coherent_folio",
    ],
    "hmmsim.exclusive": ["make_device_exclusive"],
    "hmmsim.memremap": [
        "DevPagemap", "DevPagemapOps", "MemoryType", "VmFault", "MEMORY_DEVICE_PRIVATE",
        "MEMORY_DEVICE_COHERENT", "MEMORY_DEVICE_FS_DAX", "MEMORY_DEVICE_GENERIC",
        "MEMORY_DEVICE_PCI_P2PDMA", "memremap_pages", "memunmap_pages",
        "zone_device_page_init", "zone_device_pages_init", "folio_pgmap",
        "is_device_private_page", "is_device_coherent_page", "is_pci_p2pdma_page",
    ],
}  # fmt: skip


@pytest.mark.parametrize("face", sorted(FACES))
def test_face_keeps_every_public_name(face: str) -> None:
    module = importlib.import_module(face)
    assert sorted(set(FACES[face]) - set(module.__all__)) == []
    for name in module.__all__:
        assert hasattr(module, name), f"{face}.{name}"


def test_memremap_face_and_model_are_the_same_objects() -> None:
    import hmmsim.memremap
    import hmmsim.mm.memremap

    assert hmmsim.memremap.DevPagemap is hmmsim.mm.memremap.DevPagemap
    assert hmmsim.memremap.VmFault is hmmsim.mm.VmFault


@pytest.mark.parametrize("gone", ["hmmsim.scheduler", "hmmsim.parallel"])
def test_old_module_paths_that_design_does_not_list_are_gone(gone: str) -> None:
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(gone)


def test_make_device_exclusive_lives_in_exclusive_not_migrate() -> None:
    import hmmsim.migrate

    assert not hasattr(hmmsim.migrate, "make_device_exclusive")
