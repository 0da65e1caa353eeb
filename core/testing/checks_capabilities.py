"""Conformance checks of what a driver claims and of sizes the basic checks never use.

Kernel counterpart: the properties behind each ``Capability`` a driver
declares. ``HUGE_MAPPINGS``: where the CPU maps a PMD (a THP), a device fault
over it maps order 9 too (``hmm_pfn_to_map_order``, as nouveau and
dmirror's PROT_PMD snapshots rely on). ``DEVICE_COHERENT``: pages migrated to
device memory stay CPU-addressable (``MEMORY_DEVICE_COHERENT``): the CPU
reads and writes them in place, no migration back. ``DEVICE_PRIVATE``:
migrated pages are device-private entries the device maps as its own memory.
``P2P``: peer memory a process maps (``p2pmem/allocate``) is reachable
through the mirror and mapped as such. Sizes: device mappings of several
MiB that span several page tables, each torn down by one CPU operation (one
notifier range that covers them all).
The OOM reaper's non-blockable invalidation (``__oom_reap_task_mm``): a
driver that accepts it must have dropped its mappings; one that cannot must
refuse, and the reaper then skips the VMA.
"""

from __future__ import annotations

from collections.abc import Callable

from .. import MADV_DONTNEED, PROT_READ
from ..driver import Capability
from ..mm.exit import oom_reap
from .env import HUGE, PAGE, CheckSkipped, DriverSpec, environment, needs, pattern


def check_huge_mappings(spec: DriverSpec) -> None:
    """A device read over a THP maps it with order 9, and a split brings it down."""
    with environment(spec) as env:
        needs(env, Capability.HUGE_MAPPINGS | Capability.READ)
        a = env.thp_region()
        env.proc.write(a, pattern(HUGE, 81))
        assert env.proc.pagemap(a, 1)[0].order == 9, "no THP to test with"
        assert env.mirror.read(a, HUGE) == pattern(HUGE, 81)
        ptes = env.mirror.device_ptes(a, HUGE // PAGE)
        orders = {p.order if p is not None else None for p in ptes}
        assert orders == {9}, f"the device maps a PMD-mapped THP with orders {orders}, not 9"
        env.check(a, HUGE // PAGE)
        env.proc.munmap(a + HUGE - PAGE, PAGE)  # PTE-mapped from now on
        env.check(a, HUGE // PAGE - 1)
        assert env.mirror.read(a, HUGE - PAGE) == pattern(HUGE, 81)[: HUGE - PAGE]
        env.check(a, HUGE // PAGE - 1)


def check_device_coherent_memory(spec: DriverSpec) -> None:
    """Coherent device memory: the CPU reads and writes migrated pages in place."""
    with environment(spec) as env:
        needs(env, Capability.DEVICE_COHERENT | Capability.MIGRATE)
        n = 8
        a, data = env.filled(n, 82)
        assert env.mirror.migrate_to_device(a, n) == n
        kinds = {e.kind for e in env.proc.pagemap(a, n)}
        assert kinds == {"device_coherent"}, f"migrated pages are {kinds}, not device_coherent"
        assert env.proc.read(a, n * PAGE) == data
        assert {e.kind for e in env.proc.pagemap(a, n)} == {"device_coherent"}, (
            "a CPU read migrated coherent device memory back"
        )
        env.proc.write(a + PAGE, pattern(PAGE, 83))
        assert {e.kind for e in env.proc.pagemap(a, n)} == {"device_coherent"}, (
            "a CPU write migrated coherent device memory back"
        )
        env.check(a, n)
        if Capability.READ & env.caps:
            want = data[:PAGE] + pattern(PAGE, 83) + data[2 * PAGE :]
            assert env.mirror.read(a, n * PAGE) == want
            for p in env.mirror.device_ptes(a, n):
                assert p is not None and p.memory == "device_coherent", p
            env.check(a, n)
        env.mirror.migrate_to_system(a, n)
        assert {e.kind for e in env.proc.pagemap(a, n)} == {"anon"}


def check_device_private_memory(spec: DriverSpec) -> None:
    """Private device memory: migrated pages are device-private entries, the
    device maps them as its own memory, the CPU cannot reach them in place."""
    with environment(spec) as env:
        needs(env, Capability.DEVICE_PRIVATE | Capability.MIGRATE | Capability.READ)
        n = 8
        a, data = env.filled(n, 84)
        assert env.mirror.migrate_to_device(a, n) == n
        kinds = {e.kind for e in env.proc.pagemap(a, n)}
        assert kinds == {"device_private"}, f"migrated pages are {kinds}, not device_private"
        assert env.mirror.read(a, n * PAGE) == data
        for p in env.mirror.device_ptes(a, n):
            assert p is not None and p.memory == "device_private", p
        env.check(a, n)


def check_large_range_one_invalidation(spec: DriverSpec) -> None:
    """3 MiB of device mappings across three page tables, torn down by one
    mprotect, one MADV_DONTNEED and one munmap, each covering all of them."""
    with environment(spec) as env:
        needs(env, Capability.READ)
        if Capability.HUGE_ONLY & env.caps:
            # Its mprotect and MADV_DONTNEED split the range at 4 KiB.
            raise CheckSkipped(f"{spec} claims HUGE_ONLY: the range is cut at 4 KiB")
        size = 3 << 20
        n = size // PAGE
        base = env.mmap(size + 2 * HUGE)
        # Three pages before a 2 MiB boundary: the range spans three page tables.
        a = ((base + HUGE - 1) & ~(HUGE - 1)) + HUGE - 3 * PAGE
        data = env.map_on_device(a, size, 85)
        if Capability.WRITE & env.caps:
            data = pattern(size, 86)
            env.mirror.write(a, data)
            env.proc.mprotect(a, size, PROT_READ)
            writable = [i for i, p in enumerate(env.mirror.device_ptes(a, n)) if p and p.writable]
            assert not writable, f"{len(writable)} page(s) device-writable after one mprotect"
            env.check(a, n)  # reads all of it back through the device
        env.proc.madvise(a, size, MADV_DONTNEED)
        left = [i for i, p in enumerate(env.mirror.device_ptes(a, n)) if p is not None]
        assert not left, f"{len(left)} device mapping(s) left after one MADV_DONTNEED"
        assert env.mirror.read(a, size) == bytes(size)
        env.proc.munmap(a, size)
        left = [i for i, p in enumerate(env.mirror.device_ptes(a, n)) if p is not None]
        assert not left, f"{len(left)} device mapping(s) left after one munmap"


def check_oom_reap_with_device_mappings(spec: DriverSpec) -> None:
    """The OOM reaper's non-blockable invalidation: a driver that accepts it
    maps nothing of the reaped range afterwards; one that refuses keeps the
    data whole; device memory is reaped too and nothing leaks."""
    with environment(spec) as env:
        needs(env, Capability.READ)
        if Capability.HUGE_ONLY & env.caps:
            # __oom_reap_task_mm skips VM_HUGETLB VMAs: no invalidation to see.
            raise CheckSkipped(f"{spec} claims HUGE_ONLY: the OOM reaper skips hugetlb VMAs")
        n = 16
        a = env.mmap(n * PAGE)
        env.proc.write(a, pattern(n * PAGE, 87))
        env.mirror.read(a, n * PAGE)
        if Capability.MIGRATE & env.caps:
            env.mirror.migrate_to_device(a + 8 * PAGE, 4)
        env.check(a, n)
        skipped = oom_reap(env.proc.mm)
        if skipped:
            # The driver refused (nouveau refuses every non-blockable range):
            # allowed, and then nothing was reaped and nothing may be lost.
            assert env.mirror.read(a, n * PAGE) == pattern(n * PAGE, 87)
        else:
            left = [i for i, p in enumerate(env.mirror.device_ptes(a, n)) if p is not None]
            assert not left, f"the driver accepted the reap but still maps {len(left)} page(s)"
            assert {e.kind for e in env.proc.pagemap(a, n)} == {"none"}
        env.check(a, n)


def check_p2p_memory(spec: DriverSpec) -> None:
    """Peer memory: a process maps a provider's P2PDMA pages (its
    ``p2pmem/allocate`` file); the device reads (and writes) them through the
    mirror, maps them as ``p2p`` memory, and drops them when they are unmapped."""
    from .. import MAP_SHARED, PROT_WRITE
    from ..pci import (
        PCI_VENDOR_ID_AMD,
        pci_p2pdma_add_resource,
        pci_p2pmem_allocate_file,
        pci_topology,
    )

    with environment(spec) as env:
        needs(env, Capability.P2P | Capability.READ)
        topo = pci_topology(env.machine)
        # The provider gets a host bridge of its own, as a device probed
        # without a topology has: on an AMD Zen CPU, which routes P2P between
        # root complexes, every device reaches it (a driver that DMA-maps peer
        # memory gets PCI_P2PDMA_MAP_THRU_HOST_BRIDGE, not NOT_SUPPORTED).
        topo.cpu_vendor, topo.cpu_family = PCI_VENDOR_ID_AMD, 0x17
        provider = topo.add_endpoint(
            topo.add_root_port(topo.add_host_bridge()), "p2p-provider", bars={0: 4 << 20}
        )
        pci_p2pdma_add_resource(provider, 0, 0, 0)
        n = 8
        a = env.mmap(
            n * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, file=pci_p2pmem_allocate_file(provider)
        )
        env.proc.write(a, pattern(n * PAGE, 88))
        assert env.mirror.read(a, n * PAGE) == pattern(n * PAGE, 88)
        kinds = {p.memory if p is not None else None for p in env.mirror.device_ptes(a, n)}
        assert kinds == {"p2p"}, f"the device maps peer memory as {kinds}, not p2p"
        env.check(a, n)
        if Capability.WRITE & env.caps:
            env.mirror.write(a + PAGE, pattern(PAGE, 89))
            assert env.proc.read(a + PAGE, PAGE) == pattern(PAGE, 89)
            env.check(a, n)
        env.proc.munmap(a, n * PAGE)
        assert all(p is None for p in env.mirror.device_ptes(a, n)), (
            "the device maps peer memory after munmap"
        )


CAPABILITY_CHECKS: list[Callable[[DriverSpec], None]] = [
    check_huge_mappings,
    check_device_coherent_memory,
    check_device_private_memory,
    check_p2p_memory,
]
SIZE_CHECKS: list[Callable[[DriverSpec], None]] = [check_large_range_one_invalidation]
OOM_CHECKS: list[Callable[[DriverSpec], None]] = [check_oom_reap_with_device_mappings]
