"""dmirror's bug-zoo mutants: one real HMM driver bug class each.

Each is dmirror's own source with one textual edit (``hmmsim.driver.Mutant``):
``hmmsim.testing.bugzoo`` builds the broken copy of the package and runs the
conformance suite on it, which must catch every one (``hmmsim check
--bugzoo``). Registered under the ``hmmsim.bugzoo`` entry-point group.
"""

from __future__ import annotations

from hmmsim.driver import Mutant

_DRIVER = "hmmsim.drivers.dmirror.driver:Dmirror"
_MIRROR = "hmmsim.drivers.dmirror.mirror"
_MIGRATE = "hmmsim.drivers.dmirror.migrate"
_DEVICE = "hmmsim.drivers.dmirror.device"

MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "zoo_dmirror_no_read_retry",
        _DRIVER,
        _MIRROR,
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
        _DRIVER,
        _MIRROR,
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
        _DRIVER,
        _MIRROR,
        (
            (
                "            mmu_interval_set_seq(sub, cur_seq)\n"
                "            self.erase(rng.start >> PAGE_SHIFT, rng.end >> PAGE_SHIFT)\n",
                "            self.erase(rng.start >> PAGE_SHIFT, rng.end >> PAGE_SHIFT)\n",
            ),
        ),
        "invalidate does not call mmu_interval_set_seq, so read_retry never sees the "
        "invalidation and a fault in flight maps what was just unmapped.",
    ),
    Mutant(
        "zoo_dmirror_keeps_mapping_on_invalidate",
        _DRIVER,
        _MIRROR,
        (
            (
                "            self.erase(rng.start >> PAGE_SHIFT, rng.end >> PAGE_SHIFT)\n",
                "            pass  # mutant: device mappings stay\n",
            ),
        ),
        "Bumps the sequence but leaves the device mapping in place on invalidate: the "
        "device keeps using a page the CPU no longer maps there.",
    ),
    Mutant(
        "zoo_dmirror_refuses_blockable_invalidate",
        _DRIVER,
        _MIRROR,
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
        _DRIVER,
        _MIRROR,
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
        _DRIVER,
        _MIRROR,
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
        _DRIVER,
        _MIRROR,
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
        _DRIVER,
        _MIRROR,
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
        _DRIVER,
        _MIRROR,
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
        _DRIVER,
        _MIRROR,
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
)
