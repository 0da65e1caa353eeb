"""Concurrency in the model: locks and preemption points, the scheduler, its strategies.

Kernel counterpart: the locking primitives (``rw_semaphore``, ``mutex``, wait
queues) and the several CPUs that interleave at them. The package keeps them
apart so that each imports only what it needs:

- :mod:`hmmsim.sched.locks`: ``Mutex``, ``RwSem``, ``WaitQueue``, ``point()``,
  cheap no-ops and plain locks outside a scheduler;
- :mod:`hmmsim.sched.scheduler`: ``Scheduler``, actors as greenlets, one at a
  time, and the ``RunResult`` of a run;
- :mod:`hmmsim.sched.strategies`: who runs next (``RandomWalk``, ``PCT``,
  ``BoundedDFS``, ``Replay``) and schedule ids.

Import from ``hmmsim.sched``: the modules are how the package is arranged, the
names below are its interface.
"""

from __future__ import annotations

from .locks import (
    MAIN_ACTOR,
    Mutex,
    RwSem,
    SchedulerHooks,
    WaitQueue,
    active,
    current,
    might_sleep,
    non_block_end,
    non_block_start,
    note,
    point,
    set_active,
)
from .scheduler import DEFAULT_STEP_BUDGET, RunResult, Scheduler, TraceEntry
from .strategies import (
    PCT,
    BoundedDFS,
    RandomWalk,
    Replay,
    Strategy,
    decode_schedule,
    encode_schedule,
    prefix_key,
)

__all__ = [
    "DEFAULT_STEP_BUDGET",
    "MAIN_ACTOR",
    "PCT",
    "BoundedDFS",
    "Mutex",
    "RandomWalk",
    "Replay",
    "RunResult",
    "RwSem",
    "Scheduler",
    "SchedulerHooks",
    "Strategy",
    "TraceEntry",
    "WaitQueue",
    "active",
    "current",
    "decode_schedule",
    "encode_schedule",
    "might_sleep",
    "non_block_end",
    "non_block_start",
    "note",
    "point",
    "prefix_key",
    "set_active",
]
