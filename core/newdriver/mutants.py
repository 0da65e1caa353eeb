"""The new-driver template's bug-zoo mutants: one real HMM driver bug class each.

Each is the template module's own source with one textual edit
(``hmmsim.driver.Mutant``), built and run like any driver package's mutants
(``hmmsim.testing.bugzoo``). Registered under the ``hmmsim.bugzoo``
entry-point group.
"""

from __future__ import annotations

from ..driver import Mutant

_DRIVER = "hmmsim.newdriver.template:Skel"
_TEMPLATE = "hmmsim.newdriver.template"

MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "zoo_template_no_read_retry",
        _DRIVER,
        _TEMPLATE,
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
        _DRIVER,
        _TEMPLATE,
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
        _DRIVER,
        _TEMPLATE,
        (("            hmmsim.mmu_interval_set_seq(sub, cur_seq)\n", ""),),
        "The new-driver template's invalidate without mmu_interval_set_seq.",
    ),
    Mutant(
        "zoo_template_leaks_page_refs",
        _DRIVER,
        _TEMPLATE,
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
