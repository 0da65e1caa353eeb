"""The whole simulated box: ``MachineConfig`` and ``Machine``.

Kernel counterpart: none as such; the machine owns what the kernel keeps
globally: physical memory, hugetlb pools, the swap device, the virtual clock,
the registry of page-cache/anon mappings, and the processes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import attrs

from .errors import InvalidArgument, KernelWarning
from .mm.file import File
from .mm.hugetlb import HugetlbPool
from .mm.pagetable import PAGE_SIZE, PMD_ORDER, PUD_ORDER
from .mm.physmem import PhysMem
from .mm.swap import SwapDevice
from .mm.uapi import MMAP_MIN_ADDR
from .sched import WaitQueue
from .trace import Clock, Costs, Trace

if TYPE_CHECKING:
    from .mm.process import Process
    from .notifier import NotifierRange

ThpMode = Literal["always", "madvise", "never"]

HUGE_2MB = 2 << 20
HUGE_1GB = 1 << 30
_HUGE_ORDERS = {HUGE_2MB: PMD_ORDER, HUGE_1GB: PUD_ORDER}


def _check_thp(_inst: object, _attr: object, value: str) -> None:
    if value not in ("always", "madvise", "never"):
        raise InvalidArgument(f"thp must be always, madvise or never, not {value!r}")


def _check_hugetlb(_inst: object, _attr: object, value: dict[int, int]) -> None:
    if not isinstance(value, dict):
        raise InvalidArgument(f"hugetlb_pages must be a dict, not {type(value).__name__}")
    for size, count in value.items():
        if not isinstance(count, int) or isinstance(count, bool):
            raise InvalidArgument(f"hugetlb page count {count!r} is not an int")
        if size not in _HUGE_ORDERS:
            raise InvalidArgument(f"hugetlb page size {size:#x} is not 2 MiB or 1 GiB")
        if count < 0:
            raise InvalidArgument("negative hugetlb page count")


#: The smallest machine: eight 2 MiB blocks, so THP and hugetlb tests fit.
MIN_RAM_BYTES = 16 << 20


def _check_bytes(minimum: int) -> Callable[[object, Any, object], None]:
    def check(_inst: object, attr: Any, value: object) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidArgument(f"{attr.name} must be an int, not {type(value).__name__}")
        if value < minimum:
            raise InvalidArgument(f"{attr.name} {value:#x} is below the minimum {minimum:#x}")
        if value % PAGE_SIZE:
            raise InvalidArgument(f"{attr.name} {value:#x} is not a multiple of the page size")

    return check


def _check_bool(_inst: object, attr: Any, value: object) -> None:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{attr.name} must be a bool, not {type(value).__name__}")


@attrs.frozen
class MachineConfig:
    """What the simulated machine looks like. Every field has a default.

    Every field is checked when the config is built: a wrong type, a size below
    the minimum (``ram_bytes`` at least 16 MiB, ``swap_bytes`` at least 0) or
    not a multiple of 4 KiB, an unknown THP mode or hugetlb page size raises
    ``InvalidArgument``.
    """

    ram_bytes: int = attrs.field(default=1 << 30, validator=_check_bytes(MIN_RAM_BYTES))
    swap_bytes: int = attrs.field(default=0, validator=_check_bytes(0))
    thp: ThpMode = attrs.field(default="madvise", validator=_check_thp)
    hugetlb_pages: dict[int, int] = attrs.field(factory=dict, validator=_check_hugetlb)
    store_data: bool = attrs.field(default=True, validator=_check_bool)
    #: ``transparent_hugepage/use_zero_page``: read faults map the huge zero page.
    thp_use_zero_page: bool = attrs.field(default=True, validator=_check_bool)
    #: ``vm.mmap_min_addr``: the lowest address mmap and mremap may map.
    #: 65536 as most distributions set it (the kernel's x86 default is 4096).
    mmap_min_addr: int = attrs.field(default=MMAP_MIN_ADDR, validator=_check_bytes(0))


@attrs.define(eq=False, repr=False)
class Machine:
    """Physical memory, swap, hugetlb pools, virtual time, and the processes."""

    config: MachineConfig = attrs.field(factory=MachineConfig)
    trace: Trace = attrs.field(factory=Trace)
    phys: PhysMem = attrs.field(init=False)
    hugetlb: dict[int, HugetlbPool] = attrs.field(init=False)
    swap: SwapDevice = attrs.field(init=False)
    mappings: dict[int, Any] = attrs.field(factory=dict)
    processes: list[Process] = attrs.field(factory=list)
    files: list[File] = attrs.field(factory=list)
    #: Called with every ``NotifierRange`` at invalidate_range_start (tests, tracing).
    invalidation_listeners: list[Callable[[NotifierRange], None]] = attrs.field(factory=list)
    #: Every broken kernel contract the kernel would WARN about, in order
    #: (``Machine.warn``); the invariant checks require it to stay empty.
    kernel_warnings: list[KernelWarning] = attrs.field(factory=list)
    #: DMA-API debugging state (``hmmsim.dma.DmaDebug``), made on first DMA use.
    dma_debug: Any = None
    #: The PCI topology (``hmmsim.pci.PciTopology``), made on first use.
    pci: Any = None
    #: Sleepers on migration entries (``migration_entry_wait``).
    migration_wq: WaitQueue = attrs.field(factory=lambda: WaitQueue("migration"))
    #: Where ``reclaim`` resumes its scan of physical memory.
    reclaim_cursor: int = 0
    #: Devices probed on this machine.
    devices: list[Any] = attrs.field(factory=list)
    #: The plugin manager ``probe`` uses (built on first use; replaceable).
    plugin_manager: Any = None
    _ids: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1))
    _pids: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1))
    #: Names of mms and devices count per machine, so a replayed run is
    #: named (and traced) exactly like the original.
    _mm_ids: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1))
    _device_ids: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1))

    def __attrs_post_init__(self) -> None:
        cfg = self.config
        self.phys = PhysMem(cfg.ram_bytes, cfg.store_data, self.trace.costs)
        self.hugetlb = {}
        # 1 GiB pages first: they need the largest contiguous blocks.
        for size in sorted(_HUGE_ORDERS, reverse=True):
            order = _HUGE_ORDERS[size]
            self.hugetlb[order] = HugetlbPool.boot(self.phys, order, cfg.hugetlb_pages.get(size, 0))
        self.swap = SwapDevice(cfg.swap_bytes // PAGE_SIZE, cfg.store_data)

    def __repr__(self) -> str:
        return (
            f"Machine(ram={self.config.ram_bytes >> 20} MiB, thp={self.config.thp}, "
            f"processes={len(self.processes)})"
        )

    @property
    def clock(self) -> Clock:
        return self.trace.clock

    @property
    def costs(self) -> Costs:
        return self.trace.costs

    def register_mapping(self, obj: object) -> int:
        """A fresh id for an anon_vma or a file (what ``folio->mapping`` stores)."""
        mid = next(self._ids)
        if obj is not None:
            self.mappings[mid] = obj
        return mid

    # ----- processes and files ----------------------------------------------
    def new_mm_id(self) -> int:
        return next(self._mm_ids)

    def new_device_id(self) -> int:
        return next(self._device_ids)

    def spawn(self) -> Process:
        """A new process with an empty address space."""
        from .mm.process import Process

        proc = Process(self, self.alloc_pid())
        self.processes.append(proc)
        return proc

    def alloc_pid(self) -> int:
        """The next process id (``alloc_pid``)."""
        return next(self._pids)

    def create_file(self, size: int, name: str = "") -> File:
        """A regular file of ``size`` bytes, initially all zero."""
        if size < 0:
            raise InvalidArgument("negative file size")
        return self._new_file(size, name=name)

    def _new_file(self, size: int, **kw: Any) -> File:
        fid = next(self._ids)
        f = File(self, fid, size, **kw)
        self.mappings[fid] = f
        self.files.append(f)
        return f

    def create_shmem(self, size: int) -> File:
        """The shmem object behind a ``MAP_SHARED|MAP_ANONYMOUS`` mapping."""
        return self._new_file(size, shmem=True, anonymous=True, name="shmem")

    def create_hugetlbfs_file(self, size: int, order: int) -> File:
        """The hugetlbfs object behind a shared ``MAP_HUGETLB`` mapping."""
        return self._new_file(size, hugetlb_order=order, anonymous=True, name="hugetlbfs")

    def hugetlb_pool(self, size: int) -> HugetlbPool:
        order = _HUGE_ORDERS.get(size)
        if order is None:
            raise InvalidArgument(f"no hugetlb pool of page size {size:#x}")
        return self.hugetlb[order]

    # ----- kernel warnings ----------------------------------------------------
    def warn(self, source: str, where: str, rule: str, what: str = "") -> KernelWarning:
        """Record a ``WARN()``: a kernel contract broken, the kernel carrying on.

        Args:
            source: the subsystem or driver that warns (``"mmu_notifier"``).
            where: the kernel function holding the ``WARN``.
            rule: the contract broken, in words.
            what: what happened this time (addresses, values).

        Returns:
            The record, also appended to ``kernel_warnings``.
        """
        warning = KernelWarning(source, where, rule, what)
        self.kernel_warnings.append(warning)
        return warning

    @property
    def notifier_warnings(self) -> list[str]:
        """The MMU-notifier core's entries of ``kernel_warnings``, as text (read-only)."""
        return [str(w) for w in self.kernel_warnings if w.source == "mmu_notifier"]

    # ----- devices ------------------------------------------------------------
    def probe(self, name: str, **params: Any) -> Any:
        """Find the driver ``name`` among the installed plugins and probe a device.

        Two probes of one driver give two independent devices (different
        owners, separate device memory). Raises ``NoEntry`` for an unknown
        driver and ``InvalidArgument`` for parameters the driver rejects.
        """
        from .plugins import find_driver, get_plugin_manager

        if self.plugin_manager is None:
            self.plugin_manager = get_plugin_manager()
        cls = find_driver(self.plugin_manager, name)
        driver = cls()
        device = driver.probe(self, **params)
        self.plugin_manager.hook.hmmsim_driver_probed(driver=driver, device=device)
        self.devices.append(device)
        return device

    # ----- machine-wide memory management -------------------------------------
    def reclaim(self, nbytes: int) -> int:
        """Memory pressure: reclaim about ``nbytes`` across all processes.

        Returns the number of bytes actually freed.
        """
        from .mm.reclaim import reclaim_machine

        return reclaim_machine(self, nbytes)

    def oom_kill(self, process: Process) -> None:
        """Kill ``process`` as the OOM killer does and reap its memory."""
        from .mm.exit import oom_kill

        oom_kill(process)

    def memory_failure(self, pfn: int) -> None:
        """A hardware memory error on ``pfn``: poison it, unmap it everywhere."""
        from .mm.memory_failure import memory_failure

        memory_failure(self, pfn)
