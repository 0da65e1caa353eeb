"""The ``hmmsim`` command: ``drivers``, ``check``, ``new-driver``, ``demo``.

Bad input (an unknown driver, a malformed option) gives a one-line error on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import time
import warnings
from typing import TYPE_CHECKING, Any, TextIO

from .driver import Capability
from .errors import HmmsimError
from .plugins import (
    broken_plugins,
    driver_classes,
    get_plugin_manager,
    mark_reported,
    plugin_distribution,
)

if TYPE_CHECKING:
    from .driver import Driver
    from .testing.checks import DriverSpec

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def hmmsim_version() -> str:
    """The installed hmmsim distribution's version."""
    try:
        return importlib.metadata.version("hmmsim")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hmmsim", description="An executable model of Linux HMM.")
    parser.add_argument("--version", action="version", version=f"hmmsim {hmmsim_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("demo", help="a short printed tour of the memory model")
    sub.add_parser(
        "drivers", help="list installed drivers: version, capabilities, parameters, variants"
    )
    check = sub.add_parser("check", help="run the conformance suite over drivers")
    check.add_argument(
        "--driver",
        action="append",
        default=[],
        metavar="NAME[:key=value,...]",
        help="driver to check (repeatable); default: every installed driver, each variant",
    )
    check.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    check.add_argument("--junit-xml", metavar="PATH", help="also write the results as JUnit XML")
    check.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print each failure's traceback and each check's name and time",
    )
    check.add_argument(
        "--bugzoo",
        action="store_true",
        help="run the suite on every deliberately broken driver of the bug zoo instead",
    )
    check.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=0,
        metavar="N",
        help="run the checks in N worker processes, 0 for one per usable core (default 0); "
        "the results are the same, only sooner",
    )
    exp = sub.add_parser(
        "explore",
        help="explore (or replay) the interleavings of one race scenario",
        description="Run one race scenario under many schedules. A schedule id lists "
        "the actor picked at each point where more than one could run, as runs "
        "separated by dots: 0x3.1x5 is actor 0 three times, then actor 1 five times "
        "(actor 0 is the first actor --list shows, 1 the cpu). Every failure names "
        "its id; --replay ID reruns exactly that interleaving and prints its trace.",
    )
    exp.add_argument("scenario", help="a race scenario name (see --list)", nargs="?")
    exp.add_argument("--list", action="store_true", help="list the race scenarios")
    exp.add_argument("--driver", default="dmirror", metavar="NAME[:key=value,...]")
    exp.add_argument(
        "--replay", metavar="ID", help="rerun exactly this schedule id (e.g. 0x3.1x5) and trace it"
    )
    exp.add_argument(
        "--strategy", choices=("dfs", "pct", "random"), default="dfs", help="default: dfs"
    )
    exp.add_argument("--bound", type=int, default=2, help="DFS preemption bound (default 2)")
    exp.add_argument("--depth", type=int, default=3, help="PCT bug depth (default 3)")
    exp.add_argument(
        "--schedules", type=int, default=3000, help="at most this many runs (default 3000)"
    )
    exp.add_argument("--seed", type=int, default=0)
    exp.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="explore in N worker processes, 0 for one per core (default 1); "
        "the result is the same, only sooner",
    )
    new = sub.add_parser("new-driver", help="write a new driver plugin package")
    new.add_argument("name", help="the driver's name (a Python identifier)")
    new.add_argument(
        "--dir",
        default=".",
        metavar="PATH",
        help="where to create the package directory (default: .)",
    )
    return parser


def _caps_text(caps: Capability) -> str:
    """Capabilities as names joined by ``|`` (``NONE`` for none), never an enum repr."""
    names = [c.name for c in Capability if c.value and c in caps and c.name]
    return "|".join(names) or "NONE"


def _param_text(cls: type[Driver], key: str) -> str:
    p = cls.parameter(key)
    values = "|".join(p.choices) if p.choices else "any value"
    default = f", default {p.default}" if p.default is not None else ""
    return f"{key}={values}{default}: {p.description}"


def cmd_drivers(out: TextIO) -> int:
    """One line per driver, its name first; then its parameters, indented; then broken plugins."""
    pm = get_plugin_manager()
    drivers = driver_classes(pm, warn=False)
    if not drivers:
        print("no drivers installed", file=out)
    width = max([len(n) for n in drivers] + [len(b.name) for b in broken_plugins(pm)] + [1])
    for name, cls in sorted(drivers.items()):
        dist, version = plugin_distribution(pm, cls)
        variants = "; ".join(
            ",".join(f"{k}={v}" for k, v in p.items()) or "-" for p in cls.variants
        )
        print(
            f"{name.ljust(width)}  {dist} {version}  capabilities: {_caps_text(cls.capabilities)}"
            f"  variants: {variants}",
            file=out,
        )
        for key in cls.parameters:
            print(f"{' ' * width}    {_param_text(cls, key)}", file=out)
    for b in broken_plugins(pm):
        print(f"{b.name.ljust(width)}  BROKEN: cannot be loaded: {b.reason}", file=out)
    mark_reported(pm)
    return EXIT_OK


def _resolve_specs(specs_text: list[str]) -> list[DriverSpec]:
    """Parse and validate ``NAME[:key=value,...]`` specs once, before anything runs.

    Repeats are dropped. UsageError for an unknown driver, an undeclared
    parameter, a value outside the declared choices, or one ``probe`` refuses.
    """
    from .testing.checks import DriverSpec, unique_specs, validate_spec

    try:
        specs = unique_specs([DriverSpec.parse(s) for s in specs_text])
        for spec in specs:
            validate_spec(spec)
    except HmmsimError as exc:
        raise UsageError(exc.message) from None
    return specs


def cmd_explore(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from .explore import ExploreResult, explore, replay
    from .sched import (
        PCT,
        BoundedDFS,
        RandomWalk,
        Strategy,
        decode_schedule,
        encode_schedule,
    )
    from .testing.races import RACES, applicable, race_by_name, race_scenario
    from .testing.report import print_table

    if args.list or not args.scenario:
        if not args.list:
            raise UsageError("name a scenario (hmmsim explore --list shows them)")
        print_table(
            ["scenario", "needs", "what"], [(r.name, str(r.needs.name), r.doc) for r in RACES], out
        )
        return EXIT_OK
    try:
        race = race_by_name(args.scenario)
    except KeyError as exc:
        raise UsageError(str(exc.args[0])) from None
    (spec,) = _resolve_specs([args.driver])
    if not applicable(spec, race):
        raise UsageError(f"{spec} does not claim what {race.name} needs ({race.needs.name})")
    if args.jobs < 0:
        raise UsageError(f"--jobs must be 0 (one per core) or more, not {args.jobs}")
    if args.bound < 0:
        raise UsageError(f"--bound must be 0 or more, not {args.bound}")
    if args.schedules < 1:
        raise UsageError(f"--schedules must be 1 or more, not {args.schedules}")
    if args.depth < 1:
        raise UsageError(f"--depth must be 1 or more, not {args.depth}")
    jobs = args.jobs or usable_cores()
    scenario = race_scenario(spec, race)
    if args.replay is not None:
        try:
            decode_schedule(args.replay)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        result = replay(scenario, args.replay)
        wanted = encode_schedule(decode_schedule(args.replay))
        if result.schedule != wanted:
            raise UsageError(
                f"schedule {args.replay} is not a schedule of {race.name} on {spec}: "
                f"the run it starts is {result.schedule} (schedule ids come from "
                "hmmsim explore; see hmmsim explore --help)"
            )
        print(result.format_trace(last=len(result.trace)), file=out)
        print(f"{race.name} on {spec}, schedule {args.replay}: {result.describe()}", file=out)
        return EXIT_FAILED if result.failed else EXIT_OK
    strategy: Strategy
    if args.strategy == "dfs":
        strategy = BoundedDFS(args.bound)
    elif args.strategy == "pct":
        strategy = PCT(seed=args.seed, depth=args.depth, steps=50)
    else:
        strategy = RandomWalk(seed=args.seed)
    live = bool(getattr(err, "isatty", lambda: False)())
    last = [time.perf_counter()]

    def progress(done: ExploreResult) -> None:
        now = time.perf_counter()
        if now - last[0] < (0.2 if live else 5.0):
            return
        last[0] = now
        line = (
            f"{race.name}: {done.schedules}/{args.schedules} schedules, "
            f"{len(done.failures)} failing"
        )
        if live:
            err.write(f"\r\x1b[K{line}")
        else:
            print(line, file=err)
        err.flush()

    res = explore(scenario, strategy, args.schedules, jobs=jobs, progress=progress)
    if live:
        err.write("\r\x1b[K")
    space = " (the whole space)" if res.exhausted else ""
    print(
        f"{race.name} on {spec}: {res.schedules} schedules{space}, {res.steps} steps, "
        f"{res.schedules_per_second:.0f} schedules/s, {len(res.failures)} failing",
        file=out,
    )
    for f in res.failures[:5]:
        print(f"  schedule {f.schedule} (run {f.run + 1}): {f.description}", file=out)
    if res.failures:
        f = res.failures[0]
        print(f"\ntrace of schedule {f.schedule}:\n{f.trace}", file=out)
        print(
            f"\nreplay: hmmsim explore {race.name} --driver {spec} --replay {f.schedule}",
            file=out,
        )
    return EXIT_FAILED if res.failures else EXIT_OK


def cmd_bugzoo(names: list[str], out: TextIO, jobs: int = 1) -> int:
    """The suite on every mutant: caught or not, by which check, after how many schedules.

    Each mutant is run in every variant of its driver (or the ones it
    declares) until one catches it; ``jobs`` worker processes share the
    mutants. Prints one line per mutant as it finishes, then the table (with
    the variant that decided), the kill rate per driver and per area, and
    the schedules each race-caught mutant needed. Fails when a mutant is
    missed that documents no suite gap, when a mutant crashes (no catch:
    see ``hmmsim.testing.bugzoo``), or when one documented as missed is
    caught (its note is stale).
    """
    import time

    from .testing.bugzoo import all_mutants, kill_rates, run_zoo
    from .testing.report import print_table

    known = {m.name for m in all_mutants()}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(f"no mutant named {unknown[0]!r} (see hmmsim check --bugzoo)")
    t0 = time.perf_counter()
    results = []
    rows = []
    jobs = _jobs(jobs)
    for r in run_zoo(names or None, jobs=jobs):
        results.append(r)
        schedules = "-" if r.schedules is None else str(r.schedules)
        outcome = {"caught": "yes", "missed": "NO", "crashed": "CRASH"}[r.status]
        if r.status == "missed" and r.suite_gap:
            outcome = "no (gap)"
        rows.append(
            (
                r.mutant,
                r.driver,
                r.area or "-",
                r.variant or "-",
                outcome,
                r.check or "-",
                schedules,
                f"{r.seconds:.1f}s",
            )
        )
        where = f" ({r.variant})" if r.variant else ""
        if r.caught:
            line = f"caught by {r.check}{where}"
        elif r.status == "crashed":
            line = f"CRASHED in {r.check}{where} (no catch): {r.message}"
        else:
            line = f"NOT caught in {r.variants_run} variant(s)" + (
                f" (suite gap: {r.suite_gap})" if r.suite_gap else ""
            )
        print(f"{r.mutant}: {line}", file=out, flush=True)
    print(file=out)
    print_table(
        ["mutant", "driver", "area", "variant", "caught", "by", "schedules", "time"], rows, out
    )
    for key in ("driver", "area"):
        rates = ", ".join(f"{k} {c}/{n}" for k, (c, n) in kill_rates(results, key).items())
        print(f"\nkill rate by {key}: {rates}", file=out)
    races = sorted(r.schedules for r in results if r.caught and r.schedules is not None)
    if races:
        print(
            f"\nschedules to the failing one, {len(races)} race-caught mutant(s): "
            f"min {races[0]}, median {races[len(races) // 2]}, max {races[-1]}",
            file=out,
        )
    caught = sum(r.caught for r in results)
    crashed = sum(r.status == "crashed" for r in results)
    print(
        f"\nkill rate: {caught}/{len(results)}"
        + (f" ({crashed} crashed)" if crashed else "")
        + f" in {time.perf_counter() - t0:.1f}s",
        file=out,
    )
    return EXIT_OK if all(r.expected for r in results) else EXIT_FAILED


def _writable_path(path: str, option: str) -> None:
    """UsageError now, before the run, if a report could not be written to ``path``."""
    if os.path.isdir(path):
        raise UsageError(f"{option} {path}: is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{option} {path}: no directory {parent}")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"{option} {path}: not writable")


def usable_cores() -> int:
    """The cores this process may run on (``taskset`` limits them), at least 1."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _jobs(jobs: int) -> int:
    if jobs < 0:
        raise UsageError(f"--jobs must be 0 (one per core) or more, not {jobs}")
    return jobs or usable_cores()


def cmd_check(
    specs_text: list[str],
    json_path: str | None,
    out: TextIO,
    *,
    junit_path: str | None = None,
    verbose: bool = False,
    err: TextIO | None = None,
    jobs: int = 1,
) -> int:
    """Run the suite; one line per failure, a summary, the reports; exit 1 on any failure."""
    from .testing.checks import installed_specs
    from .testing.report import Progress, run_suite, summary, to_json, to_junit

    err = err or sys.stderr
    jobs = _jobs(jobs)
    if json_path:
        _writable_path(json_path, "--json")
    if junit_path:
        _writable_path(junit_path, "--junit-xml")
    pm = get_plugin_manager()
    drivers = driver_classes(pm, warn=False)
    for b in broken_plugins(pm):
        print(f"hmmsim: warning: {b}", file=err)
    mark_reported(pm)
    specs = _resolve_specs(specs_text) if specs_text else installed_specs(pm)
    if not specs:
        raise UsageError("no drivers installed (hmmsim drivers lists them)")
    live = bool(getattr(out, "isatty", lambda: False)())
    run = run_suite(specs, Progress(out, live=live, verbose=verbose), jobs=jobs)
    run.broken = [(b.name, b.reason) for b in broken_plugins(pm)]
    for spec in specs:
        cls = drivers.get(spec.name)
        if cls is not None:
            run.plugins[spec.name] = plugin_distribution(pm, cls)
    summary(run, out)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(to_json(run), f, indent=2)
            f.write("\n")
    if junit_path:
        with open(junit_path, "wb") as fb:
            fb.write(to_junit(run))
    if run.interrupted:
        return 130
    return EXIT_FAILED if run.failed else EXIT_OK


def main(
    argv: list[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    with warnings.catch_warnings():
        # A plugin that cannot be loaded is one line, not a warning with a source line.
        def show(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
            print(f"hmmsim: warning: {message}", file=err)

        warnings.showwarning = show
        return _main(argv, out, err)


def _main(argv: list[str] | None, out: TextIO, err: TextIO) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(lambda line: print(line, file=out))
        if args.command == "drivers":
            return cmd_drivers(out)
        if args.command == "check":
            if args.bugzoo:
                return cmd_bugzoo(args.driver, out, args.jobs)
            return cmd_check(
                args.driver,
                args.json,
                out,
                junit_path=args.junit_xml,
                verbose=args.verbose,
                err=err,
                jobs=args.jobs,
            )
        if args.command == "explore":
            return cmd_explore(args, out, err)
        if args.command == "new-driver":
            from .newdriver import write_driver_package

            path = write_driver_package(args.name, args.dir)
            print(f"wrote {path}", file=out)
            print(f"install it with: pip install -e {path}", file=out)
            return EXIT_OK
    except UsageError as exc:
        print(f"hmmsim: error: {exc}", file=err)
        return EXIT_USAGE
    except HmmsimError as exc:
        print(f"hmmsim: error: {exc.message}", file=err)
        return EXIT_USAGE
    raise AssertionError(f"unhandled command {args.command}")
