"""Fixtures of the hmm-layer tests."""

from __future__ import annotations

import hmmsim
import pytest


@pytest.fixture(params=["vectorised", "per-entry"])
def migrate_path(request, monkeypatch):  # type: ignore[no-untyped-def]
    """Run the test on both implementations of the migrate phases, which must
    agree (by default ranges of up to ``SCALAR_MAX_PAGES`` take the per-entry one)."""
    threshold = 0 if request.param == "vectorised" else 1 << 30
    monkeypatch.setattr(hmmsim.migrate.args, "SCALAR_MAX_PAGES", threshold)
    return request.param
