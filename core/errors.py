"""Error hierarchy of the model: every kernel error code is an ``OSError`` subclass.

Kernel counterpart: the ``-Exxx`` return codes of mm syscalls and of the HMM
entry points, and the signals a faulting CPU access delivers.

Each exception carries its errno (``exc.errno``) so a test can compare against
the kernel's return code exactly, and a message naming the address and the
rule that was broken.
"""

from __future__ import annotations

import errno as _errno

import attrs


class HmmsimError(OSError):
    """Base class of every error the model raises on purpose."""

    errno_value: int = 0

    def __init__(self, message: str) -> None:
        super().__init__(self.errno_value, message)
        self.message = message

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno_value, str(self.errno_value))
        return f"[{name}] {self.message}"


class Busy(HmmsimError):
    """EBUSY: the notifier sequence moved (retry), or a resource is in use."""

    errno_value = _errno.EBUSY


class BadAddress(HmmsimError):
    """EFAULT: an address that cannot be accessed the way it was asked."""

    errno_value = _errno.EFAULT


class NotPermitted(HmmsimError):
    """EPERM: the VMA forbids the access (e.g. a write fault without VM_WRITE)."""

    errno_value = _errno.EPERM


class InvalidArgument(HmmsimError):
    """EINVAL: malformed arguments (unaligned, unknown flags, empty range …)."""

    errno_value = _errno.EINVAL


class OutOfMemory(HmmsimError):
    """ENOMEM: no memory, or (for address-space syscalls) no such mapping."""

    errno_value = _errno.ENOMEM


class NoEntry(HmmsimError):
    """ENOENT: the object asked for does not exist."""

    errno_value = _errno.ENOENT


class Again(HmmsimError):
    """EAGAIN: a transient condition; the same call may succeed later."""

    errno_value = _errno.EAGAIN


class Overflow(HmmsimError):
    """EOVERFLOW: a start + length that wraps around the address space."""

    errno_value = _errno.EOVERFLOW


class FileTooLarge(HmmsimError):
    """EFBIG: a write or size past the file system's largest file (``s_maxbytes``)."""

    errno_value = _errno.EFBIG


class NotSupported(HmmsimError):
    """EOPNOTSUPP: the operation exists but not for this object or driver."""

    errno_value = _errno.EOPNOTSUPP


class PermissionDenied(HmmsimError):
    """EACCES: e.g. mprotect(PROT_WRITE) of a mapping that may never be written."""

    errno_value = _errno.EACCES


class AlreadyExists(HmmsimError):
    """EEXIST: e.g. MAP_FIXED_NOREPLACE over an existing mapping."""

    errno_value = _errno.EEXIST


class NoProcess(HmmsimError):
    """ESRCH: the process has exited."""

    errno_value = _errno.ESRCH


class RemoteIO(HmmsimError):
    """EREMOTEIO: e.g. GUP of PCI P2PDMA memory without FOLL_PCI_P2PDMA."""

    errno_value = _errno.EREMOTEIO


class HardwarePoison(HmmsimError):
    """EHWPOISON: GUP with FOLL_HWPOISON hit a poisoned page."""

    errno_value = getattr(_errno, "EHWPOISON", 133)  # Linux value; absent on some hosts


class NoDevice(HmmsimError):
    """ENODEV: the device lacks what the call needs (e.g. no P2PDMA memory)."""

    errno_value = _errno.ENODEV


class IoFailure(HmmsimError):
    """EIO: the hardware path failed (e.g. a DMA mask the device cannot use)."""

    errno_value = _errno.EIO


class SegmentationFault(HmmsimError):
    """SIGSEGV: a CPU access to an address the process may not touch that way."""

    errno_value = _errno.EFAULT


class BusError(HmmsimError):
    """SIGBUS: a CPU access that hit a device error, poison, or an empty pool."""

    errno_value = _errno.EFAULT


class BadFileDescriptor(HmmsimError):
    """EBADF: a file mapping without a file (no fd and no MAP_ANONYMOUS)."""

    errno_value = _errno.EBADF


class Deadlock(RuntimeError):
    """A lock or wait that can never be satisfied (nobody else can run)."""


class KernelBug(AssertionError):
    """A broken kernel *contract*, where the kernel would BUG() or WARN().

    Bad input to a syscall or an HMM entry point is an ``HmmsimError`` with the
    errno the kernel returns. Misuse of an in-kernel contract is different: a
    ``put_page`` without a matching get, a lock released by a task that does
    not hold it, ``hmm_range_fault`` without the ``mmap_lock``, an even
    sequence passed to ``mmu_interval_set_seq``. The kernel has no errno for
    these; it crashes or warns. The model raises ``KernelBug``, an
    ``AssertionError``, so the conformance suite and pytest count it as a
    failed check, never as an expected error.

    This is the one exception type for a broken contract: code under
    ``core/`` and ``drivers/`` raises ``KernelBug`` (not a bare
    ``AssertionError``, ``ValueError`` or ``RuntimeError``) wherever the
    kernel would ``BUG()``. Where the kernel only ``WARN()``s and carries on,
    the model carries on too and records a ``KernelWarning`` instead.
    """


@attrs.frozen
class KernelWarning:
    """One broken kernel contract the kernel ``WARN()``s about and survives.

    Kernel counterpart: a ``WARN_ON``/``WARN_ONCE`` splat in the log. The
    model never prints it; it appends the record to the machine's one list,
    ``Machine.kernel_warnings`` (through ``Machine.warn``), so the invariant
    checks fail a run that produced any, and a test can assert on the fields.

    Every component reports through this one type: the MMU-notifier core (a
    blockable invalidation refused), and drivers (dmirror's ``WARN_ON`` on a
    bad pfn from ``hmm_range_fault``). A driver's own device log messages
    that are not ``WARN``s in the real driver (a cancelled GPU fault) are not
    kernel warnings and do not go here.
    """

    #: Who warns: the subsystem or driver (``"mmu_notifier"``, ``"dmirror"``).
    source: str
    #: The kernel function that holds the ``WARN`` (``"mn_itree_invalidate"``).
    where: str
    #: The contract broken, in words (``"a blockable invalidation was refused"``).
    rule: str
    #: What happened this time: addresses, values, the event.
    what: str = ""

    def __str__(self) -> str:
        detail = f": {self.what}" if self.what else ""
        return f"WARNING in {self.where} ({self.source}): {self.rule}{detail}"


__all__ = [
    "Again",
    "AlreadyExists",
    "BadAddress",
    "BadFileDescriptor",
    "BusError",
    "Busy",
    "Deadlock",
    "HardwarePoison",
    "HmmsimError",
    "InvalidArgument",
    "IoFailure",
    "KernelBug",
    "KernelWarning",
    "NoDevice",
    "NoEntry",
    "NoProcess",
    "NotPermitted",
    "NotSupported",
    "OutOfMemory",
    "Overflow",
    "PermissionDenied",
    "RemoteIO",
    "SegmentationFault",
]
