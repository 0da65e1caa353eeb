"""Race scenarios: a device access against a CPU page-table change, every interleaving.

Kernel counterpart: the window the ``mmu_interval_read_begin`` →
``hmm_range_fault`` → driver lock → ``mmu_interval_read_retry`` protocol
exists for (docs/hmm-protocol.md §2), which the kernel's ``anon_teardown`` test pokes
with random sleeps. Here each race is a scenario of two actors run by the
deterministic scheduler: the device side goes through the generic ``Mirror``
interface, the CPU side is one mm operation. After every step the mirror
invariants (``check_mirror``) must hold; at the end the data each side sees
must be one that some serial order of the two could produce, and nothing may
leak.

``RACES`` lists them; ``race_scenario(spec, race)`` builds the scenario for
``explore``; ``explore_race`` runs it with bounded DFS (k = 2) when its
schedule space is small, else with PCT under a fixed budget.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from .. import MADV_DONTNEED, MADV_PAGEOUT, PROT_READ, PROT_WRITE
from ..driver import Capability, Mirror
from ..errors import BadAddress, Busy, HmmsimError, NoEntry
from ..explore import ExploreResult, Scenario, ScenarioRun, explore
from ..mm.exit import oom_reap
from ..sched import PCT, BoundedDFS
from .env import (
    HUGE,
    PAGE,
    CheckSkipped,
    DriverSpec,
    Env,
    close_environment,
    open_environment,
    pattern,
)
from .invariants import (
    MirrorWatch,
    check_dma_contract,
    check_mirror,
    check_notifier_contract,
)
from .poison import poisoner

#: Pages each race touches.
NPAGES = 4
OLD_SEED, NEW_SEED = 1, 7

#: DFS gives up (and PCT takes over) beyond this many schedules.
DFS_LIMIT = 3000
PCT_BUDGET = 300


@attrs.define
class RaceState:
    """One instance of a race: its environment and what each side observed."""

    env: Env
    addr: int
    npages: int = NPAGES
    mirrors: list[Mirror] = attrs.field(factory=list)
    device_result: object = None
    device_error: HmmsimError | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)

    def pages(self, data: bytes) -> list[bytes]:
        return [data[i * PAGE : (i + 1) * PAGE] for i in range(self.npages)]

    @property
    def old(self) -> list[bytes]:
        return self.pages(pattern(self.npages * PAGE, OLD_SEED))

    @property
    def new(self) -> list[bytes]:
        return self.pages(pattern(self.npages * PAGE, NEW_SEED))

    def cpu_pages(self, proc: Any = None) -> list[bytes]:
        return self.pages((proc or self.env.proc).read(self.addr, self.npages * PAGE))


@attrs.frozen
class Race:
    """A device access (``device``) against a CPU operation (``cpu``)."""

    name: str
    needs: Capability
    #: The device actor's access: "read" or "write".
    access: str
    #: The CPU actor.
    cpu: Callable[[RaceState], None]
    #: Checks at the end: raise AssertionError if no serial order explains it.
    outcome: Callable[[RaceState], None]
    #: Device-access errors the race can legitimately produce.
    tolerated: tuple[type[HmmsimError], ...] = ()
    #: Errors the CPU side can legitimately produce.
    cpu_tolerated: tuple[type[HmmsimError], ...] = ()
    #: Place the buffer in a THP.
    huge: bool = False
    #: Map the pages on the device before the race starts (else the device
    #: access faults them in while the CPU side runs: the retry window).
    premap: bool = False
    doc: str = ""
    #: More set-up once the buffer exists (a second device, a second mirror).
    prepare: Callable[[RaceState], None] | None = None
    #: Replaces the device access as the first actor (named ``first_name``).
    first: Callable[[RaceState], None] | None = None
    first_name: str = "device"
    #: Write the old data before the race (False: never-populated memory).
    populate: bool = True


def _each_page_one_of(got: list[bytes], *allowed: list[bytes], what: str) -> None:
    for i, page in enumerate(got):
        if not any(page == choice[i] for choice in allowed):
            raise AssertionError(f"{what}: page {i} holds data no serial order produces")


def _device_read_is(st: RaceState, *allowed: list[bytes]) -> None:
    if st.device_error is None and st.device_result is not None:
        assert isinstance(st.device_result, bytes)
        _each_page_one_of(st.pages(st.device_result), *allowed, what="device read")


# ----- the CPU sides and the outcomes ---------------------------------------------------------


def _munmap(st: RaceState) -> None:
    st.env.proc.munmap(st.addr, st.npages * PAGE)


def _after_munmap(st: RaceState) -> None:
    _device_read_is(st, st.old)


def _mprotect_ro(st: RaceState) -> None:
    st.env.proc.mprotect(st.addr, st.npages * PAGE, PROT_READ)


def _after_write(st: RaceState) -> None:
    got = st.cpu_pages()
    if st.device_error is None:
        assert got == st.new, "the device write succeeded but the CPU does not see it"
    else:
        _each_page_one_of(got, st.old, st.new, what="CPU after a failed device write")


def _fork(st: RaceState) -> None:
    st.extra["child"] = st.env.proc.fork()


def _after_fork(st: RaceState) -> None:
    assert st.device_error is None, f"device write failed: {st.device_error}"
    assert st.cpu_pages() == st.new, "the parent does not see the device's write"
    # The child sees, page by page, the data as of the fork.
    _each_page_one_of(st.cpu_pages(st.extra["child"]), st.old, st.new, what="fork child")


def _dontneed(st: RaceState) -> None:
    st.env.proc.madvise(st.addr, st.npages * PAGE, MADV_DONTNEED)


def _after_dontneed(st: RaceState) -> None:
    zero = [bytes(PAGE)] * st.npages
    _device_read_is(st, st.old, zero)
    assert st.cpu_pages() == zero


def _move_pages(st: RaceState) -> None:
    st.env.proc.move_pages(st.addr, st.npages)


def _pageout(st: RaceState) -> None:
    st.env.proc.madvise(st.addr, st.npages * PAGE, MADV_PAGEOUT)


def _data_kept(st: RaceState) -> None:
    _device_read_is(st, st.old)
    assert st.cpu_pages() == st.old, "the CPU lost data"


def _split_thp(st: RaceState) -> None:
    # Unmapping the THP's last page splits its PMD: PTE-mapped THP from now on.
    st.env.proc.munmap(st.addr + HUGE - PAGE, PAGE)


def _probe_second_device(st: RaceState) -> None:
    spec = st.env.spec
    other = st.env.machine.probe(spec.name, **dict(spec.params)).open(st.env.proc)
    st.extra["other"] = other
    st.mirrors.append(other)


def _open_second_mirror(st: RaceState) -> None:
    m = st.env.device.open(st.env.proc)
    m.read(st.addr, st.npages * PAGE)
    st.extra["other_mirror"] = m
    st.mirrors.append(m)


def _second_device_migrates(st: RaceState) -> None:
    other = st.extra["other"]
    other.migrate_to_device(st.addr, st.npages)


def _open_and_read(st: RaceState) -> None:
    m = st.env.device.open(st.env.proc)
    st.mirrors.append(m)
    st.extra["late_read"] = m.read(st.addr, st.npages * PAGE)


def _after_late_open(st: RaceState) -> None:
    zero = [bytes(PAGE)] * st.npages
    _device_read_is(st, st.old, zero)
    _each_page_one_of(st.pages(st.extra["late_read"]), st.old, zero, what="new mirror's read")


def _close_second(st: RaceState) -> None:
    st.extra["other_mirror"].close()


def _after_close(st: RaceState) -> None:
    m = st.extra["other_mirror"]
    assert all(p is None for p in m.device_ptes(st.addr, st.npages)), "closed mirror maps pages"
    _after_dontneed(st)


#: mprotect toggles in the invalidation stream of the liveness race.
STREAM = 1
SUBPAGE = 64  # bytes each side stores per page in the sub-page race


def _invalidation_stream(st: RaceState) -> None:
    for _ in range(STREAM):
        st.env.proc.mprotect(st.addr, st.npages * PAGE, PROT_READ)
        st.env.proc.mprotect(st.addr, st.npages * PAGE, PROT_READ | PROT_WRITE)


def _after_stream(st: RaceState) -> None:
    """The access ended (the scheduler got here): with the old data, or Busy;
    and once the stream is over, the device reads the data."""
    if st.device_error is not None:
        assert isinstance(st.device_error, Busy), f"device read failed: {st.device_error}"
    _device_read_is(st, st.old)
    got = st.env.mirror.read(st.addr, st.npages * PAGE)
    assert st.pages(got) == st.old, "after the stream the device reads wrong data"


def _oom_reap(st: RaceState) -> None:
    st.extra["skipped"] = oom_reap(st.env.proc.mm)


def _after_oom_reap(st: RaceState) -> None:
    # The reaper zaps what no notifier refused: a page reads old (before the
    # reap, or a VMA it skipped) or not at all; the reaped mm is not read back.
    zero = [bytes(PAGE)] * st.npages
    _device_read_is(st, st.old, zero)


def _migrate_unpopulated(st: RaceState) -> None:
    try:
        st.extra["moved"] = st.env.mirror.migrate_to_device(st.addr, st.npages)
    except (NoEntry, Busy) as exc:
        st.extra["migrate_error"] = exc


def _cpu_store_new(st: RaceState) -> None:
    st.env.proc.write(st.addr, pattern(st.npages * PAGE, NEW_SEED))


def _after_cpu_store(st: RaceState) -> None:
    assert st.cpu_pages() == st.new, "a CPU store was lost to the migration"
    got = st.env.mirror.read(st.addr, st.npages * PAGE)
    assert st.pages(got) == st.new, "the device does not see the CPU's store"


def _subpage_device_store(st: RaceState) -> None:
    new = pattern(st.npages * PAGE, NEW_SEED)
    for i in range(st.npages):
        off = i * PAGE
        st.env.mirror.write(st.addr + off, new[off : off + SUBPAGE])


def _subpage_cpu_store(st: RaceState) -> None:
    cpu = pattern(st.npages * PAGE, 9)
    for i in range(st.npages):
        off = i * PAGE + SUBPAGE
        st.env.proc.write(st.addr + off, cpu[off : off + SUBPAGE])


def _after_subpage(st: RaceState) -> None:
    old, new, cpu = st.old, st.new, st.pages(pattern(st.npages * PAGE, 9))
    want = [
        new[i][:SUBPAGE] + cpu[i][SUBPAGE : 2 * SUBPAGE] + old[i][2 * SUBPAGE :]
        for i in range(st.npages)
    ]
    got = st.cpu_pages()
    for i in range(st.npages):
        assert got[i][:SUBPAGE] == want[i][:SUBPAGE], f"the device's store to page {i} was lost"
        assert got[i][SUBPAGE : 2 * SUBPAGE] == want[i][SUBPAGE : 2 * SUBPAGE], (
            f"the CPU's store to page {i} was lost (a device store rewrote the whole page)"
        )
        assert got[i] == want[i], f"page {i} changed outside both stores"


def _migrate_first(st: RaceState) -> None:
    st.env.mirror.migrate_to_device(st.addr, st.npages)


def _cpu_reads_back(st: RaceState) -> None:
    st.extra["cpu_read"] = st.env.proc.read(st.addr, st.npages * PAGE)


def _after_fault_back(st: RaceState) -> None:
    _device_read_is(st, st.old)
    assert st.pages(st.extra["cpu_read"]) == st.old, "the CPU read wrong data back"
    assert st.cpu_pages() == st.old, "data lost"


RACES: list[Race] = [
    Race(
        "read_vs_munmap",
        Capability.READ,
        "read",
        _munmap,
        _after_munmap,
        (BadAddress,),
        doc="a device read against munmap of its pages",
    ),
    Race(
        "read_vs_mprotect",
        Capability.READ,
        "read",
        _mprotect_ro,
        _data_kept,
        doc="a device read against mprotect(PROT_READ): the read must succeed",
    ),
    Race(
        "write_vs_mprotect",
        Capability.WRITE,
        "write",
        _mprotect_ro,
        _after_write,
        (HmmsimError,),
        doc="a device write against mprotect(PROT_READ)",
    ),
    Race(
        "write_vs_fork",
        Capability.WRITE,
        "write",
        _fork,
        _after_fork,
        doc="a device write against fork's write-protection (COW)",
    ),
    Race(
        "read_vs_dontneed",
        Capability.READ,
        "read",
        _dontneed,
        _after_dontneed,
        doc="a device read against MADV_DONTNEED",
    ),
    Race(
        "read_vs_page_migration",
        Capability.READ,
        "read",
        _move_pages,
        _data_kept,
        doc="a device read against move_pages",
    ),
    Race(
        "read_vs_reclaim",
        Capability.READ,
        "read",
        _pageout,
        _data_kept,
        doc="a device read against reclaim (MADV_PAGEOUT)",
    ),
    Race(
        "read_vs_thp_split",
        Capability.READ,
        "read",
        _split_thp,
        _data_kept,
        huge=True,
        doc="a device read of a THP against the split of its PMD",
    ),
    Race(
        "write_vs_second_device_migration",
        Capability.WRITE | Capability.MIGRATE,
        "write",
        _second_device_migrates,
        _after_write,
        # dmirror's MIGRATE_TO_DEV reads the pages back through its own page
        # table and says ENOENT when the racing write already took some back.
        cpu_tolerated=(NoEntry,),
        prepare=_probe_second_device,
        doc="a device write against a second device migrating the pages to itself",
    ),
    # The notifier races put the notifier change in the device's seat, against
    # MADV_DONTNEED.
    Race(
        "notifier_insert_vs_invalidation",
        Capability.READ,
        "read",
        _dontneed,
        _after_late_open,
        first=_open_and_read,
        first_name="notifier",
        doc="opening a mirror (notifier insert) and reading against MADV_DONTNEED",
    ),
    Race(
        "notifier_remove_vs_invalidation",
        Capability.READ,
        "read",
        _dontneed,
        _after_close,
        premap=True,
        prepare=_open_second_mirror,
        first=_close_second,
        first_name="notifier",
        doc="closing a mirror (notifier remove) against MADV_DONTNEED",
    ),
    Race(
        "read_vs_invalidation_stream",
        Capability.READ,
        "read",
        _invalidation_stream,
        _after_stream,
        (Busy,),
        doc="liveness: a device read against a stream of invalidations must end "
        "(with the data, or Busy after HMM_RANGE_DEFAULT_TIMEOUT)",
    ),
    Race(
        "read_vs_oom_reap",
        Capability.READ,
        "read",
        _oom_reap,
        _after_oom_reap,
        (HmmsimError,),
        doc="a faulting device read against the OOM reaper's non-blockable "
        "invalidation: a driver that cannot take its lock must refuse, never "
        "claim an invalidation it did not do",
    ),
    Race(
        "migrate_unpopulated_vs_cpu_store",
        Capability.MIGRATE,
        "read",
        _cpu_store_new,
        _after_cpu_store,
        first=_migrate_unpopulated,
        first_name="migrate",
        populate=False,
        doc="migration of never-populated memory against CPU stores to it",
    ),
    Race(
        "read_device_memory_vs_munmap",
        Capability.READ | Capability.MIGRATE,
        "read",
        _munmap,
        _after_munmap,
        (BadAddress,),
        prepare=_migrate_first,
        doc="a device read of pages in device memory against munmap (device pages freed)",
    ),
    Race(
        "subpage_store_vs_cpu_store",
        Capability.WRITE,
        "write",
        _subpage_cpu_store,
        _after_subpage,
        first=_subpage_device_store,
        doc="device stores of 64 bytes per page against CPU stores to the next 64 "
        "bytes of the same pages: no lost update",
    ),
    Race(
        "read_device_memory_vs_cpu_fault_back",
        Capability.READ | Capability.MIGRATE,
        "read",
        _cpu_reads_back,
        _after_fault_back,
        prepare=_migrate_first,
        doc="a device read of pages in device memory against CPU reads of them "
        "(migrate_to_ram of private memory; in place for coherent memory)",
    ),
]


#: Races explorable by name (``hmmsim explore``) but not yet in the suite:
#: each fails on an installed driver whose owner has still to fix it or
#: declare it (``Driver.expected_failures``). None at present.
PENDING_RACES: list[Race] = []


def race_by_name(name: str) -> Race:
    for race in RACES + PENDING_RACES:
        if race.name == name:
            return race
    raise KeyError(f"no race named {name!r}; known: {', '.join(r.name for r in RACES)}")


def applicable(spec: DriverSpec, race: Race, pm: Any = None) -> bool:
    caps = spec.capabilities(pm)
    return (race.needs & caps) == race.needs


def _setup(spec: DriverSpec, race: Race, pm: Any) -> RaceState:
    env = open_environment(spec, pm, small=True)
    n = NPAGES
    # The first write faults in the whole THP (or the pages); only the pages
    # the race looks at need data.
    a = env.thp_region() if race.huge else env.mmap(n * PAGE)
    if race.populate:
        env.proc.write(a, pattern(n * PAGE, OLD_SEED))
    st = RaceState(env, a, n, [env.mirror])
    if race.premap:
        env.mirror.read(a, n * PAGE)
    if race.prepare is not None:
        race.prepare(st)
    return st


def _device_actor(st: RaceState, race: Race) -> Callable[[], None]:
    def device() -> None:
        try:
            if race.access == "write":
                st.env.mirror.write(st.addr, pattern(st.npages * PAGE, NEW_SEED))
            else:
                st.device_result = st.env.mirror.read(st.addr, st.npages * PAGE)
        except race.tolerated as exc:
            st.device_error = exc

    return device


def _cpu_actor(st: RaceState, race: Race) -> Callable[[], None]:
    def cpu() -> None:
        try:
            race.cpu(st)
        except race.cpu_tolerated as exc:
            st.extra["cpu_error"] = exc

    return cpu


def race_scenario(spec: DriverSpec, race: Race, pm: Any = None) -> Scenario:
    """The scenario ``explore`` runs: fresh state, two actors, checks."""
    pm = pm or spec.plugin_manager()

    def scenario() -> ScenarioRun:
        st = _setup(spec, race, pm)
        first = race.first
        first_actor = (lambda: first(st)) if first is not None else _device_actor(st, race)
        actors = [(race.first_name, first_actor), ("cpu", _cpu_actor(st, race))]

        watches: dict[int, MirrorWatch] = {}
        pz = poisoner(st.env.machine)  # installed with the machine, once

        def check() -> None:
            # Per step, identity of pages is enough: a device entry that maps
            # the CPU's page reads the CPU's data. Contents are compared at the end.
            for m in st.mirrors:
                watch = watches.get(id(m))
                if watch is None:
                    watch = watches[id(m)] = MirrorWatch(m, st.addr, st.npages, st.env.granule)
                watch.check()
            check_notifier_contract(st.env.machine)
            check_dma_contract(st.env.machine)
            if pz is not None and pz.violations:
                raise AssertionError(f"access to freed memory: {pz.violations[0]}")

        def final(_result: object) -> None:
            race.outcome(st)
            for m in st.mirrors:
                check_mirror(m, st.addr, st.npages, granule=st.env.granule)
                if m is not st.env.mirror:
                    m.close()
            close_environment(st.env)

        return ScenarioRun(actors, check=check, final=final, state=st)

    return scenario


def explore_race(
    spec: DriverSpec,
    race: Race,
    *,
    pm: Any = None,
    bound: int = 2,
    dfs_limit: int = DFS_LIMIT,
    pct_budget: int = PCT_BUDGET,
    seed: int = 0,
    stop_at_first: bool = True,
    jobs: int = 1,
) -> ExploreResult:
    """Bounded DFS when the space fits in ``dfs_limit`` schedules, else PCT (depth 3).

    ``jobs`` worker processes share the work (see ``explore``).
    """
    scenario = race_scenario(spec, race, pm)
    result = explore(scenario, BoundedDFS(bound), dfs_limit, stop_at_first=stop_at_first, jobs=jobs)
    if result.exhausted or result.failures:
        return result
    pct = explore(
        scenario,
        PCT(seed=seed, depth=3, steps=max(result.steps // max(result.schedules, 1), 10)),
        pct_budget,
        stop_at_first=stop_at_first,
        jobs=jobs,
    )
    pct.schedules += result.schedules
    pct.steps += result.steps
    pct.seconds += result.seconds
    return pct


class RaceFailure(AssertionError):
    """A race check found a failing interleaving; what a report needs, as fields.

    ``summary`` is the one-line description; ``str()`` adds the replay command
    and the trace (what a pytest report shows).
    """

    def __init__(self, summary: str, schedule: str, replay: str, trace: str) -> None:
        super().__init__(f"{summary}; replay with: {replay}\n{trace}")
        self.summary = summary
        self.schedule = schedule
        self.replay = replay
        self.trace = trace


def race_check(race: Race) -> Callable[[DriverSpec], None]:
    """The race as a conformance check: every schedule explored must pass."""

    def check(spec: DriverSpec) -> None:
        if not applicable(spec, race):
            raise CheckSkipped(f"{spec} does not claim {race.needs.name}")
        result = explore_race(spec, race)
        if result.failures:
            f = result.failures[0]
            raise RaceFailure(
                f"{race.name}: {f.description} after {f.run + 1} schedule(s)",
                f.schedule,
                f"hmmsim explore {race.name} --driver {spec} --replay {f.schedule}",
                f.trace,
            )

    check.race = race  # type: ignore[attr-defined]  # the bug zoo explores it directly
    check.__name__ = f"check_race_{race.name}"
    check.__qualname__ = check.__name__
    check.__doc__ = f"Race: {race.doc}; every interleaving keeps the invariants."
    return check
