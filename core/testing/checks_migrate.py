"""Conformance checks of device memory and migration beyond the happy path.

Kernel counterpart: what ``migrate_vma_setup``/``pages``/``finalize`` and a
driver's ``migrate_to_ram`` must keep true (mm/migrate_device.c), exercised as
lib/test_hmm.c's selftests do and past them: a range migrated in part, moved
back in part and migrated again; a read-only source (the device-private entry
must not be writable, ``SWP_DEVICE_PRIVATE_WRITE`` only for writable VMAs;
on the way back the PTE is made writable only where the VMA is);
invalidations of device-resident memory (mprotect and a partial munmap keep
the rest in device memory); and the ordinary checks once more after
``migrate_to_system``, on pages that made the round trip. Every step checks
the mirror invariants; each check runs in every memory variant a driver
declares (private and coherent), gated on ``MIGRATE``.
"""

from __future__ import annotations

from collections.abc import Callable

from .. import MADV_DONTNEED, MADV_PAGEOUT, PROT_READ, PROT_WRITE
from ..driver import Capability
from ..errors import HmmsimError, NotPermitted
from .env import PAGE, DriverSpec, Env, environment, needs, pattern

DEVICE_KINDS = {"device_private", "device_coherent"}


def _kinds(env: Env, addr: int, npages: int) -> list[str]:
    return [e.kind for e in env.proc.pagemap(addr, npages)]


def _back_to_system(env: Env, addr: int, npages: int) -> None:
    """Part of a range back to RAM: a CPU touch for device-private memory
    (``migrate_to_ram``), ``migrate_to_system`` for coherent memory (which the
    CPU reads in place)."""
    if Capability.DEVICE_PRIVATE & env.caps:
        env.proc.read(addr, npages * PAGE)
    else:
        env.mirror.migrate_to_system(addr, npages)


def check_partial_fault_back_then_migrate_again(spec: DriverSpec) -> None:
    """Migrate 16 pages, bring 4 back, migrate all 16 again: data and entries hold."""
    with environment(spec) as env:
        needs(env, Capability.MIGRATE)
        n = 16
        a, data = env.filled(n, 21)
        assert env.mirror.migrate_to_device(a, n) == n
        env.check(a, n)
        _back_to_system(env, a + 4 * PAGE, 4)
        kinds = _kinds(env, a, n)
        assert set(kinds[4:8]) == {"anon"}, f"pages brought back are {kinds[4:8]}"
        assert set(kinds[:4] + kinds[8:]) <= DEVICE_KINDS, kinds
        env.check(a, n)
        # The pages that came back are dirtied by the CPU, then everything goes again.
        env.proc.write(a + 5 * PAGE, pattern(PAGE, 22))
        data = data[: 5 * PAGE] + pattern(PAGE, 22) + data[6 * PAGE :]
        assert env.mirror.migrate_to_device(a, n) == n
        assert set(_kinds(env, a, n)) <= DEVICE_KINDS, _kinds(env, a, n)
        env.check(a, n)
        assert env.mirror.read(a, n * PAGE) == data
        if Capability.WRITE & env.caps:
            env.mirror.write(a + 6 * PAGE, pattern(PAGE, 23))
            data = data[: 6 * PAGE] + pattern(PAGE, 23) + data[7 * PAGE :]
            env.check(a, n)
        env.mirror.migrate_to_system(a, n)
        assert set(_kinds(env, a, n)) == {"anon"}, _kinds(env, a, n)
        assert env.proc.read(a, n * PAGE) == data
        env.check(a, n)


def check_migrate_read_only_source(spec: DriverSpec) -> None:
    """A page migrated out of a read-only mapping stays read-only on both sides."""
    with environment(spec) as env:
        needs(env, Capability.MIGRATE)
        n = 8
        a, data = env.filled(n, 31)
        env.proc.mprotect(a, n * PAGE, PROT_READ)
        if Capability.WRITE & env.caps:
            # Before the migration: a device write to a read-only mapping in
            # system memory is refused (hmm_range_fault says EPERM). After it,
            # the device entries must simply not be writable (invariant 2).
            try:
                env.mirror.write(a, pattern(PAGE, 32))
            except (NotPermitted, HmmsimError):
                pass
            else:
                raise AssertionError("device write to a read-only mapping succeeded")
        moved = env.mirror.migrate_to_device(a, n)
        assert 0 <= moved <= n
        entries = env.proc.pagemap(a, n)
        for i, e in enumerate(entries):
            assert not e.writable, f"page {i} of a read-only mapping is writable as {e.kind}"
        env.check(a, n)
        assert env.mirror.read(a, n * PAGE) == data
        env.check(a, n)
        env.mirror.migrate_to_system(a, n)
        for i, e in enumerate(env.proc.pagemap(a, n)):
            assert e.kind == "anon", f"page {i} is {e.kind} after migrate_to_system"
            assert not e.writable, f"page {i} came back writable into a read-only mapping"
        assert env.proc.read(a, n * PAGE) == data
        env.check(a, n)
        env.proc.mprotect(a, n * PAGE, PROT_READ | PROT_WRITE)
        env.proc.write(a, pattern(PAGE, 33))
        assert env.proc.read(a, PAGE) == pattern(PAGE, 33)
        env.check(a, n)


def check_invalidate_device_resident(spec: DriverSpec) -> None:
    """Invalidations of device-resident pages: mprotect keeps them in device
    memory (read-only), a partial munmap frees only what it unmaps, DONTNEED
    and reclaim leave no device mapping of what they dropped."""
    with environment(spec) as env:
        needs(env, Capability.MIGRATE)
        n = 16
        a, data = env.filled(n, 41)
        assert env.mirror.migrate_to_device(a, n) == n
        env.mirror.read(a, n * PAGE)
        env.check(a, n)
        env.proc.mprotect(a, n * PAGE, PROT_READ)
        kinds = _kinds(env, a, n)
        assert set(kinds) <= DEVICE_KINDS, f"mprotect moved device pages: {kinds}"
        for i, e in enumerate(env.proc.pagemap(a, n)):
            assert not e.writable, f"page {i} is writable after mprotect(PROT_READ)"
        env.check(a, n)
        assert env.mirror.read(a, n * PAGE) == data
        env.check(a, n)
        env.proc.munmap(a + 4 * PAGE, 4 * PAGE)
        assert all(p is None for p in env.mirror.device_ptes(a + 4 * PAGE, 4)), (
            "the device maps pages munmap removed"
        )
        kinds = _kinds(env, a, 4) + _kinds(env, a + 8 * PAGE, 8)
        assert set(kinds) <= DEVICE_KINDS, f"a partial munmap moved the rest: {kinds}"
        env.check(a, 4)
        env.check(a + 8 * PAGE, 8)
        env.proc.mprotect(a + 8 * PAGE, 8 * PAGE, PROT_READ | PROT_WRITE)
        env.proc.madvise(a + 8 * PAGE, 4 * PAGE, MADV_DONTNEED)
        assert _kinds(env, a + 8 * PAGE, 4) == ["none"] * 4
        assert all(p is None for p in env.mirror.device_ptes(a + 8 * PAGE, 4))
        assert env.mirror.read(a + 8 * PAGE, 4 * PAGE) == bytes(4 * PAGE)
        env.check(a + 8 * PAGE, 8)
        env.proc.madvise(a + 12 * PAGE, 4 * PAGE, MADV_PAGEOUT)
        env.check(a + 12 * PAGE, 4)
        assert env.mirror.read(a + 12 * PAGE, 4 * PAGE) == data[12 * PAGE :]
        assert env.proc.read(a, 4 * PAGE) == data[: 4 * PAGE]
        env.check(a, 4)


def check_round_trip_pages_behave(spec: DriverSpec) -> None:
    """After migrate_to_system the pages are ordinary anonymous memory again:
    exclusive (a CPU store does not copy), writable, and every invalidation
    (fork, mprotect, swap-out, page migration, munmap) keeps the mirror right."""
    with environment(spec) as env:
        needs(env, Capability.MIGRATE)
        n = 8
        a, data = env.filled(n, 51)
        env.mirror.migrate_to_device(a, n)
        env.mirror.migrate_to_system(a, n)
        entries = env.proc.pagemap(a, n)
        assert {e.kind for e in entries} == {"anon"}
        for i, e in enumerate(entries):
            assert e.writable, f"page {i} came back read-only from a writable mapping"
            assert e.exclusive, f"page {i} came back shared (not anon-exclusive)"
        before = [e.pfn for e in entries]
        env.proc.write(a, pattern(PAGE, 52))
        assert env.proc.pagemap(a, 1)[0].pfn == before[0], "a CPU store copied an exclusive page"
        data = pattern(PAGE, 52) + data[PAGE:]
        assert env.mirror.read(a, n * PAGE) == data
        env.check(a, n)
        if Capability.WRITE & env.caps:
            env.mirror.write(a + PAGE, pattern(PAGE, 53))
            data = data[:PAGE] + pattern(PAGE, 53) + data[2 * PAGE :]
            env.check(a, n)
            child = env.proc.fork()
            env.check(a, n)
            env.mirror.write(a + 2 * PAGE, pattern(PAGE, 54))
            assert child.read(a + 2 * PAGE, PAGE) == data[2 * PAGE : 3 * PAGE]
            data = data[: 2 * PAGE] + pattern(PAGE, 54) + data[3 * PAGE :]
            env.check(a, n)
            child.exit()
        env.proc.madvise(a, 2 * PAGE, MADV_PAGEOUT)
        env.check(a, n)
        assert env.proc.move_pages(a + 2 * PAGE, 2) == [0, 0]
        env.check(a, n)
        assert env.mirror.read(a, n * PAGE) == data
        env.check(a, n)
        env.mirror.migrate_to_device(a, n)  # and once more, after all that
        env.check(a, n)
        env.proc.munmap(a + 6 * PAGE, 2 * PAGE)
        env.check(a, 6)
        env.mirror.migrate_to_system(a, 6)
        assert env.proc.read(a, 6 * PAGE) == data[: 6 * PAGE]


MIGRATE_CHECKS: list[Callable[[DriverSpec], None]] = [
    check_partial_fault_back_then_migrate_again,
    check_migrate_read_only_source,
    check_invalidate_device_resident,
    check_round_trip_pages_behave,
]
