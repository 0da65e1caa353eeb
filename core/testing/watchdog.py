"""A virtual-time budget for each check: a livelock fails fast.

Kernel counterpart: none; the hung-task and soft-lockup detectors play the
role on a real machine. The model's virtual clock advances only with work
(each ``hmm_range_fault`` pass, each page it walks, I/O), never with wall
time, so a device access that retries forever (a driver that never re-reads
the notifier sequence, or loops on a fault it cannot resolve) advances it
without end. Every conformance check runs in well under a millisecond of
virtual time; ``WatchdogClock`` raises ``Livelock`` once a check has used
``VIRTUAL_TIME_BUDGET_NS``, long before ``HMM_RANGE_DEFAULT_TIMEOUT`` (1 s)
would, so a livelock is a failure after a second of wall time, not a hang.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from ..trace import Clock

if TYPE_CHECKING:
    from ..machine import Machine

#: Virtual time one check may use: 10 ms, twenty times what the slowest
#: check uses and a hundredth of HMM_RANGE_DEFAULT_TIMEOUT.
VIRTUAL_TIME_BUDGET_NS = 10_000_000


class Livelock(AssertionError):
    """A check used more virtual time than its budget: something never ends."""


@attrs.define(eq=False)
class WatchdogClock(Clock):
    """The virtual clock, raising ``Livelock`` past ``deadline_ns``."""

    deadline_ns: int = VIRTUAL_TIME_BUDGET_NS

    def advance(self, ns: int) -> None:
        if ns < 0:
            raise ValueError("time does not run backwards")
        self.now_ns += ns
        if self.now_ns > self.deadline_ns:
            deadline, self.deadline_ns = self.deadline_ns, 1 << 62  # report once
            raise Livelock(
                f"virtual time passed the check's budget of {deadline / 1e6:.0f} ms: "
                f"a device access or fault loop that never ends (livelock)"
            )


def install_watchdog(machine: Machine, budget_ns: int = VIRTUAL_TIME_BUDGET_NS) -> WatchdogClock:
    """Replace ``machine``'s clock by a watchdog ``budget_ns`` from now."""
    now = machine.clock.now_ns
    clock = WatchdogClock(now_ns=now, deadline_ns=now + budget_ns)
    machine.trace.clock = clock
    return clock
