"""Conformance checks of teardown: after ``close()`` nothing of the mirror remains.

Kernel counterpart: a driver's ``release`` file operation
(``dmirror_fops_release``, ``nouveau_svmm_fini``, ``ib_umem_odp_release``):
``mmu_interval_notifier_remove`` for every notifier it inserted, its device
pages evicted back to system memory (no device-private entry left in the
process's page tables), its device page table and DMA mappings gone, every
page reference and pin dropped. Afterwards the file refuses work: every
``Mirror`` operation but ``close`` and ``device_ptes`` raises an
``HmmsimError`` (dmirror's ioctls say ``EFAULT``) and changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable

from ..driver import Capability
from ..errors import HmmsimError
from .env import PAGE, DriverSpec, Env, environment, needs, pattern

#: pagemap kinds of device memory.
_DEVICE_KINDS = {"device_private", "device_coherent"}


def _notifiers(env: Env) -> int:
    """Interval and classic notifiers registered on the process's mm."""
    subs = env.proc.mm.notifier_subscriptions
    if subs is None:
        return 0
    return len(subs.itree) + len(subs.classic)


def _populate(env: Env, addr: int, npages: int) -> None:
    """Map pages on the device every way the driver claims."""
    env.proc.write(addr, pattern(npages * PAGE, 61))
    env.mirror.read(addr, npages * PAGE)
    half = npages // 2
    if Capability.WRITE & env.caps:
        env.mirror.write(addr, pattern(PAGE, 62))
    if Capability.MIGRATE & env.caps:
        env.mirror.migrate_to_device(addr + half * PAGE, half // 2)
    if Capability.EXCLUSIVE & env.caps:
        env.mirror.make_exclusive(addr + (half + half // 2) * PAGE, 2)
    env.check(addr, npages)


def _refused(what: str, call: Callable[[], object]) -> None:
    try:
        call()
    except HmmsimError:
        return
    raise AssertionError(f"a closed mirror accepted {what}")


def check_close_leaves_nothing(spec: DriverSpec) -> None:
    """After close: no notifier on the mm, no device PTE, no DMA mapping, no
    pin or extra page reference; device pages still in the process come back
    on a CPU touch, and after the device is removed none is left; the data is
    the process's, intact."""
    with environment(spec) as env:
        needs(env, Capability.READ)
        n = 16
        base = _notifiers(env)
        a = env.mmap(n * PAGE)
        _populate(env, a, n)
        env.mirror.close()
        # The mirror is the only user of notifiers on this mm.
        assert _notifiers(env) == 0, (
            f"{_notifiers(env)} notifier(s) left on the mm after close (had {base})"
        )
        assert all(p is None for p in env.mirror.device_ptes(a, n)), "device PTEs left after close"
        dbg = env.machine.dma_debug
        for dev in dbg.devices if dbg is not None else ():
            live = dev.mappings()
            assert not live, f"{dev.name}: {len(live)} DMA mapping(s) alive after close"
        phys = env.machine.phys
        assert not phys.pins, f"pins left after close: {dict(phys.pins)}"
        assert not phys.extra_refs, f"page references left after close: {dict(phys.extra_refs)}"
        data = pattern(n * PAGE, 61)
        if Capability.WRITE & env.caps:
            data = pattern(PAGE, 62) + data[PAGE:]
        # Device memory may outlive the file (nouveau's VRAM belongs to the
        # DRM device, not the client): what is left must still come back on
        # a CPU touch, and removing the device must evict the rest.
        half = n // 2 + n // 8
        assert env.proc.read(a, half * PAGE) == data[: half * PAGE], "data changed across close"
        env.device.remove()
        kinds = [e.kind for e in env.proc.pagemap(a, n)]
        left = [k for k in kinds if k in _DEVICE_KINDS]
        assert not left, f"the process maps {len(left)} device page(s) after remove: {kinds}"
        assert env.proc.read(a, n * PAGE) == data, "data changed across close and remove"


def check_closed_mirror_refuses_work(spec: DriverSpec) -> None:
    """Every operation on a closed mirror raises an HmmsimError and does nothing:
    no mapping appears, no byte is stored, closing again is harmless."""
    with environment(spec) as env:
        needs(env, Capability.READ)
        a = env.mmap(4 * PAGE)
        env.proc.write(a, pattern(4 * PAGE, 71))
        env.mirror.read(a, PAGE)
        env.mirror.close()
        m = env.mirror
        _refused("a read", lambda: m.read(a, 4 * PAGE))
        if Capability.WRITE & env.caps:
            _refused("a write", lambda: m.write(a, pattern(PAGE, 72)))
        if Capability.MIGRATE & env.caps:
            _refused("a migration", lambda: m.migrate_to_device(a, 4))
        if Capability.EXCLUSIVE & env.caps:
            _refused("make_exclusive", lambda: m.make_exclusive(a, 4))
        assert all(p is None for p in m.device_ptes(a, 4)), "a closed mirror mapped pages"
        kinds = {e.kind for e in env.proc.pagemap(a, 4)}
        assert kinds <= {"anon", "hugetlb"}, f"a closed mirror left {kinds} in the process"
        assert env.proc.read(a, 4 * PAGE) == pattern(4 * PAGE, 71), "a closed mirror stored data"
        m.close()  # a second close is harmless


TEARDOWN_CHECKS: list[Callable[[DriverSpec], None]] = [
    check_close_leaves_nothing,
    check_closed_mirror_refuses_work,
]
