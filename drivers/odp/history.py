"""The three generations of ODP the model runs, and the quirks each keeps.

Kernel counterpart: the history of ``drivers/infiniband/core/umem_odp.c`` and
``drivers/infiniband/hw/mlx5/odp.c``.

=========  ===========  ==========================================================
era        kernels      how a fault reaches memory
=========  ===========  ==========================================================
gup        v5.3-v5.4    ``get_user_pages_remote`` in chunks of 512, the page
                        reference dropped at once ("avoid pinning the page"),
                        ``dma_list`` entries carrying ``ODP_READ_ALLOWED_BIT`` /
                        ``ODP_WRITE_ALLOWED_BIT``, one classic per-mm notifier
                        over an interval tree of umems, ``notifiers_seq`` /
                        ``notifiers_count`` as the retry check
hmm        v5.10-v6.15  ``hmm_range_fault`` into a 4 KiB-unit ``pfn_list``, one
                        interval notifier per umem, each umem page DMA-mapped in
                        the map path into the umem's own ``dma_list``
mainline   v6.16+       ``struct hmm_dma_map``: the map path only faults and
                        locks, ``populate_mtt`` DMA-maps each entry through
                        ``hmm_dma_map_pfn`` (P2P pages included)
=========  ===========  ==========================================================

v5.5 moved ODP to interval notifiers, and in the same cycle "IB/core: Fix ODP
with IB_ACCESS_HUGETLB handling" (rdma-rc, December 2019) dropped the
registration-time VMA check for ``HPAGE_SHIFT`` and a per-page
``vma_kernel_pagesize`` check at fault time (-EFAULT), which v5.10's map-order
check replaced; v5.5-v5.9 are not an era of their own here.

Quirks kept, with where they come from:

* ``IB_ACCESS_HUGETLB`` is hugetlb-or-fail. In the gup era the VMA at the MR's
  start must be hugetlb (``ib_umem_odp_get``: ``find_vma`` +
  ``is_vm_hugetlb_page``, page shift from its hstate), so THP memory is refused
  at registration. Since v5.10 only the CPU mapping order is checked at fault
  time (``hmm_pfn_to_map_order() + PAGE_SHIFT < page_shift`` → -EINVAL), so a
  PMD-mapped THP works and 4 KiB pages fail.
* 6.16+ fills ``pfn_list`` in 4 KiB units but ``populate_mtt``,
  ``mlx5_ib_invalidate_range`` and ``ib_umem_odp_unmap_dma_pages`` index it in
  umem pages: a hugetlb MR of more than one huge page maps its later huge
  pages from the wrong entries. Modelled as read (``MAINLINE_HUGETLB_INDEXING``
  in ``driver``); the mirror's one-huge-page MRs never reach it.
* 6.16+ ``populate_mtt`` does ``odp->npages++`` for every VALID entry of the
  UMR run, mapped before or not, and the unmap takes one off per entry it
  unmaps: npages drifts up, and an implicit child whose entries were written
  twice is never destroyed when emptied (v5.10-v6.15 counted each mapping
  once, in ``ib_umem_odp_map_dma_single_page``).
* 6.16+ ``populate_mtt`` writes every VALID entry of the 8-entry-aligned UMR
  run, including entries outside the span just faulted. A fault that failed
  part-way leaves the entries ``hmm_range_fault`` had filled VALID (and WRITE),
  and while nothing is DMA-mapped (npages 0) ``mlx5_ib_invalidate_range``
  returns before clearing them, so a later fault next to them gives the HCA
  translations of pages the CPU no longer maps that way (after fork: writable
  translations of pages shared read-only with the child). Modelled as read;
  the conformance suite does not reach it. v5.10-v6.15 wrote the MTTs from
  ``dma_list``, which holds only mapped entries.
* The RDMA responder prefetches ``min(MAX_PREFETCH_LEN, bytes_committed)``
  bytes from the faulting packet when the message length is unknown
  (``mlx5_ib_mr_rdma_pfault_handler``): nothing for the first packet.
* The 1000 ms deadline is set once; after it the -EBUSY itself reaches the
  fault handler, which resumes with error; a stale ``read_retry`` loops back
  to the walk without looking at the deadline (``umem_odp.c``, v5.10+).
* Every fault of a writable ODP MR asks for write access
  (``pagefault_real_mr``: ``odp->umem.writable && !downgrade``), so a writable
  MR cannot map read-only memory; PREFETCH is the only read-only mapping.
* ZAP runs close only at an invalid entry with an 8-aligned index and the
  statistics count one entry too many per run (``mlx5_ib_invalidate_range``);
  every UMR is widened to 8-entry units (``mlx5r_umr_update_xlt``).
* No event or owner filtering: RELEASE is a zap like any other.
* The gup era reports a write to a read-only VMA as -EFAULT (GUP) and fails a
  huge umem page whose 4 KiB pieces stopped being contiguous between two GUP
  calls with -EFAULT, leaking the reference of the piece that failed the check
  (``ib_umem_odp_map_dma_pages`` breaks out before ``put_user_page`` and
  releases only the pages after it).
* The gup era's "got different pages" branch of
  ``ib_umem_odp_map_dma_single_page`` calls ``ib_umem_notifier_start_account``,
  which takes ``umem_mutex``, held by its caller: v5.3/v5.4 self-deadlock there
  (unreachable while the sequence check works); v5.5 made it WARN + -EAGAIN.
* The gup era's hugetlb check is ``find_vma`` (the first VMA ending above the
  MR start, which may begin above it) + ``is_vm_hugetlb_page``.
"""

from __future__ import annotations

from typing import Final

#: The eras, newest first, and the kernels each stands for.
ERAS: Final = ("mainline", "hmm", "gup")
KERNELS: Final = {"mainline": "v6.16+", "hmm": "v5.10-v6.15", "gup": "v5.3-v5.4"}

__all__ = ["ERAS", "KERNELS"]
