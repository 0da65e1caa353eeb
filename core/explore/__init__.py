"""Exploring the interleavings of a scenario, and replaying one exactly.

Kernel counterpart: none. A *scenario* is a callable that builds fresh state
and returns a ``ScenarioRun``: the actors (``(name, callable)`` pairs) and
optionally a check to run after every step and one to run at the end.
``explore`` runs it under many schedules (a ``BoundedDFS`` until exhausted, or
``RandomWalk``/``PCT`` for ``max_schedules`` runs), in this process or in
forked workers, and returns the failing schedule ids with a readable trace;
``replay`` reruns one id.

- :mod:`hmmsim.explore.run`: one run of a scenario, replay;
- :mod:`hmmsim.explore.search`: ``explore``, the loop over schedules;
- :mod:`hmmsim.explore.parallel`: the same exploration over worker processes.
"""

from __future__ import annotations

from .parallel import WorkerFailed, explore_parallel
from .run import ExploreResult, Failure, Scenario, ScenarioRun, replay, run_one
from .search import explore

__all__ = [
    "ExploreResult",
    "Failure",
    "Scenario",
    "ScenarioRun",
    "WorkerFailed",
    "explore",
    "explore_parallel",
    "replay",
    "run_one",
]
