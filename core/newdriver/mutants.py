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
        area="fault",
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
        area="invalidation",
    ),
    Mutant(
        "zoo_template_no_set_seq",
        _DRIVER,
        _TEMPLATE,
        (("            hmmsim.mmu_interval_set_seq(sub, cur_seq)\n", ""),),
        "The new-driver template's invalidate without mmu_interval_set_seq.",
        area="invalidation",
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
        area="teardown",
    ),
    Mutant(
        "zoo_template_maps_read_fault_writable",
        _DRIVER,
        _TEMPLATE,
        (
            (
                "(hmm_pfn_to_page(e), bool(e & HMM_PFN_WRITE))",
                "(hmm_pfn_to_page(e), True)  # mutant",
            ),
        ),
        "Maps every faulted page writable on the device, ignoring HMM_PFN_WRITE: a read "
        "fault on the zero page or a COW-shared page becomes a writable device mapping.",
        area="permissions",
    ),
    Mutant(
        "zoo_template_stores_through_read_only_entry",
        _DRIVER,
        _TEMPLATE,
        (
            (
                "e is not None and (e[1] or data is None)",
                "e is not None  # mutant: writability not checked\n",
            ),
        ),
        "A device store checks only that each page is mapped, not that it is mapped "
        "writable: it writes through entries the fault path mapped read-only.",
        area="permissions",
    ),
    Mutant(
        "zoo_template_invalidate_range_short_by_one_page",
        _DRIVER,
        _TEMPLATE,
        (
            (
                "first, last = rng.start // PAGE, (rng.end - 1) // PAGE\n",
                "first, last = rng.start // PAGE, (rng.end - 1) // PAGE - 1  # mutant\n",
            ),
        ),
        "Drops one page less than the invalidated range: the last page stays mapped on "
        "the device (an off-by-one on the range end).",
        area="invalidation",
    ),
    Mutant(
        "zoo_template_refuses_blockable_invalidate",
        _DRIVER,
        _TEMPLATE,
        (
            (
                "        if rng.blockable:\n"
                "            self.lock.acquire()\n"
                "        elif not self.lock.try_acquire():\n",
                "        if not self.lock.try_acquire():  # mutant: even when blockable\n",
            ),
        ),
        "Returns false from a blockable invalidation when its lock is busy: only "
        "non-blockable ranges may be refused.",
        area="invalidation",
    ),
    Mutant(
        "zoo_template_seq_reused_across_retries",
        _DRIVER,
        _TEMPLATE,
        (
            (
                "            while True:\n"
                "                if clock.now_ns > deadline:\n"
                '                    raise Busy("skel: fault timed out")\n'
                "                self.stats.fault_rounds += 1  # one per hmm_range_fault call\n"
                "                rng.notifier_seq = "
                "hmmsim.mmu_interval_read_begin(self.notifier)\n",
                "            rng.notifier_seq = hmmsim.mmu_interval_read_begin(self.notifier)\n"
                "            while True:  # mutant: one sequence for every attempt\n"
                "                if clock.now_ns > deadline:\n"
                '                    raise Busy("skel: fault timed out")\n'
                "                self.stats.fault_rounds += 1  # one per hmm_range_fault call\n",
            ),
        ),
        "Calls mmu_interval_read_begin once per window and retries with the same sequence: "
        "after one invalidation the fault spins until it times out.",
        area="fault",
    ),
    Mutant(
        "zoo_template_no_dirty_on_device_write",
        _DRIVER,
        _TEMPLATE,
        (("                            phys.flags[phys.head(pfn)] |= PG_dirty\n", ""),),
        "Stores through the device without dirtying the folio: reclaim drops a clean "
        "page the device wrote, and the store is lost.",
        area="coherence",
    ),
    Mutant(
        "zoo_template_close_keeps_notifier",
        _DRIVER,
        _TEMPLATE,
        (("        hmmsim.mmu_interval_notifier_remove(self.notifier)\n", ""),),
        "close() never removes its interval notifier: the mm keeps calling into a closed mirror.",
        area="teardown",
    ),
)
