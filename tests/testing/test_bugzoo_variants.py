"""The bug zoo runs each mutant in every variant of its driver, or in the ones it declares."""

from __future__ import annotations

import io

import pytest
from hmmsim.cli import main
from hmmsim.driver import Mutant
from hmmsim.testing.bugzoo import all_mutants, mutant_variants, run_mutant

DMIRROR = "hmmsim.drivers.dmirror.driver:Dmirror"

#: Coherent memory is never selected for migration back to system memory:
#: a bug only the coherent variant has (private pages migrate as before).
_COHERENT_STAYS = (
    (
        "        else MIGRATE_VMA_SELECT_DEVICE_COHERENT\n    ) | MIGRATE_VMA_SELECT_COMPOUND",
        "        else 0  # mutant: coherent pages are never selected\n"
        "    ) | MIGRATE_VMA_SELECT_COMPOUND",
    ),
)
_RULE = (
    "migrate_vma_setup selects device-coherent pages only with "
    "MIGRATE_VMA_SELECT_DEVICE_COHERENT: without it MIGRATE_TO_SYS leaves them on the device."
)


def _coherent_only(name: str, variants: tuple[dict[str, str], ...] = ()) -> Mutant:
    return Mutant(
        name,
        DMIRROR,
        "hmmsim.drivers.dmirror.migrate",
        _COHERENT_STAYS,
        _RULE,
        area="migration",
        variants=variants,
    )


def test_a_mutant_runs_in_every_variant_its_driver_declares():
    dmirror = next(m for m in all_mutants() if m.driver == DMIRROR)
    assert mutant_variants(dmirror) == [{"memory": "private"}, {"memory": "coherent"}]
    mine = _coherent_only("zoo_test_declared", ({"memory": "coherent"},))
    assert mutant_variants(mine) == [{"memory": "coherent"}]


def test_a_mutant_declaring_its_variant_is_caught_there():
    r = run_mutant(_coherent_only("zoo_test_coherent_declared", ({"memory": "coherent"},)))
    assert r.status == "caught", r
    assert (r.variant, r.variants_run) == ("memory=coherent", 1)
    assert r.check.startswith("device-memory/"), r.check


@pytest.mark.slow
def test_a_mutant_declaring_only_the_variant_without_the_bug_is_missed():
    # The private variant selects private pages: nothing the mutant changed runs.
    r = run_mutant(_coherent_only("zoo_test_private_declared", ({"memory": "private"},)))
    assert (r.status, r.variant, r.variants_run) == ("missed", "memory=private", 1)


@pytest.mark.slow
def test_a_bug_of_the_second_variant_only_is_caught_in_the_second_variant():
    r = run_mutant(_coherent_only("zoo_test_coherent_default"))
    assert r.status == "caught", r
    assert (r.variant, r.variants_run) == ("memory=coherent", 2)


def test_check_bugzoo_names_the_variant_that_caught_each_mutant():
    out = io.StringIO()
    names = ["--driver", "zoo_template_no_set_seq", "--driver", "zoo_dmirror_no_read_retry"]
    rc = main(["check", "--bugzoo", "--jobs", "2", *names], out)
    text = out.getvalue()
    assert rc == 0, text
    assert "zoo_dmirror_no_read_retry: caught by " in text
    assert " (memory=private)" in text
    header = next(line for line in text.splitlines() if line.startswith("mutant "))
    assert header.split() == [
        "mutant",
        "driver",
        "area",
        "variant",
        "caught",
        "by",
        "schedules",
        "time",
    ]
    assert "kill rate: 2/2" in text
