"""Each new conformance check fails on a deliberately broken driver, and passes on dmirror.

The broken drivers are dmirror with one method changed, each a real class of
HMM driver bug, registered under their own names through a test plugin. For
each: the named check fails with the rule it breaks; the unmodified driver
passes the same check (the control). The template, nouveau and both dmirror
variants pass every new check in ``hmmsim check`` (tests/test_conformance_suite.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers import register_test_drivers
from hmmsim import MADV_DONTNEED
from hmmsim.driver import Capability
from hmmsim.drivers.dmirror import Dmirror, DmirrorCmd, DmirrorDevice, DmirrorFile
from hmmsim.drivers.dmirror import migrate as dmirror_migrate
from hmmsim.errors import Busy
from hmmsim.hmm import (
    HMM_PFN_REQ_FAULT,
    HMM_PFN_REQ_WRITE,
    HMM_RANGE_DEFAULT_TIMEOUT,
    HmmRange,
    hmm_range_fault,
)
from hmmsim.migrate import MIGRATE_PFN_MIGRATE, MIGRATE_PFN_WRITE
from hmmsim.mm.pagetable import PAGE_SHIFT, PAGE_SIZE
from hmmsim.notifier import MmuNotifyEvent, mmu_interval_read_begin, mmu_interval_read_retry
from hmmsim.testing import checks_capabilities as caps
from hmmsim.testing import checks_migrate as mig
from hmmsim.testing import checks_teardown as td
from hmmsim.testing.checks import (
    DriverSpec,
    check_exclusive_access,
    check_invalidate_on_munmap,
    check_read_anonymous,
    check_transparent_huge_pages,
    close_environment,
    open_environment,
    run_check,
)
from hmmsim.testing.races import explore_race, race_by_name

PAGE = PAGE_SIZE
_U64 = np.uint64

# ----- the broken mirrors ---------------------------------------------------------------------


class WritableMigrationFile(DmirrorFile):
    """Migrates every page as writable, ignoring the source's write permission
    (the device-private entry of a read-only VMA becomes writable)."""

    @staticmethod
    def alloc_and_copy_to_device(args: Any) -> None:
        args.dst[args.dst != 0] |= _U64(MIGRATE_PFN_WRITE)


class NotifierLeftFile(DmirrorFile):
    """close() forgets mmu_interval_notifier_remove."""

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.device.evict_all()
        finally:
            self.pt.clear()
            if self in self.device.files:
                self.device.files.remove(self)


class ReopenedFile(DmirrorFile):
    """A closed file keeps serving ioctls (its notifier is gone)."""

    def close(self) -> None:
        super().close()
        self.closed = False


class ExclusiveIgnoredFile(DmirrorFile):
    """Ignores EXCLUSIVE invalidations: keeps atomic access after the CPU took
    the page back from its device-exclusive entry."""

    def invalidate(self, sub: Any, rng: Any, cur_seq: int) -> bool:
        if rng.event == MmuNotifyEvent.EXCLUSIVE:
            return True
        return super().invalidate(sub, rng, cur_seq)


class OnePageTableFile(DmirrorFile):
    """Erases at most one page table (512 entries) per invalidation."""

    def erase(self, first: int, last: int) -> None:
        super().erase(first, min(last, first + 511))


class NonblockingLiarFile(DmirrorFile):
    """Claims every non-blockable invalidation without doing it."""

    def invalidate(self, sub: Any, rng: Any, cur_seq: int) -> bool:
        if not rng.blockable:
            return True
        return super().invalidate(sub, rng, cur_seq)


class StaleSequenceFile(DmirrorFile):
    """Reads the notifier sequence once, before its retry loop: after one
    invalidation in the window it retries forever (a livelock)."""

    def _range_fault(self, start: int, end: int, write: bool) -> None:
        clock = self.machine.clock
        deadline = clock.now_ns + HMM_RANGE_DEFAULT_TIMEOUT * 1_000_000
        flags = HMM_PFN_REQ_FAULT | (HMM_PFN_REQ_WRITE if write else 0)
        pfns = np.zeros((end - start) >> PAGE_SHIFT, dtype=_U64)
        rng = HmmRange(
            self.notifier, start, end, pfns, default_flags=flags, dev_private_owner=self.device
        )
        rng.notifier_seq = mmu_interval_read_begin(self.notifier)
        while True:
            if clock.now_ns > deadline:
                raise Busy("stale: timed out")
            try:
                with self.mm.mmap_lock.read():
                    hmm_range_fault(rng)
            except Busy:
                continue
            self.mutex.acquire()
            if mmu_interval_read_retry(self.notifier, rng.notifier_seq):
                self.mutex.release()
                continue
            try:
                self._do_fault(rng, write)
            finally:
                self.mutex.release()
            return


class MapsUnmigratedFile(DmirrorFile):
    """Maps every page it allocated a destination for, migrated or not (what
    nouveau's nouveau_pfns_map does with the pfns computed before
    migrate_vma_pages)."""

    @staticmethod
    def finalize_and_map(args: Any, real: Any, dmirror: Any) -> None:
        saved = args.src.copy()
        args.src[args.dst != 0] |= _U64(MIGRATE_PFN_MIGRATE)
        try:
            real(dmirror, args)
        finally:
            args.src[:] = saved


class ReadModifyWriteFile(DmirrorFile):
    """A sub-page device store reads the whole pages and writes them back."""

    def write(self, addr: int, data: bytes) -> None:
        first, n = self._pages_covering(addr, len(data))
        buf = bytearray(self.read(first, n * PAGE))
        buf[addr - first : addr - first + len(data)] = data
        from hmmsim.drivers.dmirror import HMM_DMIRROR_WRITE

        self.ioctl(HMM_DMIRROR_WRITE, DmirrorCmd(first, n, buf))


class StaleTlbFile(DmirrorFile):
    """Keeps using a translation after its invalidation returned (a device TLB
    that is not flushed)."""

    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        self.tlb: dict[int, tuple[int, int]] = {}

    def _mapped_prefix(self, start: int, end: int, need_write: bool) -> Any:
        self.tlb.update(self.pt)
        saved = self.pt
        self.pt = {**self.tlb, **saved}
        try:
            return super()._mapped_prefix(start, end, need_write)
        finally:
            self.pt = saved


class SystemKindFile(DmirrorFile):
    """Maps peer (P2PDMA) memory as if it were system memory: it would DMA-map
    a BAR page as RAM."""

    def device_ptes(self, addr: int, npages: int) -> list[Any]:
        import attrs

        return [
            None if p is None else attrs.evolve(p, memory="system")
            for p in super().device_ptes(addr, npages)
        ]


# ----- their drivers --------------------------------------------------------------------------


def _driver(
    name: str,
    file_cls: type[DmirrorFile] = DmirrorFile,
    *,
    add: Capability = Capability.NONE,
    coherent_claim: bool = False,
    granule: int = PAGE,
) -> type[Dmirror]:
    class Dev(DmirrorDevice):
        def open(self, process: Any) -> DmirrorFile:
            return file_cls(self, process)

    class Drv(Dmirror):
        def probe(self, machine: Any, **params: Any) -> DmirrorDevice:
            return Dev(self, machine, str(params.get("memory", "private")))

        def capabilities_for(self, **params: Any) -> Capability:
            got = super().capabilities_for(**params) | add
            if coherent_claim:
                got = (got & ~Capability.DEVICE_PRIVATE) | Capability.DEVICE_COHERENT
            return got

    Drv.name = name
    Drv.mapping_granule = granule
    Drv.__name__ = Drv.__qualname__ = name
    return Drv


BROKEN: list[type[Dmirror]] = [
    _driver("broken_writable_migration", WritableMigrationFile),
    _driver("broken_notifier_left", NotifierLeftFile),
    _driver("broken_reopened", ReopenedFile),
    _driver("broken_exclusive_ignored", ExclusiveIgnoredFile),
    _driver("broken_one_page_table", OnePageTableFile),
    _driver("broken_nonblocking_liar", NonblockingLiarFile),
    _driver("broken_stale_sequence", StaleSequenceFile),
    _driver("broken_maps_unmigrated", MapsUnmigratedFile),
    _driver("broken_read_modify_write", ReadModifyWriteFile),
    _driver("broken_stale_tlb", StaleTlbFile),
    _driver("broken_claims_huge", add=Capability.HUGE_MAPPINGS),
    _driver("broken_claims_coherent", coherent_claim=True),
    _driver("broken_claims_64k", granule=64 << 10),
    _driver("p2p_dmirror", add=Capability.P2P),
    _driver("broken_p2p_as_system", SystemKindFile, add=Capability.P2P),
]


@pytest.fixture(autouse=True)
def broken_drivers(monkeypatch: pytest.MonkeyPatch) -> None:
    register_test_drivers(monkeypatch, list(BROKEN), "broken-drivers")
    # dmirror's migration steps are functions of its migrate module that take
    # the open file (as in test_hmm.c): the broken files bend them per file.
    real_copy = dmirror_migrate.alloc_and_copy_to_device
    real_map = dmirror_migrate.finalize_and_map

    def copy(dmirror: Any, args: Any) -> None:
        real_copy(dmirror, args)
        if isinstance(dmirror, WritableMigrationFile):
            WritableMigrationFile.alloc_and_copy_to_device(args)

    def finalize(dmirror: Any, args: Any) -> None:
        if isinstance(dmirror, MapsUnmigratedFile):
            MapsUnmigratedFile.finalize_and_map(args, real_map, dmirror)
        else:
            real_map(dmirror, args)

    monkeypatch.setattr(dmirror_migrate, "alloc_and_copy_to_device", copy)
    monkeypatch.setattr(dmirror_migrate, "finalize_and_map", finalize)


def _fails(name: str, check: Any, match: str, memory: str = "private") -> None:
    spec = DriverSpec(name, (("memory", memory),))
    r = run_check(spec, "x", check)
    assert r.outcome == "failed", f"{name} passed {check.__name__}"
    assert match in r.message + r.traceback, r.message
    control = run_check(DriverSpec("dmirror", (("memory", memory),)), "x", check)
    assert control.outcome == "passed", control.message


def _race_fails(name: str, race: str, match: str, memory: str = "private") -> int:
    r = explore_race(DriverSpec(name, (("memory", memory),)), race_by_name(race))
    assert r.failures, f"{name} survived {race} ({r.schedules} schedules)"
    assert match in r.failures[0].description, r.failures[0].description
    ok = explore_race(DriverSpec("dmirror", (("memory", memory),)), race_by_name(race))
    assert not ok.failures, ok.failures[0].description
    return r.schedules


# ----- the checks -----------------------------------------------------------------------------


@pytest.mark.parametrize("memory", ["private", "coherent"])
def test_read_only_source_catches_writable_migration(memory: str) -> None:
    _fails("broken_writable_migration", mig.check_migrate_read_only_source, "read-only", memory)


def test_close_leaves_nothing_catches_a_notifier_left_on_the_mm() -> None:
    _fails("broken_notifier_left", td.check_close_leaves_nothing, "notifier(s) left on the mm")


def test_closed_mirror_refuses_work_catches_a_file_that_keeps_serving() -> None:
    _fails("broken_reopened", td.check_closed_mirror_refuses_work, "closed mirror accepted")


def test_converse_atomic_invariant_catches_atomic_access_kept_after_the_cpu_took_the_page():
    _fails("broken_exclusive_ignored", check_exclusive_access, "not device-exclusive")


def test_large_range_catches_an_invalidation_that_stops_after_one_page_table() -> None:
    _fails("broken_one_page_table", caps.check_large_range_one_invalidation, "after one mprotect")
    # The small ranges of the basic checks never see it.
    small = run_check(DriverSpec("broken_one_page_table"), "x", check_invalidate_on_munmap)
    assert small.outcome == "passed"


def test_oom_reap_catches_a_driver_claiming_a_non_blockable_invalidation() -> None:
    _fails("broken_nonblocking_liar", caps.check_oom_reap_with_device_mappings, "still maps")


def test_oom_reap_race_catches_a_driver_claiming_a_non_blockable_invalidation() -> None:
    _race_fails("broken_nonblocking_liar", "read_vs_oom_reap", "invariant violated")


def test_invalidation_stream_catches_a_livelock_fast() -> None:
    import time

    t0 = time.perf_counter()
    _race_fails("broken_stale_sequence", "read_vs_invalidation_stream", "livelock")
    assert time.perf_counter() - t0 < 60


def test_unpopulated_migration_race_catches_mapping_what_did_not_migrate() -> None:
    _race_fails("broken_maps_unmigrated", "migrate_unpopulated_vs_cpu_store", "invariant violated")


def test_subpage_race_catches_a_read_modify_write_device_store() -> None:
    _race_fails("broken_read_modify_write", "subpage_store_vs_cpu_store", "lost")


def test_huge_mappings_check_catches_a_driver_claiming_it_without_doing_it() -> None:
    _fails_claim("broken_claims_huge", caps.check_huge_mappings, "not 9")


def test_device_coherent_check_catches_private_memory_claimed_as_coherent() -> None:
    _fails_claim("broken_claims_coherent", caps.check_device_coherent_memory, "device_private")


def test_granule_invariant_catches_a_64k_driver_mapping_4k() -> None:
    _fails("broken_claims_64k", check_transparent_huge_pages, "granule")
    assert run_check(DriverSpec("broken_claims_64k"), "x", check_read_anonymous).outcome == "passed"


def test_p2p_check_passes_on_a_driver_that_maps_peer_memory_and_fails_on_one_that_does_not():
    ok = run_check(DriverSpec("p2p_dmirror"), "x", caps.check_p2p_memory)
    assert ok.outcome == "passed", ok.message
    _fails_claim("broken_p2p_as_system", caps.check_p2p_memory, "not p2p")
    skipped = run_check(DriverSpec("dmirror"), "x", caps.check_p2p_memory)
    assert skipped.outcome == "skipped" and "P2P" in skipped.message


def _fails_claim(name: str, check: Any, match: str) -> None:
    r = run_check(DriverSpec(name), "x", check)
    assert r.outcome == "failed", r.message
    assert match in r.message + r.traceback, r.message


def test_use_after_invalidation_is_caught_by_the_audit_and_the_poison() -> None:
    env = open_environment(DriverSpec("broken_stale_tlb"))
    a = env.mmap(4 * PAGE)
    env.proc.write(a, b"s" * 4 * PAGE)
    env.mirror.write(a, b"t" * 4 * PAGE)
    env.proc.madvise(a, 4 * PAGE, MADV_DONTNEED)  # the pages are freed
    env.mirror.write(a, b"u" * PAGE)  # through the stale translation
    assert env.proc.read(a, PAGE) == bytes(PAGE)  # the store went nowhere the CPU sees
    with pytest.raises(AssertionError, match="freed memory"):
        close_environment(env)
    # dmirror, the same steps: the store faults a new page in.
    env = open_environment(DriverSpec("dmirror"))
    a = env.mmap(4 * PAGE)
    env.proc.write(a, b"s" * 4 * PAGE)
    env.mirror.write(a, b"t" * 4 * PAGE)
    env.proc.madvise(a, 4 * PAGE, MADV_DONTNEED)
    env.mirror.write(a, b"u" * PAGE)
    assert env.proc.read(a, PAGE) == b"u" * PAGE
    close_environment(env)


def test_unpopulated_migration_race_finds_nouveaus_unconditional_pfns_map() -> None:
    """nouveau_dmem_migrate_chunk maps the pfns it computed before
    migrate_vma_pages, migrated or not: a CPU store that fills a hole between
    collect and pages leaves the GPU mapping a VRAM page the CPU does not map
    (mainline; a dri-devel patch maps only when every page migrated)."""
    r = explore_race(DriverSpec("nouveau"), race_by_name("migrate_unpopulated_vs_cpu_store"))
    assert r.failures, "nouveau survived"
    assert "invariant violated: device maps pfn" in r.failures[0].description


def test_fault_back_race_finds_dmirrors_own_migrate_skip() -> None:
    """dmirror ignores its own MIGRATE invalidations without bumping the
    notifier sequence: a device fault that read a device-private pfn just
    before a CPU fault moved the page back still maps it (test_hmm.c's own
    behaviour, which private dmirror declares as an expected failure;
    coherent memory is read in place, so that variant passes)."""
    race = race_by_name("read_device_memory_vs_cpu_fault_back")
    bad = explore_race(DriverSpec("dmirror", (("memory", "private"),)), race)
    assert bad.failures and "invariant violated: device maps pfn" in bad.failures[0].description
    ok = explore_race(DriverSpec("dmirror", (("memory", "coherent"),)), race)
    assert not ok.failures and ok.exhausted
