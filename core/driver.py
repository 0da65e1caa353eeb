"""What a driver plugin implements: ``Driver``, ``Device``, ``Mirror``.

Kernel counterpart: none directly; these are the shapes every HMM consumer
has (a driver binds devices; opening a device binds it to one process's mm,
as ``open("/dev/hmm_dmirror0")`` does; the mirror keeps a device page table
coherent with the CPU's through an interval notifier).

The conformance suite drives every driver through the generic ``Mirror``
methods; each driver builds them on its own native path (dmirror's ioctls,
nouveau's fault buffer, amdgpu's userptr BOs …), never beside it.
Optional operations a driver lacks raise ``NotSupported``.

The docstrings below are the plugin contract: what each method must do, what
it raises, and what is (and is not) guaranteed when it fails. They state what
the conformance checks (``hmmsim.testing.checks``, ``.invariants``,
``.races``) enforce; a rule a check enforces names the check. Errors are the
``hmmsim.errors`` exceptions, each an ``OSError`` with the errno the real
driver's ioctl or fault path returns. A driver that finds the *kernel* broke
a contract under it (``hmm_range_fault`` handing back an error pfn it asked
to fault) does what the real driver does: raises ``KernelBug`` where the
kernel would ``BUG()``, or records ``machine.warn(...)`` (a ``KernelWarning``)
where it would ``WARN()``; any recorded warning fails the invariant checks.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Hashable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import attrs

from .errors import BadAddress, InvalidArgument, NotSupported
from .mm.kinds import MemoryKind as MemoryKind  # re-exported: the type of DevicePte.memory
from .mm.uapi import PAGE_SIZE, TASK_SIZE

if TYPE_CHECKING:
    from .machine import Machine
    from .mm.process import Process
    from .mm.vma import Vma


class FileOperations(Protocol):
    """What ``Process.mmap(..., file=obj)`` needs of ``obj`` (``file->f_op->mmap``).

    ``mmap(vma)`` runs once the VMA exists. A page-cache file (``hmmsim.File``)
    enters the VMA in its ``i_mmap`` and lets faults read its pages in. A
    device file installs its pages itself: ``vm_insert_page`` (which makes the
    VMA ``VM_MIXEDMAP``), ``remap_pfn_range`` (``VM_IO|VM_PFNMAP``) or
    ``vmf_insert_pfn``, from ``hmmsim.mm``; or it sets ``vma.vm_ops`` to an
    object whose ``fault(vma, addr, write) -> vm_fault_t`` fills pages on
    demand. An exception from ``mmap`` undoes the mapping.
    """

    def mmap(self, vma: Vma) -> None:
        """``file->f_op->mmap``: called once the VMA exists, ``mmap_lock`` held for write.

        Args:
            vma: the new mapping (``vma.start``, ``vma.end``, ``vma.flags``).

        Raises:
            HmmsimError: any errno error refuses the mapping; ``mmap`` undoes
                it and the caller of ``Process.mmap`` sees the error.
        """
        ...


class Capability(enum.Flag):
    """What a driver claims; the conformance suite tests exactly that."""

    NONE = 0
    #: Keeps a device page table that mirrors a process address space.
    MIRROR = enum.auto()
    #: Device loads through the mirror.
    READ = enum.auto()
    #: Device stores through the mirror (write faults, COW breaking).
    WRITE = enum.auto()
    #: Maps more than 4 KiB at once where the CPU does.
    HUGE_MAPPINGS = enum.auto()
    #: Has unaddressable device-private memory.
    DEVICE_PRIVATE = enum.auto()
    #: Has CPU-coherent device memory.
    DEVICE_COHERENT = enum.auto()
    #: Migrates pages into its memory and back.
    MIGRATE = enum.auto()
    #: Takes device-exclusive (atomic) access with make_device_exclusive.
    EXCLUSIVE = enum.auto()
    #: Exposes or uses PCI peer-to-peer memory.
    P2P = enum.auto()
    #: Refuses memory that is not huge (ODP hugetlb MRs).
    HUGE_ONLY = enum.auto()


@attrs.frozen
class DevicePte:
    """What the device page table holds for one 4 KiB slot, seen through the backdoor.

    ``Mirror.device_ptes`` returns one per 4 KiB slot, whatever size the device
    entry covering the slot has: a 2 MiB entry shows as 512 ``DevicePte``, each
    with its own subpage's ``addr`` and ``pfn`` and the entry's ``order`` 9.
    """

    #: The slot's virtual address (page aligned).
    addr: int
    #: The pfn of *this slot's* 4 KiB page (for a huge entry: its head pfn plus
    #: the slot's index in it), so it compares directly with the CPU's pfn.
    pfn: int
    #: The device may store through the entry.
    writable: bool
    #: The device may do atomics through it (a device-exclusive mapping).
    atomic: bool
    #: The order of the device entry covering the slot: 0 for 4 KiB, 9 for 2 MiB.
    order: int
    #: What the entry points at: ``SYSTEM``, ``DEVICE_PRIVATE``,
    #: ``DEVICE_COHERENT`` or ``P2P``; a plain string naming one is converted.
    memory: MemoryKind = attrs.field(converter=MemoryKind)


@attrs.define
class MirrorStats:
    """Counters a mirror keeps of its own work, each in one unit for every driver.

    The units are fixed so that figures compare across drivers (the driver
    benchmarks record them) and a test can assert exact values. A driver
    counts on its native path, where the event happens; a count is never
    derived afterwards from another counter. Pages are always 4 KiB pages.
    """

    #: Device fault events as the hardware reports them: one per fault the
    #: device raises and the driver is told about (nouveau: one per entry
    #: written to the fault buffer; dmirror: one per stop of a READ/WRITE
    #: command at a page it cannot access, the kernel's ``cmd.faults``), never
    #: one per page the servicing then maps.
    faults: int = 0
    #: ``hmm_range_fault`` calls made to service device faults and accesses:
    #: every call counts, including one that returned ``Busy`` and one whose
    #: result ``mmu_interval_read_retry`` threw away. Snapshots that fault
    #: nothing in (dmirror's SNAPSHOT) do not count.
    fault_rounds: int = 0
    #: Times the driver threw away what it read of the CPU page table and
    #: started again: ``hmm_range_fault`` returned ``Busy``, or
    #: ``mmu_interval_read_retry`` said an invalidation ran (after
    #: ``hmm_range_fault`` or after ``make_device_exclusive``).
    retries: int = 0
    #: Invalidation callbacks of the mirror's long-lived notifier (its
    #: interval notifier, or nouveau's classic ``mmu_notifier``) that it acted
    #: on: took its lock, cleared the range (even if nothing was mapped
    #: there). Not the ones it refused (non-blockable, lock busy), not its own
    #: migrations it skipped, not those of short-lived per-fault notifiers.
    invalidations: int = 0
    #: Device page-table entries written, in 4 KiB pages they cover (a 2 MiB
    #: entry counts 512; rewriting a live entry counts again): by faults,
    #: migrations to the device and exclusive access alike.
    pages_mapped: int = 0
    #: Device page-table entries removed, in 4 KiB pages they covered: by
    #: invalidations, migrations back and ``close`` alike.
    pages_unmapped: int = 0
    #: DMA mappings the driver created for device access to memory
    #: (``dma_map_page``, an IOVA link, ``hmm_dma_map_pfn``): one per call,
    #: whatever its size. A CPU-side device (dmirror) makes none.
    dma_maps: int = 0
    #: ``migrate_vma_setup`` … ``migrate_vma_finalize`` sequences run to move
    #: pages into device memory that collected at least one page (``cpages``
    #: > 0): one per window, not per page.
    migrations_to_device: int = 0
    #: The same sequences moving pages back to system memory, whether asked
    #: (``migrate_to_system``) or from a CPU fault (``migrate_to_ram``).
    migrations_to_system: int = 0


def check_user_range(addr: int, length: int, what: str) -> None:
    """Check a range a ``Mirror`` method was handed, as an ioctl checks its arguments.

    A driver's generic methods call this first, so bad input is a typed error
    and never a ``MemoryError`` or a NumPy exception from deep inside.

    Args:
        addr: the first byte.
        length: the number of bytes (``npages * PAGE_SIZE`` for page counts).
        what: the method's name, for the message.

    Raises:
        InvalidArgument: ``addr`` or ``length`` is negative or not an int.
        BadAddress: the range passes ``TASK_SIZE`` (``access_ok`` fails).
    """
    for name, value in (("address", addr), ("length", length)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidArgument(f"{what}: {name} {value!r} is not a non-negative int")
    if addr + length > TASK_SIZE:
        raise BadAddress(f"{what}: [{addr:#x}, +{length:#x}) passes TASK_SIZE")


def check_user_pages(addr: int, npages: int, what: str) -> None:
    """``check_user_range`` for a page count; ``addr`` must be page aligned.

    Args:
        addr: the first page's address.
        npages: the number of 4 KiB pages.
        what: the method's name, for the message.

    Raises:
        InvalidArgument: a negative count or address, or an unaligned address.
        BadAddress: the range passes ``TASK_SIZE``.
    """
    if not isinstance(npages, int) or isinstance(npages, bool) or npages < 0:
        raise InvalidArgument(f"{what}: page count {npages!r} is not a non-negative int")
    check_user_range(addr, npages * PAGE_SIZE, what)
    if addr % PAGE_SIZE:
        raise InvalidArgument(f"{what}: address {addr:#x} is not page aligned")


@attrs.frozen
class Mutant:
    """A deliberately broken copy of a driver, for the bug zoo.

    The mutant is the driver package's own source with ``edits`` applied to
    one ``module`` (each old text must occur exactly once), so it can never
    drift from the driver it mutates. A driver package lists its mutants in
    its ``mutants.py`` as ``MUTANTS``; ``hmmsim.testing.bugzoo`` builds and runs
    them, and the suite must catch every one.
    """

    #: The mutant driver's name (it is probed and reported under it).
    name: str
    #: The driver class to build, as "package.module:Class".
    driver: str
    #: The module of that driver's package the edits apply to.
    module: str
    edits: tuple[tuple[str, str], ...]
    #: The kernel rule it breaks, and the real driver bug it stands for.
    rule: str
    #: The part of a driver it breaks, for the zoo's kill rate per area:
    #: fault, invalidation, permissions, huge, migration, exclusive, teardown, dma.
    area: str = ""
    #: Why the conformance suite does not catch it yet (a known gap): the zoo
    #: then expects a miss, and reports the mutant once a check catches it.
    suite_gap: str = ""
    #: The probe parameters the zoo runs the suite with, one dict per variant
    #: (a bug of coherent memory only needs ``{"memory": "coherent"}``);
    #: empty: every variant the driver declares (``Driver.variants``).
    variants: tuple[dict[str, str], ...] = attrs.field(default=(), converter=tuple, hash=False)


class Mirror(abc.ABC):
    """A device's view of one process's address space.

    Every method takes and releases the locks it needs; callers hold none.
    Errors are the hmmsim exceptions and their types are part of the contract
    (the checks name them). What a failed call leaves behind is stated per
    method; in short: a failed ``read`` returns nothing, a failed ``write``
    never leaves a 4 KiB page torn, and a failed migration leaves each page
    whole in one place or the other. Any failure may leave pages faulted in
    on the CPU side and entries in the device page table: those are
    coherent (the invariants hold after every call, failed or not), and a
    device access through them is correct.

    Invariants the checks verify after every call and, in the race checks,
    after every scheduling step (``hmmsim.testing.invariants.check_mirror``):

    1. every device entry maps the page the CPU maps at that address, or the
       device's own private page behind a device-private entry, or the page
       behind a device-exclusive entry (then with ``atomic`` set);
    2. a device-writable entry is CPU-writable;
    3. a device entry's order is at most the CPU mapping's order there;
    4. the data the device reads is the data the CPU would read.

    Attributes:
        process: the process whose mm the mirror was opened on.
        stats: the mirror's counters (``MirrorStats``, units fixed there).
        device: optional, but a mirror that has it gets a stricter check: a
            device-private page it maps must belong to a ``DevPagemap`` whose
            ``owner`` is this object (invariant 1).
    """

    process: Process
    stats: MirrorStats

    @abc.abstractmethod
    def read(self, addr: int, length: int) -> bytes:
        """Device load of ``length`` bytes at ``addr``, faulting through the driver.

        The load goes through the device page table; a page the device does
        not map (or maps from a stale snapshot) is faulted in through the
        driver's own fault path (``hmm_range_fault`` under the
        ``read_begin``/``read_retry`` protocol), never read around it.

        Args:
            addr: the first byte; any alignment.
            length: bytes to load; 0 returns ``b""`` without touching anything.

        Returns:
            Exactly ``length`` bytes: what a CPU load of the same range would
            return at that moment, including zeroes for never-written
            anonymous pages (``coherence/read_anonymous``), file contents
            through a file mapping (``coherence/file_backed``), and the data
            of pages swapped out, migrated, split or in device memory
            (``invalidation/*``). A read racing a CPU change returns, page by
            page, the data before or after it (``races/read_vs_*``).

        Raises:
            BadAddress: a page of the range has no VMA, or one the device may
                not read (``PROT_NONE``, no ``VM_READ``): ``permissions/
                permission_errors``, ``invalidation/invalidate_on_munmap``;
                also the range passes ``TASK_SIZE``, or the mm is gone.
            InvalidArgument: ``addr`` or ``length`` is negative or not an int
                (``check_user_range``).
            Busy: the fault did not complete within
                ``HMM_RANGE_DEFAULT_TIMEOUT`` of virtual time.

        On failure nothing is returned; the pages before the failing one may
        have been faulted in (on the CPU and in the device page table), as
        the real fault path leaves them. Never raises on a hole that a CPU
        load would read as zeroes.

        Not guaranteed: ``BadAddress`` for a ``PROT_NONE`` page the device
        already maps. A driver that maps pages when it migrates them (nouveau's
        ``SVM_BIND``, which checks no VMA permission) lets the device read
        them without a fault, as the real driver does.
        """

    @abc.abstractmethod
    def write(self, addr: int, data: bytes) -> None:
        """Device store of ``data`` at ``addr``, write-faulting through the driver.

        Stores exactly ``data``: the other bytes of the pages it touches are
        never rewritten (a read-modify-write of whole pages would lose a
        concurrent CPU store). The store write-faults each page first, which
        breaks copy-on-write in the mirror's own process only
        (``invalidation/invalidate_on_fork``,
        ``invalidation/device_write_in_fork_child``), and dirties the pages,
        so the data survives reclaim (``invalidation/invalidate_on_swap_out``)
        and reaches a shared file (``coherence/file_backed``).

        Args:
            addr: the first byte; any alignment.
            data: the bytes to store; empty stores nothing.

        Raises:
            NotPermitted: a page of the range is mapped without write
                permission (``PROT_READ``): ``permissions/permission_errors``.
            BadAddress: a page has no VMA or is ``PROT_NONE``; the range
                passes ``TASK_SIZE``; the mm is gone.
            InvalidArgument: ``addr`` is negative or not an int.
            Busy: the fault did not complete within
                ``HMM_RANGE_DEFAULT_TIMEOUT``.

        On failure: a write refused before any page could be stored stores
        nothing (``permissions/permission_errors`` reads the old data back);
        a write that fails because a CPU change raced it leaves every 4 KiB
        page holding either its old or its new contents, never a mix
        (``races/write_vs_mprotect``). dmirror stores nothing unless every
        page is mapped writable under its lock; nouveau write-faults every
        page before storing any, so only a change racing its stores can leave
        some pages stored. On success the CPU sees every byte
        (``coherence/write_anonymous``).
        """

    @abc.abstractmethod
    def device_ptes(self, addr: int, npages: int) -> list[DevicePte | None]:
        """The device page table for ``npages`` 4 KiB slots from ``addr``.

        A debug read of device state, like reading the device's page table
        over a debug port: it must not take the driver's locks or sleep,
        because the invariant checks call it between the steps of a scheduled
        run, while an actor may hold those locks. It changes nothing.

        Args:
            addr: the first slot's address; an unaligned address means the
                slot it falls in (slot addresses in the result are always
                page aligned).
            npages: the number of 4 KiB slots.

        Returns:
            A list of exactly ``npages`` items, item ``i`` for the slot at
            ``addr + i * PAGE_SIZE``: None where no valid device entry
            translates the slot, else a ``DevicePte`` with ``addr`` that
            slot's address, ``pfn`` that slot's own 4 KiB page (for a 2 MiB
            entry, the entry's first pfn plus ``i`` modulo 512), and
            ``order`` the order of the device entry covering the slot. The
            invariants compare it slot by slot with the CPU page table. After
            ``close`` or the process's exit every item is None
            (``teardown/*``), and it may be called then. Shape, slot
            addresses and errors: ``introspection/device_ptes_slots``.

        Raises:
            InvalidArgument: a negative count or address, or one that is not
                an int (``check_user_pages`` of the rounded-down address).
            BadAddress: the range passes ``TASK_SIZE``.
        """

    def device_pte_state(self, addr: int, npages: int) -> Hashable | None:
        """A fingerprint of ``device_ptes(addr, npages)``, or None if it maps nothing there.

        Equal fingerprints must mean equal entries: the invariant watch that
        runs after every step of an exploration re-verifies a range only when
        its fingerprint (or the CPU's entries) changed. The same rules as
        ``device_ptes`` apply: no locks, no sleeping. This default builds the
        entries; a driver that can read its page table more cheaply overrides it.

        Args:
            addr: as for ``device_ptes``.
            npages: as for ``device_ptes``.

        Returns:
            None exactly when every slot of the range is unmapped on the
            device; else a hashable value that changes whenever any item
            ``device_ptes`` would return changes
            (``introspection/device_pte_state_fingerprint``).
        """
        ptes = self.device_ptes(addr, npages)
        return tuple(ptes) if any(p is not None for p in ptes) else None

    @abc.abstractmethod
    def close(self) -> None:
        """Unbind from the mm: drop every mapping and device page this mirror holds.

        ``release()`` of the device file. Afterwards ``device_ptes`` shows
        nothing, the mirror's interval notifier is removed, every page it had
        in device memory is back in system memory with its data
        (``teardown/close_drops_everything``), and no page reference, pin,
        DMA mapping or device page it took is left (the leak checks at the
        end of every check). It works, and leaks nothing, after the process
        has exited (``teardown/exit_with_mirror_open``). A second ``close``
        does nothing. Afterwards every method but ``device_ptes`` and ``close``
        raises ``BadAddress`` (EFAULT, as an ioctl on a released file) and does
        nothing.

        Raises:
            Nothing the caller can act on: it must not fail. (An exception
            here is reported as a failed check.)
        """

    def migrate_to_device(self, addr: int, npages: int) -> int:
        """Move the pages into device memory (``migrate_vma_setup`` … ``finalize``).

        Needs ``Capability.MIGRATE``. The driver selects system pages
        (``MIGRATE_VMA_SELECT_SYSTEM``), copies them into its own memory and
        maps them on the device; the CPU then sees device-private (or
        device-coherent) entries in ``pagemap``
        (``device-memory/migration_round_trip``), and a CPU touch of a
        device-private page brings it back through ``migrate_to_ram``
        (``device-memory/cpu_fault_on_device_memory``).

        Args:
            addr: the first page, page aligned.
            npages: pages to move.

        Returns:
            How many of the pages live in this device's memory afterwards
            (all of them for an ordinary anonymous range).

        Raises:
            NotSupported: the driver has no device memory (this default).
            InvalidArgument: a bad range (``check_user_pages``), or the mm is
                gone; dmirror also for a part not covered by a readable VMA
                (nouveau's ``SVM_BIND`` skips what no VMA covers, and moves
                what a VMA covers whatever its protection).
            BadAddress: the range passes ``TASK_SIZE``.
            NoEntry: the driver's own read-back found pages not in its page
                table (dmirror's ``MIGRATE_TO_DEV``, when a racing CPU access
                took some back).
            OutOfMemory: no device memory (drivers that do not just leave
                the pages where they are).

        On failure, and for pages that cannot move (pinned, under writeback,
        no device memory left), pages stay in system memory; pages already
        moved stay moved (migration works window by window and is not rolled
        back, as in Linux). No page is ever lost or torn: each page's data is
        in exactly one place.
        """
        raise NotSupported(f"{type(self).__name__} has no device memory")

    def migrate_to_system(self, addr: int, npages: int) -> int:
        """Move this device's pages in the range back to system memory.

        Needs ``Capability.MIGRATE``. Afterwards ``pagemap`` shows ordinary
        anonymous pages with the data intact
        (``device-memory/migration_round_trip``).

        Args:
            addr: the first page, page aligned.
            npages: pages to consider; pages not in this device's memory are
                left alone.

        Returns:
            How many pages moved.

        Raises:
            NotSupported: the driver has no device memory (this default).
            InvalidArgument: a bad range, or the mm is gone; dmirror also for
                a part not covered by a readable VMA.
            BadAddress: the range passes ``TASK_SIZE``.
            SegmentationFault: (nouveau, which moves pages back by CPU
                touches) a page of the range is not readable by the CPU.
            OutOfMemory: no system memory for some page; those stay in device
                memory, the others moved.

        On failure pages already moved stay moved and the rest stay on the
        device, each whole and reachable (a CPU touch still migrates it).
        """
        raise NotSupported(f"{type(self).__name__} has no device memory")

    def make_exclusive(self, addr: int, npages: int) -> None:
        """Take device-exclusive (atomic) access to the pages (``make_device_exclusive``).

        Needs ``Capability.EXCLUSIVE``. Afterwards ``pagemap`` shows
        ``device_exclusive`` entries and the device maps the pages with
        ``atomic`` set; a CPU access takes a page back (an ``EXCLUSIVE``
        invalidation the mirror must honour), and a device read then sees the
        CPU's data (``exclusive/exclusive_access``).

        Args:
            addr: the first page, page aligned.
            npages: pages to take.

        Raises:
            NotSupported: the driver has no exclusive access (this default);
                or a page is not an ordinary anonymous page (file, hugetlb):
                ``make_device_exclusive``'s -EOPNOTSUPP, passed through.
            BadAddress: a page ``get_user_pages`` cannot fault in for writing
                (no VMA, read-only); the range passes ``TASK_SIZE``.
            InvalidArgument: a bad range (``check_user_pages``), or the mm is
                gone. A driver whose real ioctl maps every
                ``make_device_exclusive`` error to -EINVAL (nouveau) raises
                this instead of the two above.
            NoEntry: (dmirror) a page lost its entry before the read-back.
            Busy: the retry loop did not complete within its timeout.

        On failure the pages taken before the failing one stay exclusive;
        each page is either exclusive and atomically mapped or untouched.
        """
        raise NotSupported(f"{type(self).__name__} has no exclusive access")


class Device(abc.ABC):
    """One probed device of a driver, on one machine.

    Two probes of one driver on one machine are two independent devices:
    different ``owner_id``, separate device memory, and each migrates only
    its own pages (``races/write_vs_second_device_migration``).
    """

    driver: Driver
    machine: Machine

    def __init__(self, driver: Driver, machine: Machine) -> None:
        self.driver = driver
        self.machine = machine
        #: The cookie the device uses as ``pgmap->owner`` and range owner.
        self.owner_id = machine.new_device_id()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(#{self.owner_id})"

    @abc.abstractmethod
    def open(self, process: Process) -> Mirror:
        """Bind the device to ``process``'s address space (``open()`` of the device file).

        The mirror inserts its interval notifier here, so it sees every
        invalidation from the moment ``open`` returns; a read racing the
        insert sees data from before or after a concurrent change, never a
        stale mapping (``races/notifier_insert_vs_invalidation``). A device
        may be opened any number of times, on one process (each open an
        independent mirror, ``races/notifier_remove_vs_invalidation``) or on
        several (a fork child, ``invalidation/device_write_in_fork_child``).

        Args:
            process: a live process of the device's machine.

        Returns:
            A new ``Mirror`` with ``process`` and a zeroed ``stats``.

        Raises:
            NotSupported: the device cannot mirror an address space (a GPU
                generation without SVM).
        """

    @abc.abstractmethod
    def remove(self) -> None:
        """Unbind the device from the machine (driver unload).

        Closes every mirror still open (as ``Mirror.close``), gives every
        page in device memory back to system memory with its data, releases
        the device memory, and tears down the device's DMA state, whose leak
        report then fails the checks. Afterwards the device is not used again.

        Raises:
            Nothing: like ``close``, it must not fail.
        """


@attrs.frozen
class Parameter:
    """A probe parameter a driver declares: what it means and the values it takes.

    ``choices`` empty means any string; ``default`` is what ``probe`` uses when
    the parameter is not given (None: no default, or not meaningful to show).
    """

    description: str
    choices: tuple[str, ...] = ()
    default: str | None = None


class Driver(abc.ABC):
    """A driver plugin: a name, what it can do, and how to probe a device."""

    name: ClassVar[str]
    capabilities: ClassVar[Capability] = Capability.NONE
    #: Probe parameters the driver accepts: a ``Parameter`` each, or (older
    #: plugins) a one-line description.
    parameters: ClassVar[Mapping[str, Parameter | str]] = {}
    #: The probe-parameter sets tested when none is named (default: one, no params).
    variants: ClassVar[list[dict[str, str]]] = [{}]
    #: The bytes the device maps and unmaps as one unit (a power of two, at
    #: least a page): where the CPU maps a whole aligned granule, the device
    #: maps all of it or none of it. The suite checks device mappings against it.
    mapping_granule: ClassVar[int] = PAGE_SIZE

    @classmethod
    def parameter(cls, key: str) -> Parameter:
        """The declaration of parameter ``key`` (a bare description becomes a ``Parameter``).

        Args:
            key: a name in ``parameters``.

        Returns:
            Its ``Parameter``.

        Raises:
            KeyError: ``key`` is not a declared parameter.
        """
        p = cls.parameters[key]
        return p if isinstance(p, Parameter) else Parameter(str(p))

    @classmethod
    def check_parameters(cls, params: Mapping[str, object]) -> None:
        """Refuse unknown parameters and values outside a parameter's ``choices``.

        Args:
            params: the probe parameters as given (``key=value`` strings from
                the command line, or any values from ``Machine.probe``).

        Raises:
            InvalidArgument: naming the unknown parameter or the refused value
                and what the driver accepts.
        """
        from .errors import InvalidArgument

        unknown = sorted(set(params) - set(cls.parameters))
        if unknown:
            known = ", ".join(sorted(cls.parameters)) or "none"
            raise InvalidArgument(
                f"driver {cls.name!r} has no parameter {unknown[0]!r} (parameters: {known})"
            )
        for key, value in params.items():
            p = cls.parameter(key)
            if p.choices and str(value) not in p.choices:
                raise InvalidArgument(
                    f"driver {cls.name!r}: {key}={value} is not one of {', '.join(p.choices)}"
                )

    def capabilities_for(self, **params: Any) -> Capability:
        """Capabilities of a device probed with ``params`` (default: the class's).

        The suite runs exactly the checks these claim: a claimed capability
        that does not work fails, an unclaimed one is skipped with a reason.

        Args:
            **params: the probe parameters, as for ``probe``.

        Returns:
            The capabilities such a device has (``memory=coherent`` may have
            ``DEVICE_COHERENT`` where the default has ``DEVICE_PRIVATE``).
        """
        return self.capabilities

    def expected_failures(self, **params: Any) -> dict[str, str]:
        """Conformance checks a device probed with ``params`` is known to fail.

        Maps a check id (``area/name``, as ``hmmsim check`` prints it, e.g.
        ``teardown/exit_with_mirror_open``) to the reason: the real driver's bug
        or quirk the model keeps on purpose, and the commit that fixed it (or
        "not fixed"). The suite reports such a failure as expected, and a
        declared check that passes as a failure (strict). Default: none.

        Args:
            **params: the probe parameters, as for ``probe`` (an era that
                keeps a historic bug declares it; the fixed era does not).

        Returns:
            Check id → reason; empty when the device should pass everything.
        """
        return {}

    @abc.abstractmethod
    def probe(self, machine: Machine, **params: Any) -> Device:
        """Create a device on ``machine`` (the driver's PCI probe, in short).

        Called by ``Machine.probe`` on a fresh ``Driver`` instance, which then
        fires ``hmmsim_driver_probed`` and appends the device to
        ``machine.devices``. The device adds its memory
        (``memremap_pages``) and any PCI function here.

        Args:
            machine: the machine the device lives on.
            **params: the probe parameters (``memory="coherent"``), values as
                given: strings from a driver spec, or any type from code.

        Returns:
            A new, independent ``Device``.

        Raises:
            InvalidArgument: an unknown parameter or a value the driver
                refuses. ``hmmsim check`` probes once up front and reports
                exactly this as a usage error; anything else ``probe`` raises
                is reported as the driver's failure, check by check.
            OutOfMemory: the machine has no room for the device's memory.
        """
