"""Virtual memory areas: ``Vma``, VM flags, and the sorted set of an mm's VMAs.

Kernel counterpart: ``struct vm_area_struct`` (include/linux/mm_types.h), the
``VM_*`` flags (include/linux/mm.h, same values), and the VMA tree with
``find_vma``/``vma_merge``/``__split_vma`` (mm/vma.c).

``pgoff`` is the page offset of ``start`` in the backing object: the file
page for file mappings, and for anonymous mappings the linear page index
``start >> PAGE_SHIFT`` fixed at mmap time (kept across mremap moves, as in
Linux, so the reverse map can find a page's address from its index).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

import attrs

from ..errors import KernelBug
from .pagetable import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from .address_space import AddressSpace
    from .rmap import AnonVma

VM_NONE: Final = 0x00000000
VM_READ: Final = 0x00000001
VM_WRITE: Final = 0x00000002
VM_EXEC: Final = 0x00000004
VM_SHARED: Final = 0x00000008
VM_MAYREAD: Final = 0x00000010
VM_MAYWRITE: Final = 0x00000020
VM_MAYEXEC: Final = 0x00000040
VM_MAYSHARE: Final = 0x00000080
VM_GROWSDOWN: Final = 0x00000100
VM_PFNMAP: Final = 0x00000400
VM_LOCKED: Final = 0x00002000
VM_IO: Final = 0x00004000
VM_SEQ_READ: Final = 0x00008000
VM_RAND_READ: Final = 0x00010000
VM_DONTCOPY: Final = 0x00020000
VM_DONTEXPAND: Final = 0x00040000
VM_ACCOUNT: Final = 0x00100000
VM_NORESERVE: Final = 0x00200000
VM_HUGETLB: Final = 0x00400000
VM_WIPEONFORK: Final = 0x02000000
VM_DONTDUMP: Final = 0x04000000
VM_MIXEDMAP: Final = 0x10000000
VM_HUGEPAGE: Final = 0x20000000
VM_NOHUGEPAGE: Final = 0x40000000
VM_MERGEABLE: Final = 0x80000000

VM_SPECIAL: Final = VM_IO | VM_DONTEXPAND | VM_PFNMAP | VM_MIXEDMAP
VM_ACCESS_FLAGS: Final = VM_READ | VM_WRITE | VM_EXEC

_FLAG_NAMES: Final = {
    VM_READ: "READ",
    VM_WRITE: "WRITE",
    VM_EXEC: "EXEC",
    VM_SHARED: "SHARED",
    VM_MAYREAD: "MAYREAD",
    VM_MAYWRITE: "MAYWRITE",
    VM_MAYEXEC: "MAYEXEC",
    VM_MAYSHARE: "MAYSHARE",
    VM_PFNMAP: "PFNMAP",
    VM_IO: "IO",
    VM_DONTCOPY: "DONTCOPY",
    VM_DONTEXPAND: "DONTEXPAND",
    VM_ACCOUNT: "ACCOUNT",
    VM_NORESERVE: "NORESERVE",
    VM_HUGETLB: "HUGETLB",
    VM_MIXEDMAP: "MIXEDMAP",
    VM_HUGEPAGE: "HUGEPAGE",
    VM_NOHUGEPAGE: "NOHUGEPAGE",
}


def vm_flags_str(flags: int) -> str:
    return "|".join(name for bit, name in _FLAG_NAMES.items() if flags & bit) or "NONE"


@attrs.define(eq=False, repr=False)
class Vma:
    """One mapping [start, end) of an address space."""

    mm: AddressSpace
    start: int
    end: int
    flags: int
    pgoff: int
    file: Any = None
    #: ``vm_ops`` of a device file (``fault``), None for page-cache/anon VMAs.
    vm_ops: Any = None
    #: The anon_vma new anonymous pages of this VMA go into (None until needed).
    anon_vma: AnonVma | None = None
    #: Every anon_vma this VMA is linked to, oldest (the root) first.
    anon_chain: list[AnonVma] = attrs.field(factory=list)
    #: Order of the huge pages of a hugetlb VMA (9 or 18), else 0.
    hugetlb_order: int = 0
    #: Huge-page reservations of a private hugetlb mapping (shared by its splits).
    hugetlb_resv: Any = None
    #: ``HPAGE_RESV_UNMAPPED``: the owner of this private hugetlb mapping took
    #: back a page it could not copy; any later no-page fault here is SIGBUS.
    #: Kept by splits and moves, dropped by fork (``hugetlb_dup_vma_private``).
    hugetlb_resv_unmapped: bool = False
    id: int = attrs.field(factory=itertools.count(1).__next__)

    def __repr__(self) -> str:
        backing = "anon" if self.file is None else f"file#{getattr(self.file, 'id', '?')}"
        return (
            f"Vma([{self.start:#x}, {self.end:#x}) {vm_flags_str(self.flags)} "
            f"pgoff={self.pgoff:#x} {backing})"
        )

    def copy(self, start: int, end: int, pgoff: int, mm: AddressSpace | None = None) -> Vma:
        """A VMA like this one over [start, end) (split, move, fork), not yet linked."""
        return Vma(
            self.mm if mm is None else mm,
            start,
            end,
            self.flags,
            pgoff,
            file=self.file,
            vm_ops=self.vm_ops,
            hugetlb_order=self.hugetlb_order,
            hugetlb_resv=self.hugetlb_resv if mm is None else None,
            hugetlb_resv_unmapped=self.hugetlb_resv_unmapped and mm is None,
        )

    @property
    def start_vpn(self) -> int:
        return self.start >> PAGE_SHIFT

    @property
    def end_vpn(self) -> int:
        return self.end >> PAGE_SHIFT

    @property
    def npages(self) -> int:
        return (self.end - self.start) >> PAGE_SHIFT

    @property
    def length(self) -> int:
        return self.end - self.start

    def contains(self, addr: int) -> bool:
        return self.start <= addr < self.end

    def linear_index(self, vpn: int) -> int:
        """Page index in the backing object of virtual page ``vpn``."""
        return self.pgoff + vpn - self.start_vpn

    @property
    def page_cache(self) -> Any:
        """The page-cache ``File`` behind this VMA, or None (anonymous, device file)."""
        f = self.file
        return f if getattr(f, "is_page_cache", False) else None

    def link_file(self) -> None:
        """Enter the VMA in its file's ``i_mmap`` (``vma_link_file``)."""
        f = self.page_cache
        if f is not None:
            f.i_mmap.add(self)

    def unlink_file(self) -> None:
        """Leave the file's ``i_mmap``; an unlinked anonymous object dies with it."""
        f = self.page_cache
        if f is not None:
            f.i_mmap.discard(self)
            if f.anonymous and not f.i_mmap:
                f.release()

    @property
    def is_anonymous(self) -> bool:
        """``vma_is_anonymous``: no backing object at all (not shmem, not a device)."""
        return self.file is None and self.vm_ops is None

    @property
    def is_shared(self) -> bool:
        return bool(self.flags & VM_SHARED)

    @property
    def is_hugetlb(self) -> bool:
        return bool(self.flags & VM_HUGETLB)

    @property
    def is_cow_mapping(self) -> bool:
        """Private and possibly writable: pages are copied on write."""
        return (self.flags & (VM_SHARED | VM_MAYWRITE)) == VM_MAYWRITE

    @property
    def huge_page_size(self) -> int:
        return PAGE_SIZE << self.hugetlb_order


class VmaSet:
    """An mm's VMAs in address order with O(log n) lookup (the maple tree)."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._vmas: list[Vma] = []

    def __len__(self) -> int:
        return len(self._vmas)

    def __iter__(self) -> Iterator[Vma]:
        return iter(list(self._vmas))

    def insert(self, vma: Vma) -> None:
        i = bisect.bisect_left(self._starts, vma.start)
        if i < len(self._vmas) and self._vmas[i].start < vma.end:
            raise KernelBug(f"{vma} overlaps {self._vmas[i]}")
        if i > 0 and self._vmas[i - 1].end > vma.start:
            raise KernelBug(f"{vma} overlaps {self._vmas[i - 1]}")
        self._starts.insert(i, vma.start)
        self._vmas.insert(i, vma)

    def remove(self, vma: Vma) -> None:
        i = bisect.bisect_left(self._starts, vma.start)
        if i == len(self._vmas) or self._vmas[i] is not vma:
            raise KernelBug(f"{vma} is not in the set")
        del self._starts[i]
        del self._vmas[i]

    def find(self, addr: int) -> Vma | None:
        """The VMA containing ``addr``, if any."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self._vmas[i].end:
            return self._vmas[i]
        return None

    def find_next(self, addr: int) -> Vma | None:
        """``find_vma``: the first VMA with end > addr."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self._vmas[i].end:
            return self._vmas[i]
        return self._vmas[i + 1] if i + 1 < len(self._vmas) else None

    def intersecting(self, start: int, end: int) -> list[Vma]:
        """VMAs overlapping [start, end), in address order."""
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        out = []
        while i < len(self._vmas) and self._vmas[i].start < end:
            if self._vmas[i].end > start:
                out.append(self._vmas[i])
            i += 1
        return out

    def bounds_around(self, start: int, end: int) -> tuple[int, int | None]:
        """(end of the last VMA below ``start`` or 0, start of the first VMA at or
        above ``end`` or None): the ``floor`` and ``ceiling`` of ``free_pgtables``."""
        i = bisect.bisect_left(self._starts, start)
        floor = self._vmas[i - 1].end if i > 0 else 0
        j = bisect.bisect_left(self._starts, end)
        ceiling = self._vmas[j].start if j < len(self._vmas) else None
        return min(floor, start), ceiling

    def neighbours(self, vma: Vma) -> tuple[Vma | None, Vma | None]:
        i = bisect.bisect_left(self._starts, vma.start)
        prev = self._vmas[i - 1] if i > 0 else None
        nxt = self._vmas[i + 1] if i + 1 < len(self._vmas) else None
        return prev, nxt

    def gaps(self, low: int, high: int) -> Iterator[tuple[int, int]]:
        """Free gaps [a, b) inside [low, high), highest first."""
        prev_start = high
        for vma in reversed(self._vmas):
            if vma.end <= low:
                break
            if vma.start >= high:
                continue
            gap_lo = max(vma.end, low)
            if prev_start > gap_lo:
                yield gap_lo, prev_start
            prev_start = min(prev_start, vma.start)
        if prev_start > low:
            yield low, prev_start
