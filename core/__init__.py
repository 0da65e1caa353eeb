"""hmmsim: an executable model of Linux HMM for people who write device drivers.

The public API is importable from here: ``Machine``,
``MachineConfig``, ``Process``, ``File``, ``PagemapEntry``, the error classes,
every ``PROT_*``/``MAP_*``/``MADV_*``/``MREMAP_*`` constant under its Linux
name, and the MMU-notifier API.
"""

from __future__ import annotations

import importlib.metadata as _metadata

from . import errors, sched
from .driver import Capability, Device, DevicePte, Driver, Mirror, MirrorStats
from .errors import (
    Again,
    AlreadyExists,
    BadAddress,
    BusError,
    Busy,
    Deadlock,
    FileTooLarge,
    HardwarePoison,
    HmmsimError,
    InvalidArgument,
    IoFailure,
    KernelBug,
    NoDevice,
    NoEntry,
    NoProcess,
    NotPermitted,
    NotSupported,
    OutOfMemory,
    Overflow,
    PermissionDenied,
    RemoteIO,
    SegmentationFault,
)
from .hookspecs import hookimpl
from .machine import HUGE_1GB, HUGE_2MB, Machine, MachineConfig
from .mm.address_space import AddressSpace
from .mm.file import File
from .mm.pagetable import PAGE_SHIFT, PAGE_SIZE, PMD_SIZE, PUD_SIZE
from .mm.process import PagemapEntry, Process
from .mm.uapi import (
    MADV_COLD,
    MADV_COLLAPSE,
    MADV_DODUMP,
    MADV_DOFORK,
    MADV_DONTDUMP,
    MADV_DONTFORK,
    MADV_DONTNEED,
    MADV_DONTNEED_LOCKED,
    MADV_FREE,
    MADV_GUARD_INSTALL,
    MADV_GUARD_REMOVE,
    MADV_HUGEPAGE,
    MADV_KEEPONFORK,
    MADV_MERGEABLE,
    MADV_NOHUGEPAGE,
    MADV_NORMAL,
    MADV_PAGEOUT,
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
    MADV_RANDOM,
    MADV_REMOVE,
    MADV_SEQUENTIAL,
    MADV_UNMERGEABLE,
    MADV_WILLNEED,
    MADV_WIPEONFORK,
    MAP_ANON,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_HUGE_1GB,
    MAP_HUGE_2MB,
    MAP_HUGE_MASK,
    MAP_HUGE_SHIFT,
    MAP_HUGETLB,
    MAP_NONBLOCK,
    MAP_NORESERVE,
    MAP_POPULATE,
    MAP_PRIVATE,
    MAP_SHARED,
    MAP_SHARED_VALIDATE,
    MAP_TYPE,
    MREMAP_DONTUNMAP,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PROT_EXEC,
    PROT_GROWSDOWN,
    PROT_GROWSUP,
    PROT_NONE,
    PROT_READ,
    PROT_SEM,
    PROT_WRITE,
)
from .notifier import (
    MMU_NOTIFY_CLEAR,
    MMU_NOTIFY_EXCLUSIVE,
    MMU_NOTIFY_MIGRATE,
    MMU_NOTIFY_PROTECTION_PAGE,
    MMU_NOTIFY_PROTECTION_VMA,
    MMU_NOTIFY_RELEASE,
    MMU_NOTIFY_SOFT_DIRTY,
    MMU_NOTIFY_UNMAP,
    IntervalNotifier,
    MmuNotifier,
    MmuNotifyEvent,
    NotifierRange,
    mmu_interval_check_retry,
    mmu_interval_notifier_insert,
    mmu_interval_notifier_insert_locked,
    mmu_interval_notifier_remove,
    mmu_interval_read_begin,
    mmu_interval_read_retry,
    mmu_interval_set_seq,
    mmu_notifier_register,
    mmu_notifier_unregister,
)

__version__ = _metadata.version("hmmsim")  # the installed distribution's version

__all__ = [name for name in dir() if not name.startswith("_")]
