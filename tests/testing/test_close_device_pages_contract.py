"""Why no generic check catches ``zoo_dmirror_close_leaves_device_pages``.

Evicting device memory on ``close()`` is test_hmm.c's own choice (its 2026
fix: device pages kept a pointer to the freed mirror), not a contract of
every driver: nouveau's VRAM pages belong to the device, not to the client
that migrated them, and stay in the process after the client closes. What
every driver must honour after close, the pages faulting back with their
data and nothing left once the device is removed, the mutant honours too.
"""

from __future__ import annotations

from hmmsim.plugins import BUGZOO_GROUP
from hmmsim.testing.env import PAGE, DriverSpec, open_environment, pattern

N = 8


def _migrated_then_closed(spec: DriverSpec):
    env = open_environment(spec)
    a = env.mmap(N * PAGE)
    env.proc.write(a, pattern(N * PAGE, 5))
    assert env.mirror.migrate_to_device(a, N) == N
    env.mirror.close()
    return env, a


def _kinds(env, a):
    return {str(e.kind) for e in env.proc.pagemap(a, N)}


def test_nouveau_keeps_vram_pages_past_its_clients_close():
    env, a = _migrated_then_closed(DriverSpec("nouveau"))
    assert _kinds(env, a) == {"device_private"}
    assert env.proc.read(a, N * PAGE) == pattern(N * PAGE, 5)
    assert _kinds(env, a) == {"anon"}


def test_dmirror_evicts_on_close():
    env, a = _migrated_then_closed(DriverSpec("dmirror"))
    assert _kinds(env, a) == {"anon"}
    assert env.proc.read(a, N * PAGE) == pattern(N * PAGE, 5)


def test_the_mutant_keeps_the_generic_contracts_after_close_and_device_removal():
    spec = DriverSpec("zoo_dmirror_close_leaves_device_pages", (), BUGZOO_GROUP)
    env, a = _migrated_then_closed(spec)
    assert _kinds(env, a) == {"device_private"}  # what dmirror itself no longer does
    assert env.proc.read(a, PAGE) == pattern(PAGE, 5)  # faults back with its data
    env.device.remove()
    assert _kinds(env, a) == {"anon"}
    assert env.proc.read(a, N * PAGE) == pattern(N * PAGE, 5)
