"""The bug zoo: deliberately broken drivers the conformance suite must catch.

A driver package declares its mutants in its own ``mutants.py`` (``MUTANTS``,
a tuple of ``hmmsim.driver.Mutant``: the driver class, the module of the
package it edits, the edits and the kernel rule broken) and registers that
module under the ``hmmsim.bugzoo`` entry-point group (dmirror, nouveau, and
the new-driver template, ``hmmsim.newdriver.mutants``). This module knows no
driver by name: it builds each mutant as a private copy of its package with
the named module edited (so it can never drift from the driver it mutates),
and registers the broken driver classes in the same group, so that ``hmmsim
check`` and the tests never pick them up unless asked (``hmmsim check
--bugzoo``, ``run_zoo``).

``run_zoo`` runs the suite on every mutant and reports, for each, whether it
was caught, by which check, and for a race how many schedules were explored
until the failing one.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import re
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

from .. import errors
from ..driver import Driver, Mutant
from ..errors import Deadlock, HmmsimError
from ..hookspecs import hookimpl
from ..plugins import BUGZOO_GROUP, find_driver, get_plugin_manager
from .checks import CheckSkipped, DriverSpec, all_checks, check_id, race_skip_reason
from .races import applicable, explore_race


class _PackageCopy(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves a mutant's private copy of a driver package from source text.

    Every module of the package is executed anew under ``prefix``, one of them
    with the mutant's edits, so the mutated module and everything that
    imports it (relatively) form one consistent broken driver.
    """

    def __init__(self, prefix: str, sources: dict[str, str]) -> None:
        self.prefix = prefix
        self.sources = sources

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.prefix and not fullname.startswith(self.prefix + "."):
            return None
        sub = fullname[len(self.prefix) + 1 :] or "__init__"
        if sub not in self.sources:
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=fullname == self.prefix)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        sub = module.__name__[len(self.prefix) + 1 :] or "__init__"
        code = compile(self.sources[sub], f"<bugzoo {module.__name__}>", "exec")
        exec(code, module.__dict__)


def _apply(name: str, where: str, source: str, edits: tuple[tuple[str, str], ...]) -> str:
    for old, new in edits:
        count = source.count(old)
        if count != 1:
            raise AssertionError(f"{name}: the text to mutate occurs {count} times in {where}")
        source = source.replace(old, new)
    return source


def build_package_mutant(mutant: Mutant) -> type[Driver]:
    """A mutant of a driver package (``hmmsim.driver.Mutant``): its own copy of the package."""
    modpath, clsname = mutant.driver.split(":")
    package = modpath.rsplit(".", 1)[0]
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations is not None
    folder = Path(next(iter(spec.submodule_search_locations)))
    sources = {f.stem: f.read_text() for f in sorted(folder.glob("*.py"))}
    target = mutant.module.rsplit(".", 1)[1]
    if mutant.module.rsplit(".", 1)[0] != package or target not in sources:
        raise AssertionError(f"{mutant.name}: {mutant.module} is not a module of {package}")
    sources[target] = _apply(mutant.name, mutant.module, sources[target], mutant.edits)
    prefix = f"_hmmsim_bugzoo_{mutant.name}"  # a top-level package of its own
    finder = _PackageCopy(prefix, sources)
    sys.meta_path.insert(0, finder)
    try:
        module = importlib.import_module(prefix + modpath[len(package) :])
    finally:
        sys.meta_path.remove(finder)
    base = module.__dict__[clsname]
    return type(clsname, (base,), {"name": mutant.name, "__doc__": mutant.rule})


def package_mutants() -> tuple[Mutant, ...]:
    """The mutants driver packages declare (their ``mutants`` module's ``MUTANTS``),
    registered under the ``hmmsim.bugzoo`` entry-point group."""
    found: list[Mutant] = []
    for ep in importlib.metadata.entry_points(group=BUGZOO_GROUP):
        if ep.value == __name__:
            continue
        found.extend(getattr(ep.load(), "MUTANTS", ()))
    return tuple(found)


def build(mutant: Mutant) -> type[Driver]:
    """The mutant's driver class, from its package's source with its edits applied."""
    return build_package_mutant(mutant)


def all_mutants() -> tuple[Mutant, ...]:
    """Every mutant a package registers (dmirror's, the template's, nouveau's, …)."""
    return package_mutants()


@functools.cache
def mutant_drivers() -> tuple[type[Driver], ...]:
    return tuple(build(m) for m in all_mutants())


#: Mutants ``run_mutant`` was handed that no package registers, while it runs.
_EXTRA: dict[str, type[Driver]] = {}


@hookimpl
def hmmsim_register_drivers() -> list[type[Driver]]:
    return [*mutant_drivers(), *_EXTRA.values()]


# ----- running the suite on the zoo ------------------------------------------------------
#
# What counts as a catch: a check of the suite failing the mutant as it would
# fail a real driver — an AssertionError from a check, an invariant or a
# KernelBug; an errno error (hmmsim.errors) the check did not expect; a
# Deadlock the model's locks detect; for a race, an invariant violated, a
# deadlock or livelock, or an actor failing with one of those. A mutant whose
# edits do not apply fails to build (an AssertionError from ``build``, before
# any check runs), and a check or actor dying of a plain Python error is a
# crash: neither is a catch.


#: Exceptions that are the suite failing a driver: an oracle's AssertionError
#: (checks, invariants, ``KernelBug``), an errno error the check did not
#: expect (the driver answered its user wrongly), or a ``Deadlock`` the
#: model's locks detected (what lockdep reports). Anything else is a crash.
CATCHING: tuple[type[BaseException], ...] = (AssertionError, HmmsimError, Deadlock)
_CATCHING_NAMES = frozenset(
    name
    for name, obj in vars(errors).items()
    if isinstance(obj, type) and issubclass(obj, CATCHING)
) | {"AssertionError", "RaceFailure"}


@attrs.frozen
class ZooResult:
    """What the suite did with one mutant.

    ``status`` is ``caught`` (a check failed, see ``CATCHING``), ``missed``
    (every check passed) or ``crashed`` (a check or a race actor died of a
    Python error such as ``NameError`` or ``TypeError``: the mutant is broken
    code, which says nothing about the suite's oracle, so it is no catch).
    """

    mutant: str
    status: str
    check: str = ""
    #: For a race: schedules explored up to and including the failing one.
    schedules: int | None = None
    message: str = ""
    seconds: float = 0.0
    #: The unmutated driver's name (``skel`` is the new-driver template).
    driver: str = ""
    #: The mutant's area (``Mutant.area``).
    area: str = ""
    #: The mutant's documented suite gap (``Mutant.suite_gap``), if any.
    suite_gap: str = ""
    #: The variant (probe parameters, ``key=value,...``; "" for none) whose
    #: run decided: the one that caught or crashed it, else the last one run.
    variant: str = ""
    #: How many variants the suite ran on before it decided.
    variants_run: int = 0

    @property
    def caught(self) -> bool:
        return self.status == "caught"

    @property
    def expected(self) -> bool:
        """Caught, or missed where the mutant documents the suite's gap."""
        return self.status == ("missed" if self.suite_gap else "caught")


def _race_failure_catches(description: str) -> bool:
    """Whether a race's failure is a check failing (see ``ZooResult``)."""
    if description.startswith(("invariant violated", "deadlock", "livelock")):
        return True
    # Actor errors read "actor: ExceptionType: message; ...".
    kinds = re.findall(r"(?:^|; )[\w-]+: (\w+): ", description)
    return bool(kinds) and all(k in _CATCHING_NAMES for k in kinds)


def _first_failure(spec: DriverSpec, pm: object) -> tuple[str, str, int | None, str]:
    """(status, check id, schedules, message) of the first check that fails."""
    # A check the driver declares it fails (a quirk of the real driver, kept on
    # purpose) fails for the unmutated driver too: it catches nothing.
    known = spec.driver(pm).expected_failures(**dict(spec.params))
    for area, check in all_checks():
        if check_id(area, check) in known:
            continue
        race = getattr(check, "race", None)
        if race is not None:
            if not applicable(spec, race, pm) or race_skip_reason(spec, race, pm) is not None:
                continue
            result = explore_race(spec, race, pm=pm)
            if result.failures:
                f = result.failures[0]
                status = "caught" if _race_failure_catches(f.description) else "crashed"
                message = f"{f.description} [{f.schedule}]"
                return status, f"{area}/{race.name}", f.run + 1, message
            continue
        try:
            check(spec)
        except CheckSkipped:
            continue
        except CATCHING as exc:
            return "caught", check_id(area, check), None, f"{type(exc).__name__}: {exc}"
        except Exception as exc:
            return "crashed", check_id(area, check), None, f"{type(exc).__name__}: {exc}"
    return "missed", "", None, ""


def _driver_name(mutant: Mutant) -> str:
    base = build(mutant).__mro__[1]
    return str(getattr(base, "name", mutant.driver))


def mutant_variants(mutant: Mutant, pm: Any = None) -> list[dict[str, str]]:
    """The variants the zoo runs a mutant in: the ones it declares
    (``Mutant.variants``), else every variant its driver declares."""
    if mutant.variants:
        return [dict(v) for v in mutant.variants]
    pm = pm or get_plugin_manager(group=BUGZOO_GROUP)
    cls = find_driver(pm, mutant.name)
    return [dict(v) for v in (getattr(cls, "variants", None) or [{}])]


def run_mutant(mutant: Mutant, pm: Any = None) -> ZooResult:
    """Run the suite on one mutant until a check catches it (see ``ZooResult``).

    The suite runs in each variant of ``mutant_variants`` in turn, as
    ``hmmsim check`` runs it in each variant of a driver, until one catches
    it: a bug of one memory kind is caught in that kind's variant. A crash
    in one variant does not stop the others (a catch wins over a crash).
    ``mutant`` need not be registered: one that is not is built and offered
    by this module's hook while the suite runs on it.
    """
    extra = mutant.name not in {m.name for m in all_mutants()}
    if extra:
        _EXTRA[mutant.name] = build(mutant)
    t0 = time.perf_counter()
    try:
        pm = pm or get_plugin_manager(group=BUGZOO_GROUP)
        decided: tuple[str, str, int | None, str, str] | None = None
        variants = mutant_variants(mutant, pm)
        run = 0
        for params in variants:
            spec = DriverSpec(mutant.name, tuple(sorted(params.items())), BUGZOO_GROUP)
            run += 1
            status, check, schedules, message = _first_failure(spec, pm)
            variant = str(spec).partition(":")[2]
            if status == "caught":
                decided = (status, check, schedules, message, variant)
                break
            if status == "crashed" and decided is None:
                decided = (status, check, schedules, message, variant)
        if decided is None:
            decided = ("missed", "", None, "", variant)
    finally:
        if extra:
            del _EXTRA[mutant.name]
    status, check, schedules, message, variant = decided
    return ZooResult(
        mutant.name,
        status,
        check,
        schedules,
        message,
        time.perf_counter() - t0,
        _driver_name(mutant),
        mutant.area,
        mutant.suite_gap,
        variant,
        run,
    )


def run_zoo(names: list[str] | None = None, *, jobs: int = 1) -> Iterator[ZooResult]:
    """Run the suite on each mutant (all by default) until a check catches it.

    Checks run in the suite's order and the first failure decides: for a
    race, how many schedules the exploration needed up to the failing one.
    ``jobs`` > 1 runs the mutants in that many forked worker processes; the
    results come in the zoo's order all the same.
    """
    pm = get_plugin_manager(group=BUGZOO_GROUP)
    todo = [m for m in all_mutants() if not names or m.name in names]
    if jobs <= 1 or len(todo) <= 1:
        for mutant in todo:
            yield run_mutant(mutant, pm)
        return
    yield from _run_zoo_parallel(todo, pm, jobs)


def _run_zoo_parallel(todo: list[Mutant], pm: Any, jobs: int) -> Iterator[ZooResult]:
    from .report import forked_map

    mutant_drivers()  # built once here, not once per worker
    done: dict[int, ZooResult] = {}
    nxt = 0
    for i, result in forked_map(lambda i: run_mutant(todo[i], pm), range(len(todo)), jobs):
        done[i] = result
        while nxt in done:  # in the zoo's order
            yield done.pop(nxt)
            nxt += 1


def kill_rates(results: list[ZooResult], key: str) -> dict[str, tuple[int, int]]:
    """(caught, total) per value of ``key`` (``driver`` or ``area``), sorted by it."""
    out: dict[str, tuple[int, int]] = {}
    for r in results:
        k = getattr(r, key) or "-"
        caught, total = out.get(k, (0, 0))
        out[k] = (caught + r.caught, total + 1)
    return dict(sorted(out.items()))


__all__: list[str] = [
    "CATCHING",
    "Mutant",
    "ZooResult",
    "all_mutants",
    "build",
    "build_package_mutant",
    "kill_rates",
    "mutant_drivers",
    "mutant_variants",
    "run_mutant",
    "run_zoo",
]
