"""The size and OOM checks in hugetlb memory, for drivers that take only huge pages.

Kernel counterpart: a mirror of ``MAP_HUGETLB`` memory (an ODP MR registered
with ``IB_ACCESS_HUGETLB`` maps only hugetlb pages). The 4 KiB versions
(``checks_capabilities``) skip a driver claiming ``HUGE_ONLY``: they cut a
range at 4 KiB, and ``__oom_reap_task_mm`` skips ``VM_HUGETLB`` VMAs. These
keep every operation 2 MiB aligned, so such a driver is tested there too:
device mappings over several hugetlb pages across two page-middle tables,
each torn down by one CPU operation; and an OOM reap that, skipping the
hugetlb VMA, must leave the device's mappings and the data whole (no
notifier ran, so nothing may have been dropped), with the exit after it
tearing everything down.
"""

from __future__ import annotations

from collections.abc import Callable

from .. import MADV_DONTNEED, MAP_FIXED_NOREPLACE, MAP_HUGETLB, PROT_READ
from ..driver import Capability
from ..mm.exit import oom_reap
from .env import ANON, HUGE, PAGE, RW, CheckSkipped, DriverSpec, Env, environment, needs, pattern

#: A 1 GiB boundary (one page-middle table maps 1 GiB): the range starts one
#: huge page before it, so its huge pages sit in two PMD tables.
_PUD = 1 << 30
_AT = 16 * _PUD - HUGE


def _huge_only(env: Env) -> None:
    if not Capability.HUGE_ONLY & env.caps:
        raise CheckSkipped(
            f"{env.spec} does not claim HUGE_ONLY: the 4 KiB version of this check covers it"
        )


def _hugetlb(env: Env, npages: int) -> int:
    """``npages`` hugetlb pages, mapped at ``_AT`` (across a 1 GiB boundary)."""
    return env.proc.mmap(npages * HUGE, RW, ANON | MAP_HUGETLB | MAP_FIXED_NOREPLACE, addr=_AT)


def check_large_hugetlb_range_one_invalidation(spec: DriverSpec) -> None:
    """6 MiB of device mappings over three hugetlb pages in two PMD tables,
    torn down by one mprotect, one MADV_DONTNEED and one munmap, each covering
    all of them."""
    with environment(spec) as env:
        needs(env, Capability.READ)
        _huge_only(env)
        size = 3 * HUGE
        n = size // PAGE
        a = _hugetlb(env, 3)
        assert a // _PUD != (a + size - 1) // _PUD, "the range must cross a 1 GiB boundary"
        data = env.map_on_device(a, size, 90)
        if Capability.WRITE & env.caps:
            data = pattern(size, 91)
            env.mirror.write(a, data)
            assert env.proc.read(a, size) == data, "the CPU does not see the device's write"
            env.proc.mprotect(a, size, PROT_READ)
            writable = [i for i, p in enumerate(env.mirror.device_ptes(a, n)) if p and p.writable]
            assert not writable, f"{len(writable)} page(s) device-writable after one mprotect"
            env.check(a, n)
        env.proc.madvise(a, size, MADV_DONTNEED)
        left = [i for i, p in enumerate(env.mirror.device_ptes(a, n)) if p is not None]
        assert not left, f"{len(left)} device mapping(s) left after one MADV_DONTNEED"
        assert env.mirror.read(a, size) == bytes(size), "MADV_DONTNEED'd hugetlb memory reads data"
        env.check(a, n)
        env.proc.munmap(a, size)
        left = [i for i, p in enumerate(env.mirror.device_ptes(a, n)) if p is not None]
        assert not left, f"{len(left)} device mapping(s) left after one munmap"


def check_oom_reap_skips_hugetlb_device_mappings(spec: DriverSpec) -> None:
    """The OOM reaper skips a hugetlb VMA without a notifier call: the device
    keeps its mappings and reads the data; the exit after it drops them all."""
    with environment(spec) as env:
        needs(env, Capability.READ)
        _huge_only(env)
        size = 2 * HUGE
        n = size // PAGE
        a = _hugetlb(env, 2)
        env.proc.write(a, pattern(size, 92))
        assert env.mirror.read(a, size) == pattern(size, 92)
        env.check(a, n)
        before = [e.pfn for e in env.proc.pagemap(a, n)]
        skipped = oom_reap(env.proc.mm)
        assert skipped == [], f"the reaper skipped a VMA for a notifier: {skipped}"
        after = env.proc.pagemap(a, n)
        assert {e.kind for e in after} == {"hugetlb"}, "the reaper zapped hugetlb memory"
        assert [e.pfn for e in after] == before, "the reaper moved hugetlb memory"
        left = [i for i, p in enumerate(env.mirror.device_ptes(a, n)) if p is None]
        assert not left, f"{len(left)} device mapping(s) dropped with no invalidation"
        assert env.mirror.read(a, size) == pattern(size, 92), "the reap lost hugetlb data"
        env.check(a, n)
        env.proc.exit()
        gone = [i for i, p in enumerate(env.mirror.device_ptes(a, n)) if p is not None]
        assert not gone, f"{len(gone)} device mapping(s) left after the reaped process exited"


HUGE_ONLY_SIZE_CHECKS: list[Callable[[DriverSpec], None]] = [
    check_large_hugetlb_range_one_invalidation
]
HUGE_ONLY_OOM_CHECKS: list[Callable[[DriverSpec], None]] = [
    check_oom_reap_skips_hugetlb_device_mappings
]
