"""What a driver plugin implements: ``Driver``, ``Device``, ``Mirror``.

Kernel counterpart: none directly; these are the shapes every HMM consumer
has (a driver binds devices; opening a device binds it to one process's mm,
as ``open("/dev/hmm_dmirror0")`` does; the mirror keeps a device page table
coherent with the CPU's through an interval notifier).

The conformance suite drives every driver through the generic ``Mirror``
methods; each driver builds them on its own native path (dmirror's ioctls,
nouveau's fault buffer, amdgpu's userptr BOs …), never beside it.
Optional operations a driver lacks raise ``NotSupported``.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Hashable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import attrs

from .errors import BadAddress, InvalidArgument, NotSupported
from .mm.uapi import PAGE_SIZE, TASK_SIZE

if TYPE_CHECKING:
    from .machine import Machine
    from .mm.process import Process
    from .mm.vma import Vma

MemoryKind = Literal["system", "device_private", "device_coherent", "p2p"]


class FileOperations(Protocol):
    """What ``Process.mmap(..., file=obj)`` needs of ``obj`` (``file->f_op->mmap``).

    ``mmap(vma)`` runs once the VMA exists. A page-cache file (``hmmsim.File``)
    enters the VMA in its ``i_mmap`` and lets faults read its pages in. A
    device file installs its pages itself: ``vm_insert_page`` (which makes the
    VMA ``VM_MIXEDMAP``), ``remap_pfn_range`` (``VM_IO|VM_PFNMAP``) or
    ``vmf_insert_pfn``, from ``hmmsim.mm.pfnmap``; or it sets ``vma.vm_ops`` to an
    object whose ``fault(vma, addr, write) -> vm_fault_t`` fills pages on
    demand. An exception from ``mmap`` undoes the mapping.
    """

    def mmap(self, vma: Vma) -> None: ...


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
    """One entry of a device page table, seen through the test backdoor."""

    addr: int
    pfn: int
    writable: bool
    atomic: bool
    order: int
    memory: MemoryKind


@attrs.define
class MirrorStats:
    """Counters a mirror keeps of its own work."""

    faults: int = 0
    fault_rounds: int = 0
    retries: int = 0
    invalidations: int = 0
    pages_mapped: int = 0
    pages_unmapped: int = 0
    dma_maps: int = 0
    migrations_to_device: int = 0
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


class Mirror(abc.ABC):
    """A device's view of one process's address space.

    Every method takes and releases the locks it needs; callers hold none.
    Errors are the hmmsim exceptions (``BadAddress`` for a range the device
    may not access, ``NotPermitted`` for a write to read-only memory, …) and
    leave nothing half-done: a failed ``read`` returns nothing, a failed
    ``write`` stores nothing through the device.
    """

    process: Process
    stats: MirrorStats

    @abc.abstractmethod
    def read(self, addr: int, length: int) -> bytes:
        """Device load of ``length`` bytes at ``addr``, faulting through the driver."""

    @abc.abstractmethod
    def write(self, addr: int, data: bytes) -> None:
        """Device store of ``data`` at ``addr``, write-faulting through the driver."""

    @abc.abstractmethod
    def device_ptes(self, addr: int, npages: int) -> list[DevicePte | None]:
        """The device page table for ``npages`` pages from ``addr`` (None: no entry).

        A debug read of device state, like reading the device's page table over
        a debug port: it must not take the driver's locks or sleep, because the
        invariant checks call it between the steps of a scheduled run, while
        an actor may hold those locks.
        """

    def device_pte_state(self, addr: int, npages: int) -> Hashable | None:
        """A fingerprint of ``device_ptes(addr, npages)``, or None if it maps nothing there.

        Equal fingerprints must mean equal entries: the invariant watch that
        runs after every step of an exploration re-verifies a range only when
        its fingerprint (or the CPU's entries) changed. The same rules as
        ``device_ptes`` apply: no locks, no sleeping. This default builds the
        entries; a driver that can read its page table more cheaply overrides it.
        """
        ptes = self.device_ptes(addr, npages)
        return tuple(ptes) if any(p is not None for p in ptes) else None

    @abc.abstractmethod
    def close(self) -> None:
        """Unbind from the mm: drop every mapping and device page this mirror holds."""

    def migrate_to_device(self, addr: int, npages: int) -> int:
        """Move the pages into device memory; returns how many now live there."""
        raise NotSupported(f"{type(self).__name__} has no device memory")

    def migrate_to_system(self, addr: int, npages: int) -> int:
        """Move this device's pages back to system memory; returns how many moved."""
        raise NotSupported(f"{type(self).__name__} has no device memory")

    def make_exclusive(self, addr: int, npages: int) -> None:
        """Take device-exclusive (atomic) access to the pages."""
        raise NotSupported(f"{type(self).__name__} has no exclusive access")


class Device(abc.ABC):
    """One probed device of a driver, on one machine."""

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
        """Bind the device to ``process``'s address space."""

    @abc.abstractmethod
    def remove(self) -> None:
        """Unbind the device from the machine (give back all device memory)."""


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

    @classmethod
    def parameter(cls, key: str) -> Parameter:
        """The declaration of parameter ``key`` (a bare description becomes a ``Parameter``)."""
        p = cls.parameters[key]
        return p if isinstance(p, Parameter) else Parameter(str(p))

    @classmethod
    def check_parameters(cls, params: Mapping[str, object]) -> None:
        """Refuse unknown parameters and values outside a parameter's ``choices``.

        Raises ``InvalidArgument`` naming the parameter and what it accepts.
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
        """Capabilities of a device probed with ``params`` (default: the class's)."""
        return self.capabilities

    def expected_failures(self, **params: Any) -> dict[str, str]:
        """Conformance checks a device probed with ``params`` is known to fail.

        Maps a check id (``area/name``, as ``hmmsim check`` prints it, e.g.
        ``teardown/exit_with_mirror_open``) to the reason: the real driver's bug
        or quirk the model keeps on purpose, and the commit that fixed it (or
        "not fixed"). The suite reports such a failure as expected, and a
        declared check that passes as a failure (strict). Default: none.
        """
        return {}

    @abc.abstractmethod
    def probe(self, machine: Machine, **params: Any) -> Device:
        """Create a device on ``machine``; raise ``InvalidArgument`` for bad params."""
