"""Linux user-space ABI constants for the memory syscalls (mman.h).

Kernel counterpart: include/uapi/asm-generic/mman-common.h, mman.h and
include/uapi/linux/mman.h (x86-64 values). Every name and value is the one a C
program would use, so a test ports from C without translation.
"""

from __future__ import annotations

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

PROT_NONE = 0x0
PROT_READ = 0x1
PROT_WRITE = 0x2
PROT_EXEC = 0x4
#: Accepted and ignored by mprotect/mmap on x86-64 (no VM flag).
PROT_SEM = 0x8
PROT_GROWSDOWN = 0x01000000
PROT_GROWSUP = 0x02000000
PROT_MASK = PROT_READ | PROT_WRITE | PROT_EXEC

MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_SHARED_VALIDATE = 0x03
MAP_TYPE = 0x0F
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_ANON = MAP_ANONYMOUS
MAP_GROWSDOWN = 0x0100
MAP_LOCKED = 0x2000
MAP_NORESERVE = 0x4000
MAP_POPULATE = 0x8000
MAP_NONBLOCK = 0x10000
MAP_HUGETLB = 0x40000
MAP_SYNC = 0x80000
MAP_FIXED_NOREPLACE = 0x100000

MAP_HUGE_SHIFT = 26
MAP_HUGE_MASK = 0x3F
MAP_HUGE_2MB = 21 << MAP_HUGE_SHIFT
MAP_HUGE_1GB = 30 << MAP_HUGE_SHIFT

#: Flags the model gives a meaning to. mmap ignores other flags, as Linux does,
#: except with ``MAP_SHARED_VALIDATE`` (EOPNOTSUPP).
MAP_KNOWN_FLAGS = (
    MAP_TYPE
    | MAP_FIXED
    | MAP_ANONYMOUS
    | MAP_NORESERVE
    | MAP_POPULATE
    | MAP_NONBLOCK
    | MAP_HUGETLB
    | MAP_FIXED_NOREPLACE
    | (MAP_HUGE_MASK << MAP_HUGE_SHIFT)
)

MADV_NORMAL = 0
MADV_RANDOM = 1
MADV_SEQUENTIAL = 2
MADV_WILLNEED = 3
MADV_DONTNEED = 4
MADV_FREE = 8
MADV_REMOVE = 9
MADV_DONTFORK = 10
MADV_DOFORK = 11
MADV_MERGEABLE = 12
MADV_UNMERGEABLE = 13
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
MADV_DONTDUMP = 16
MADV_DODUMP = 17
MADV_WIPEONFORK = 18
MADV_KEEPONFORK = 19
MADV_COLD = 20
MADV_PAGEOUT = 21
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23
MADV_DONTNEED_LOCKED = 24
MADV_COLLAPSE = 25
MADV_GUARD_INSTALL = 102
MADV_GUARD_REMOVE = 103

MREMAP_MAYMOVE = 1
MREMAP_FIXED = 2
MREMAP_DONTUNMAP = 4

#: Top of the user address space on x86-64 with 4-level paging (47 bits).
TASK_SIZE = (1 << 47) - PAGE_SIZE
#: Lowest address mmap hands out (vm.mmap_min_addr).
MMAP_MIN_ADDR = 0x10000
#: Where the top-down mmap allocator starts (below a notional stack gap).
MMAP_BASE = 0x7F00_0000_0000

__all__ = [name for name in dir() if name.isupper()]
