"""The model against the host kernel: seeded random sequences, compared every step.

Skips (with the reason) where the host cannot show PFNs and frame flags: not
Linux, not root, no THP or hugetlb, no ``PAGEMAP_SCAN``. See
docs/differential.md for what is compared and the named divergence classes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from .classes import INTENTIONAL, KNOWN, classify
from .hostkernel import _current, _settings_plan, host_settings, host_support
from .model import ModelRun
from .ops import PAGE, WINDOW_PAGES, Op, generate
from .runner import Summary, minimize, run_many, run_ops
from .state import ProcState, Result, frame_classes, page_hashes

_REASON = host_support()
needs_host = pytest.mark.skipif(_REASON is not None, reason=f"differential: {_REASON}")

#: The default run: seeds and steps (about half a minute on an idle 2-core box).
DEFAULT_SEEDS = range(0, 40)
DEFAULT_STEPS = 20
#: Sequences of the default run that agreed outside the intentional classes
#: after the last issue-10 fixes (40 of 40 here; 99.5 % or more over thousands of
#: unseen seeds, docs/differential.md), minus a margin for a loaded host (each
#: sequence is 2.5 % of this run).
DEFAULT_MIN_AGREE = 0.9
#: The slow run.
SLOW_SEEDS = range(10_000, 10_600)
SLOW_STEPS = 25
SLOW_MIN_AGREE = 0.97  # 598 of 600 (99.7 %) after the last issue-10 fixes


@pytest.fixture(scope="module")
def quiet_host() -> Iterator[None]:
    with host_settings():
        yield


def _op(kind: str, proc: int, tag: int = 1, **args: object) -> Op:
    return Op(kind, proc, tuple(args.items()), tag)


def _mmap(page: int, npages: int, kind: str = "anon", prot: int = 3, **kw: object) -> Op:
    args = {"populate": False, "noreplace": False, **kw}
    return _op("mmap", 0, page=page, npages=npages, prot=prot, map_kind=kind, **args)


def _unexplained(summary: Summary) -> list[str]:
    out = list(summary.errors)
    for r in summary.failures:
        assert r.first is not None
        name = classify(r.first)
        if name not in KNOWN and name not in INTENTIONAL:
            out.append(f"seed {r.seed}: {name}: {r.first.describe()}")
    return out


# ----- the instrument itself (no host needed) ---------------------------------------------
def test_generate_depends_on_the_seed_alone() -> None:
    assert generate(7, 30) == generate(7, 30)
    assert generate(7, 30) != generate(8, 30)


def test_frame_classes_label_shared_frames_by_first_occurrence() -> None:
    def state(pfns: list[int]) -> ProcState:
        pfn = np.full(WINDOW_PAGES, -1, np.int64)
        pfn[: len(pfns)] = pfns
        z = np.zeros(WINDOW_PAGES)
        return ProcState(z.astype(np.uint8), pfn, z.astype(np.uint64), [])

    a = frame_classes([state([900, 5, -1]), state([5, 77])])
    b = frame_classes([state([3, 40, -1]), state([40, 1])])
    assert a[:3].tolist() == [0, 1, -1]
    assert a[WINDOW_PAGES : WINDOW_PAGES + 2].tolist() == [1, 2]
    assert (a == b).all()


def test_page_hashes_tell_written_pages_apart() -> None:
    pages = np.zeros((3, PAGE), np.uint8)
    pages[1, :8] = 1
    pages[2, 8 * 511] = 1
    h = page_hashes(pages)
    assert len(set(h.tolist())) == 3 and (h != 0).all()


def test_docs_list_every_named_class_with_its_reason() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "differential.md").read_text()
    missing = [name for name in [*INTENTIONAL, *KNOWN] if f"`{name}`" not in doc]
    assert not missing, f"docs/differential.md does not list: {missing}"


# ----- host runs ---------------------------------------------------------------------------
@needs_host
def test_host_settings_are_restored_after_the_run() -> None:
    before = {p: _current(p) for p, _ in _settings_plan()}
    with host_settings():
        khugepaged = Path("/sys/kernel/mm/transparent_hugepage/khugepaged/scan_sleep_millisecs")
        assert khugepaged.read_text().strip() == "86400000"
    assert {p: _current(p) for p in before} == before


@needs_host
def test_cow_after_fork_agrees_page_by_page(quiet_host: None) -> None:
    ops = [
        _mmap(0, 4),
        _op("write", 0, page=0, npages=4),
        _op("fork", 0, child=1),
        _op("write", 1, tag=5, page=1, npages=1),
        _op("exit", 1),
        _op("read", 0, page=0, npages=4),
    ]
    r = run_ops(0, ops)
    assert r.first is None, r.first.describe()
    assert r.stats.pages == r.stats.agreeing > 0
    assert r.results[3] == (("ok", 0), ("ok", 0))


@needs_host
def test_a_touch_that_faults_kills_the_process_on_both_sides(quiet_host: None) -> None:
    ops = [
        _mmap(0, 4, prot=1),
        _op("fork", 0, child=1),
        _op("write", 1, page=0, npages=1),  # read-only: SIGSEGV
        _op("read", 0, page=10, npages=1),  # unmapped: SIGSEGV
    ]
    r = run_ops(0, ops)
    assert r.first is None, r.first.describe()
    assert r.results[2] == (("signal", "SIGSEGV"), ("signal", "SIGSEGV"))
    assert r.results[3] == (("signal", "SIGSEGV"), ("signal", "SIGSEGV"))


@needs_host
def test_a_divergence_is_found_named_and_minimised(
    quiet_host: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model made wrong on purpose (mprotect reports EPERM): found, named, shrunk."""
    real = ModelRun.apply

    def broken(self: ModelRun, op: Op) -> Result:
        result = real(self, op)
        return ("errno", "EPERM") if op.kind == "mprotect" else result

    monkeypatch.setattr(ModelRun, "apply", broken)
    ops = [
        _mmap(0, 4, kind="shared"),
        _op("write", 0, page=0, npages=1),
        _mmap(600, 3),
        _op("read", 0, page=600, npages=3),
        _op("mprotect", 0, page=600, npages=1, prot=1),
        _op("write", 0, page=1, npages=1),
    ]
    r = run_ops(0, ops)
    assert r.first is not None
    assert classify(r.first) == "result@mprotect"
    assert (r.first.step, r.first.host, r.first.model) == (4, ("ok", 0), ("errno", "EPERM"))
    assert [op.kind for op in minimize(r)] == ["mprotect"]


@needs_host
def test_random_sequences_diverge_only_in_named_classes(quiet_host: None) -> None:
    s = run_many(DEFAULT_SEEDS, DEFAULT_STEPS)
    print(s.report())
    unexplained = _unexplained(s)
    assert not unexplained, "divergences outside classes.KNOWN:\n" + "\n".join(unexplained)
    assert s.agree / s.sequences >= DEFAULT_MIN_AGREE, s.report()


@pytest.mark.slow
@needs_host
def test_many_random_sequences_diverge_only_in_named_classes(quiet_host: None) -> None:
    s = run_many(SLOW_SEEDS, SLOW_STEPS)
    print(s.report())
    unexplained = _unexplained(s)
    assert not unexplained, "divergences outside classes.KNOWN:\n" + "\n".join(unexplained)
    assert s.agree / s.sequences >= SLOW_MIN_AGREE, s.report()
