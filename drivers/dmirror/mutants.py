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
        area="fault",
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
        area="fault",
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
        area="invalidation",
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
        area="invalidation",
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
        area="invalidation",
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
        area="invalidation",
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
        area="permissions",
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
        area="fault",
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
        area="fault",
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
        area="huge",
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
        area="teardown",
    ),
    Mutant(
        "zoo_dmirror_seq_after_the_walk",
        _DRIVER,
        _MIRROR,
        (
            (
                "        while True:\n"
                "            if clock.now_ns > deadline:\n"
                '                raise Busy(f"dmirror: fault of '
                '[{start:#x}, {end:#x}) timed out")\n'
                "            self.stats.fault_rounds += 1  # the hmm_range_fault call below\n"
                "            rng.notifier_seq = mmu_interval_read_begin(self.notifier)\n",
                "        rng.notifier_seq = mmu_interval_read_begin(self.notifier)\n"
                "        while True:\n"
                "            if clock.now_ns > deadline:\n"
                '                raise Busy(f"dmirror: fault of '
                '[{start:#x}, {end:#x}) timed out")\n'
                "            self.stats.fault_rounds += 1  # the hmm_range_fault call below\n",
            ),
            (
                "            except Busy:\n"
                "                self.stats.retries += 1\n"
                "                continue\n"
                '            sched.point("dmirror:after_range_fault")\n',
                "            except Busy:\n"
                "                self.stats.retries += 1\n"
                "                rng.notifier_seq = mmu_interval_read_begin(self.notifier)\n"
                "                continue\n"
                '            sched.point("dmirror:after_range_fault")\n'
                "            # mutant: the sequence is taken after the walk, not before it\n"
                "            rng.notifier_seq = mmu_interval_read_begin(self.notifier)\n",
            ),
        ),
        "Takes the notifier sequence after hmm_range_fault instead of before it: an "
        "invalidation that ran during the walk is already in the sequence, so "
        "mmu_interval_read_retry passes and the device maps what the walk saw before the "
        "CPU changed it (the sequence must be read before the walk it validates).",
        area="fault",
    ),
    Mutant(
        "zoo_dmirror_seq_reused_across_retries",
        _DRIVER,
        _MIRROR,
        (
            (
                "        while True:\n"
                "            if clock.now_ns > deadline:\n"
                '                raise Busy(f"dmirror: fault of '
                '[{start:#x}, {end:#x}) timed out")\n'
                "            self.stats.fault_rounds += 1  # the hmm_range_fault call below\n"
                "            rng.notifier_seq = mmu_interval_read_begin(self.notifier)\n",
                "        rng.notifier_seq = mmu_interval_read_begin(self.notifier)"
                "  # mutant: once\n"
                "        while True:\n"
                "            if clock.now_ns > deadline:\n"
                '                raise Busy(f"dmirror: fault of '
                '[{start:#x}, {end:#x}) timed out")\n'
                "            self.stats.fault_rounds += 1  # the hmm_range_fault call below\n",
            ),
        ),
        "Calls mmu_interval_read_begin once and retries with the same sequence: after one "
        "invalidation every later hmm_range_fault returns -EBUSY and every read_retry "
        "fails, so the fault spins until HMM_RANGE_DEFAULT_TIMEOUT (each attempt needs "
        "a fresh read_begin).",
        area="fault",
    ),
    Mutant(
        "zoo_dmirror_no_dirty_on_device_write",
        _DRIVER,
        _MIRROR,
        (
            (
                "            phys.write_pages(pfns, data.reshape(len(pfns), PAGE_SIZE))\n"
                "            phys.flags[phys.head_of(pfns)] |= np.uint16(PG_dirty)\n",
                "            phys.write_pages(pfns, data.reshape(len(pfns), PAGE_SIZE))\n",
            ),
            (
                "            phys.write(int(pfns[n - 1]), 0, tail)\n"
                "        phys.flags[phys.head_of(pfns)] |= np.uint16(PG_dirty)\n",
                "            phys.write(int(pfns[n - 1]), 0, tail)\n",
            ),
        ),
        "Stores through the device without dirtying the page (set_page_dirty): a clean "
        "page-cache or lazily-freed page the device wrote is dropped by reclaim and the "
        "store is lost.",
        area="coherence",
    ),
    Mutant(
        "zoo_dmirror_ignores_clear",
        _DRIVER,
        _MIRROR,
        (
            (
                "            self.erase(rng.start >> PAGE_SHIFT, rng.end >> PAGE_SHIFT)\n",
                "            if rng.event != MmuNotifyEvent.CLEAR:  # mutant\n"
                "                self.erase(rng.start >> PAGE_SHIFT, rng.end >> PAGE_SHIFT)\n",
            ),
        ),
        "Bumps the sequence but keeps the device PTEs on MMU_NOTIFY_CLEAR (zap, "
        "MADV_DONTNEED, reclaim): only UNMAP and PROTECTION events drop them, so the device "
        "keeps a page the CPU has unmapped.",
        area="invalidation",
    ),
    Mutant(
        "zoo_dmirror_invalidate_range_short_by_one_page",
        _DRIVER,
        _MIRROR,
        (
            (
                "            self.erase(rng.start >> PAGE_SHIFT, rng.end >> PAGE_SHIFT)\n",
                "            self.erase(rng.start >> PAGE_SHIFT, (rng.end >> PAGE_SHIFT) - 2)\n",
            ),
        ),
        "Drops [start, end - PAGE_SIZE) instead of [start, end): the last page of every "
        "invalidated range stays mapped on the device (an off-by-one on the range end).",
        area="invalidation",
    ),
    Mutant(
        "zoo_dmirror_sleeps_in_nonblockable_invalidate",
        _DRIVER,
        _MIRROR,
        (
            (
                "        if rng.blockable:\n"
                "            self.mutex.acquire()\n"
                "        elif not self.mutex.try_acquire():\n"
                "            return False\n",
                "        self.mutex.acquire()  # mutant: sleeps even when not blockable\n",
            ),
        ),
        "Sleeps on its lock in a non-blockable invalidation (the OOM reaper's) and returns "
        "true: mmu_notifier_range_blockable() false means the callback must not sleep and "
        "must return false when it cannot do its work at once.",
        area="invalidation",
    ),
    Mutant(
        "zoo_dmirror_write_through_read_only_entry",
        _DRIVER,
        _MIRROR,
        (
            (
                "                pfns = self._mapped_prefix(first, end, need_write=True)\n",
                "                pfns = self._mapped_prefix(first, end, need_write=False)"
                "  # mutant\n",
            ),
        ),
        "A device store checks only that the page is mapped, not that it is mapped "
        "writable: it writes the zero page, a COW-shared page or a read-only mapping "
        "through an entry the fault path mapped read-only.",
        area="permissions",
    ),
    Mutant(
        "zoo_dmirror_migrated_page_mapped_writable",
        _DRIVER,
        _MIGRATE,
        (
            (
                "            dmirror.map_pages(base + i, dpage, nr, bool(d & MIGRATE_PFN_WRITE))\n",
                "            dmirror.map_pages(base + i, dpage, nr, True)  # mutant\n",
            ),
        ),
        "Maps every page it migrated to the device writable, ignoring MIGRATE_PFN_WRITE: "
        "a page migrated out of a read-only or COW-shared mapping becomes device-writable.",
        area="migration",
    ),
    Mutant(
        "zoo_dmirror_maps_entries_that_did_not_migrate",
        _DRIVER,
        _MIGRATE,
        (
            (
                "            if not s & MIGRATE_PFN_MIGRATE or dpage is None:\n",
                "            if dpage is None:  # mutant: MIGRATE_PFN_MIGRATE not rechecked\n",
            ),
        ),
        "Maps the destination of every entry it allocated one for without rechecking "
        "MIGRATE_PFN_MIGRATE after migrate_vma_pages: an entry the core could not migrate "
        "(pinned, raced) is mapped to a device page that finalize then frees.",
        area="migration",
    ),
    Mutant(
        "zoo_dmirror_device_page_without_init",
        _DRIVER,
        _DEVICE,
        (("        zone_device_page_init(self.machine, pfn, order)\n", ""),),
        "Hands out a free device page without zone_device_page_init: its refcount stays 0, "
        "so the migration's reference is a get on a free page and the put frees it under "
        "the CPU's mapping.",
        area="migration",
    ),
    Mutant(
        "zoo_dmirror_no_migrate_vma_finalize",
        _DRIVER,
        _MIGRATE,
        (
            (
                "                finalize_and_map(dmirror, args)\n"
                "                migrate_vma_finalize(args)\n",
                "                finalize_and_map(dmirror, args)  # mutant: no finalize\n",
            ),
        ),
        "Never calls migrate_vma_finalize after migrating to the device: the migration "
        "entries stay in the CPU page table and the pages stay locked, so the next CPU "
        "access waits forever.",
        area="migration",
    ),
    Mutant(
        "zoo_dmirror_keeps_device_pte_after_migrating_back",
        _DRIVER,
        _MIGRATE,
        (
            (
                "            dmirror.erase(base + i, base + i + nr - 1)\n        i += nr\n",
                "            pass  # mutant: the device entries stay\n        i += nr\n",
            ),
            (
                "            if pt.pop(vpn, None) is not None:\n                erased += 1\n",
                "            pass  # mutant: the device entries stay\n",
            ),
        ),
        "Migrates device pages back to RAM without dropping its own device PTEs (its own "
        "migration's invalidation is skipped, so nobody else will): the device keeps "
        "mapping device pages that are freed.",
        area="migration",
    ),
    Mutant(
        "zoo_dmirror_migrates_back_without_copying",
        _DRIVER,
        _MIGRATE,
        (
            (
                "            _fill(dmirror, new, spage, nr)\n",
                "            _fill(dmirror, new, None, nr)  # mutant: zeroed, not copied\n",
            ),
            (
                "    phys.copy_pages(new, spages)\n",
                "    phys.zero_pages(new)  # mutant: zeroed, not copied\n",
            ),
        ),
        "Allocates the system pages for a migration back to RAM but never copies the "
        "device data into them before migrate_vma_pages: the process reads zeros.",
        area="migration",
    ),
    Mutant(
        "zoo_dmirror_migration_window_short_by_one_page",
        _DRIVER,
        _MIGRATE,
        (
            (
                "                    vma,\n"
                "                    start,\n"
                "                    end,\n"
                "                    MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_SELECT_COMPOUND,\n",
                "                    vma,\n"
                "                    start,\n"
                "                    end - PAGE_SIZE,  # mutant: off by one page\n"
                "                    MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_SELECT_COMPOUND,\n",
            ),
        ),
        "Sets up each migration window one page short of its end: the last page of every "
        "window is never migrated, so the command fails its read-back (-ENOENT).",
        area="migration",
    ),
    Mutant(
        "zoo_dmirror_exclusive_entry_not_atomic",
        _DRIVER,
        _MIRROR,
        (
            (
                "                        self.pt[addr >> PAGE_SHIFT] = (page, TAG_ATOMIC)\n",
                "                        self.pt[addr >> PAGE_SHIFT] = (page, TAG_WRITE)"
                "  # mutant\n",
            ),
        ),
        "Maps a page it made device-exclusive as a plain writable entry: the device "
        "believes it has no atomic access, and CHECK_EXCLUSIVE reports none.",
        area="exclusive",
    ),
    Mutant(
        "zoo_dmirror_exclusive_keeps_folio_reference",
        _DRIVER,
        _MIRROR,
        (("                    phys.put_page(folio)\n", ""),),
        "Unlocks the folio make_device_exclusive returned but never puts it: every page "
        "made exclusive leaks a reference.",
        area="exclusive",
    ),
    Mutant(
        "zoo_dmirror_close_keeps_notifier",
        _DRIVER,
        _MIRROR,
        (
            (
                "        mmu_interval_notifier_remove(self.notifier)\n        self.closed = True\n",
                "        self.closed = True  # mutant: the notifier stays on the mm\n",
            ),
        ),
        "close() never removes its interval notifier: the mm keeps calling into a closed "
        "mirror for the rest of its life.",
        area="teardown",
    ),
    Mutant(
        "zoo_dmirror_close_leaves_device_pages",
        _DRIVER,
        _MIRROR,
        (("            self.device.evict_all()\n", "            pass  # mutant: no eviction\n"),),
        "close() does not evict the device memory it migrated in: the process keeps "
        "device-private entries whose zone_device_data points at the freed dmirror, and "
        "the next CPU touch's migrate_to_ram uses it after free.",
        area="teardown",
    ),
    Mutant(
        "zoo_dmirror_evict_without_finalize",
        _DRIVER,
        _DEVICE,
        (("            migrate_device_finalize(machine, src, dst, n)\n", ""),),
        "Evicts a chunk without migrate_device_finalize: the evicted pages keep their "
        "migration entries and stay locked.",
        area="teardown",
    ),
)
