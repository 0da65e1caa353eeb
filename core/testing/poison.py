"""Page poisoning and a use-after-free audit of memory accesses, for the checks.

Kernel counterpart: ``page_poisoning`` (``CONFIG_PAGE_POISONING``, boot
option ``page_poison=1``): a freed page is filled with a fixed pattern
(``PAGE_POISON`` 0xaa) and the pattern is verified when the page is handed
out again, so a store after free is reported ("pagealloc: memory
corruption") and a load after free reads the pattern instead of the old
data. KASAN plays the second role for accesses to freed memory.

``Poisoner`` does both for one machine of the conformance suite:

- every folio freed (RAM frames and device pages alike, through
  ``PhysMem.free_watchers``) gets the pattern, so a device that reads a page
  after its invalidation returned sees 0xaa bytes, never the old data that
  would make the read look right;
- every page read or written through ``PhysMem.read``/``read_pages``/
  ``write``/``write_pages`` while its folio is free is recorded as a
  violation at once (a device's load or store through a translation it
  should have dropped, caught whether or not the page is reused);
- ``check`` verifies that each poisoned page still free holds the pattern
  (a store after free that bypassed the audited paths).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from ..mm.pagetable import PAGE_SIZE
from ..mm.physmem import PG_zeroed

if TYPE_CHECKING:
    from ..machine import Machine

#: The byte freed pages are filled with (the kernel's ``PAGE_POISON``).
PAGE_POISON = 0xAA
_I64 = np.int64


class Poisoner:
    """Poison freed pages of ``machine`` and audit accesses to free pages."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.phys = machine.phys
        #: Pages poisoned since the last check (a set of pfns).
        self.poisoned: set[int] = set()
        #: One line per access to a free page.
        self.violations: list[str] = []
        self._installed = False

    def install(self) -> Poisoner:
        """Start poisoning frees and auditing accesses (idempotent)."""
        if self._installed or self.phys.arena is None:
            return self
        self._installed = True
        phys = self.phys
        phys.free_watchers.append(self._freed)
        read, read_pages = phys.read, phys.read_pages
        write, write_pages = phys.write, phys.write_pages

        def audited_read(pfn: int, offset: int, length: int) -> bytes:
            self._audit(np.array([pfn], dtype=_I64), "load from")
            return read(pfn, offset, length)

        def audited_read_pages(pfns: NDArray[np.int64]) -> NDArray[np.uint8]:
            self._audit(pfns, "load from")
            return read_pages(pfns)

        def audited_write(pfn: int, offset: int, data: Any) -> None:
            self._audit(np.array([pfn], dtype=_I64), "store to")
            write(pfn, offset, data)

        def audited_write_pages(pfns: NDArray[np.int64], data: NDArray[np.uint8]) -> None:
            self._audit(pfns, "store to")
            write_pages(pfns, data)

        # Instance attributes shadow the methods for this machine only.
        phys.read = audited_read  # type: ignore[method-assign]
        phys.read_pages = audited_read_pages  # type: ignore[method-assign]
        phys.write = audited_write  # type: ignore[method-assign]
        phys.write_pages = audited_write_pages  # type: ignore[method-assign]
        return self

    def _audit(self, pfns: NDArray[np.int64], what: str) -> None:
        if len(pfns) == 0:
            return
        pfns = np.asarray(pfns, dtype=_I64)
        heads = self.phys.head_of(pfns)
        free = self.phys.refcount[heads] <= 0
        if free.any():
            pfn = int(pfns[free][0])
            self.violations.append(
                f"{what} pfn {pfn:#x}, a free page (use after free: "
                f"{int(free.sum())} free page(s) in one access)"
            )

    def _freed(self, heads: NDArray[np.int64], orders: NDArray[np.int64]) -> None:
        if len(heads) == 0:
            return
        if orders.any():
            sizes = np.left_shift(1, orders.astype(_I64))
            starts = np.repeat(np.cumsum(sizes) - sizes, sizes)
            pages = np.repeat(np.asarray(heads, dtype=_I64), sizes) + (
                np.arange(int(sizes.sum()), dtype=_I64) - starts
            )
        else:
            pages = np.asarray(heads, dtype=_I64)
        arena = self.phys.arena
        assert arena is not None
        arena.scatter(pages, PAGE_POISON)
        self.phys.flags[pages] &= np.uint16(~PG_zeroed & 0xFFFF)
        self.poisoned.update(pages.tolist())

    def check(self) -> None:
        """No access to a free page happened, and free poisoned pages still hold
        the pattern; raises ``AssertionError`` naming the first offence."""
        assert not self.violations, (
            f"{len(self.violations)} access(es) to freed memory, first: {self.violations[0]}"
        )
        if not self.poisoned:
            return
        phys = self.phys
        pages = np.fromiter(self.poisoned, dtype=_I64, count=len(self.poisoned))
        still_free = pages[phys.refcount[phys.head_of(pages)] <= 0]
        self.poisoned = set(still_free.tolist())
        if len(still_free) == 0 or phys.arena is None:
            return
        data = phys.arena.gather(still_free)
        bad = np.flatnonzero((data != PAGE_POISON).any(axis=1))
        assert len(bad) == 0, (
            f"freed page {int(still_free[bad[0]]):#x} was written after it was freed "
            f"({int((data[bad[0]] != PAGE_POISON).sum())} of {PAGE_SIZE} poison bytes changed)"
        )


#: The poisoner of each machine the suite set one up on (a Machine has slots).
_POISONERS: weakref.WeakKeyDictionary[Machine, Poisoner] = weakref.WeakKeyDictionary()


def poisoner(machine: Machine) -> Poisoner | None:
    """The machine's ``Poisoner`` if the suite installed one."""
    return _POISONERS.get(machine)


def install_poisoning(machine: Machine) -> Poisoner:
    """Install (once) and return the machine's ``Poisoner``."""
    p = _POISONERS.get(machine)
    if p is None:
        p = _POISONERS[machine] = Poisoner(machine).install()
    return p


def check_poison(machine: Machine) -> None:
    """``Poisoner.check`` for a machine the suite poisons; nothing otherwise."""
    p = poisoner(machine)
    if p is not None:
        p.check()
