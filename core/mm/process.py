"""A process: memory syscalls, CPU loads and stores, pagemap.

Kernel counterpart: the syscall entry points of mm/ (``mmap``, ``munmap``,
``mprotect``, ``madvise``, ``mremap``, ``move_pages``), ``fork``/``exit``,
the arch page-fault handler (a CPU access checks the VMA's permissions,
then calls ``handle_mm_fault``) and ``/proc/pid/pagemap``.

Each syscall takes ``mmap_lock`` in the mode the kernel takes it, validates
its arguments completely before changing anything, and raises the errno
exception the kernel would return. ``mprotect`` and ``madvise`` are the
exceptions Linux makes: they work VMA by VMA and, on a hole or a VMA that
refuses, return the error with the VMAs before it already changed; the model
does the same (their docstrings say which errors come when). A CPU access to an address with no VMA,
or without the needed permission, raises ``SegmentationFault`` before any
byte moves; one whose fault fails raises ``BusError`` (SIGBUS, hwpoison) or
``OutOfMemory``.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np
from numpy.typing import NDArray

from ..errors import (
    BadAddress,
    BusError,
    InvalidArgument,
    NoProcess,
    OutOfMemory,
    SegmentationFault,
)
from .address_space import AddressSpace
from .fault import (
    VM_FAULT_ERROR,
    VM_FAULT_HWPOISON,
    VM_FAULT_HWPOISON_LARGE,
    VM_FAULT_OOM,
    VM_FAULT_SIGBUS,
    entries_needing_fault,
    populate_range,
)
from .fork import do_fork
from .kinds import MemoryKind
from .madvise import WRITE_LOCKED_ADVICE, check_advice, do_madvise
from .memremap import KIND_NAMES
from .migration import migrate_folio
from .mmap import do_mmap, do_mremap, do_munmap
from .mprotect import do_mprotect
from .pagetable import (
    KIND_DEVICE_EXCLUSIVE,
    KIND_DEVICE_PRIVATE,
    KIND_HWPOISON,
    KIND_MARKER,
    KIND_MIGRATION,
    KIND_NONE,
    KIND_PRESENT,
    KIND_PROTNONE,
    KIND_SWAP,
    PAGE_SHIFT,
    PAGE_SIZE,
    PTE_DIRTY,
    PTE_SPECIAL,
    PTE_WRITE,
    PTE_YOUNG,
    U64,
    pte_kind_array,
    pte_pfn,
)
from .physmem import PG_anon, PG_hugetlb, PG_swapbacked, PG_zone_device
from .reclaim import direct_reclaim
from .rmap import rmap_walk
from .uapi import TASK_SIZE
from .vma import VM_READ, VM_WRITE

if TYPE_CHECKING:
    from ..machine import Machine

#: How often a CPU access re-faults a range that changed under it before giving up.
MAX_ACCESS_RETRIES = 64


@attrs.frozen
class PagemapEntry:
    """One page of ``/proc/pid/pagemap``, decoded.

    ``kind`` names what backs the page: none, zero, anon, file, shmem,
    hugetlb, pfnmap, swap, migration, hwpoison, marker, device_private,
    device_exclusive, device_coherent, p2p. A device-private entry reads as
    swapped, not present, as in Linux. ``exclusive`` is ``PM_MMAP_EXCLUSIVE``:
    the page itself is mapped once (per page, so a THP mapped by 512 PTEs of
    one process is exclusive; see ``decode_pagemap``).
    """

    addr: int
    present: bool
    swapped: bool
    pfn: int | None
    writable: bool
    order: int
    kind: MemoryKind
    dirty: bool = False
    exclusive: bool = False
    swap_offset: int | None = None


@attrs.define(eq=False, repr=False)
class Process:
    """A process of the simulated machine, with its address space ``mm``."""

    machine: Machine
    pid: int
    mm: AddressSpace = attrs.field(init=False)
    exited: bool = False
    #: VMAs the OOM reaper had to skip (a notifier refused), if it ran.
    oom_reap_skipped: list[str] = attrs.field(factory=list)

    def __attrs_post_init__(self) -> None:
        self.mm = AddressSpace(self.machine)

    def __repr__(self) -> str:
        state = "exited" if self.exited else f"{len(self.mm.vmas)} VMAs"
        return f"Process(pid={self.pid}, {state})"

    def _alive(self) -> None:
        if self.exited:
            raise NoProcess(f"process {self.pid} has exited")

    # ----- memory syscalls --------------------------------------------------------
    def mmap(
        self,
        length: int,
        prot: int,
        flags: int,
        file: Any = None,
        offset: int = 0,
        addr: int = 0,
    ) -> int:
        """``mmap(2)``; returns the address of the new mapping."""
        self._alive()
        length, prot, flags, offset, addr = _ints(
            "mmap", length=length, prot=prot, flags=flags, offset=offset, addr=addr
        )
        with self.mm.mmap_lock.write():
            return do_mmap(self.mm, addr, length, prot, flags, file, offset)

    def munmap(self, addr: int, length: int) -> None:
        self._alive()
        addr, length = _ints("munmap", addr=addr, length=length)
        with self.mm.mmap_lock.write():
            do_munmap(self.mm, addr, length)

    def mprotect(self, addr: int, length: int, prot: int) -> None:
        """``mprotect(2)``; addresses and lengths are C ``unsigned long``s.

        See ``hmmsim.mm.mprotect.do_mprotect`` for the order of the checks
        and where Linux (and the model) half-applies.
        """
        self._alive()
        addr, length, prot = _ints("mprotect", addr=addr, length=length, prot=prot)
        with self.mm.mmap_lock.write():
            do_mprotect(self.mm, addr, length, prot)

    def madvise(self, addr: int, length: int, advice: int) -> None:
        """``madvise(2)`` with any advice value Linux 6.18 accepts.

        See ``hmmsim.mm.madvise`` for what each advice does, its errors, and
        the valid values the model does not implement (EOPNOTSUPP).
        """
        self._alive()
        addr, length, advice = _ints("madvise", addr=addr, length=length, advice=advice)
        check_advice(advice)
        lock = self.mm.mmap_lock
        with lock.write() if advice in WRITE_LOCKED_ADVICE else lock.read():
            do_madvise(self.mm, addr, length, advice)

    def mremap(
        self, old: int, old_len: int, new_len: int, flags: int = 0, new_addr: int | None = None
    ) -> int:
        """``mremap(2)``; returns the (possibly new) address of the mapping."""
        self._alive()
        old, old_len, new_len, flags = _ints(
            "mremap", old=old, old_len=old_len, new_len=new_len, flags=flags
        )
        if new_addr is not None:
            (new_addr,) = _ints("mremap", new_addr=new_addr)
        with self.mm.mmap_lock.write():
            return do_mremap(self.mm, old, old_len, new_len, flags, new_addr)

    def move_pages(self, addr: int, npages: int) -> list[int]:
        """``move_pages(2)`` to "another node": move each page to a new frame.

        Returns a status per page: 0 when moved, -ENOENT when not present
        (or device memory),
        -EFAULT when unmapped, the zero page or a special mapping, -EBUSY
        when the page is pinned or locked, -ENOMEM when no frame is free.
        """
        self._alive()
        if addr % PAGE_SIZE or npages <= 0 or addr < 0:
            raise InvalidArgument("move_pages: page-aligned address and npages > 0 required")
        if addr + npages * PAGE_SIZE > TASK_SIZE:
            # The kernel looks up each address on its own and would report
            # -EFAULT per page, but a caller's status array that large cannot
            # exist: its copy_to_user fails first.
            raise BadAddress(f"move_pages: [{addr:#x}, +{npages} pages) passes TASK_SIZE")
        status = [0] * npages
        machine = self.machine
        phys = machine.phys
        with self.mm.mmap_lock.read():
            vpn0 = addr >> PAGE_SHIFT
            walk = self.mm.pt.walk(vpn0, npages)
            kinds = walk.kinds
            pfns = walk.pfns()
            done: dict[int, int] = {}
            for i in range(npages):
                vma = self.mm.vmas.find((vpn0 + i) << PAGE_SHIFT)
                if vma is None:
                    status[i] = -errno.EFAULT
                    continue
                kind = int(kinds[i])
                if kind != KIND_PRESENT:
                    status[i] = -errno.ENOENT
                    continue
                pfn = int(pfns[i])
                if walk.entries[i] & U64(PTE_SPECIAL) or phys.is_zero_pfn(pfn):
                    status[i] = -errno.EFAULT
                    continue
                head = phys.head(pfn)
                if phys.flags[head] & PG_zone_device:
                    status[i] = -errno.ENOENT  # device memory is not moved by move_pages
                    continue
                if head not in done:
                    done[head] = migrate_folio(machine, head)
                status[i] = done[head]
        return status

    def fork(self) -> Process:
        """``fork(2)``: a child with a copy-on-write copy of the address space.

        Raises ``OutOfMemory`` (ENOMEM), leaving no child, when a page that
        must be copied at once (a pinned one) finds no free frame.
        """
        self._alive()
        return do_fork(self)

    def exit(self) -> None:
        """``exit(2)``: drop the process's user of the mm (the last one tears it down)."""
        self._alive()
        self.exited = True
        if self in self.machine.processes:
            self.machine.processes.remove(self)
        self.mm.mmput()

    # ----- CPU accesses -------------------------------------------------------------
    def read(self, addr: int, length: int) -> bytes:
        """A CPU load of ``length`` bytes; faults as Linux would."""
        self._alive()
        if length < 0:
            raise InvalidArgument("negative read length")
        if length == 0:
            return b""
        with self.mm.mmap_lock.read():
            return self._access(addr, length, None)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """A CPU store of ``data``; faults (and breaks COW) as Linux would."""
        self._alive()
        if len(data) == 0:
            return
        with self.mm.mmap_lock.read():
            self._access(addr, len(data), bytes(data))

    def _pieces(
        self, addr: int, length: int, write: bool
    ) -> tuple[list[tuple[Any, int, int]], SegmentationFault | None]:
        """The VMA pieces of [addr, addr + length) up to the first place the
        access faults, and that fault (None if the whole range is accessible)."""
        end = addr + length
        if addr < 0 or end > (1 << 47):
            raise SegmentationFault(f"access to [{addr:#x}, {end:#x}) is outside user space")
        need = VM_WRITE if write else (VM_READ | VM_WRITE)
        pos = addr
        pieces: list[tuple[Any, int, int]] = []
        for vma in self.mm.vmas.intersecting(addr, end):
            if vma.start > pos:
                break
            if not vma.flags & need:
                what = "write to" if write else "read from"
                return pieces, SegmentationFault(f"{what} {pos:#x}: {vma} does not allow it")
            pieces.append((vma, pos, min(end, vma.end)))
            pos = vma.end
        if pos < end:
            return pieces, SegmentationFault(f"access to {pos:#x}: no mapping there")
        return pieces, None

    def _access(self, addr: int, length: int, data: bytes | None) -> bytes:
        """A CPU load or store, page by page in address order as a CPU's copy
        loop runs. An access that faults part-way has done what came before
        the fault: a store has stored those bytes (other processes sharing the
        memory see them), a load has faulted those pages in; then it raises
        the fault of the first page it cannot access (``BusError`` past the
        end of a file before ``SegmentationFault`` at a later hole)."""
        write = data is not None
        out = bytearray() if not write else b""
        pt = self.mm.pt
        phys = self.machine.phys
        pieces, fault = self._pieces(addr, length, write)
        for vma, lo, hi in pieces:
            vpn0 = lo >> PAGE_SHIFT
            n = ((hi + PAGE_SIZE - 1) >> PAGE_SHIFT) - vpn0
            err = 0
            tries = 0
            left = n + 1
            while True:
                tries += 1
                if tries > MAX_ACCESS_RETRIES:
                    raise BusError(f"access to {lo:#x} kept faulting (livelock)")
                failures = phys.order0_failures
                ret = populate_range(vma, vpn0, n, write)
                walk = pt.walk(vpn0, n)
                need = entries_needing_fault(walk.entries, write)
                if ret & VM_FAULT_OOM and phys.order0_failures == failures:
                    # No allocation failed: a fault handler (a driver's
                    # migrate_to_ram) returned VM_FAULT_OOM for its own reasons.
                    # Since 5.16 pagefault_out_of_memory only warns that it
                    # "leaked out to the #PF handler" and the fault is retried.
                    self.machine.warn(
                        "mm",
                        "pagefault_out_of_memory",
                        "VM_FAULT_OOM leaked out to the #PF handler",
                        f"process {self.pid} at {lo:#x}",
                    )
                    continue
                todo = int(need.sum())
                if ret & VM_FAULT_OOM and direct_reclaim(self.machine, todo, since=failures):
                    # RAM ran out; reclaim freed some: fault again. Only a
                    # retry that made no progress counts towards livelock.
                    if todo < left:
                        left, tries = todo, 0
                    continue
                if ret & VM_FAULT_ERROR:
                    err = ret
                    break
                if not need.any():
                    break
            if err & VM_FAULT_OOM:
                # RAM is exhausted and reclaim freed nothing (see
                # direct_reclaim): the model's store fails whole here.
                _raise_fault(err, lo, write)
            if err:
                # The failing page is the first one left empty (pages past EOF,
                # an empty pool); the pages before it that still need a fault
                # (COW) get it now, as the CPU's loop would have reached them
                # first. Then touch what is before the failing page.
                empty = need & (walk.kinds == 0)
                k = int(np.argmax(empty)) if empty.any() else int(np.argmax(need))
                if k and need[:k].any():
                    ret = populate_range(vma, vpn0, k, write)
                    need = entries_needing_fault(pt.walk(vpn0, n).entries, write)
                    if ret & VM_FAULT_ERROR:
                        err = ret
                        k = min(k, int(np.argmax(need)))
                cut = min(hi, (vpn0 + k) << PAGE_SHIFT)
                if cut > lo:
                    self._touch(pt.walk(vpn0, k), addr, lo, cut, data, out)
                _raise_fault(err, max(lo, (vpn0 + k) << PAGE_SHIFT), write)
            self._touch(walk, addr, lo, hi, data, out)
        if fault is not None:
            raise fault
        return bytes(out)

    def _touch(
        self, walk: Any, addr: int, lo: int, hi: int, data: bytes | None, out: bytes | bytearray
    ) -> None:
        """Load or store [lo, hi) through the present entries of ``walk``
        (which starts at the page of ``lo``); a load appends to ``out``."""
        phys = self.machine.phys
        write = data is not None
        vpn0 = lo >> PAGE_SHIFT
        n = ((hi + PAGE_SIZE - 1) >> PAGE_SHIFT) - vpn0
        pfns = walk.pfns()[:n]
        locs = walk.loc[:n]
        self.mm.pt.flat[locs] |= U64(PTE_YOUNG | (PTE_DIRTY if write else 0))
        off = lo - (vpn0 << PAGE_SHIFT)
        if write and off == 0 and hi - lo == n << PAGE_SHIFT:
            # Whole pages overwritten: nothing of the old contents survives.
            assert data is not None
            stored = np.frombuffer(data, dtype=np.uint8, count=hi - lo, offset=lo - addr)
            phys.write_pages(pfns, stored.reshape(n, PAGE_SIZE))
            return
        pages = phys.read_pages(pfns).reshape(-1)
        if write:
            assert data is not None
            chunk = data[lo - addr : hi - addr]
            pages[off : off + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
            phys.write_pages(pfns, pages.reshape(n, PAGE_SIZE))
        else:
            assert isinstance(out, bytearray)
            out += pages[off : off + (hi - lo)].tobytes()

    # ----- introspection ------------------------------------------------------------
    def pagemap(self, addr: int, npages: int) -> list[PagemapEntry]:
        """``/proc/pid/pagemap`` for ``npages`` pages from ``addr``.

        As a read of the file, it stops at ``TASK_SIZE``: pages at or past
        the top of user space have no entry, so the list is shorter than
        ``npages`` (empty from ``TASK_SIZE`` on). A negative address is EINVAL.
        """
        self._alive()
        if addr < 0 or addr % PAGE_SIZE or npages < 0:
            raise InvalidArgument("pagemap: page-aligned address >= 0 and npages >= 0 required")
        npages = max(0, min(npages, (TASK_SIZE - addr) >> PAGE_SHIFT))
        if npages == 0:
            return []
        walk = self.mm.pt.walk(addr >> PAGE_SHIFT, npages)
        return decode_pagemap(self.machine, addr, walk.entries, walk.kinds, walk.pfns(), walk.order)


def _ints(call: str, **args: object) -> list[int]:
    """A syscall's integer arguments as Python ints, in the order given.

    A C caller cannot pass anything but an integer there: anything else is
    ``InvalidArgument``, not a ``TypeError``. NumPy integers are integers.
    """
    out = []
    for name, value in args.items():
        if not isinstance(value, int | np.integer):
            raise InvalidArgument(f"{call}: {name} must be an integer, not {value!r}")
        out.append(int(value))
    return out


def _raise_fault(ret: int, addr: int, write: bool) -> None:
    what = "write to" if write else "read from"
    if ret & (VM_FAULT_HWPOISON | VM_FAULT_HWPOISON_LARGE):
        raise BusError(f"{what} {addr:#x}: memory is poisoned")
    if ret & VM_FAULT_SIGBUS:
        raise BusError(f"{what} {addr:#x}: SIGBUS (beyond end of file, empty pool or device)")
    if ret & VM_FAULT_OOM:
        raise OutOfMemory(f"{what} {addr:#x}: out of memory")
    raise SegmentationFault(f"{what} {addr:#x}: fault failed ({ret:#x})")


def _backing_kind(machine: Machine, pfn: int, entry: int) -> MemoryKind:
    phys = machine.phys
    if phys.is_zero_pfn(pfn):
        return MemoryKind.ZERO
    if entry & PTE_SPECIAL or not phys.valid_pfn(pfn):
        return MemoryKind.PFNMAP
    flags = int(phys.flags[pfn])
    if flags & PG_zone_device:
        pgmap = phys.pgmap_of(pfn)
        return (
            KIND_NAMES.get(pgmap.type, MemoryKind.DEVICE)
            if pgmap is not None
            else MemoryKind.DEVICE
        )
    if flags & PG_hugetlb:
        return MemoryKind.HUGETLB
    if flags & PG_anon:
        return MemoryKind.ANON
    return MemoryKind.SHMEM if flags & PG_swapbacked else MemoryKind.FILE


_SOFT_NAMES = {
    KIND_SWAP: MemoryKind.SWAP,
    KIND_MIGRATION: MemoryKind.MIGRATION,
    KIND_HWPOISON: MemoryKind.HWPOISON,
    KIND_DEVICE_PRIVATE: MemoryKind.DEVICE_PRIVATE,
    KIND_DEVICE_EXCLUSIVE: MemoryKind.DEVICE_EXCLUSIVE,
}


def decode_pagemap(
    machine: Machine,
    addr: int,
    entries: NDArray[np.uint64],
    kinds: NDArray[np.uint8],
    pfns: NDArray[np.int64],
    orders: NDArray[np.uint8],
) -> list[PagemapEntry]:
    """Decode page-table entries into ``/proc/pid/pagemap`` records.

    ``exclusive`` is ``PM_MMAP_EXCLUSIVE`` as 6.18 built with
    ``CONFIG_PAGE_MAPCOUNT`` reports it: the page's precise mapcount is one
    (see ``_MapcountCache``). Only present pages of ordinary folios carry it;
    the zero pages, special mappings and non-present entries never do.
    """
    mapcounts = _MapcountCache(machine)
    out = []
    for i in range(len(entries)):
        e = int(entries[i])
        kind = int(kinds[i])
        a = addr + i * PAGE_SIZE
        pfn = int(pfns[i])
        order = int(orders[i])
        if kind == KIND_NONE:
            out.append(PagemapEntry(a, False, False, None, False, 0, MemoryKind.NONE))
        elif kind in (KIND_PRESENT, KIND_PROTNONE):
            backing = _backing_kind(machine, pfn, e)
            exclusive = False
            if backing not in (MemoryKind.ZERO, MemoryKind.PFNMAP):
                # A PMD leaf reports the mapcount of its first page for all 512.
                exclusive = mapcounts.precise(pte_pfn(e) if order else pfn) == 1
            out.append(
                PagemapEntry(
                    a,
                    True,
                    False,
                    pfn,
                    kind == KIND_PRESENT and bool(e & PTE_WRITE),
                    order,
                    backing,
                    dirty=bool(e & PTE_DIRTY),
                    exclusive=exclusive,
                )
            )
        elif kind == KIND_MARKER:
            out.append(PagemapEntry(a, False, False, None, False, order, MemoryKind.MARKER))
        elif kind == KIND_SWAP:
            out.append(
                PagemapEntry(a, False, True, None, False, 0, MemoryKind.SWAP, swap_offset=pfn)
            )
        else:
            out.append(PagemapEntry(a, False, True, pfn, False, order, _SOFT_NAMES[kind]))
    return out


class _MapcountCache:
    """Precise per-page mapcounts (``folio_precise_page_mapcount``), per folio.

    The model keeps one mapcount per folio (a PMD mapping counts once, each
    PTE once). For a small folio or a hugetlb folio that is the page's
    mapcount; for a large folio with several mappings the per-page count is
    the number of PMD mappings of the folio plus the PTEs mapping that very
    page, found once per folio by an rmap walk.
    """

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.folios: dict[int, tuple[int, NDArray[np.int64]]] = {}

    def precise(self, pfn: int) -> int:
        phys = self.machine.phys
        head = phys.head(pfn)
        total = int(phys.mapcount[head])
        if total <= 1 or phys.order[head] == 0 or phys.flags[head] & PG_hugetlb:
            return total
        got = self.folios.get(head)
        if got is None:
            got = self.folios[head] = _page_mapcounts(self.machine, head)
        entire, per_page = got
        return entire + int(per_page[pfn - head])


#: Entry kinds that count in a folio's mapcount.
_MAPPING_KINDS = (KIND_PRESENT, KIND_PROTNONE, KIND_DEVICE_PRIVATE, KIND_DEVICE_EXCLUSIVE)


def _page_mapcounts(machine: Machine, head: int) -> tuple[int, NDArray[np.int64]]:
    """(PMD mappings of the folio, PTE mappings of each of its pages)."""
    nr = 1 << int(machine.phys.order[head])
    per_page = np.zeros(nr, dtype=np.int64)
    entire = 0
    for hit in rmap_walk(machine, head):
        live = np.isin(pte_kind_array(hit.entries), _MAPPING_KINDS)
        pte = live & (hit.levels == 0)
        np.add.at(per_page, hit.pfns[pte] - head, 1)
        entire += len(np.unique(hit.locs[live & (hit.levels > 0)]))
    return entire, per_page
