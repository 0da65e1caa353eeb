"""The environment a conformance check runs in: a driver spec, a fresh machine, a mirror.

``DriverSpec`` names a driver and its probe parameters; ``open_environment``
probes it on a small machine, spawns a process and opens a mirror;
``close_environment`` tears it all down and checks that nothing leaked.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import numpy as np

from .. import MADV_HUGEPAGE, MAP_ANONYMOUS, MAP_HUGETLB, MAP_PRIVATE, PROT_READ, PROT_WRITE
from ..driver import Capability, Device, Driver, Mirror
from ..machine import Machine, MachineConfig
from ..mm.process import Process
from ..plugins import DRIVERS_GROUP, find_driver, get_plugin_manager, parse_driver_spec
from .invariants import (
    check_dma_contract,
    check_mirror,
    check_no_leaks,
    check_notifier_contract,
    check_zero_pages,
)
from .poison import check_poison, install_poisoning
from .watchdog import install_watchdog

PAGE = 4096
HUGE = 2 << 20
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS


@attrs.frozen
class DriverSpec:
    """A driver name plus probe parameters (``NAME[:key=value,...]``)."""

    name: str
    params: tuple[tuple[str, str], ...] = ()
    #: The entry-point group the driver comes from (the bug zoo has its own).
    group: str = DRIVERS_GROUP

    @classmethod
    def parse(cls, spec: str, group: str = DRIVERS_GROUP) -> DriverSpec:
        name, params = parse_driver_spec(spec)
        return cls(name, tuple(sorted(params.items())), group)

    def plugin_manager(self) -> Any:
        """A plugin manager that knows this driver."""
        return get_plugin_manager(group=self.group)

    def __str__(self) -> str:
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.params)

    def driver(self, pm: Any = None) -> Driver:
        return find_driver(pm or self.plugin_manager(), self.name)()

    def capabilities(self, pm: Any = None) -> Capability:
        return self.driver(pm).capabilities_for(**dict(self.params))

    def machine(self, small: bool = False, huge_only: bool = False) -> Machine:
        """The checks' machine; ``small`` for the race scenarios, built thousands
        of times (no hugetlb pool, less RAM to index). ``huge_only`` (a driver
        claiming ``HUGE_ONLY``): a hugetlb pool big enough for every mapping
        ``Env.mmap`` makes, since each one is a 2 MiB hugetlb mapping."""
        if small:
            if huge_only:
                return Machine(
                    MachineConfig(ram_bytes=32 << 20, swap_bytes=1 << 20, hugetlb_pages={HUGE: 6})
                )
            return Machine(MachineConfig(ram_bytes=16 << 20, swap_bytes=1 << 20))
        pool = 32 if huge_only else 2
        return Machine(
            MachineConfig(ram_bytes=256 << 20, swap_bytes=64 << 20, hugetlb_pages={HUGE: pool})
        )


@attrs.define
class Env:
    """What a check works with: machine, device, process, mirror."""

    spec: DriverSpec
    machine: Machine
    device: Device
    proc: Process
    mirror: Mirror
    caps: Capability
    #: The driver's ``mapping_granule`` (bytes).
    granule: int = PAGE

    def mmap(self, size: int, prot: int = RW, flags: int = ANON, **kw: Any) -> int:
        """``mmap`` for a check. A driver claiming ``HUGE_ONLY`` refuses memory
        that is not huge, so anonymous memory is then a ``MAP_HUGETLB``
        mapping rounded up to 2 MiB (2 MiB aligned)."""
        if Capability.HUGE_ONLY & self.caps and "file" not in kw and flags & MAP_ANONYMOUS:
            flags |= MAP_HUGETLB
            size = (size + HUGE - 1) & ~(HUGE - 1)
        return self.proc.mmap(size, prot, flags, **kw)

    def thp_region(self) -> int:
        """A 2 MiB-aligned, MADV_HUGEPAGE region of 2 MiB (its first fault makes a THP).

        Raises ``CheckSkipped`` for a driver claiming ``HUGE_ONLY`` (it refuses THP
        memory by definition of the scenario: hugetlb is what it maps)."""
        if Capability.HUGE_ONLY & self.caps:
            raise CheckSkipped(f"{self.spec} claims HUGE_ONLY: a THP scenario does not apply")
        a = (self.mmap(2 * HUGE) + HUGE - 1) & ~(HUGE - 1)
        self.proc.madvise(a, HUGE, MADV_HUGEPAGE)
        return a

    def check(self, addr: int, npages: int) -> None:
        check_mirror(self.mirror, addr, npages, granule=self.granule)

    def filled(self, npages: int, seed: int) -> tuple[int, bytes]:
        """A new mapping of ``npages`` pages the CPU filled with ``pattern(.., seed)``.

        Returns:
            Its address and the bytes written.
        """
        addr = self.mmap(npages * PAGE)
        data = pattern(npages * PAGE, seed)
        self.proc.write(addr, data)
        return addr, data

    def map_on_device(self, addr: int, size: int, seed: int) -> bytes:
        """Fill ``size`` bytes at ``addr`` from the CPU, read them through the
        device, which must map every page of it, and check the mirror.

        Returns:
            The bytes written (``pattern(size, seed)``).
        """
        n = size // PAGE
        data = pattern(size, seed)
        self.proc.write(addr, data)
        assert self.mirror.read(addr, size) == data
        ptes = self.mirror.device_ptes(addr, n)
        assert all(p is not None for p in ptes), "a device read left pages unmapped"
        self.check(addr, n)
        return data

    def open(self, proc: Process) -> Mirror:
        return self.device.open(proc)


def open_environment(spec: DriverSpec, pm: Any = None, *, small: bool = False) -> Env:
    """Probe the driver on a fresh machine, spawn a process and open a mirror on it."""
    pm = pm or spec.plugin_manager()
    caps = spec.capabilities(pm)
    machine = spec.machine(small, bool(Capability.HUGE_ONLY & caps))
    machine.plugin_manager = pm
    install_poisoning(machine)
    install_watchdog(machine)
    device = machine.probe(spec.name, **dict(spec.params))
    proc = machine.spawn()
    mirror = device.open(proc)
    granule = int(getattr(spec.driver(pm), "mapping_granule", PAGE))
    return Env(spec, machine, device, proc, mirror, caps, granule)


def close_environment(env: Env) -> None:
    """Close the mirror, let every process exit, and check that nothing leaked."""
    env.mirror.close()
    for p in list(env.machine.processes):
        p.exit()
    check_no_leaks(env.machine)
    check_notifier_contract(env.machine)
    check_dma_contract(env.machine)
    check_poison(env.machine)
    check_zero_pages(env.machine)


@contextmanager
def environment(spec: DriverSpec, pm: Any = None) -> Iterator[Env]:
    """Probe the driver on a fresh machine; close everything and check for leaks."""
    env = open_environment(spec, pm)
    yield env
    close_environment(env)


@functools.lru_cache(maxsize=64)
def pattern(n: int, seed: int = 1) -> bytes:
    """``n`` bytes that differ from page to page and from seed to seed (cached:
    the race scenarios ask for the same ones thousands of times)."""
    return (np.arange(n, dtype=np.uint32) * 2654435761 + seed).astype(np.uint32).tobytes()[:n]


def needs(env: Env, cap: Capability) -> None:
    """Skip the check unless the driver claims every capability in ``cap``."""
    missing = cap & ~env.caps
    if missing:
        raise CheckSkipped(f"{env.spec} does not claim {missing.name}")


class CheckSkipped(Exception):
    """The driver does not claim what this check needs."""
