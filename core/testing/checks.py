"""The conformance checks: plain functions, a driver spec in, ``AssertionError`` out.

Each check builds a small machine, probes the driver, opens a mirror on a
process, exercises one behaviour through the generic ``Mirror`` interface
and checks the invariants (``invariants.check_mirror``) after every step and
the absence of leaks at the end. A check whose capability the driver does
not claim raises ``CheckSkipped``; a claimed capability that does not work
fails.
"""

from __future__ import annotations

import functools
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from .. import (
    MADV_DONTNEED,
    MADV_PAGEOUT,
    MAP_ANONYMOUS,
    MAP_HUGETLB,
    MAP_PRIVATE,
    MAP_SHARED,
    PROT_NONE,
    PROT_READ,
)
from ..driver import Capability
from ..errors import BadAddress, InvalidArgument, NotPermitted
from ..plugins import driver_classes, find_driver, get_plugin_manager
from .env import (
    ANON,
    HUGE,
    PAGE,
    RW,
    CheckSkipped,
    DriverSpec,
    Env,
    close_environment,
    environment,
    needs,
    open_environment,
    pattern,
)
from .invariants import check_mirror
from .races import RACES, RaceFailure, race_check


def not_huge_only(env: Env, what: str) -> None:
    """Skip a scenario that works on 4 KiB pieces of memory when the driver only
    takes huge pages (``HUGE_ONLY``): it has no hugetlb counterpart."""
    if Capability.HUGE_ONLY & env.caps:
        raise CheckSkipped(f"{env.spec} claims HUGE_ONLY: {what} has no hugetlb counterpart")


def expect_error(exc: type[Exception], call: Callable[[], object], what: str) -> None:
    """``call()`` must raise ``exc``; ``what`` says what should have been refused."""
    try:
        call()
    except exc:
        return
    raise AssertionError(f"{what} succeeded")


# ----- coherence ------------------------------------------------------------------------


def check_read_anonymous(spec: DriverSpec) -> None:
    """Device reads see CPU data, zero pages and holes included."""
    with environment(spec) as env:
        needs(env, Capability.READ)
        a = env.mmap(16 * PAGE)
        data = pattern(8 * PAGE)
        env.proc.write(a, data)
        assert env.mirror.read(a, 16 * PAGE) == data + bytes(8 * PAGE)
        env.check(a, 16)


def check_write_anonymous(spec: DriverSpec) -> None:
    """Device writes land in the process's memory, also where a device read
    mapped the zero page first (the store must break COW, not write the zero page)."""
    with environment(spec) as env:
        needs(env, Capability.WRITE)
        a = env.mmap(16 * PAGE)
        data = pattern(16 * PAGE, 7)
        assert env.mirror.read(a, 16 * PAGE) == bytes(16 * PAGE)
        env.mirror.write(a, data)
        assert env.proc.read(a, 16 * PAGE) == data
        env.check(a, 16)
        fresh = env.mmap(16 * PAGE)
        assert env.proc.read(fresh, 16 * PAGE) == bytes(16 * PAGE), (
            "untouched memory reads non-zero: a device store went into the zero page"
        )


def check_shared_anonymous(spec: DriverSpec) -> None:
    """shmem: a device write through one process is seen by a forked child,
    and dirties the page, so reclaim keeps it."""
    with environment(spec) as env:
        needs(env, Capability.WRITE)
        a = env.mmap(4 * PAGE, flags=MAP_SHARED | MAP_ANONYMOUS)
        child = env.proc.fork()
        env.mirror.write(a, pattern(4 * PAGE))
        assert child.read(a, 4 * PAGE) == pattern(4 * PAGE)
        env.check(a, 4)
        if Capability.HUGE_ONLY & env.caps:
            return  # MADV_PAGEOUT refuses hugetlb memory
        # A CPU read brings the shmem pages in clean and mapped writable; the
        # device store through them must dirty the folios (set_page_dirty),
        # or reclaim drops them as clean and the bytes are lost.
        b = env.mmap(4 * PAGE, flags=MAP_SHARED | MAP_ANONYMOUS)
        assert env.proc.read(b, 4 * PAGE) == bytes(4 * PAGE)
        env.mirror.write(b, pattern(4 * PAGE, 5))
        env.proc.madvise(b, 4 * PAGE, MADV_PAGEOUT)
        assert env.proc.read(b, 4 * PAGE) == pattern(4 * PAGE, 5), (
            "a device store left the shmem page clean: reclaim dropped its bytes"
        )
        env.check(b, 4)


def check_file_backed(spec: DriverSpec) -> None:
    """Shared file mappings: device writes reach the file; private ones copy on write."""
    with environment(spec) as env:
        needs(env, Capability.WRITE)
        not_huge_only(env, "page-cache memory")
        f = env.machine.create_file(4 * PAGE)
        f.pwrite(0, pattern(4 * PAGE, 3))
        a = env.mmap(4 * PAGE, flags=MAP_SHARED, file=f)
        assert env.mirror.read(a, 4 * PAGE) == pattern(4 * PAGE, 3)
        env.mirror.write(a, pattern(PAGE, 9))
        assert f.pread(0, PAGE) == pattern(PAGE, 9)
        env.check(a, 4)
        b = env.mmap(4 * PAGE, flags=MAP_PRIVATE, file=f)
        env.mirror.write(b + PAGE, pattern(PAGE, 5))
        assert f.pread(PAGE, PAGE) == pattern(4 * PAGE, 3)[PAGE : 2 * PAGE]
        assert env.proc.read(b + PAGE, PAGE) == pattern(PAGE, 5)
        env.check(b, 4)


def check_transparent_huge_pages(spec: DriverSpec) -> None:
    """THP-backed memory reads and writes coherently."""
    with environment(spec) as env:
        needs(env, Capability.WRITE)
        a = env.thp_region()
        env.proc.write(a, pattern(PAGE))
        assert env.proc.pagemap(a, 1)[0].order == 9
        env.mirror.write(a + 100 * PAGE, pattern(PAGE, 2))
        assert env.proc.read(a + 100 * PAGE, PAGE) == pattern(PAGE, 2)
        assert env.mirror.read(a, PAGE) == pattern(PAGE)
        env.check(a, HUGE // PAGE)


def check_hugetlb(spec: DriverSpec) -> None:
    """hugetlb memory reads and writes coherently; a driver that only takes huge
    pages (``HUGE_ONLY``) refuses 4 KiB memory with EINVAL."""
    with environment(spec) as env:
        needs(env, Capability.WRITE)
        a = env.mmap(HUGE, flags=ANON | MAP_HUGETLB)
        env.mirror.write(a + 3 * PAGE, pattern(PAGE, 4))
        assert env.proc.read(a + 3 * PAGE, PAGE) == pattern(PAGE, 4)
        env.check(a, HUGE // PAGE)
        if Capability.HUGE_ONLY & env.caps:
            refuses_small_pages(env)


def refuses_small_pages(env: Env) -> None:
    """A ``HUGE_ONLY`` driver refuses 4 KiB memory with EINVAL, storing nothing."""
    # Not Env.mmap: 4 KiB pages, over a whole 2 MiB-aligned huge page.
    a = (env.proc.mmap(2 * HUGE, RW, ANON) + HUGE - 1) & ~(HUGE - 1)
    env.proc.write(a, pattern(4 * PAGE))
    assert env.proc.pagemap(a, 1)[0].order == 0
    expect_error(
        InvalidArgument, lambda: env.mirror.read(a, 4 * PAGE), "device read of 4 KiB pages"
    )
    expect_error(
        InvalidArgument,
        lambda: env.mirror.write(a, pattern(PAGE, 2)),
        "device write of 4 KiB pages",
    )
    assert env.proc.read(a, 4 * PAGE) == pattern(4 * PAGE)
    env.check(a, 4)


# ----- permissions ------------------------------------------------------------------------


def check_permission_errors(spec: DriverSpec) -> None:
    """No read without VM_READ, no write without VM_WRITE, nothing half-copied."""
    with environment(spec) as env:
        needs(env, Capability.READ)
        not_huge_only(env, "mprotect of 4 KiB pages")
        a = env.mmap(4 * PAGE)
        env.proc.write(a, pattern(4 * PAGE))
        env.proc.mprotect(a + 2 * PAGE, 2 * PAGE, PROT_NONE)
        expect_error(
            BadAddress, lambda: env.mirror.read(a, 4 * PAGE), "device read of PROT_NONE memory"
        )
        env.proc.mprotect(a, 4 * PAGE, PROT_READ)
        if Capability.WRITE & env.caps:
            expect_error(
                NotPermitted,
                lambda: env.mirror.write(a, pattern(4 * PAGE, 8)),
                "device write to read-only memory",
            )
        assert env.proc.read(a, 4 * PAGE) == pattern(4 * PAGE)
        unmapped = env.mmap(PAGE)
        env.proc.munmap(unmapped, PAGE)
        expect_error(
            BadAddress, lambda: env.mirror.read(unmapped, PAGE), "device read of unmapped memory"
        )
        env.check(a, 4)


# ----- invalidation ---------------------------------------------------------------------------


def _mapped(env: Env, npages: int, write: bool = True) -> int:
    a = env.mmap(npages * PAGE)
    env.proc.write(a, pattern(npages * PAGE))
    if write and Capability.WRITE & env.caps:
        env.mirror.write(a, pattern(npages * PAGE))
    else:
        env.mirror.read(a, npages * PAGE)
    assert any(p is not None for p in env.mirror.device_ptes(a, npages)), (
        "device access left no device mapping"
    )
    return a


def check_invalidate_on_munmap(spec: DriverSpec) -> None:
    with environment(spec) as env:
        needs(env, Capability.READ)
        not_huge_only(env, "munmap of 4 KiB pages")
        a = _mapped(env, 8)
        env.proc.munmap(a + 2 * PAGE, 4 * PAGE)
        assert all(p is None for p in env.mirror.device_ptes(a + 2 * PAGE, 4)), (
            "the device still maps pages after munmap"
        )
        env.check(a, 8)
        expect_error(
            BadAddress,
            lambda: env.mirror.read(a + 2 * PAGE, PAGE),
            "device read of unmapped memory",
        )


def check_invalidate_on_mprotect(spec: DriverSpec) -> None:
    with environment(spec) as env:
        needs(env, Capability.WRITE)
        not_huge_only(env, "mprotect of 4 KiB pages")
        a = _mapped(env, 8)
        env.proc.mprotect(a, 8 * PAGE, PROT_READ)
        env.check(a, 8)  # nothing device-writable any more
        assert env.mirror.read(a, 8 * PAGE) == pattern(8 * PAGE)


def check_invalidate_on_fork(spec: DriverSpec) -> None:
    """Fork write-protects; a device write then breaks COW in its own process only."""
    with environment(spec) as env:
        needs(env, Capability.WRITE)
        a = _mapped(env, 4)
        child = env.proc.fork()
        env.check(a, 4)
        env.mirror.write(a, pattern(PAGE, 11))
        env.check(a, 4)
        assert env.proc.read(a, PAGE) == pattern(PAGE, 11)
        assert child.read(a, PAGE) == pattern(4 * PAGE)[:PAGE]


def check_device_write_in_fork_child(spec: DriverSpec) -> None:
    """A mirror opened by the child writes the child's copy only."""
    with environment(spec) as env:
        needs(env, Capability.WRITE)
        a = env.mmap(4 * PAGE)
        env.proc.write(a, pattern(4 * PAGE))
        child = env.proc.fork()
        cm = env.open(child)
        try:
            cm.write(a, pattern(4 * PAGE, 12))
            check_mirror(cm, a, 4)
            assert child.read(a, 4 * PAGE) == pattern(4 * PAGE, 12)
            assert env.proc.read(a, 4 * PAGE) == pattern(4 * PAGE)
        finally:
            cm.close()


def check_invalidate_on_dontneed(spec: DriverSpec) -> None:
    with environment(spec) as env:
        needs(env, Capability.READ)
        not_huge_only(env, "MADV_DONTNEED of 4 KiB pages")
        a = _mapped(env, 4)
        env.proc.madvise(a, 4 * PAGE, MADV_DONTNEED)
        env.check(a, 4)
        assert env.mirror.read(a, 4 * PAGE) == bytes(4 * PAGE)


def check_invalidate_on_swap_out(spec: DriverSpec) -> None:
    with environment(spec) as env:
        needs(env, Capability.READ)
        not_huge_only(env, "swap-out (hugetlb is never swapped)")
        a = _mapped(env, 4)
        env.proc.madvise(a, 4 * PAGE, MADV_PAGEOUT)
        env.check(a, 4)
        assert env.mirror.read(a, 4 * PAGE) == pattern(4 * PAGE)
        env.check(a, 4)


def check_invalidate_on_page_migration(spec: DriverSpec) -> None:
    with environment(spec) as env:
        needs(env, Capability.READ)
        a = _mapped(env, 4)
        assert env.proc.move_pages(a, 4) == [0, 0, 0, 0]
        env.check(a, 4)
        assert env.mirror.read(a, 4 * PAGE) == pattern(4 * PAGE)


def check_invalidate_on_thp_split(spec: DriverSpec) -> None:
    """After a PMD split the device maps no more than 4 KiB where the CPU maps 4 KiB."""
    with environment(spec) as env:
        needs(env, Capability.READ)
        a = env.thp_region()
        env.proc.write(a, pattern(HUGE))
        env.mirror.read(a, HUGE)
        env.check(a, HUGE // PAGE)
        env.proc.munmap(a + HUGE - PAGE, PAGE)  # PTE-mapped THP from now on
        env.check(a, HUGE // PAGE - 1)
        assert env.mirror.read(a, HUGE - PAGE) == pattern(HUGE)[: HUGE - PAGE]
        env.check(a, HUGE // PAGE - 1)


# ----- device memory, exclusive access ------------------------------------------------------


def check_migration_round_trip(spec: DriverSpec) -> None:
    with environment(spec) as env:
        needs(env, Capability.MIGRATE)
        a = env.mmap(16 * PAGE)
        env.proc.write(a, pattern(16 * PAGE))
        assert env.mirror.migrate_to_device(a, 16) == 16
        kinds = {e.kind for e in env.proc.pagemap(a, 16)}
        assert kinds <= {"device_private", "device_coherent"}, kinds
        env.check(a, 16)
        env.mirror.migrate_to_system(a, 16)
        assert {e.kind for e in env.proc.pagemap(a, 16)} == {"anon"}
        assert env.proc.read(a, 16 * PAGE) == pattern(16 * PAGE)


def check_cpu_fault_on_device_memory(spec: DriverSpec) -> None:
    """A CPU touch of device-private memory brings the page back, data intact."""
    with environment(spec) as env:
        needs(env, Capability.MIGRATE)
        needs(env, Capability.DEVICE_PRIVATE)
        a = env.mmap(4 * PAGE)
        env.proc.write(a, pattern(4 * PAGE))
        env.mirror.migrate_to_device(a, 4)
        assert env.proc.read(a + PAGE, PAGE) == pattern(4 * PAGE)[PAGE : 2 * PAGE]
        assert env.proc.pagemap(a + PAGE, 1)[0].kind == "anon"
        env.check(a, 4)


def check_exclusive_access(spec: DriverSpec) -> None:
    with environment(spec) as env:
        needs(env, Capability.EXCLUSIVE)
        a = env.mmap(4 * PAGE)
        env.proc.write(a, pattern(4 * PAGE))
        env.mirror.make_exclusive(a, 4)
        assert {e.kind for e in env.proc.pagemap(a, 4)} == {"device_exclusive"}
        env.check(a, 4)
        env.proc.write(a, pattern(PAGE, 13))  # the CPU takes it back
        env.check(a, 4)
        assert env.mirror.read(a, PAGE) == pattern(PAGE, 13)


# ----- teardown ------------------------------------------------------------------------------


def check_close_drops_everything(spec: DriverSpec) -> None:
    """Closing the mirror leaves no device mapping and no leaked page."""
    with environment(spec) as env:
        needs(env, Capability.READ)
        a = _mapped(env, 8)
        if Capability.MIGRATE & env.caps:
            env.mirror.migrate_to_device(a, 4)
        env.mirror.close()
        assert all(p is None for p in env.mirror.device_ptes(a, 8))
        assert env.proc.read(a, 8 * PAGE) == pattern(8 * PAGE)


def check_exit_with_mirror_open(spec: DriverSpec) -> None:
    """The process exits first: the mirror sees RELEASE and its mappings go."""
    with environment(spec) as env:
        needs(env, Capability.READ)
        a = _mapped(env, 4)
        env.proc.exit()
        assert all(p is None for p in env.mirror.device_ptes(a, 4))


# ----- the catalogue -------------------------------------------------------------------------

CHECKS: dict[str, list[Callable[[DriverSpec], None]]] = {
    "coherence": [
        check_read_anonymous,
        check_write_anonymous,
        check_shared_anonymous,
        check_file_backed,
        check_transparent_huge_pages,
        check_hugetlb,
    ],
    "permissions": [check_permission_errors],
    "invalidation": [
        check_invalidate_on_munmap,
        check_invalidate_on_mprotect,
        check_invalidate_on_fork,
        check_device_write_in_fork_child,
        check_invalidate_on_dontneed,
        check_invalidate_on_swap_out,
        check_invalidate_on_page_migration,
        check_invalidate_on_thp_split,
    ],
    "device-memory": [check_migration_round_trip, check_cpu_fault_on_device_memory],
    "exclusive": [check_exclusive_access],
    "teardown": [check_close_drops_everything, check_exit_with_mirror_open],
}

#: The races that have a hugetlb counterpart: the others change 4 KiB pieces
#: of the buffer (munmap, mprotect, MADV_DONTNEED, reclaim, THP split).
HUGE_ONLY_RACES = frozenset({"write_vs_fork", "read_vs_page_migration"})


def race_skip_reason(spec: DriverSpec, race: Any, pm: Any = None) -> str | None:
    """Why the suite skips ``race`` for ``spec`` beyond its capabilities, or None:
    a ``HUGE_ONLY`` driver skips the races without a hugetlb counterpart
    (the bug zoo, which explores races directly, asks the same)."""
    if race.name not in HUGE_ONLY_RACES and Capability.HUGE_ONLY & spec.capabilities(pm):
        return f"{spec} claims HUGE_ONLY: {race.name} works on 4 KiB pages"
    return None


def _race_check(race: Any) -> Callable[[DriverSpec], None]:
    """``race_check``, skipped for a ``HUGE_ONLY`` driver unless it has a hugetlb
    counterpart (``HUGE_ONLY_RACES``)."""
    check = race_check(race)
    if race.name in HUGE_ONLY_RACES:
        return check

    def wrapped(spec: DriverSpec) -> None:
        reason = race_skip_reason(spec, race)
        if reason is not None:
            raise CheckSkipped(reason)
        check(spec)

    for attr in ("race", "__name__", "__qualname__", "__doc__"):
        setattr(wrapped, attr, getattr(check, attr))
    return wrapped


CHECKS["races"] = [_race_check(race) for race in RACES]

# The checks of other modules (imported here: they use this module's helpers).
from .checks_capabilities import CAPABILITY_CHECKS, OOM_CHECKS, SIZE_CHECKS  # noqa: E402
from .checks_exact import (  # noqa: E402
    EVICTION_CHECKS,
    EXACT_DATA_CHECKS,
    INTROSPECTION_CHECKS,
    MIGRATION_CHECKS,
)
from .checks_hugeonly import HUGE_ONLY_OOM_CHECKS, HUGE_ONLY_SIZE_CHECKS  # noqa: E402
from .checks_migrate import MIGRATE_CHECKS  # noqa: E402
from .checks_teardown import TEARDOWN_CHECKS  # noqa: E402

CHECKS["device-memory"] += MIGRATE_CHECKS
CHECKS["teardown"] += TEARDOWN_CHECKS
CHECKS["capabilities"] = CAPABILITY_CHECKS
CHECKS["sizes"] = SIZE_CHECKS
CHECKS["oom"] = OOM_CHECKS
CHECKS["coherence"] += EXACT_DATA_CHECKS
CHECKS["device-memory"] += MIGRATION_CHECKS
CHECKS["teardown"] += EVICTION_CHECKS
CHECKS["introspection"] = INTROSPECTION_CHECKS
CHECKS["sizes"] += HUGE_ONLY_SIZE_CHECKS
CHECKS["oom"] += HUGE_ONLY_OOM_CHECKS


def check_name(check: Callable[[DriverSpec], None]) -> str:
    """A check's name: its function name without ``check_`` (``read_anonymous``);
    for a race check, the race's name (``read_vs_munmap``, what ``hmmsim explore`` takes)."""
    race = getattr(check, "race", None)
    return str(race.name) if race is not None else check.__name__.removeprefix("check_")


def check_id(area: str, check: Callable[[DriverSpec], None]) -> str:
    """A check's one name everywhere (CLI, pytest id, JSON, bug zoo): ``area/name``."""
    return f"{area}/{check_name(check)}"


@attrs.frozen
class CheckResult:
    """The outcome of one check on one driver spec."""

    driver: str
    area: str
    #: ``check_name``: the function name without ``check_``.
    check: str
    outcome: str  # passed | failed | skipped | xfailed (a declared expected failure)
    #: Why it failed or was skipped, one line (``Type: text`` for a failure).
    message: str = ""
    seconds: float = 0.0
    #: The exception's traceback for a failure ("" otherwise).
    traceback: str = ""
    #: For a race failure: the failing schedule id, the command that replays
    #: it, and its trace.
    schedule: str | None = None
    replay: str | None = None
    trace: str | None = None

    @property
    def id(self) -> str:
        return f"{self.area}/{self.check}"


@functools.lru_cache(maxsize=64)
def _expected_failures(spec: DriverSpec) -> dict[str, str]:
    return dict(spec.driver().expected_failures(**dict(spec.params)))


def expected_failure(
    spec: DriverSpec, area: str, check: Callable[[DriverSpec], None]
) -> str | None:
    """Why the driver declares it fails this check (``Driver.expected_failures``), or None."""
    return _expected_failures(spec).get(check_id(area, check))


def run_check(spec: DriverSpec, area: str, check: Callable[[DriverSpec], None]) -> CheckResult:
    """Run one check, judged against what the driver declares it fails.

    A check the driver declares as an expected failure (a kept quirk of the
    real driver) that fails is ``xfailed``; one that passes is ``failed``
    (strict: the declaration is out of date).
    """
    result = _run_check(spec, area, check)
    reason = expected_failure(spec, area, check)
    if reason is None or result.outcome == "skipped":
        return result
    if result.outcome == "failed":
        return attrs.evolve(result, outcome="xfailed", message=f"expected: {reason}")
    return attrs.evolve(
        result, outcome="failed", message=f"declared as an expected failure, but passed: {reason}"
    )


def _run_check(spec: DriverSpec, area: str, check: Callable[[DriverSpec], None]) -> CheckResult:
    """Run one check; any exception from it (or the driver under it) is a failed check.

    ``CheckSkipped`` is a skip with its reason. ``KeyboardInterrupt`` and
    ``SystemExit`` propagate: they stop the run, they are not results.
    """
    name = check_name(check)
    t0 = time.perf_counter()
    try:
        check(spec)
    except CheckSkipped as exc:
        return CheckResult(str(spec), area, name, "skipped", str(exc), time.perf_counter() - t0)
    except Exception as exc:
        seconds = time.perf_counter() - t0
        tb = "".join(traceback.format_exception(exc))
        if isinstance(exc, RaceFailure):
            return CheckResult(
                str(spec),
                area,
                name,
                "failed",
                f"{type(exc).__name__}: {exc.summary}",
                seconds,
                tb,
                exc.schedule,
                exc.replay,
                exc.trace,
            )
        text = str(exc).strip().splitlines()
        message = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
        return CheckResult(str(spec), area, name, "failed", message, seconds, tb)
    return CheckResult(str(spec), area, name, "passed", "", time.perf_counter() - t0)


def all_checks() -> Iterator[tuple[str, Callable[[DriverSpec], None]]]:
    for area, checks in CHECKS.items():
        for check in checks:
            yield area, check


def installed_specs(pm: Any = None) -> list[DriverSpec]:
    """Every installed driver, in each variant it declares (``Driver.variants``)."""
    pm = pm or get_plugin_manager()
    specs = []
    for name, cls in sorted(driver_classes(pm).items()):
        variants = getattr(cls, "variants", None) or [{}]
        for params in variants:
            specs.append(DriverSpec(name, tuple(sorted(params.items()))))
    return specs


def validate_spec(spec: DriverSpec, pm: Any = None) -> None:
    """Check once, before any check runs, that ``spec`` names a driver that probes.

    Raises ``NoEntry`` for a driver that is not installed and ``InvalidArgument``
    for a parameter it does not declare or a value outside its choices — what
    a user mistyped. Then probes one device on a small machine, so that values
    the driver refuses in ``probe`` (``InvalidArgument``, as the ``Driver``
    contract says) are caught here too. Anything else ``probe`` raises is the
    driver's own failure, left to the checks to report one by one.
    """
    pm = pm or spec.plugin_manager()
    cls = find_driver(pm, spec.name)
    cls.check_parameters(dict(spec.params))
    machine = spec.machine(small=True)
    machine.plugin_manager = pm
    try:
        machine.probe(spec.name, **dict(spec.params)).remove()
    except InvalidArgument:
        raise
    except Exception:  # the driver's failure, not the user's: the checks report it
        return


def unique_specs(specs: list[DriverSpec]) -> list[DriverSpec]:
    """``specs`` without repeats, in order (a driver named twice is checked once)."""
    return list(dict.fromkeys(specs))


__all__ = [
    "CHECKS",
    "CheckResult",
    "CheckSkipped",
    "DriverSpec",
    "Env",
    "all_checks",
    "check_id",
    "check_name",
    "close_environment",
    "environment",
    "expect_error",
    "installed_specs",
    "needs",
    "open_environment",
    "pattern",
    "race_skip_reason",
    "run_check",
    "unique_specs",
    "validate_spec",
]
