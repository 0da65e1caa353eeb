"""nouveau's bug-zoo mutants: one real nouveau bug class each.

Each is nouveau's own source with one textual edit (``hmmsim.driver.Mutant``).
The conformance suite must catch every one (``hmmsim check --bugzoo``).

Not here yet: the 2025 atomic-retry fix (the retry path that kept the folio
locked). Only a race that makes the atomic fault's read_retry fail drives
that path, and on that path the unmutated driver livelocks too. Each retry's
``make_device_exclusive`` first faults back the exclusive entry the previous
attempt left, and that restore is an ``MMU_NOTIFY_EXCLUSIVE`` with no owner,
so it bumps the window's sequence again. The kernel leaves this loop through
the 1000 ms deadline. The model's virtual clock does not advance enough per
attempt to reach it inside an exploration.
"""

from __future__ import annotations

from hmmsim.driver import Mutant

_DRIVER = "hmmsim.drivers.nouveau.driver:Nouveau"
_SVM = "hmmsim.drivers.nouveau.svm"
_VMM = "hmmsim.drivers.nouveau.vmm"

MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "zoo_nouveau_maps_whole_compound",
        _DRIVER,
        _SVM,
        (
            (
                "    order = hmm_pfn_to_map_order(e)\n",
                "    order = int(drm.machine.phys.order[drm.machine.phys.head(pfn)])  # mutant\n",
            ),
        ),
        "Maps the whole compound page (the folio's order) where the CPU maps only part of "
        "it with PTEs: the GPU keeps 2 MiB after a THP split (the 2020 cover letter's rule, "
        "the GPU never maps more than the CPU).",
        area="huge",
    ),
    Mutant(
        "zoo_nouveau_skips_every_migrate",
        _DRIVER,
        _SVM,
        (("                and rng.owner is svmm.drm\n", "                and True  # mutant\n"),),
        "The whole-mm notifier skips every MMU_NOTIFY_MIGRATE, not only nouveau's own: a "
        "page another migration moved stays mapped on the GPU at its old frame.",
        area="invalidation",
    ),
    Mutant(
        "zoo_nouveau_stale_requests_after_busy",
        _DRIVER,
        _SVM,
        (
            (
                "            np.zeros(1, dtype=np.uint64),\n            default_flags=hmm_flags,\n",
                "            np.full(1, hmm_flags, dtype=np.uint64),\n"
                "            pfn_flags_mask=HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE,  # mutant\n",
            ),
        ),
        "Per-entry requests in hmm_pfns that are not refilled after -EBUSY or a stale "
        "read_retry (the v5.8 FIXME): the outputs of the failed attempt are asked for "
        "again, so a read retried after an mprotect asks for a write.",
        area="fault",
    ),
    Mutant(
        "zoo_nouveau_no_read_retry",
        _DRIVER,
        _SVM,
        (
            (
                "            if mmu_interval_read_retry(notifier, rng.notifier_seq):\n",
                "            if False:  # mutant: no read_retry\n",
            ),
        ),
        "Writes the GPU PTE without mmu_interval_read_retry: an invalidation after "
        "hmm_range_fault is missed and the GPU maps a page the CPU no longer maps.",
        area="fault",
    ),
    Mutant(
        "zoo_nouveau_transient_no_set_seq",
        _DRIVER,
        _SVM,
        (("        mmu_interval_set_seq(sub, cur_seq)\n", "        pass  # mutant\n"),),
        "The transient interval notifier does not bump the sequence, so read_retry never "
        "sees an invalidation of the window being faulted.",
        area="invalidation",
    ),
    Mutant(
        "zoo_nouveau_no_pfnclr",
        _DRIVER,
        _SVM,
        (("            svmm.invalidate(start, limit)\n", "            pass  # mutant\n"),),
        "The whole-mm notifier takes the lock but issues no PFNCLR: GPU PTEs outlive the "
        "CPU mappings they mirror.",
        area="invalidation",
    ),
    Mutant(
        "zoo_nouveau_ignores_write_bit",
        _DRIVER,
        _SVM,
        (
            (
                "    if e & HMM_PFN_WRITE:\n        word |= NVIF_VMM_PFNMAP_V0_W\n",
                "    word |= NVIF_VMM_PFNMAP_V0_W  # mutant: W whatever the CPU allows\n",
            ),
        ),
        "Sets W in the PFNMAP word without HMM_PFN_WRITE: the GPU writes a page the CPU "
        "maps read-only (a COW-shared or zero page).",
        area="permissions",
    ),
    Mutant(
        "zoo_nouveau_no_dma_unmap",
        _DRIVER,
        _VMM,
        (
            (
                "                dma_unmap_page(drm.dma, pte.dma_addr, 1 << pte.shift, "
                "DMA_BIDIRECTIONAL)\n",
                "                pass  # mutant: the DMA mapping outlives the PTE\n",
            ),
        ),
        "PFNCLR clears the GPU entry but never DMA-unmaps the host page: the IOMMU keeps "
        "the page mapped after it is freed (what DMA-API debugging reports).",
        area="dma",
    ),
    Mutant(
        "zoo_nouveau_drops_huge_order",
        _DRIVER,
        _SVM,
        (
            (
                "    if order:\n        args.page = order + PAGE_SHIFT\n",
                "    if False:  # mutant: the CPU mapping's order is dropped\n"
                "        args.page = order + PAGE_SHIFT\n",
            ),
        ),
        "Ignores hmm_pfn_to_map_order and maps every page with a 4 KiB GPU PTE, though it "
        "claims HUGE_MAPPINGS: where the CPU maps 2 MiB the GPU should too (the v5.9 "
        "change that made nouveau map huge pages).",
        area="huge",
    ),
    Mutant(
        "zoo_nouveau_pfnclr_short_by_one_page",
        _DRIVER,
        _SVM,
        (
            (
                "            svmm.invalidate(start, limit)\n",
                "            svmm.invalidate(start, limit - PAGE_SIZE)  # mutant\n",
            ),
        ),
        "Clears [start, end - PAGE_SIZE) on invalidate_range_start: the last page of "
        "every invalidated range stays mapped on the GPU.",
        area="invalidation",
    ),
    Mutant(
        "zoo_nouveau_nonblockable_claims_success",
        _DRIVER,
        _SVM,
        (
            (
                "            return -11  # -EAGAIN\n",
                "            return 0  # mutant: success without clearing anything\n",
            ),
        ),
        "Returns success from a non-blockable invalidate_range_start (the OOM reaper's) "
        "without clearing the GPU PTEs: the reaper frees the pages while the GPU maps "
        "them. It must return -EAGAIN when it cannot do the work without sleeping.",
        area="invalidation",
    ),
    Mutant(
        "zoo_nouveau_seq_reused_across_retries",
        _DRIVER,
        _SVM,
        (
            (
                "        while True:\n"
                "            if clock.now_ns > deadline:\n"
                '                raise Busy(f"nouveau: fault at {args.addr:#x} timed out")\n'
                "            svmm.cli.stats.fault_rounds += 1  # the hmm_range_fault call below\n"
                "            rng.notifier_seq = mmu_interval_read_begin(notifier)\n",
                "        rng.notifier_seq = mmu_interval_read_begin(notifier)\n"
                "        while True:  # mutant: one sequence for every attempt\n"
                "            if clock.now_ns > deadline:\n"
                '                raise Busy(f"nouveau: fault at {args.addr:#x} timed out")\n'
                "            svmm.cli.stats.fault_rounds += 1  # the hmm_range_fault call below\n",
            ),
        ),
        "Calls mmu_interval_read_begin once and retries with the same sequence: after one "
        "invalidation of the window the replayed fault spins until the 1000 ms deadline "
        "and is cancelled.",
        area="fault",
    ),
    Mutant(
        "zoo_nouveau_fini_keeps_notifier",
        _DRIVER,
        _SVM,
        (("        mmu_notifier_unregister(self.notifier, self.mm)\n", ""),),
        "nouveau_svmm_fini never unregisters the whole-mm notifier: the mm keeps calling "
        "into a torn-down svmm.",
        area="teardown",
    ),
)
