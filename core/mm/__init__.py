"""The CPU side of the memory model: physical memory, page tables, VMAs, faults.

Each module models one part of Linux mm/; see its docstring for the kernel
counterpart.

``hmmsim.mm`` itself is the face drivers use, the subset of ``linux/mm.h`` (and
the headers it pulls in: ``mm_types.h``, ``pgtable.h``, ``page-flags.h``) a
device driver may include. A module under ``drivers/`` imports these names from
``hmmsim.mm``, never from ``hmmsim.mm.<module>``: the modules are the model's
internals and may move, the names below stay.
"""

from __future__ import annotations

from .address_space import AddressSpace
from .fault import (
    VM_FAULT_DONE_COW,
    VM_FAULT_ERROR,
    VM_FAULT_FALLBACK,
    VM_FAULT_HWPOISON,
    VM_FAULT_HWPOISON_LARGE,
    VM_FAULT_LOCKED,
    VM_FAULT_MAJOR,
    VM_FAULT_NOPAGE,
    VM_FAULT_OOM,
    VM_FAULT_RETRY,
    VM_FAULT_SIGBUS,
    VM_FAULT_SIGSEGV,
)
from .kinds import MemoryKind
from .memremap import VmFault
from .oom import alloc_pages_nofail
from .pagetable import (
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_ORDER,
    PMD_PAGES,
    PMD_SIZE,
    PUD_ORDER,
    PUD_PAGES,
    PUD_SIZE,
)
from .pfnmap import remap_pfn_range, vm_insert_page, vmf_insert_pfn
from .physmem import (
    HUGE_ZERO_PFN,
    ZERO_PFN,
    PG_anon,
    PG_dirty,
    PG_locked,
    PG_uptodate,
    PhysMem,
)
from .process import Process
from .vma import (
    VM_EXEC,
    VM_HUGEPAGE,
    VM_IO,
    VM_MIXEDMAP,
    VM_NOHUGEPAGE,
    VM_PFNMAP,
    VM_READ,
    VM_SHARED,
    VM_WRITE,
    Vma,
)

__all__ = [
    "HUGE_ZERO_PFN",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "PMD_ORDER",
    "PMD_PAGES",
    "PMD_SIZE",
    "PUD_ORDER",
    "PUD_PAGES",
    "PUD_SIZE",
    "VM_EXEC",
    "VM_FAULT_DONE_COW",
    "VM_FAULT_ERROR",
    "VM_FAULT_FALLBACK",
    "VM_FAULT_HWPOISON",
    "VM_FAULT_HWPOISON_LARGE",
    "VM_FAULT_LOCKED",
    "VM_FAULT_MAJOR",
    "VM_FAULT_NOPAGE",
    "VM_FAULT_OOM",
    "VM_FAULT_RETRY",
    "VM_FAULT_SIGBUS",
    "VM_FAULT_SIGSEGV",
    "VM_HUGEPAGE",
    "VM_IO",
    "VM_MIXEDMAP",
    "VM_NOHUGEPAGE",
    "VM_PFNMAP",
    "VM_READ",
    "VM_SHARED",
    "VM_WRITE",
    "ZERO_PFN",
    "AddressSpace",
    "MemoryKind",
    "PG_anon",
    "PG_dirty",
    "PG_locked",
    "PG_uptodate",
    "PhysMem",
    "Process",
    "VmFault",
    "Vma",
    "alloc_pages_nofail",
    "remap_pfn_range",
    "vm_insert_page",
    "vmf_insert_pfn",
]
