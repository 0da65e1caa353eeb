"""Shared test helpers: constants and a recorder of MMU-notifier events."""

from __future__ import annotations

from collections.abc import Callable

import attrs
import hmmsim
import pytest
from hmmsim import Machine, MachineConfig
from hmmsim.notifier import NotifierRange


@attrs.frozen
class Event:
    mm: int
    event: str
    start: int
    end: int
    owner: object
    blockable: bool


class EventLog:
    """Every invalidate_range_start of the machine, in order."""

    def __init__(self, machine: Machine) -> None:
        self.events: list[Event] = []
        machine.invalidation_listeners.append(self._record)

    def _record(self, rng: NotifierRange) -> None:
        self.events.append(
            Event(rng.mm.id, rng.event.name, rng.start, rng.end, rng.owner, rng.blockable)
        )

    def clear(self) -> None:
        self.events.clear()

    def names(self) -> list[str]:
        return [e.event for e in self.events]

    def of(self, name: str) -> list[Event]:
        return [e for e in self.events if e.event == name]


@pytest.fixture
def make_machine() -> Callable[..., Machine]:
    def make(**kw: object) -> Machine:
        kw.setdefault("ram_bytes", 64 << 20)
        return hmmsim.Machine(MachineConfig(**kw))  # type: ignore[arg-type]

    return make


@pytest.fixture
def machine(make_machine: Callable[..., Machine]) -> Machine:
    return make_machine()


@pytest.fixture
def proc(machine: Machine) -> hmmsim.Process:
    return machine.spawn()


@pytest.fixture
def events(machine: Machine) -> EventLog:
    return EventLog(machine)


RW = hmmsim.PROT_READ | hmmsim.PROT_WRITE
ANON = hmmsim.MAP_PRIVATE | hmmsim.MAP_ANONYMOUS
PAGE = 4096
MB2 = 2 << 20


def register_test_drivers(
    monkeypatch: pytest.MonkeyPatch, classes: list[type[hmmsim.Driver]], name: str
) -> None:
    """Make the suite's environments find ``classes`` as installed drivers (a
    plugin registered in every plugin manager ``hmmsim.testing.env`` creates)."""
    from hmmsim import hookimpl
    from hmmsim.testing import env as envmod

    class _Plugin:
        @hookimpl
        def hmmsim_register_drivers(self) -> list[type[hmmsim.Driver]]:
            return list(classes)

    real = envmod.get_plugin_manager

    def pm(*args: object, **kw: object) -> object:
        got = real(*args, **kw)  # type: ignore[arg-type]
        got.register(_Plugin(), name)
        return got

    monkeypatch.setattr(envmod, "get_plugin_manager", pm)
