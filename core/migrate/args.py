"""``struct migrate_vma`` and the ``MIGRATE_PFN_*`` encoding of its ``src``/``dst``.

Kernel counterpart: include/linux/migrate.h. An entry of ``src``/``dst`` is
``(pfn << MIGRATE_PFN_SHIFT) | flags``; a folio is named by its head pfn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import attrs
import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from ..mm.vma import Vma

MIGRATE_PFN_VALID: Final = 1 << 0
MIGRATE_PFN_MIGRATE: Final = 1 << 1
MIGRATE_PFN_WRITE: Final = 1 << 3
MIGRATE_PFN_COMPOUND: Final = 1 << 4
MIGRATE_PFN_SHIFT: Final = 6

MIGRATE_VMA_SELECT_SYSTEM: Final = 1 << 0
MIGRATE_VMA_SELECT_DEVICE_PRIVATE: Final = 1 << 1
MIGRATE_VMA_SELECT_DEVICE_COHERENT: Final = 1 << 2
MIGRATE_VMA_SELECT_COMPOUND: Final = 1 << 3

_I64 = np.int64

#: Up to this many pages, collect/pages/finalize take the per-entry paths:
#: array set-up costs more than it saves on a fault's one page (the
#: vectorised paths pay off on migration windows of tens of pages and more).
SCALAR_MAX_PAGES: Final = 8


def migrate_pfn(pfn: int) -> int:
    return (pfn << MIGRATE_PFN_SHIFT) | MIGRATE_PFN_VALID


def migrate_pfn_to_page(entry: int) -> int | None:
    """The pfn an entry names, or None when it has no page (no VALID)."""
    entry = int(entry)
    if not entry & MIGRATE_PFN_VALID:
        return None
    return entry >> MIGRATE_PFN_SHIFT


@attrs.define(eq=False)
class MigrateVma:
    """``struct migrate_vma``."""

    vma: Vma | None
    start: int
    end: int
    src: NDArray[np.uint64] | None
    dst: NDArray[np.uint64] | None
    pgmap_owner: object | None = None
    flags: int = 0
    #: Set by ``migrate_to_ram``: the faulting device-private page, locked.
    fault_page: int | None = None
    cpages: int = 0
    npages: int = 0
    #: Model bookkeeping, not in the kernel struct: folios that were also
    #: unmapped from other mappings (so finalize must find those via rmap).
    unmapped_elsewhere: set[int] = attrs.field(factory=set, repr=False)


def _entries(args: MigrateVma) -> tuple[NDArray[np.uint64], NDArray[np.uint64]]:
    assert args.src is not None and args.dst is not None
    return args.src, args.dst
