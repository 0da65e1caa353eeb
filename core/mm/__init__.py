"""The CPU side of the memory model: physical memory, page tables, VMAs, faults.

Each module models one part of Linux mm/; see its docstring for the kernel
counterpart.
"""

# The linux/mm.h subset a driver may use (drivers import these from
# ``hmmsim.mm``, never from its modules). Added for dmirror.
from .fault import VM_FAULT_OOM, VM_FAULT_SIGBUS
from .oom import alloc_pages_nofail
from .pagetable import PAGE_SHIFT, PAGE_SIZE, PMD_ORDER, PMD_PAGES, PUD_ORDER
from .pfnmap import vm_insert_page
from .physmem import ZERO_PFN, PG_dirty, PG_locked
from .vma import VM_READ, Vma

__all__ = [
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "PMD_ORDER",
    "PMD_PAGES",
    "PUD_ORDER",
    "VM_FAULT_OOM",
    "VM_FAULT_SIGBUS",
    "VM_READ",
    "ZERO_PFN",
    "PG_dirty",
    "PG_locked",
    "Vma",
    "alloc_pages_nofail",
    "vm_insert_page",
]
