"""Declared expected failures (``Driver.expected_failures``): reported, and strict."""

from __future__ import annotations

import pytest
from hmmsim.testing import checks
from hmmsim.testing.checks import (
    DriverSpec,
    check_exit_with_mirror_open,
    check_read_anonymous,
    run_check,
)


def test_a_declared_failure_that_fails_is_xfailed_with_its_reason():
    r = run_check(DriverSpec.parse("nouveau"), "teardown", check_exit_with_mirror_open)
    assert r.outcome == "xfailed"
    assert "no .release" in r.message


def test_a_declared_failure_that_passes_is_a_failure(monkeypatch):
    monkeypatch.setattr(
        checks, "_expected_failures", lambda spec: {"coherence/read_anonymous": "a stale claim"}
    )
    r = run_check(DriverSpec.parse("dmirror"), "coherence", check_read_anonymous)
    assert r.outcome == "failed"
    assert "declared as an expected failure, but passed: a stale claim" in r.message


def test_undeclared_checks_are_judged_as_usual():
    r = run_check(DriverSpec.parse("nouveau"), "coherence", check_read_anonymous)
    assert r.outcome == "passed"


@pytest.mark.parametrize("era", ["5.8", "5.7"])
def test_old_nouveau_eras_fail_read_vs_mprotect_as_declared(era):
    race_check = next(c for c in checks.CHECKS["races"] if c.race.name == "read_vs_mprotect")
    r = run_check(DriverSpec.parse(f"nouveau:era={era}"), "races", race_check)
    assert r.outcome == "xfailed" and "v5.9" in r.message
