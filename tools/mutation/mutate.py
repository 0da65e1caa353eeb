"""Sampled mutation testing of hmmsim's model, drivers and oracles.

A small, dependency-free mutation driver (stdlib ``ast`` only). It exists
instead of running mutmut 3 directly because mutmut 3 mutates through
trampolines in a copied ``mutants/`` tree that it imports by top-level module
name, which does not fit this project's ``package-dir`` mapping (``hmmsim``
lives in ``core/``, ``hmmsim.drivers`` in ``drivers/``). The operators are
mutmut's semantic ones (comparison, boolean, arithmetic and bitwise operator
swaps, ``not`` removal, constant changes, ``return`` value replacement,
call-statement and assignment deletion); string mutations are left out (they
only change messages).

Sub-commands:

* ``enumerate``: list every mutant of the target modules (deterministic order).
* ``sample``: a seeded random sample of that list, written as JSON.
* ``run``: apply each sampled mutant textually to a private copy of the
  package tree and run a test command against it; record killed / survived /
  timeout per mutant.  ``--tests pytest`` runs the test files that
  ``SELECTION`` maps the mutated module to (plus ``--always`` files first),
  with ``-x``; ``--tests suite`` runs the conformance suite
  (``hmmsim check --driver``).
* ``score``: print the score of a results file.

Run it from the repository root; see docs/mutation.md for the figures.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

#: The modules mutated by default: the CPU memory model, the HMM contracts,
#: the oracles and the reference driver.
DEFAULT_TARGETS = (
    "core/mm",
    "core/hmm.py",
    "core/notifier.py",
    "core/migrate",
    "core/gup.py",
    "core/testing",
    "drivers/dmirror",
)

_CMP_SWAP: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}
_BIN_SWAP: dict[type[ast.operator], type[ast.operator]] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.FloorDiv,
    ast.FloorDiv: ast.Mult,
    ast.Div: ast.Mult,
    ast.Mod: ast.FloorDiv,
    ast.BitAnd: ast.BitOr,
    ast.BitOr: ast.BitAnd,
    ast.BitXor: ast.BitOr,
    ast.LShift: ast.RShift,
    ast.RShift: ast.LShift,
}


@dataclass(frozen=True)
class Mutant:
    """One textual mutation: replace ``[start, end)`` of ``path`` by ``new``."""

    id: str
    path: str
    function: str
    line: int
    kind: str
    start: tuple[int, int]
    end: tuple[int, int]
    old: str
    new: str


def _offset(lines: list[str], pos: tuple[int, int]) -> int:
    """Character offset of a (1-based line, UTF-8 byte column) position."""
    line, col = pos
    before = sum(len(x) for x in lines[: line - 1])
    return before + len(lines[line - 1].encode()[:col].decode())


def _docstring_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Module):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                skip.add(id(body[0]))
    return skip


def _skipped_subtrees(fn: ast.AST) -> set[int]:
    """Nodes whose subtrees are not mutated: annotations, raise messages, asserts."""
    skip: set[int] = set()
    for node in ast.walk(fn):
        targets: list[ast.AST] = []
        if isinstance(node, ast.arg) and node.annotation is not None:
            targets.append(node.annotation)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.returns is not None:
            targets.append(node.returns)
        if isinstance(node, ast.AnnAssign):
            targets.append(node.annotation)
        if isinstance(node, ast.JoinedStr):
            targets.append(node)
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            # The exception type matters, its message does not.
            targets.extend(node.exc.args)
            targets.extend(k.value for k in node.exc.keywords)
        for t in targets:
            skip.update(id(n) for n in ast.walk(t))
    return skip


def _functions(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    def visit(
        node: ast.AST, prefix: str
    ) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                yield from visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                yield f"{prefix}{child.name}", child
                yield from visit(child, f"{prefix}{child.name}.")

    yield from visit(tree, "")


def _direct_nodes(fn: ast.AST) -> Iterator[ast.AST]:
    """Nodes of ``fn``'s body, not descending into nested functions or classes."""
    stack = list(ast.iter_child_nodes(fn))
    while stack:
        node = stack.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def _is_logging_or_noop(call: ast.Call) -> bool:
    f = call.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
    return name in {"debug", "info", "warning", "print", "append_trace", "trace"}


def _mutations(node: ast.AST, src: str) -> Iterator[tuple[str, ast.AST, str]]:
    """(kind, node to replace, replacement text) for one node."""
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            swap = _CMP_SWAP.get(type(op))
            if swap is not None:
                new = ast.Compare(node.left, list(node.ops), node.comparators)
                new.ops[i] = swap()
                yield "cmp", node, f"({ast.unparse(new)})"
    elif isinstance(node, ast.BoolOp):
        other = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        yield "boolop", node, f"({ast.unparse(ast.BoolOp(other, node.values))})"
    elif isinstance(node, ast.BinOp):
        swap_b = _BIN_SWAP.get(type(node.op))
        if swap_b is not None:
            yield "binop", node, f"({ast.unparse(ast.BinOp(node.left, swap_b(), node.right))})"
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not | ast.Invert):
        yield "unary", node, f"({ast.unparse(node.operand)})"
    elif isinstance(node, ast.Constant):
        v = node.value
        if v is True or v is False:
            yield "const", node, str(not v)
        elif isinstance(v, int) and not isinstance(v, bool):
            yield "const", node, str(v + 1)
    elif isinstance(node, ast.Return) and node.value is not None:
        rv = node.value
        if isinstance(rv, ast.Constant) and (rv.value is None or isinstance(rv.value, bool)):
            return  # nothing to replace, or covered by the constant flip
        yield "return", node, "return None"
    elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        if not _is_logging_or_noop(node.value):
            yield "delcall", node, "pass"
    elif isinstance(node, ast.AugAssign):
        yield "delassign", node, "pass"
    elif isinstance(node, ast.Assign) and isinstance(
        node.targets[0], ast.Subscript | ast.Attribute
    ):
        # Stores into state (attributes, array slices); plain local names are
        # mostly caught as NameError or are equivalent.
        yield "delassign", node, "pass"


def enumerate_mutants(targets: tuple[str, ...] = DEFAULT_TARGETS) -> list[Mutant]:
    """Every mutant of the target modules, in a deterministic order."""
    files: list[Path] = []
    for t in targets:
        p = ROOT / t
        files.extend(sorted(p.rglob("*.py")) if p.is_dir() else [p])
    out: list[Mutant] = []
    for f in files:
        out.extend(_mutants_of(str(f.relative_to(ROOT)), f.read_text()))
    return out


def _mutants_of(rel: str, src: str) -> list[Mutant]:
    """The mutants of one module's text ``src`` (repository path ``rel``)."""
    out: list[Mutant] = []
    tree = ast.parse(src)
    docs = _docstring_nodes(tree)
    for qual, fn in _functions(tree):
        skip = _skipped_subtrees(fn) | docs
        n = 0
        for node in sorted(
            _direct_nodes(fn),
            key=lambda x: (getattr(x, "lineno", 0), getattr(x, "col_offset", 0)),
        ):
            if id(node) in skip or not hasattr(node, "lineno"):
                continue
            for kind, found, new in _mutations(node, src):
                target: Any = found  # an expr or a stmt: it has positions
                old = ast.get_source_segment(src, target) or ""
                if old == new:
                    continue
                n += 1
                out.append(
                    Mutant(
                        id=f"{rel}:{qual}:{n}",
                        path=rel,
                        function=qual,
                        line=target.lineno,
                        kind=kind,
                        start=(target.lineno, target.col_offset),
                        end=(target.end_lineno, target.end_col_offset),
                        old=old,
                        new=new,
                    )
                )
    return out


def apply(src: str, m: Mutant) -> str:
    """The mutated text of ``src`` (which must be the original of ``m.path``)."""
    lines = src.splitlines(keepends=True)
    try:
        a, b = _offset(lines, m.start), _offset(lines, m.end)
    except IndexError:
        a = b = -1
    if a < 0 or src[a:b] != m.old:
        # The file changed since the sample was drawn: the mutated text, if
        # it still occurs exactly once, is the same mutant moved; otherwise
        # the mutant of the same function and index, if it makes the same
        # change, is (the code around it moved, the function did not change
        # before that point).
        if src.count(m.old) == 1:
            a = src.index(m.old)
            b = a + len(m.old)
        else:
            a, b = _relocate(src, m)
    return src[:a] + m.new + src[b:]


def _relocate(src: str, m: Mutant) -> tuple[int, int]:
    """Where mutant ``m`` (by function, index and text) now is in ``src``."""
    lines = src.splitlines(keepends=True)
    # The id is "<module path>:<function>:<n>"; samples drawn before a module
    # became a package keep the old module path in the id (``path`` follows).
    key = f"{m.path}:{m.id.split(':', 1)[1]}"
    for cur in _mutants_of(m.path, src):
        if cur.id == key and (cur.old, cur.new) == (m.old, m.new):
            return _offset(lines, cur.start), _offset(lines, cur.end)
    raise StaleMutant(f"{m.id}: {m.old!r} is no longer found in {m.path}")


class StaleMutant(ValueError):
    """A sampled mutant whose original text is gone from the source."""


def sample(mutants: list[Mutant], n: int, seed: int) -> list[Mutant]:
    """A seeded uniform sample of ``n`` mutants, in enumeration order."""
    rng = random.Random(seed)
    idx = sorted(rng.sample(range(len(mutants)), min(n, len(mutants))))
    return [mutants[i] for i in idx]


# ----------------------------------------------------------------- test selection

_MM = [
    "tests/mm",
    "tests/testing/test_verify_machine_meta.py",
]
_HMM = [
    "tests/hmm/test_hmm_range_fault.py",
    "tests/hmm/test_hmm_pte_hole.py",
    "tests/dma/test_hmm_dma.py",
    "tests/drivers/dmirror/test_dmirror.py",
    "tests/hmm",
]
_NOTIFIER = ["tests/hmm/test_notifier_events.py", "tests/hmm/test_notifier_seq.py", *_HMM]
_MIGRATE = [
    "tests/hmm/test_migrate.py",
    "tests/hmm/test_exclusive.py",
    "tests/drivers/dmirror/test_dmirror.py",
    "tests/drivers/dmirror/test_device_reliability.py",
    "tests/hmm",
]
_GUP = [
    "tests/mm/test_mm_ops.py",
    "tests/mm/test_fork_fidelity.py",
    "tests/hmm/test_migrate.py",
    "tests/plugins/test_errors_contract.py",
    "tests/hmm",
]
_TESTING = [
    "tests/testing/test_conformance_suite.py",
    "tests/testing/test_bugzoo.py",
    "tests/explore/test_races.py",
    "tests/testing",
    "tests/plugins/test_newcomer_report.py",
]
_DMIRROR = [
    "tests/drivers/dmirror/test_dmirror.py",
    "tests/hmm/test_exclusive.py",
    "tests/hmm/test_migrate.py",
    "tests/drivers/dmirror",
    "tests/testing/test_conformance_suite.py",
]

#: The project's test files run against a mutant of each module, most
#: pointed first (``-x`` stops at the first failure).  A static map stands in
#: for per-line coverage: recording coverage contexts for the whole suite took
#: over an hour on this shared 2-core machine, and the whole suite per mutant
#: (2.5 min or more) does not fit a sample of useful size.  The score is thus
#: "killed by the tests of its area", a lower bound of "killed by pytest -q".
SELECTION: dict[str, list[str]] = {
    "core/mm": _MM,
    "core/hmm.py": _HMM,
    "core/notifier.py": _NOTIFIER,
    "core/migrate": _MIGRATE,
    "core/gup.py": _GUP,
    "core/testing": _TESTING,
    "drivers/dmirror": _DMIRROR,
}


def tests_for(m: Mutant, extra: list[str], tests_root: Path) -> list[str]:
    """Test files run against mutant ``m``: ``extra`` first, then the module's list."""
    for prefix, files in SELECTION.items():
        if m.path.startswith(prefix):
            chosen = [*extra, *files]
            break
    else:
        chosen = [*extra, *_MM]
    seen: dict[str, None] = {}
    for f in chosen:
        if (tests_root / f).exists():
            seen.setdefault(f, None)
    return list(seen)


# ----------------------------------------------------------------------- running


@dataclass
class Result:
    """The outcome of one mutant."""

    id: str
    status: str  # killed | survived | timeout | stale
    seconds: float
    tests: int
    detail: str = ""


class Worker:
    """A private copy of the package tree, importable as ``hmmsim``."""

    def __init__(self, base: Path, tests: Path) -> None:
        self.base = base
        # The tests as they were when the run started: tests written while a
        # run goes on do not leak into it.
        shutil.copytree(tests, base / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "pyproject.toml", base / "pyproject.toml")
        pkg = base / "pkg" / "hmmsim"
        shutil.copytree(ROOT / "core", pkg, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(
            ROOT / "drivers", pkg / "drivers", ignore=shutil.ignore_patterns("__pycache__")
        )
        shutil.copytree(ROOT / "bench", pkg / "bench", ignore=shutil.ignore_patterns("__pycache__"))
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = str(base / "pkg")
        self.env["PYTHONDONTWRITEBYTECODE"] = "1"
        self.env["PYTHONHASHSEED"] = "0"
        # Fewer random sequences per state-machine test: the sample's time
        # budget goes to more mutants instead.
        self.env.setdefault("HMMSIM_STATEFUL_EXAMPLES", "40")

    def target(self, rel: str) -> Path:
        """Where the copy of repository file ``rel`` lives in this worker."""
        p = Path(rel)
        if p.parts[0] == "core":
            return self.base / "pkg" / "hmmsim" / Path(*p.parts[1:])
        return self.base / "pkg" / "hmmsim" / p

    def run(self, m: Mutant, cmd: list[str], timeout: float) -> tuple[str, float, str]:
        """Apply ``m``, run ``cmd``; (status, seconds, tail of output)."""
        dst = self.target(m.path)
        orig = (ROOT / m.path).read_text()
        try:
            dst.write_text(apply(orig, m))
        except StaleMutant as exc:
            return "stale", 0.0, str(exc)
        t0 = time.monotonic()
        try:
            proc = subprocess.run(
                cmd, cwd=self.base, env=self.env, capture_output=True, text=True, timeout=timeout
            )
            dt = time.monotonic() - t0
            tail = (proc.stdout + proc.stderr)[-600:]
            # Any failure counts, collection and import errors included: the
            # mutant broke something a test imports.
            return ("survived" if proc.returncode == 0 else "killed"), dt, tail
        except subprocess.TimeoutExpired:
            return "timeout", time.monotonic() - t0, ""
        finally:
            dst.write_text(orig)


def _pytest_cmd(tests: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-x",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:randomly",
        "--hypothesis-seed=0",
        "-o",
        "addopts=",
        "-m",
        "not slow",
        *tests,
    ]


def _suite_cmd(driver: str) -> list[str]:
    return [sys.executable, "-m", "hmmsim", "check", "--driver", driver]


def run(args: argparse.Namespace) -> None:
    """Run every mutant of the sample and write the results file."""
    mutants = [
        Mutant(**{**d, "start": tuple(d["start"]), "end": tuple(d["end"])})
        for d in json.loads(Path(args.sample).read_text())
    ]
    extra = list(args.always or [])
    done: dict[str, Result] = {}
    out = Path(args.results)
    if out.exists() and args.resume:
        for d in json.loads(out.read_text()):
            done[d["id"]] = Result(**d)
    todo = [m for m in mutants if m.id not in done]
    tmp = Path(tempfile.mkdtemp(prefix="hmmsim-mut-"))
    workers = [Worker(tmp / f"w{i}", ROOT / "tests") for i in range(args.jobs)]
    free = list(workers)

    def one(m: Mutant) -> Result:
        w = free.pop()
        try:
            if args.tests == "suite":
                cmd = _suite_cmd(args.driver)
                n = 1
            else:
                sel = [f for f in extra if (w.base / f).exists()]
                if not args.only:
                    sel = tests_for(m, sel, w.base)
                cmd = _pytest_cmd(sel)
                n = len(sel)
            status, dt, tail = w.run(m, cmd, args.timeout)
            return Result(m.id, status, round(dt, 1), n, tail if status != "survived" else "")
        finally:
            free.append(w)

    try:
        with ThreadPoolExecutor(args.jobs) as ex:
            for r in ex.map(one, todo):
                done[r.id] = r
                print(f"{r.status:11s} {r.seconds:6.1f}s {r.tests:4d}t {r.id}", flush=True)
                out.write_text(json.dumps([asdict(x) for x in done.values()], indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    score(out, mutants)


def score(
    results: Path, mutants: list[Mutant] | None = None, equivalent: Path | None = None
) -> float:
    """Print the kill score of a results file; return the killed share (0-1)."""
    rs = [Result(**d) for d in json.loads(results.read_text())]
    eq: set[str] = set()
    if equivalent is not None and equivalent.exists():
        eq = {d["id"] for d in json.loads(equivalent.read_text())}
    by = {m.id: m for m in mutants or []}
    counts: dict[str, int] = {}
    for r in rs:
        status = "equivalent" if r.status == "survived" and r.id in eq else r.status
        counts[status] = counts.get(status, 0) + 1
    killed = counts.get("killed", 0)  # a timeout is not counted as a kill
    scored = len(rs) - counts.get("equivalent", 0) - counts.get("stale", 0)
    share = killed / scored if scored else 1.0
    print(f"mutants {len(rs)}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"score: {killed}/{scored} killed = {100 * share:.1f} % (equivalents excluded)")
    for r in rs:
        if r.status in ("survived", "stale") and r.id not in eq:
            m = by.get(r.id)
            desc = f"  line {m.line}: {m.old!r} -> {m.new!r}" if m else ""
            print(f"  {r.status}: {r.id}{desc}")
    return share


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("enumerate")
    e.add_argument("--targets", nargs="*", default=list(DEFAULT_TARGETS))
    s = sub.add_parser("sample")
    s.add_argument("--targets", nargs="*", default=list(DEFAULT_TARGETS))
    s.add_argument("-n", type=int, default=200)
    s.add_argument("--seed", type=int, default=13)
    s.add_argument("-o", "--out", required=True)
    s.add_argument("--ids", nargs="*", help="pick these mutant ids instead of sampling")
    r = sub.add_parser("run")
    r.add_argument("--sample", required=True)
    r.add_argument("--results", required=True)
    r.add_argument("--tests", choices=["pytest", "suite"], default="pytest")
    r.add_argument("--always", nargs="*", help="test files run first for every mutant")
    r.add_argument("--only", action="store_true", help="run only the --always files")
    r.add_argument("--driver", default="dmirror")
    r.add_argument("--timeout", type=float, default=300.0)
    r.add_argument("-j", "--jobs", type=int, default=2)
    r.add_argument("--resume", action="store_true")
    c = sub.add_parser("score")
    c.add_argument("results")
    c.add_argument("--sample")
    c.add_argument("--equivalent")
    a = p.parse_args(argv)
    if a.cmd == "enumerate":
        ms = enumerate_mutants(tuple(a.targets))
        for m in ms:
            print(f"{m.id}\t{m.kind}\tline {m.line}\t{m.old!r} -> {m.new!r}")
        print(f"{len(ms)} mutants", file=sys.stderr)
    elif a.cmd == "sample":
        ms = enumerate_mutants(tuple(a.targets))
        if a.ids:
            by_id = {m.id: m for m in ms}
            ms = [by_id[i] for i in a.ids]
        else:
            ms = sample(ms, a.n, a.seed)
        Path(a.out).write_text(json.dumps([asdict(m) for m in ms], indent=1))
        print(f"{len(ms)} mutants sampled (seed {a.seed}) -> {a.out}")
    elif a.cmd == "run":
        run(a)
    else:
        ms = None
        if a.sample:
            ms = [
                Mutant(**{**d, "start": tuple(d["start"]), "end": tuple(d["end"])})
                for d in json.loads(Path(a.sample).read_text())
            ]
        score(Path(a.results), ms, Path(a.equivalent) if a.equivalent else None)


if __name__ == "__main__":
    main()
