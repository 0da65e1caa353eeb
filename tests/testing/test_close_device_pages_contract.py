"""Device pages after ``close()``: what every driver owes, and how
``zoo_dmirror_close_leaves_device_pages`` breaks it.

Evicting device memory on ``close()`` is not a contract of every driver:
nouveau's VRAM pages belong to the device, not to the client that migrated
them, and stay in the process after the client closes. What every driver
must honour is that such pages fault back with their data. test_hmm.c's
device pages point at the dmirror that migrated them (``zone_device_data``),
which release frees: that is why its release evicts them. Without the
eviction the CPU fault back is a use after free, which the model reports as
a ``KernelBug`` (as KASAN would), so the generic fault-back after close
catches the mutant.
"""

from __future__ import annotations

import pytest
from hmmsim.errors import KernelBug
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


def test_the_mutant_faults_back_through_the_freed_dmirror():
    spec = DriverSpec("zoo_dmirror_close_leaves_device_pages", (), BUGZOO_GROUP)
    env, a = _migrated_then_closed(spec)
    assert _kinds(env, a) == {"device_private"}  # what dmirror itself no longer leaves
    with pytest.raises(KernelBug, match="use after free"):
        env.proc.read(a, PAGE)
