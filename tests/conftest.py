"""Shared fixtures: small machines and a recorder of MMU-notifier events."""

from __future__ import annotations

from helpers import EventLog, events, machine, make_machine, proc  # noqa: F401
