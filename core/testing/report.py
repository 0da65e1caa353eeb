"""Running the conformance suite for ``hmmsim check`` and reporting it.

``run_suite`` runs every check on every driver spec, telling a ``Progress``
what it does (a live status line on a terminal, one plain line per driver and
area otherwise). The results go to the terminal as a summary, and on request
to JSON (``to_json``, schema ``SCHEMA_VERSION``) and JUnit XML (``to_junit``)
for CI dashboards. Nothing here needs pytest.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TextIO

import attrs

from .checks import CHECKS, CheckResult, DriverSpec, all_checks, check_name, run_check

#: Bumped when a field of the JSON report changes meaning or goes away.
SCHEMA_VERSION = 2

OUTCOME_CHAR = {"passed": ".", "failed": "F", "skipped": "s", "xfailed": "x"}


@attrs.define
class SuiteRun:
    """Everything one ``hmmsim check`` produced."""

    specs: list[DriverSpec]
    results: list[CheckResult] = attrs.field(factory=list)
    seconds: float = 0.0
    #: Plugin name → (distribution, version) of each plugin the drivers came from.
    plugins: dict[str, tuple[str, str]] = attrs.field(factory=dict)
    #: Plugins that could not be loaded: (name, reason).
    broken: list[tuple[str, str]] = attrs.field(factory=list)
    interrupted: bool = False

    def totals(self) -> dict[str, int]:
        c = Counter(r.outcome for r in self.results)
        return {k: c[k] for k in ("passed", "failed", "skipped", "xfailed")}

    @property
    def failed(self) -> int:
        return self.totals()["failed"]


class Progress:
    """What a run tells the person watching: per driver, per area, per failure.

    On a terminal (``live``) a status line names the check running now and is
    overwritten; elsewhere each finished area is one plain line. A failure is
    one line (``verbose``: with its traceback); a skip gives its reason.
    """

    def __init__(self, out: TextIO, *, live: bool, verbose: bool = False) -> None:
        self.out = out
        self.live = live
        self.verbose = verbose
        self._status = False
        self._width = max(len(area) for area in CHECKS)

    def _clear(self) -> None:
        if self._status:
            self.out.write("\r\x1b[K")
            self._status = False

    def check_started(self, spec: DriverSpec, area: str, name: str, done: int, total: int) -> None:
        if self.live:
            self._clear()
            line = f"[{done}/{total}] {spec} {area}/{name} ..."
            # A wrapped line cannot be overwritten: keep it within the terminal.
            width = shutil.get_terminal_size().columns - 1
            self.out.write(line if len(line) <= width else line[: max(width - 3, 1)] + "...")
            self.out.flush()
            self._status = True

    def area_done(self, spec: DriverSpec, area: str, results: Sequence[CheckResult]) -> None:
        self._clear()
        marks = "".join(OUTCOME_CHAR[r.outcome] for r in results)
        secs = sum(r.seconds for r in results)
        print(f"{spec} {area.ljust(self._width)} {marks} ({secs:.1f}s)", file=self.out, flush=True)
        for r in results:
            if self.verbose:
                print(f"  {r.outcome:7s} {r.id} ({r.seconds:.2f}s)", file=self.out)
            if r.outcome == "failed":
                print(f"  FAILED {r.id}: {r.message}", file=self.out)
                if r.replay:
                    print(f"    replay: {r.replay}", file=self.out)
                if self.verbose and r.traceback:
                    print(_indent(r.traceback.rstrip(), "    "), file=self.out)
            elif r.outcome == "skipped":
                print(f"  skipped {r.id}: {r.message}", file=self.out)
            elif r.outcome == "xfailed":
                print(f"  xfailed {r.id}: {r.message}", file=self.out)
        self.out.flush()


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def run_suite(
    specs: Sequence[DriverSpec],
    progress: Progress | None = None,
    checks: Iterable[tuple[str, Callable[[DriverSpec], None]]] | None = None,
    *,
    jobs: int = 1,
) -> SuiteRun:
    """Every check on every spec; an exception in one check fails that check only.

    ``jobs`` > 1 runs the checks in that many forked worker processes (each
    check builds its own machine, so they are independent); the results, the
    progress lines and the report are the same as with one, in the same
    order, only sooner. A ``KeyboardInterrupt`` ends the run early with the
    results so far (``interrupted``), so that they are still reported.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, not {jobs}")
    todo = list(checks if checks is not None else all_checks())
    run = SuiteRun(list(specs))
    tasks = [(spec, area, check) for spec in run.specs for area, check in todo]
    t0 = time.perf_counter()
    collector = _Collector(tasks, progress)
    try:
        if jobs > 1 and len(tasks) > 1:
            _run_parallel(tasks, collector, jobs)
        else:
            for i, (spec, area, check) in enumerate(tasks):
                collector.started(i)
                collector.finished(i, run_check(spec, area, check))
    except KeyboardInterrupt:
        run.interrupted = True
    run.results = collector.in_order()
    run.seconds = time.perf_counter() - t0
    return run


Task = tuple[DriverSpec, str, Callable[[DriverSpec], None]]


class _Collector:
    """Puts results back in suite order and tells ``progress`` an area once it is whole."""

    def __init__(self, tasks: list[Task], progress: Progress | None) -> None:
        self.tasks = tasks
        self.progress = progress
        self.results: dict[int, CheckResult] = {}
        self.next = 0  # the first task whose area has not been reported yet
        self.area_start = 0

    def started(self, i: int) -> None:
        if self.progress is not None:
            spec, area, check = self.tasks[i]
            self.progress.check_started(
                spec, area, check_name(check), len(self.results), len(self.tasks)
            )

    def finished(self, i: int, result: CheckResult) -> None:
        self.results[i] = result
        # Report each area, in suite order, once all of its checks are in.
        while self.next in self.results:
            spec, area, _ = self.tasks[self.next]
            self.next += 1
            last = self.next == len(self.tasks) or self.tasks[self.next][:2] != (spec, area)
            if last:
                if self.progress is not None:
                    done = [self.results[j] for j in range(self.area_start, self.next)]
                    self.progress.area_done(spec, area, done)
                self.area_start = self.next

    def in_order(self) -> list[CheckResult]:
        """The results so far, in suite order (all of them unless interrupted)."""
        return [self.results[i] for i in sorted(self.results)]


def _cost_order(tasks: list[Task]) -> list[int]:
    """Task indices, the long ones first (races explore hundreds of schedules),
    so that the last check to finish is a short one and both cores stay busy."""
    return sorted(range(len(tasks)), key=lambda i: tasks[i][1] != "races")


def _run_parallel(tasks: list[Task], collector: _Collector, jobs: int) -> None:
    for i, result in forked_map(lambda i: run_check(*tasks[i]), _cost_order(tasks), jobs):
        collector.finished(i, result)
        if collector.next < len(tasks):
            collector.started(collector.next)


#: The function a ``forked_map`` runs, set in the parent before the workers
#: fork (they inherit it: the checks are closures, which cannot be pickled).
_WORK: list[Callable[[int], Any]] = []


def _work(i: int) -> tuple[int, Any]:
    return i, _WORK[0](i)


def forked_map(
    fn: Callable[[int], Any], order: Sequence[int], jobs: int
) -> Iterator[tuple[int, Any]]:
    """``(i, fn(i))`` for each ``i`` of ``order``, as they finish, computed in
    ``jobs`` forked worker processes (handed out in that order).

    ``fn`` and what it uses reach the workers by ``fork``, so nothing but the
    index and the result (which must pickle) crosses a pipe. An exception
    from ``fn`` is raised here; it, or an interrupt, kills and reaps every
    worker at once instead of waiting for the work still running. When the
    workers cannot be forked (``OSError``: a process whose address space the
    kernel will not commit twice, such as a long test session, gets
    ``ENOMEM``), the work runs here, one index after the other.
    """
    import concurrent.futures
    import multiprocessing
    import sys

    # Output buffered now would be written again by every worker at its exit.
    sys.stdout.flush()
    sys.stderr.flush()
    _WORK[:] = [fn]
    pool = concurrent.futures.ProcessPoolExecutor(
        jobs, mp_context=multiprocessing.get_context("fork")
    )
    try:
        try:
            # With fork, the first submit starts every worker: fn is theirs now.
            futures = [pool.submit(_work, i) for i in order]
        except OSError:
            _stop(pool)
            futures = []
        if not futures:
            for i in order:
                yield i, fn(i)
            return
        for fut in concurrent.futures.as_completed(futures):
            yield fut.result()
    except BaseException:
        _stop(pool)
        raise
    finally:
        _WORK.clear()
    pool.shutdown(wait=True)


def _stop(pool: Any) -> None:
    """Kill and reap a pool's workers and drop its queued work, without waiting
    for the work still running.

    The pool's manager thread may start a worker in place of one that died
    (a worker an interrupt ended) until it has seen the shutdown, so the
    workers are looked up again once that thread is gone.
    """
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for proc in procs:
        proc.kill()
    pool.shutdown(wait=False, cancel_futures=True)
    manager = getattr(pool, "_executor_manager_thread", None)
    if manager is not None:
        manager.join(timeout=10)
    procs += [p for p in (getattr(pool, "_processes", None) or {}).values() if p not in procs]
    for proc in procs:
        proc.kill()
        proc.join(timeout=10)


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO) -> None:
    """Print ``rows`` under ``header`` in left-aligned columns two spaces apart."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    print(line, file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)), file=out)


def summary(run: SuiteRun, out: TextIO) -> None:
    """The per-driver, per-area table and the totals line."""
    areas = list(dict.fromkeys(r.area for r in run.results))
    rows = []
    for spec in run.specs:
        row = [str(spec)]
        for area in areas:
            c = Counter(r.outcome for r in run.results if r.driver == str(spec) and r.area == area)
            cell = f"{c['passed']}/{c['failed']}/{c['skipped']}"
            row.append(cell + (f" +{c['xfailed']}x" if c["xfailed"] else ""))
        rows.append(row)
    print("\nresults (passed/failed/skipped, +N declared expected failures):", file=out)
    print_table(["driver", *areas], rows, out)
    failures = [r for r in run.results if r.outcome == "failed"]
    if failures:
        print("\nfailed:", file=out)
        for r in failures:
            print(f"  {r.driver} {r.id}: {r.message}", file=out)
    t = run.totals()
    stopped = " (interrupted)" if run.interrupted else ""
    print(
        f"\n{len(run.specs)} driver spec(s), {len(run.results)} checks: {t['passed']} passed, "
        f"{t['failed']} failed, {t['skipped']} skipped, {t['xfailed']} expected failures "
        f"in {run.seconds:.1f}s{stopped}",
        file=out,
    )


def _hmmsim_version() -> str:
    try:
        return importlib.metadata.version("hmmsim")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def to_json(run: SuiteRun) -> dict[str, Any]:
    """The JSON report (schema ``SCHEMA_VERSION``).

    Top level: ``schema``, ``hmmsim_version``, ``plugins`` (name →
    distribution and version), ``broken_plugins``, ``drivers`` (the specs),
    ``totals`` (passed, failed, skipped, xfailed, checks, seconds), ``interrupted``,
    ``failed`` (the count, as in schema 1) and ``results``: one object per check
    with ``driver``, ``id`` (``area/name``), ``area``, ``check`` (the name),
    ``outcome``, ``message``, ``seconds``, ``traceback`` and, for a race
    failure, ``schedule``, ``replay`` (a command) and ``trace``.
    """
    totals: dict[str, Any] = dict(run.totals())
    totals["checks"] = len(run.results)
    totals["seconds"] = round(run.seconds, 3)
    results = []
    for r in run.results:
        d = attrs.asdict(r)
        d["id"] = r.id
        d["seconds"] = round(r.seconds, 4)
        results.append(d)
    return {
        "schema": SCHEMA_VERSION,
        "hmmsim_version": _hmmsim_version(),
        "plugins": {
            name: {"distribution": dist, "version": version}
            for name, (dist, version) in sorted(run.plugins.items())
        },
        "broken_plugins": [{"name": n, "reason": why} for n, why in run.broken],
        "drivers": [str(s) for s in run.specs],
        "totals": totals,
        "interrupted": run.interrupted,
        "failed": run.totals()["failed"],
        "results": results,
    }


def to_junit(run: SuiteRun) -> bytes:
    """JUnit XML: one ``testsuite`` per driver spec, one ``testcase`` per check.

    ``classname`` is ``hmmsim.<driver spec>``, ``name`` the check id; a failure
    carries its one-line message as ``message`` and the traceback (and for a
    race the replay command and trace) as text; a skip carries its reason.
    """
    root = ET.Element("testsuites", name="hmmsim check", time=f"{run.seconds:.3f}")
    t = run.totals()
    root.set("tests", str(len(run.results)))
    root.set("failures", str(t["failed"]))
    root.set("skipped", str(t["skipped"] + t["xfailed"]))
    for spec in run.specs:
        mine = [r for r in run.results if r.driver == str(spec)]
        c = Counter(r.outcome for r in mine)
        suite = ET.SubElement(
            root,
            "testsuite",
            name=str(spec),
            tests=str(len(mine)),
            failures=str(c["failed"]),
            errors="0",
            skipped=str(c["skipped"] + c["xfailed"]),
            time=f"{sum(r.seconds for r in mine):.3f}",
        )
        for r in mine:
            case = ET.SubElement(
                suite, "testcase", classname=f"hmmsim.{spec}", name=r.id, time=f"{r.seconds:.3f}"
            )
            if r.outcome == "failed":
                text = r.traceback
                if r.replay:
                    text += f"\nschedule: {r.schedule}\nreplay: {r.replay}\n{r.trace}"
                fail = ET.SubElement(
                    case, "failure", message=r.message, type=r.message.partition(":")[0]
                )
                fail.text = text
            elif r.outcome in ("skipped", "xfailed"):
                # JUnit has no expected failure: it is a skip whose message says so.
                ET.SubElement(case, "skipped", message=r.message)
    ET.indent(root)
    data: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return data
