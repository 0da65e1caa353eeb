"""The bug zoo: deliberately broken drivers the conformance suite must catch.

Each mutant is the source of a correct driver — ``dmirror`` or the
``hmmsim new-driver`` template — with one textual change that reproduces a
class of bug seen in real drivers, built into its own module at load time
(so it can never drift from the driver it mutates). They are registered
under their own entry-point group, ``hmmsim.bugzoo``, so that ``hmmsim
check`` and the tests never pick them up unless asked
(``hmmsim check --bugzoo``, ``run_zoo``).

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
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import attrs

from ..driver import Driver
from ..driver import Mutant as PackageMutant
from ..hookspecs import hookimpl
from ..newdriver import class_name, render_module
from ..plugins import BUGZOO_GROUP, get_plugin_manager
from .checks import CheckSkipped, DriverSpec, all_checks, check_id
from .races import applicable, explore_race


@attrs.frozen
class Mutant:
    """One broken driver: ``base`` with each ``old`` text replaced by ``new``."""

    name: str
    base: str  # "dmirror" or "template"
    edits: tuple[tuple[str, str], ...]
    #: The rule it breaks (docs/hmm-protocol.md references where there is one).
    doc: str


MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "zoo_dmirror_no_read_retry",
        "dmirror",
        (
            (
                "            if mmu_interval_read_retry(self.notifier, rng.notifier_seq):\n",
                "            if False:  # mutant: the read_retry check is gone\n",
            ),
        ),
        "Programs the device without mmu_interval_read_retry: an invalidation that ran "
        "after hmm_range_fault is missed and the device maps a stale page "
        "(docs/hmm-protocol.md §2).",
    ),
    Mutant(
        "zoo_dmirror_retry_outside_lock",
        "dmirror",
        (
            (
                "            self.mutex.acquire()\n"
                "            if mmu_interval_read_retry(self.notifier, rng.notifier_seq):\n"
                "                self.mutex.release()\n",
                "            if mmu_interval_read_retry(self.notifier, rng.notifier_seq):\n",
            ),
            (
                "            try:\n                self._do_fault(rng, write)\n",
                "            sched.point('mutant:between retry check and lock')\n"
                "            self.mutex.acquire()\n"
                "            try:\n                self._do_fault(rng, write)\n",
            ),
        ),
        "Checks mmu_interval_read_retry without holding the lock invalidate takes: an "
        "invalidation between the check and the programming is missed.",
    ),
    Mutant(
        "zoo_dmirror_no_set_seq",
        "dmirror",
        (
            (
                "            mmu_interval_set_seq(sub, cur_seq)\n"
                "            self._erase(rng.start >> PAGE_SHIFT, rng.end >> PAGE_SHIFT)\n",
                "            self._erase(rng.start >> PAGE_SHIFT, rng.end >> PAGE_SHIFT)\n",
            ),
        ),
        "invalidate does not call mmu_interval_set_seq, so read_retry never sees the "
        "invalidation and a fault in flight maps what was just unmapped.",
    ),
    Mutant(
        "zoo_dmirror_keeps_mapping_on_invalidate",
        "dmirror",
        (
            (
                "            self._erase(rng.start >> PAGE_SHIFT, rng.end >> PAGE_SHIFT)\n",
                "            pass  # mutant: device mappings stay\n",
            ),
        ),
        "Bumps the sequence but leaves the device mapping in place on invalidate: the "
        "device keeps using a page the CPU no longer maps there.",
    ),
    Mutant(
        "zoo_dmirror_refuses_blockable_invalidate",
        "dmirror",
        (
            (
                "        if rng.blockable:\n            self.mutex.acquire()\n"
                "        elif not self.mutex.try_acquire():\n",
                "        if not self.mutex.try_acquire():  # mutant: even when blockable\n",
            ),
        ),
        "Returns False from a blockable invalidate when its lock is busy: only "
        "non-blockable ranges may be refused (the kernel WARNs and the mapping goes stale).",
    ),
    Mutant(
        "zoo_dmirror_skips_foreign_migrate",
        "dmirror",
        (
            (
                "        if rng.event == MmuNotifyEvent.MIGRATE and rng.owner is self.device:\n",
                "        if rng.event == MmuNotifyEvent.MIGRATE:  # mutant: anyone's\n",
            ),
        ),
        "Skips every MIGRATE invalidation, not only those its own device started: when "
        "another device migrates the pages, this one keeps mapping the old ones.",
    ),
    Mutant(
        "zoo_dmirror_ignores_write_flag",
        "dmirror",
        (
            (
                "            tag = TAG_WRITE if e & HMM_PFN_WRITE else TAG_READ\n",
                "            tag = TAG_WRITE  # mutant: HMM_PFN_WRITE ignored\n",
            ),
        ),
        "Ignores HMM_PFN_WRITE and maps every page writable: the device can write the "
        "zero page, COW-shared pages and read-only mappings.",
    ),
    Mutant(
        "zoo_dmirror_lock_held_across_fault",
        "dmirror",
        (
            (
                "            rng.notifier_seq = mmu_interval_read_begin(self.notifier)\n"
                "            try:\n"
                "                with self.mm.mmap_lock.read():\n"
                "                    hmm_range_fault(rng)\n"
                "            except Busy:\n"
                "                self.stats.retries += 1\n"
                "                continue\n"
                '            sched.point("dmirror:after_range_fault")\n'
                "            self.mutex.acquire()\n",
                "            rng.notifier_seq = mmu_interval_read_begin(self.notifier)\n"
                "            self.mutex.acquire()  # mutant: held across hmm_range_fault\n"
                "            try:\n"
                "                with self.mm.mmap_lock.read():\n"
                "                    hmm_range_fault(rng)\n"
                "            except Busy:\n"
                "                self.mutex.release()\n"
                "                self.stats.retries += 1\n"
                "                continue\n",
            ),
        ),
        "Holds the driver lock across hmm_range_fault: a fault that invalidates (COW, "
        "munmap on another CPU) calls invalidate, which takes the same lock: deadlock.",
    ),
    Mutant(
        "zoo_dmirror_stale_req_bits_after_busy",
        "dmirror",
        (
            (
                "            self.notifier, start, end, pfns, default_flags=flags, "
                "dev_private_owner=self.device\n",
                "            self.notifier, start, end, pfns, default_flags=0,\n"
                "            pfn_flags_mask=HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE,\n"
                "            dev_private_owner=self.device\n",
            ),
            (
                "        flags = HMM_PFN_REQ_FAULT | (HMM_PFN_REQ_WRITE if write else 0)\n"
                "        pfns = np.zeros((end - start) >> PAGE_SHIFT, dtype=_U64)\n",
                "        flags = HMM_PFN_REQ_FAULT | (HMM_PFN_REQ_WRITE if write else 0)\n"
                "        pfns = np.full((end - start) >> PAGE_SHIFT, flags, dtype=_U64)\n",
            ),
        ),
        "Requests faults per page (pfn_flags_mask) and, after a retry, passes the previous "
        "output array back as input: the stale VALID/WRITE outputs read as REQ_FAULT/"
        "REQ_WRITE, so a read turns into a write fault (docs/hmm-protocol.md §1.1).",
    ),
    Mutant(
        "zoo_dmirror_maps_huge_over_pte_thp",
        "dmirror",
        (
            (
                "                    0,\n                    self.device.kind_of_page(pfn),\n",
                "                    # mutant: the folio's order, not the CPU mapping's\n"
                "                    int(self.machine.phys.order[self.machine.phys.head(pfn)]),\n"
                "                    self.device.kind_of_page(pfn),\n",
            ),
        ),
        "Maps a THP's pages with one 2 MiB device entry because the folio is huge, even "
        "where the CPU maps it with 4 KiB PTEs (a PTE-mapped THP): the order must come "
        "from hmm_pfn_to_map_order, i.e. the CPU mapping.",
    ),
    Mutant(
        "zoo_dmirror_leaks_page_refs",
        "dmirror",
        (
            (
                "            self.pt[vpn + i] = (hmm_pfn_to_page(e), tag)\n",
                "            self.pt[vpn + i] = (hmm_pfn_to_page(e), tag)\n"
                "            self.machine.phys.get_page(hmm_pfn_to_page(e))  # mutant: never put\n",
            ),
        ),
        "Takes a page reference for every page it maps and never drops it, not even on "
        "close: the pages leak.",
    ),
    Mutant(
        "zoo_template_no_read_retry",
        "template",
        (
            (
                "if hmmsim.mmu_interval_read_retry(self.notifier, rng.notifier_seq):",
                "if False:  # mutant: the read_retry check is gone",
            ),
        ),
        "The new-driver template without mmu_interval_read_retry (docs/hmm-protocol.md §2).",
    ),
    Mutant(
        "zoo_template_invalidate_without_lock",
        "template",
        (
            (
                "        if rng.blockable:\n"
                "            self.lock.acquire()\n"
                "        elif not self.lock.try_acquire():\n"
                "            return False\n",
                "",
            ),
            (
                "            self.stats.invalidations += 1\n"
                "        finally:\n"
                "            self.lock.release()\n",
                "            self.stats.invalidations += 1\n"
                "        finally:\n"
                "            pass  # mutant: invalidate takes no lock\n",
            ),
        ),
        "invalidate does not take the lock the fault path checks read_retry under: an "
        "invalidation between the check and the programming is missed.",
    ),
    Mutant(
        "zoo_template_no_set_seq",
        "template",
        (("            hmmsim.mmu_interval_set_seq(sub, cur_seq)\n", ""),),
        "The new-driver template's invalidate without mmu_interval_set_seq.",
    ),
    Mutant(
        "zoo_template_leaks_page_refs",
        "template",
        (
            (
                "                    self.stats.pages_mapped += len(rng.hmm_pfns)\n",
                "                    self.stats.pages_mapped += len(rng.hmm_pfns)\n"
                "                    for e in rng.hmm_pfns.tolist():  # mutant: never put\n"
                "                        self.mm.machine.phys.get_page(hmm_pfn_to_page(e))\n",
            ),
        ),
        "The new-driver template taking a reference on every page it maps and never "
        "dropping it: the pages leak.",
    ),
)


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


def build_package_mutant(mutant: PackageMutant) -> type[Driver]:
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


def package_mutants() -> tuple[PackageMutant, ...]:
    """The mutants driver packages declare (their ``mutants`` module's ``MUTANTS``),
    registered under the ``hmmsim.bugzoo`` entry-point group."""
    found: list[PackageMutant] = []
    for ep in importlib.metadata.entry_points(group=BUGZOO_GROUP):
        if ep.value == __name__:
            continue
        found.extend(getattr(ep.load(), "MUTANTS", ()))
    return tuple(found)


def _base_source(base: str, name: str) -> tuple[str, str | None]:
    """(source, package for relative imports) of the driver a mutant mutates."""
    if base == "template":
        return render_module(name), None
    if base == "dmirror":
        spec = importlib.util.find_spec("hmmsim.drivers.dmirror.device")
        assert spec is not None and spec.origin is not None
        with open(spec.origin) as f:
            return f.read(), "hmmsim.drivers.dmirror"
    raise ValueError(f"unknown mutant base {base!r}")


def build(mutant: Mutant | PackageMutant) -> type[Driver]:
    """The mutant's driver class, from its base's source with its edits applied."""
    if isinstance(mutant, PackageMutant):
        return build_package_mutant(mutant)
    source, package = _base_source(mutant.base, mutant.name)
    source = _apply(mutant.name, mutant.base, source, mutant.edits)
    if mutant.base == "dmirror":
        source = source.replace('    name = "dmirror"\n', f'    name = "{mutant.name}"\n')
    modname = f"hmmsim.testing.bugzoo._{mutant.name}"
    module = types.ModuleType(modname)
    module.__package__ = package or "hmmsim.testing"
    module.__file__ = f"<bugzoo {mutant.name}>"
    sys.modules[modname] = module
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    cls: type[Driver] = module.__dict__[
        "Dmirror" if mutant.base == "dmirror" else class_name(mutant.name)
    ]
    cls.__doc__ = mutant.doc
    return cls


def all_mutants() -> tuple[Mutant | PackageMutant, ...]:
    """This module's mutants (dmirror, the template) and every driver package's."""
    return (*MUTANTS, *package_mutants())


@functools.cache
def mutant_drivers() -> tuple[type[Driver], ...]:
    return tuple(build(m) for m in all_mutants())


@hookimpl
def hmmsim_register_drivers() -> list[type[Driver]]:
    return list(mutant_drivers())


# ----- running the suite on the zoo ------------------------------------------------------


@attrs.frozen
class ZooResult:
    mutant: str
    caught: bool
    check: str = ""
    #: For a race: schedules explored up to and including the failing one.
    schedules: int | None = None
    message: str = ""
    seconds: float = 0.0


def _first_failure(spec: DriverSpec, pm: object) -> tuple[str, int | None, str]:
    # A check the driver declares it fails (a quirk of the real driver, kept on
    # purpose) fails for the unmutated driver too: it catches nothing.
    known = spec.driver(pm).expected_failures(**dict(spec.params))
    for area, check in all_checks():
        if check_id(area, check) in known:
            continue
        race = getattr(check, "race", None)
        if race is not None:
            if not applicable(spec, race, pm):
                continue
            result = explore_race(spec, race, pm=pm)
            if result.failures:
                f = result.failures[0]
                return f"{area}/{race.name}", f.run + 1, f"{f.description} [{f.schedule}]"
            continue
        try:
            check(spec)
        except CheckSkipped:
            continue
        except Exception as exc:
            return check_id(area, check), None, f"{type(exc).__name__}: {exc}"
    return "", None, ""


def run_zoo(names: list[str] | None = None) -> Iterator[ZooResult]:
    """Run the suite on each mutant (all by default) until a check catches it."""
    pm = get_plugin_manager(group=BUGZOO_GROUP)
    for mutant in all_mutants():
        if names and mutant.name not in names:
            continue
        spec = DriverSpec(mutant.name, (), BUGZOO_GROUP)
        t0 = time.perf_counter()
        check, schedules, message = _first_failure(spec, pm)
        yield ZooResult(
            mutant.name, bool(check), check, schedules, message, time.perf_counter() - t0
        )


__all__: list[str] = ["MUTANTS", "Mutant", "ZooResult", "build", "mutant_drivers", "run_zoo"]
