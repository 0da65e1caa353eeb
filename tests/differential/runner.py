"""Run sequences on both executors, compare after every step, gather statistics.

``run_sequence`` plays one op list on the host and on the model, compares
after every step and keeps going after a divergence (ops of a process that
is gone on one side are skipped there) so the page-step agreement figure
covers whole sequences; the first divergence outside the intentional classes
is what a sequence is judged by. ``minimize`` shrinks a failing op list to a
short repro with the same first-divergence class.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from .classes import classify, is_intentional
from .compare import Divergence, StepStats, compare_step
from .hostkernel import HostRun, hugetlb_available, top_up_hugetlb
from .model import ModelRun
from .ops import BASE, PAGE, Op, generate
from .state import Result


@dataclass
class SequenceResult:
    seed: int
    ops: list[Op]
    steps: int = 0
    first: Divergence | None = None
    #: Intentional divergences seen before ``first`` (or at all, when it agrees).
    intentional: list[Divergence] = field(default_factory=list)
    stats: StepStats = field(default_factory=StepStats)
    #: (host, model) result of every step run.
    results: list[tuple[Result, Result]] = field(default_factory=list)

    @property
    def agrees(self) -> bool:
        """No divergence at all outside the intentional (named, documented) classes."""
        return self.first is None

    @property
    def fully_agrees(self) -> bool:
        return self.first is None and not self.intentional


def _backing(model: ModelRun):  # type: ignore[no-untyped-def]
    def lookup(proc: int, page: int) -> str:
        p = model.procs.get(proc)
        vma = p.mm.vmas.find(BASE + page * PAGE) if p is not None else None
        if vma is None:
            return "unmapped"
        if vma.is_hugetlb:
            return "hugetlb_shared" if vma.is_shared else "hugetlb"
        return "shared" if vma.is_shared else "anon"

    return lookup


def run_ops(seed: int, ops: list[Op], stop_at_first: bool = False) -> SequenceResult:
    """Play ``ops`` on a fresh host run and a fresh model; compare after every step."""
    res = SequenceResult(seed, ops)
    host = HostRun()
    top_up_hugetlb()
    model = ModelRun(hugetlb_pages=max(0, hugetlb_available()))
    try:
        host.start()
        model.start()
        lookup = _backing(model)
        for step, op in enumerate(ops):
            on_host = op.proc in host.workers
            on_model = op.proc in model.procs
            if not on_host and not on_model:
                continue
            # Host and model work at the same time: the worker runs the op while
            # the model does, and snapshots itself while the model is read.
            if on_host:
                host.send_op(op)
            mr = model.apply(op) if on_model else ("skipped", "no such process")
            hr = host.recv_op(op) if on_host else ("skipped", "no such process")
            fallback = host.last_fallback if on_host else {}
            res.results.append((hr, mr))
            if model.crashed:
                # The model's state is no longer trustworthy: judge by this step only.
                res.steps = step + 1
                if res.first is None:
                    res.first = Divergence(step, op, "crash", op.proc, None, hr, mr)
                break
            host.send_snapshot()
            try:
                mstate = model.snapshot()
            except Exception as exc:  # the model's own state is inconsistent
                mr = ("crash", f"snapshot: {type(exc).__name__}: {exc}")
                model.crashed = True
            hstate = host.recv_snapshot()
            if model.crashed:
                res.steps = step + 1
                if res.first is None:
                    res.first = Divergence(step, op, "crash", op.proc, None, hr, mr)
                break
            pools = (host.last_hugetlb, model.last_hugetlb) if on_host and on_model else (-1, -1)
            divs = compare_step(
                step, op, hr, mr, hstate, mstate, lookup, fallback, pools, res.stats
            )
            res.steps = step + 1
            if res.first is None and divs and is_intentional(divs[0]):
                # The two sides now differ on purpose and cannot be brought back
                # together: the sequence ends here, judged by what came before.
                res.intentional.append(divs[0])
                break
            if res.first is None and divs:
                res.first = divs[0]
                if stop_at_first:
                    break
    finally:
        host.close()
    return res


def run_sequence(seed: int, nsteps: int) -> SequenceResult:
    return run_ops(seed, generate(seed, nsteps))


def _valid(ops: list[Op]) -> bool:
    """Every op's process exists when the op runs (forks create, exits end)."""
    live = {0}
    for op in ops:
        if op.proc not in live:
            return False
        if op.kind == "fork":
            live.add(op.arg("child"))
        elif op.kind == "exit":
            live.discard(op.proc)
    return True


def minimize(res: SequenceResult) -> list[Op]:
    """A shorter op list whose first divergence has the same class (greedy removal)."""
    assert res.first is not None
    want = classify(res.first)
    ops = res.ops[: res.first.step + 1]
    i = len(ops) - 2
    while i >= 0:
        cand = ops[:i] + ops[i + 1 :]
        if _valid(cand):
            r = run_ops(res.seed, cand, stop_at_first=True)
            if r.first is not None and classify(r.first) == want:
                ops = cand[: r.first.step + 1]
                i = min(i, len(ops) - 1)
        i -= 1
    return ops


@dataclass
class Summary:
    sequences: int = 0
    agree: int = 0
    fully_agree: int = 0
    steps: int = 0
    page_steps: int = 0
    page_steps_agreeing: int = 0
    first_classes: Counter[str] = field(default_factory=Counter)
    intentional_classes: Counter[str] = field(default_factory=Counter)
    failures: list[SequenceResult] = field(default_factory=list)
    #: Sequences the instrument itself failed on (counted as not agreeing).
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, r: SequenceResult) -> None:
        self.sequences += 1
        self.agree += r.agrees
        self.fully_agree += r.fully_agrees
        self.steps += r.steps
        self.page_steps += r.stats.pages
        self.page_steps_agreeing += r.stats.agreeing
        for name in {classify(d) for d in r.intentional}:
            self.intentional_classes[name] += 1
        if r.first is not None:
            self.first_classes[classify(r.first)] += 1
            self.failures.append(r)

    def report(self) -> str:
        pct = 100.0 * self.agree / max(1, self.sequences)
        ppct = 100.0 * self.page_steps_agreeing / max(1, self.page_steps)
        lines = [
            f"sequences: {self.sequences}, steps: {self.steps}, {self.seconds:.0f} s",
            f"agree outside intentional classes: {self.agree} ({pct:.2f} %)",
            f"agree with no divergence at all: {self.fully_agree}",
            f"page-steps compared: {self.page_steps}, agreeing: {self.page_steps_agreeing}"
            f" ({ppct:.3f} %)",
        ]
        if self.first_classes:
            lines.append("first-divergence classes (sequences):")
            lines += [f"  {n:6d}  {name}" for name, n in self.first_classes.most_common()]
        if self.errors:
            lines.append(f"instrument errors ({len(self.errors)}):")
            lines += [f"  {e}" for e in self.errors[:10]]
        if self.intentional_classes:
            lines.append("intentional classes seen (sequences):")
            lines += [f"  {n:6d}  {name}" for name, n in self.intentional_classes.most_common()]
        return "\n".join(lines)


def run_many(
    seeds: range | list[int], nsteps: int, progress: Callable[[Summary], None] | None = None
) -> Summary:
    """Run one sequence per seed; ``progress`` is called after every 100 sequences."""
    s = Summary()
    t0 = time.monotonic()
    for seed in seeds:
        if progress is not None and s.sequences and s.sequences % 100 == 0:
            s.seconds = time.monotonic() - t0
            progress(s)
        try:
            r = run_sequence(seed, nsteps)
        except Exception as exc:  # a defect of the instrument itself: report, go on
            s.sequences += 1
            s.errors.append(f"seed {seed}: {type(exc).__name__}: {exc}")
            continue
        s.add(r)
    s.seconds = time.monotonic() - t0
    return s
