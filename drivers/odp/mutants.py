"""The odp driver's bug-zoo mutants: one real ODP bug class each.

Each is the odp package's own source with a textual edit of one module
(``hmmsim.driver.Mutant``). A mutant is probed without parameters, so the
mutants of era- or hugetlb-specific code are built from the preset classes
``OdpGup`` and ``OdpHugetlbHmm``. The conformance suite must catch every one
(``hmmsim check --bugzoo``).
"""

from __future__ import annotations

from hmmsim.driver import Mutant

_ODP = "hmmsim.drivers.odp.driver:Odp"
_GUP = "hmmsim.drivers.odp.driver:OdpGup"
_HUGE = "hmmsim.drivers.odp.driver:OdpHugetlbHmm"
_MR = "hmmsim.drivers.odp.mr"
_UMEM = "hmmsim.drivers.odp.umem"
_DEVICE = "hmmsim.drivers.odp.device"

MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "zoo_odp_invalidate_without_set_seq",
        _ODP,
        _MR,
        (("        mmu_interval_set_seq(sub, cur_seq)\n", "        pass  # mutant\n"),),
        "The umem's invalidate callback zaps the MTTs but never calls "
        "mmu_interval_set_seq: a fault that walked the page tables before the "
        "invalidation passes its read_retry and maps pages that are gone (the rule "
        "every mmu_interval_notifier user had to follow from v5.5 on).",
        area="invalidation",
    ),
    Mutant(
        "zoo_odp_no_read_retry_under_umem_mutex",
        _ODP,
        _UMEM,
        (
            (
                "            if mmu_interval_read_retry(self.notifier, rng.notifier_seq):\n",
                "            if False:  # mutant\n",
            ),
        ),
        "ib_umem_odp_map_dma_and_lock takes umem_mutex but does not check "
        "mmu_interval_read_retry: the MTTs are written from a walk an invalidation "
        "overtook (the sequence check the 2019 code did with notifiers_seq).",
        area="fault",
    ),
    Mutant(
        "zoo_odp_zap_without_dma_unmap",
        _ODP,
        _MR,
        (("        umem.unmap_dma_pages(start, end)\n", "        pass  # mutant\n"),),
        "The invalidation zaps the MTTs but leaves the pages DMA-mapped: the IOMMU "
        "still lets the HCA reach pages the CPU freed (ib_umem_odp_unmap_dma_pages "
        "skipped).",
        area="dma",
    ),
    Mutant(
        "zoo_odp_mtt_writable_regardless_of_cpu",
        _ODP,
        _MR,
        (
            (
                "                if entry & HMM_PFN_WRITE and not downgrade:\n",
                "                if not downgrade:  # mutant\n",
            ),
        ),
        "populate_mtt sets MLX5_IB_MTT_WRITE without looking at HMM_PFN_WRITE: the "
        "HCA may write pages the CPU maps read-only (the zero page, COW-shared "
        "pages after fork).",
        area="permissions",
    ),
    Mutant(
        "zoo_odp_npages_not_counted",
        _ODP,
        _MR,
        (
            (
                "                umem.npages += 1\n",
                "                umem.npages += 0  # mutant\n",
            ),
        ),
        "The MTT writer DMA-maps entries without counting them in umem_odp->npages: "
        "mlx5_ib_invalidate_range's 'nothing was ever mapped' shortcut then skips "
        "the zap, and the HCA keeps pages the CPU unmapped.",
        area="invalidation",
    ),
    Mutant(
        "zoo_odp_release_stops_listening_first",
        _ODP,
        _UMEM,
        (
            (
                "        with self.umem_mutex:\n"
                "            self.unmap_dma_pages(self.start, self.end)\n"
                '        if self.era == "gup":\n            self.hca.per_mm(self.mm).remove(self)\n'
                "        elif self.notifier is not None:\n"
                "            mmu_interval_notifier_remove(self.notifier)\n",
                '        if self.era == "gup":\n            self.hca.per_mm(self.mm).remove(self)\n'
                "        elif self.notifier is not None:\n"
                "            mmu_interval_notifier_remove(self.notifier)\n"
                "        sched.point('odp:mutant')\n"
                "        with self.umem_mutex:  # mutant: unmapped after the notifier is gone\n"
                "            self.unmap_dma_pages(self.start, self.end)\n",
            ),
        ),
        "ib_umem_odp_release removes the notifier before it unmaps: an invalidation "
        "in between is not seen, and its pages are freed while still DMA-mapped.",
        area="teardown",
    ),
    Mutant(
        "zoo_odp_fault_resumed_without_error",
        _ODP,
        _DEVICE,
        (("        eqe.error = exc\n", "        eqe.error = None  # mutant\n"),),
        "A failed page fault resumes the QP without the error bit: the HCA retries "
        "the access for ever instead of completing the work request with an error.",
        area="fault",
    ),
    Mutant(
        "zoo_odp_hugetlb_map_order_unchecked",
        _HUGE,
        _UMEM,
        (
            (
                "        return int(bad[0]) if len(bad) else len(entries)\n",
                "        return len(entries)  # mutant\n",
            ),
        ),
        "The map path does not check hmm_pfn_to_map_order against the umem page: an "
        "IB_ACCESS_HUGETLB MR over 4 KiB pages maps 2 MiB from one 4 KiB page (the "
        "check v5.10 added, kept an error so hugetlb MRs over small pages fail).",
        area="huge",
    ),
    Mutant(
        "zoo_odp_gup_no_sequence_check",
        _GUP,
        _UMEM,
        (
            (
                "            if self.notifiers_count or self.notifiers_seq != current_seq:\n"
                '                raise Again("odp: an invalidation raced the fault")\n'
                "            if not int(self.dma_list[idx]):\n",
                "            if not int(self.dma_list[idx]):  # mutant\n",
            ),
            (
                "        if self.notifiers_count or self.notifiers_seq != current_seq:\n"
                "            self.umem_mutex.release()\n",
                "        if False:  # mutant\n            self.umem_mutex.release()\n",
            ),
        ),
        "The 2019 GUP path maps pages without ib_umem_mmu_notifier_retry: a page "
        "GUP returned before an invalidation is mapped after it.",
        area="fault",
    ),
)
