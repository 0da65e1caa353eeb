"""Device migration: ``migrate_vma_*`` and ``migrate_device_*``.

Kernel counterpart: include/linux/migrate.h and mm/migrate_device.c (mainline
6.19+, with device-private THP: ``MIGRATE_VMA_SELECT_COMPOUND`` and
``MIGRATE_PFN_COMPOUND``). ``make_device_exclusive`` (mm/rmap.c) is
:mod:`hmmsim.exclusive`.

The three steps follow the kernel's (docs/hmm-protocol.md §3):

* ``migrate_vma_setup`` collects [start, end) inside one ``MMU_NOTIFY_MIGRATE``
  invalidation (owner = ``pgmap_owner``): holes of anonymous VMAs and zero
  pages become "empty" entries (MIGRATE without VALID); selected pages are
  referenced, locked, unmapped and replaced by migration entries; then pages
  still mapped elsewhere are unmapped there too (``CLEAR``), and any page with
  references beyond the migration's own (pinned) is restored and dropped;
* the driver allocates and fills ``dst``; ``migrate_vma_pages`` commits the
  struct-page state and inserts pages into holes (a second ``MIGRATE``
  invalidation); ``migrate_vma_finalize`` turns the migration entries into
  entries for the new pages (or back to the old ones), unlocks and releases.

A folio is named by its head pfn; entries of ``src``/``dst`` are
``(pfn << MIGRATE_PFN_SHIFT) | flags``.

The package follows the steps: :mod:`~hmmsim.migrate.args` (``struct
migrate_vma``, the pfn encoding), :mod:`~hmmsim.migrate.collect` (setup:
collect + unmap), :mod:`~hmmsim.migrate.pages` (pages + finalize) and
:mod:`~hmmsim.migrate.device` (evicting device memory by pfn). Import from
``hmmsim.migrate``.
"""

from __future__ import annotations

from .args import (
    MIGRATE_PFN_COMPOUND,
    MIGRATE_PFN_MIGRATE,
    MIGRATE_PFN_SHIFT,
    MIGRATE_PFN_VALID,
    MIGRATE_PFN_WRITE,
    MIGRATE_VMA_SELECT_COMPOUND,
    MIGRATE_VMA_SELECT_DEVICE_COHERENT,
    MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
    MIGRATE_VMA_SELECT_SYSTEM,
    MigrateVma,
    migrate_pfn,
    migrate_pfn_to_page,
)
from .collect import migrate_vma_setup
from .device import migrate_device_coherent_folio, migrate_device_pfns, migrate_device_range
from .pages import (
    migrate_device_finalize,
    migrate_device_pages,
    migrate_vma_finalize,
    migrate_vma_pages,
)

__all__ = [
    "MIGRATE_PFN_COMPOUND",
    "MIGRATE_PFN_MIGRATE",
    "MIGRATE_PFN_SHIFT",
    "MIGRATE_PFN_VALID",
    "MIGRATE_PFN_WRITE",
    "MIGRATE_VMA_SELECT_COMPOUND",
    "MIGRATE_VMA_SELECT_DEVICE_COHERENT",
    "MIGRATE_VMA_SELECT_DEVICE_PRIVATE",
    "MIGRATE_VMA_SELECT_SYSTEM",
    "MigrateVma",
    "migrate_device_coherent_folio",
    "migrate_device_finalize",
    "migrate_device_pages",
    "migrate_device_pfns",
    "migrate_device_range",
    "migrate_pfn",
    "migrate_pfn_to_page",
    "migrate_vma_finalize",
    "migrate_vma_pages",
    "migrate_vma_setup",
]
