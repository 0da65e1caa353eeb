"""Mutants of the odp driver: real ODP bug classes, each a small edit of the source."""

from __future__ import annotations

from hmmsim.driver import Mutant

MUTANTS: list[Mutant] = []
