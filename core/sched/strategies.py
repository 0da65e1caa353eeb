"""Scheduling strategies and schedule ids: who runs next, and how a run is named.

Kernel counterpart: none. A strategy stands in for the hardware's choice of
which CPU gets the next lock or runs the next instruction; the scheduler
(:mod:`hmmsim.sched.scheduler`) asks it at every decision point. Strategies:
a seeded random walk, PCT (probabilistic concurrency testing with a depth
bound), the replay of a schedule id, and bounded-preemption depth-first search.

A schedule id encodes the choices of one run (the actor picked at each point
where more than one could run); replaying it reruns exactly that interleaving.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Protocol


class Strategy(Protocol):
    """Chooses who runs at each decision point."""

    def begin(self, run: int) -> None:
        """A new run starts (``run`` counts runs of one exploration)."""

    def choose(self, runnable: list[int], current: int | None, step: int) -> int:
        """Pick an actor index among ``runnable`` (sorted); ``current`` just ran."""


def encode_schedule(choices: Sequence[int]) -> str:
    """Choices as a short id: runs of the same actor index, e.g. ``0x5.1x2.0``."""
    if not choices:
        return "-"
    parts = []
    prev, count = choices[0], 0
    for c in choices:
        if c == prev:
            count += 1
        else:
            parts.append(f"{prev}x{count}" if count > 1 else str(prev))
            prev, count = c, 1
    parts.append(f"{prev}x{count}" if count > 1 else str(prev))
    return ".".join(parts)


def decode_schedule(schedule: str) -> list[int]:
    if schedule in ("", "-"):
        return []
    if not re.fullmatch(r"\d+(x\d+)?(\.\d+(x\d+)?)*", schedule):
        raise ValueError(f"not a schedule id: {schedule!r}")
    out: list[int] = []
    for part in schedule.split("."):
        actor, _, count = part.partition("x")
        out.extend([int(actor)] * (int(count) if count else 1))
    return out


class RandomWalk:
    """Pick uniformly among the runnable actors; seeded, so runs replay."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.rng = random.Random(seed)

    def begin(self, run: int) -> None:
        self.rng = random.Random(self.seed * 1_000_003 + run)

    def choose(self, runnable: list[int], current: int | None, step: int) -> int:
        return self.rng.choice(runnable)


class PCT:
    """Probabilistic concurrency testing (Burckhardt et al., ASPLOS 2010).

    Each run gives the actors random distinct priorities and picks ``depth - 1``
    random change points among the first ``steps`` steps; the highest-priority
    runnable actor always runs, and at the i-th change point the running actor
    drops to priority i (below every initial one). A bug of depth d is found
    with probability at least 1 / (n * k^(d-1)) per run.
    """

    def __init__(self, seed: int = 0, depth: int = 2, steps: int = 200) -> None:
        if depth < 1:
            raise ValueError("PCT depth is at least 1")
        self.seed = seed
        self.depth = depth
        self.steps = steps
        self.priorities: dict[int, float] = {}
        self.change_points: list[int] = []
        self.rng = random.Random(seed)

    def begin(self, run: int) -> None:
        self.rng = random.Random(self.seed * 1_000_003 + run)
        self.priorities = {}
        k = max(self.steps, self.depth)
        self.change_points = sorted(self.rng.sample(range(1, k + 1), self.depth - 1))

    def choose(self, runnable: list[int], current: int | None, step: int) -> int:
        for a in runnable:
            if a not in self.priorities:
                self.priorities[a] = self.depth + self.rng.random()
        if self.change_points and step >= self.change_points[0] and current in self.priorities:
            self.change_points.pop(0)
            self.priorities[current] = len(self.change_points) + self.rng.random() * 0.5
        return max(runnable, key=lambda a: self.priorities[a])


class Replay:
    """Follow a recorded schedule id exactly (then the lowest runnable actor)."""

    def __init__(self, schedule: str) -> None:
        self.choices = decode_schedule(schedule)
        self.pos = 0

    def begin(self, run: int) -> None:
        self.pos = 0

    def choose(self, runnable: list[int], current: int | None, step: int) -> int:
        if self.pos < len(self.choices):
            pick = self.choices[self.pos]
            self.pos += 1
            if pick in runnable:
                return pick
        return runnable[0]


def prefix_key(decisions: Sequence[tuple[list[int], int]]) -> tuple[int, ...]:
    """The option indices a sequence of DFS decisions took; keys sort in DFS order."""
    return tuple(idx for _, idx in decisions)


class BoundedDFS:
    """Every schedule with at most ``bound`` preemptions, depth first (as in CHESS).

    A preemption is switching away from an actor that could have gone on.
    Call ``advance()`` after each run; it returns False when all are done.
    """

    def __init__(self, bound: int = 2) -> None:
        self.bound = bound
        #: One entry per decision of the current run: the options there, and
        #: the index of the one taken.
        self.stack: list[tuple[list[int], int]] = []
        #: Entries below this are a fixed prefix: the search covers only the
        #: subtree under it (``below``).
        self.floor = 0
        self.pos = 0
        self.preemptions = 0
        self.exhausted = False

    @classmethod
    def below(cls, bound: int, prefix: list[tuple[list[int], int]]) -> BoundedDFS:
        """A search of only the schedules that start with the decisions ``prefix``."""
        dfs = cls(bound)
        dfs.stack = list(prefix)
        dfs.floor = len(prefix)
        return dfs

    def begin(self, run: int) -> None:
        self.pos = 0
        self.preemptions = 0

    def choose(self, runnable: list[int], current: int | None, step: int) -> int:
        if self.pos < len(self.stack):
            options, idx = self.stack[self.pos]
        else:
            if current in runnable:
                others = [a for a in runnable if a != current]
                options = [current] + (others if self.preemptions < self.bound else [])
            else:
                options = list(runnable)
            idx = 0
            self.stack.append((options, idx))
        pick = options[idx]
        if current in runnable and pick != current:
            self.preemptions += 1
        self.pos += 1
        return pick

    def leaf_key(self) -> tuple[int, ...]:
        """The run just ended, as the indices it took: sorting keys gives DFS order."""
        return prefix_key(self.stack[: self.pos])

    def next_key(self) -> tuple[int, ...]:
        """After ``advance``: every schedule still to come has a key at least this."""
        return prefix_key(self.stack)

    def advance(self) -> bool:
        """Move to the next unexplored schedule; False when the space is exhausted."""
        if self.pos < self.floor:
            raise RuntimeError(
                "the scenario is not deterministic: a run ended inside the prefix it replays"
            )
        del self.stack[self.pos :]
        while len(self.stack) > self.floor:
            options, idx = self.stack[-1]
            if idx + 1 < len(options):
                self.stack[-1] = (options, idx + 1)
                return True
            self.stack.pop()
        self.exhausted = True
        return False

    def split(self) -> list[list[tuple[list[int], int]]]:
        """Give away the shallowest untried alternatives, as prefixes for ``below``.

        Called between runs (after ``advance``). The search keeps the branch
        it is in and drops the alternatives it gave away; together, the
        subtrees it still covers and the ones returned are exactly what it
        covered before. The shallowest branch point holds the largest subtree.
        """
        for p in range(self.floor, len(self.stack)):
            options, idx = self.stack[p]
            if idx + 1 < len(options):
                given = [[*self.stack[:p], (options, j)] for j in range(idx + 1, len(options))]
                self.stack[p] = (options[: idx + 1], idx)
                return given
        return []
