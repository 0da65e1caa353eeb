"""The odp driver against its spec, point by point where the first version strayed:
capabilities of the hugetlb variant, ibv_advise_mr's errors, the responder's prefetch
length, registration limits, the mainline npages accounting and the 2019 GUP path."""

from __future__ import annotations

import numpy as np
import pytest
from hmmsim import (
    MADV_DONTNEED,
    MAP_ANONYMOUS,
    MAP_HUGETLB,
    MAP_POPULATE,
    MAP_PRIVATE,
    PROT_READ,
    PROT_WRITE,
    Machine,
    MachineConfig,
)
from hmmsim.driver import Capability
from hmmsim.drivers.odp import (
    IB_ACCESS_HUGETLB,
    IB_ACCESS_LOCAL_WRITE,
    IB_ACCESS_ON_DEMAND,
    IB_ACCESS_REMOTE_READ,
    IB_ACCESS_REMOTE_WRITE,
    IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH,
    IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH_NO_FAULT,
    IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH_WRITE,
    IB_UVERBS_ADVISE_MR_FLAG_FLUSH,
    IMPLICIT_LENGTH,
    IbvSge,
    Odp,
)
from hmmsim.drivers.odp import umem as umem_mod
from hmmsim.drivers.odp.uapi import IB_ACCESS_FLUSH_GLOBAL
from hmmsim.errors import (
    BadAddress,
    Deadlock,
    InvalidArgument,
    NoEntry,
    NotPermitted,
    NotSupported,
    Overflow,
)
from hmmsim.notifier import MmuNotifyEvent, NotifierRange
from hmmsim.testing.invariants import check_dma_contract, check_no_leaks

PAGE = 4096
HUGE = 2 << 20
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS
ODP_RO = IB_ACCESS_ON_DEMAND | IB_ACCESS_REMOTE_READ
ODP_RW = ODP_RO | IB_ACCESS_LOCAL_WRITE | IB_ACCESS_REMOTE_WRITE
FLUSH = IB_UVERBS_ADVISE_MR_FLAG_FLUSH
WRITE = IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH_WRITE


@pytest.fixture
def machine() -> Machine:
    return Machine(MachineConfig(ram_bytes=128 << 20, thp="madvise", hugetlb_pages={HUGE: 8}))


def setup(machine: Machine, era: str = "mainline", **params: str):  # type: ignore[no-untyped-def]
    hca = machine.probe("odp", era=era, **params)
    proc = machine.spawn()
    pd = hca.alloc_ucontext(proc).alloc_pd()
    return hca, proc, pd, hca.create_qp(pd)


def teardown(machine: Machine, hca) -> None:  # type: ignore[no-untyped-def]
    hca.remove()
    for p in list(machine.processes):
        p.exit()
    check_no_leaks(machine)
    check_dma_contract(machine)


def mapped(mr, n: int, bit: int = 2) -> list[int]:  # type: ignore[no-untyped-def]
    return np.flatnonzero((mr.mtt[:n] & np.uint64(bit)) != 0).tolist()


# ----- capabilities --------------------------------------------------------------------------


def test_hugetlb_variant_does_not_claim_p2p():
    """Peer memory is mapped in 4 KiB pages (vm_insert_page), which a hugetlb MR
    refuses with EINVAL: only the 4 KiB mainline variant maps P2P."""
    d = Odp()
    assert d.capabilities_for() & Capability.P2P
    assert d.capabilities_for(implicit="1") & Capability.P2P
    assert not d.capabilities_for(hugetlb="1") & Capability.P2P
    assert d.capabilities_for(hugetlb="1") & Capability.HUGE_ONLY


# ----- ibv_advise_mr --------------------------------------------------------------------------


def test_prefetch_write_on_a_read_only_mr_is_eperm(machine):
    hca, proc, pd, _qp = setup(machine)
    a = proc.mmap(4 * PAGE, RW, ANON)
    mr = hca.reg_mr(pd, a, 4 * PAGE, ODP_RO)
    for flags in (FLUSH, 0):
        with pytest.raises(NotPermitted):
            hca.advise_mr(pd, WRITE, flags, [IbvSge(a, PAGE, mr.key)])
    assert not mr.mtt.any() and mr.num_deferred_work == 0
    teardown(machine, hca)


def test_prefetch_with_another_pds_key_is_eperm_and_a_pinned_key_enoent(machine):
    hca, proc, pd, _qp = setup(machine)
    a = proc.mmap(4 * PAGE, RW, ANON)
    proc.write(a, b"x")
    mr = hca.reg_mr(pd, a, 4 * PAGE, ODP_RW)
    other = hca.alloc_ucontext(proc).alloc_pd()
    with pytest.raises(NotPermitted):
        hca.advise_mr(other, IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH, FLUSH, [IbvSge(a, PAGE, mr.key)])
    pinned = hca.reg_mr(pd, a, PAGE, IB_ACCESS_LOCAL_WRITE)
    with pytest.raises(NoEntry):  # only ODP mkeys are in odp_mkeys
        hca.advise_mr(pd, IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH, FLUSH, [IbvSge(a, PAGE, pinned.key)])
    teardown(machine, hca)


def test_advise_with_unknown_flags_is_einval(machine):
    hca, proc, pd, _qp = setup(machine)
    a = proc.mmap(4 * PAGE, RW, ANON)
    mr = hca.reg_mr(pd, a, 4 * PAGE, ODP_RW)
    with pytest.raises(InvalidArgument):
        hca.advise_mr(pd, WRITE, 2, [IbvSge(a, PAGE, mr.key)])
    with pytest.raises(InvalidArgument):  # the flags attribute is parsed before the advice
        hca.advise_mr(pd, 7, 2, [IbvSge(a, PAGE, mr.key)])
    with pytest.raises(NotSupported):
        hca.advise_mr(pd, 7, FLUSH, [IbvSge(a, PAGE, mr.key)])
    teardown(machine, hca)


def test_synchronous_prefetch_maps_the_segments_before_a_bad_key(machine):
    """mlx5_ib_prefetch_sg_list looks each key up right before prefetching it, so a
    bad key in the second segment fails the call after the first was mapped."""
    hca, proc, pd, _qp = setup(machine)
    a = proc.mmap(8 * PAGE, RW, ANON)
    mr = hca.reg_mr(pd, a, 8 * PAGE, ODP_RW)
    with pytest.raises(NoEntry):
        hca.advise_mr(pd, WRITE, FLUSH, [IbvSge(a, PAGE, mr.key), IbvSge(a, PAGE, 0xDEAD)])
    assert mapped(mr, 8) == [0]


def test_queued_prefetch_with_a_bad_key_queues_nothing(machine):
    """init_prefetch_work takes every MR before queueing: all or nothing."""
    hca, proc, pd, _qp = setup(machine)
    a = proc.mmap(8 * PAGE, RW, ANON)
    mr = hca.reg_mr(pd, a, 8 * PAGE, ODP_RW)
    with pytest.raises(NoEntry):
        hca.advise_mr(pd, WRITE, 0, [IbvSge(a, PAGE, mr.key), IbvSge(a, PAGE, 0xDEAD)])
    assert not hca.workqueue and mr.num_deferred_work == 0
    hca.flush_workqueue()
    assert not mr.mtt.any()
    teardown(machine, hca)


def test_synchronous_prefetch_of_zero_aligned_bytes_is_einval(machine):
    """A zero-length segment at a page boundary is an empty hmm_range_fault
    (walk_page_range: -EINVAL); unaligned, it maps the page it points into."""
    hca, proc, pd, _qp = setup(machine)
    a = proc.mmap(8 * PAGE, RW, ANON)
    mr = hca.reg_mr(pd, a, 8 * PAGE, ODP_RW)
    with pytest.raises(InvalidArgument):
        hca.advise_mr(pd, WRITE, FLUSH, [IbvSge(a, 0, mr.key)])
    hca.advise_mr(pd, WRITE, FLUSH, [IbvSge(a + PAGE + 8, 0, mr.key)])
    assert mapped(mr, 8) == [1]
    teardown(machine, hca)


# ----- the responder's prefetch ---------------------------------------------------------------


def test_responder_write_prefetches_as_many_bytes_as_the_message_committed(machine):
    """RDMA WRITE packets carry no message length: the handler faults the packet,
    resumes, then prefetches min(MAX_PREFETCH_LEN, bytes_committed) from it. The
    first packet has committed nothing, so it prefetches nothing."""
    hca, proc, pd, qp = setup(machine)
    a = proc.mmap(16 * PAGE, RW, ANON)
    mr = hca.reg_mr(pd, a, 16 * PAGE, ODP_RW)
    qp.rdma_write(mr.key, a, bytes(range(256)) * 48)  # 3 packets of 4 KiB
    # Packet 0: page 0, no prefetch. Packet 1 (1 page committed): page 1 and a
    # one-page prefetch of it. Packet 2 (2 pages committed): pages 2 and 3.
    assert hca.stats.rdma_faults == 3
    assert mapped(mr, 16) == [0, 1, 2, 3]
    assert proc.read(a, 3 * PAGE) == bytes(range(256)) * 48
    teardown(machine, hca)


def test_responder_write_prefetch_is_capped_at_4mib(machine):
    hca, proc, pd, qp = setup(machine)
    a = proc.mmap(16 << 20, RW, ANON)
    mr = hca.reg_mr(pd, a, 16 << 20, ODP_RW)
    hca.advise_mr(pd, WRITE, FLUSH, [IbvSge(a, 6 << 20, mr.key)])
    faults = hca.stats.rdma_faults
    qp.rdma_write(mr.key, a, bytes((6 << 20) + PAGE))
    # The packet at 6 MiB faults with 6 MiB committed: 4 MiB are prefetched.
    assert hca.stats.rdma_faults == faults + 1
    assert mapped(mr, (16 << 20) // PAGE) == list(range((10 << 20) // PAGE))
    teardown(machine, hca)


def test_responder_read_fault_maps_the_rest_of_the_message(machine):
    hca, proc, pd, qp = setup(machine)
    a = proc.mmap(16 * PAGE, RW, ANON)
    proc.write(a, b"r" * 16 * PAGE)
    mr = hca.reg_mr(pd, a, 16 * PAGE, ODP_RO)
    proc.madvise(a, 16 * PAGE, MADV_DONTNEED)
    assert qp.rdma_read(mr.key, a + 2 * PAGE, 5 * PAGE) == bytes(5 * PAGE)
    assert hca.stats.rdma_faults == 1
    assert mapped(mr, 16, 1) == [2, 3, 4, 5, 6]
    teardown(machine, hca)


# ----- registration ---------------------------------------------------------------------------


def test_umem_end_aligned_past_the_address_space_is_eoverflow(machine):
    """ib_init_umem_odp: ALIGN(addr + size) wraps to 0 → -EOVERFLOW."""
    hca, _proc, pd, _qp = setup(machine)
    with pytest.raises(Overflow):
        hca.reg_mr(pd, (1 << 64) - PAGE, 1, ODP_RO)
    with pytest.raises(Overflow):
        hca.reg_mr(pd, (1 << 64) - 2 * HUGE, HUGE + 1, ODP_RO | IB_ACCESS_HUGETLB)
    teardown(machine, hca)


def test_pinned_mr_ignores_hugetlb_and_refuses_a_wrapping_span(machine):
    """ib_umem_get has no IB_ACCESS_HUGETLB check (only ib_umem_odp_get reads it),
    and refuses addr + size that wraps, or whose page alignment wraps, with -EINVAL."""
    hca, proc, pd, qp = setup(machine)
    a = proc.mmap(4 * PAGE, RW, ANON)
    proc.write(a, b"pinned")
    mr = hca.reg_mr(pd, a, 2 * PAGE, IB_ACCESS_LOCAL_WRITE | IB_ACCESS_HUGETLB)
    assert not mr.is_odp and len(mr.pinned) == 2
    assert qp.post_send([IbvSge(a, 6, mr.key)]) == b"pinned"
    hca.dereg_mr(mr)
    with pytest.raises(InvalidArgument):
        hca.reg_mr(pd, (1 << 64) - PAGE, 2 * PAGE, IB_ACCESS_LOCAL_WRITE)
    with pytest.raises(InvalidArgument):
        hca.reg_mr(pd, (1 << 64) - PAGE, PAGE - 1, IB_ACCESS_LOCAL_WRITE)
    teardown(machine, hca)


def test_access_flags_mlx5_does_not_offer_and_optional_bits(machine):
    """FLUSH_GLOBAL needs IB_DEVICE_FLUSH_GLOBAL, which mlx5 does not set (-EOPNOTSUPP);
    bits 20..29 are IB_ACCESS_OPTIONAL: a driver ignores the ones it does not know."""
    hca, proc, pd, _qp = setup(machine)
    a = proc.mmap(4 * PAGE, RW, ANON)
    with pytest.raises(NotSupported):
        hca.reg_mr(pd, a, PAGE, ODP_RO | IB_ACCESS_FLUSH_GLOBAL)
    mr = hca.reg_mr(pd, a, PAGE, ODP_RO | (1 << 25))
    assert mr.is_odp
    with pytest.raises(InvalidArgument):
        hca.reg_mr(pd, a, PAGE, ODP_RO | (1 << 30))
    teardown(machine, hca)


# ----- mainline npages accounting -------------------------------------------------------------


def test_mainline_populate_counts_every_valid_entry_it_writes(machine):
    """6.16+ populate_mtt does odp->npages++ for each VALID entry of the UMR run,
    mapped before or not, while the unmap takes one off per entry it unmaps: an
    entry written twice leaves npages above the pages really mapped, and an
    implicit child emptied by an invalidation is then not destroyed."""
    hca, proc, pd, qp = setup(machine, "mainline")
    imr = hca.reg_mr(pd, 0, IMPLICIT_LENGTH, ODP_RW)
    a = proc.mmap(4 * PAGE, RW, ANON)
    proc.write(a, b"x" * 4 * PAGE)
    assert qp.rdma_read(imr.key, a, PAGE) == b"x" * PAGE
    assert qp.rdma_read(imr.key, a + PAGE, PAGE) == b"x" * PAGE  # rewrites entry 0 too
    child = imr.children[a >> 30]
    assert child.umem.npages == 3
    proc.munmap(a, 4 * PAGE)
    hca.flush_workqueue()
    assert child.umem.npages == 1 and imr.children == {child.umem.start >> 30: child}
    assert hca.stats.implicit_children_destroyed == 0
    teardown(machine, hca)


def test_hmm_era_counts_each_mapping_once_and_destroys_the_empty_child(machine):
    hca, proc, pd, qp = setup(machine, "hmm")
    imr = hca.reg_mr(pd, 0, IMPLICIT_LENGTH, ODP_RW)
    a = proc.mmap(4 * PAGE, RW, ANON)
    proc.write(a, b"x" * 4 * PAGE)
    qp.rdma_read(imr.key, a, PAGE)
    qp.rdma_read(imr.key, a + PAGE, PAGE)
    child = imr.children[a >> 30]
    assert child.umem.npages == 2
    proc.munmap(a, 4 * PAGE)
    hca.flush_workqueue()
    assert imr.children == {} and hca.stats.implicit_children_destroyed == 1
    teardown(machine, hca)


# ----- the 2019 GUP path ----------------------------------------------------------------------


def test_gup_era_hugetlb_registration_uses_find_vma_semantics(machine):
    """find_vma returns the first VMA ending above the address, which may start above
    it: a hugetlb MR starting in a hole below a hugetlb VMA registers."""
    hca, proc, pd, qp = setup(machine, "gup")
    a = proc.mmap(2 * HUGE, RW, ANON | MAP_HUGETLB)
    proc.munmap(a, HUGE)
    mr = hca.reg_mr(pd, a, 2 * HUGE, ODP_RW | IB_ACCESS_HUGETLB)
    assert mr.umem.page_shift == 21
    qp.rdma_write(mr.key, a + HUGE, b"huge")
    assert proc.read(a + HUGE, 4) == b"huge"
    teardown(machine, hca)


def test_gup_era_non_blockable_invalidation_with_the_umem_tree_locked_is_eagain(machine):
    """v5.3 ib_umem_notifier_invalidate_range_start: a non-blockable range fails
    down_read_trylock(umem_rwsem) while a writer holds it: -EAGAIN."""
    hca, proc, pd, _qp = setup(machine, "gup")
    a = proc.mmap(4 * PAGE, RW, ANON)
    b = proc.mmap(4 * PAGE, RW, ANON)
    hca.reg_mr(pd, a, 4 * PAGE, ODP_RW)
    pm = hca.per_mm(proc.mm)
    rng = NotifierRange(proc.mm, b, b + PAGE, MmuNotifyEvent.UNMAP, blockable=False)
    assert pm.invalidate_range_start(rng) == 0  # no umem overlaps
    with pm.umem_rwsem.write():
        assert pm.invalidate_range_start(rng) == -11
    teardown(machine, hca)


def test_gup_era_different_page_already_stored_deadlocks_on_umem_mutex(machine):
    """ib_umem_odp_map_dma_single_page's "got different pages" branch means to
    invalidate the umem page and return -EAGAIN, but ib_umem_notifier_start_account
    takes umem_mutex, which ib_umem_odp_map_dma_pages holds around the call: v5.3
    deadlocks there, after dropping the page reference (v5.5: WARN and -EAGAIN)."""
    hca, proc, pd, qp = setup(machine, "gup")
    a = proc.mmap(4 * PAGE, RW, ANON)
    proc.write(a, b"a" * PAGE)
    mr = hca.reg_mr(pd, a, 4 * PAGE, ODP_RW)
    qp.rdma_read(mr.key, a, PAGE)
    umem = mr.umem
    real = int(umem.page_list[0])
    other = proc.pagemap(proc.mmap(PAGE, RW, ANON | MAP_POPULATE), 1)[0].pfn
    umem.page_list[0] = other  # as if the CPU page changed without a notifier
    refs = dict(machine.phys.extra_refs)
    with pytest.raises(Deadlock, match="umem_mutex"):
        mr.pagefault(a, PAGE, 0)
    assert machine.phys.extra_refs == refs
    assert not umem.umem_mutex.holder
    umem.page_list[0] = real
    assert mr.pagefault(a, PAGE, 0) == PAGE
    assert int(mr.mtt[0]) & 3 == 3
    teardown(machine, hca)


def test_gup_era_non_contiguous_sub_page_is_efault_and_leaks_its_reference(machine, monkeypatch):
    """v5.3 GUPs a 2 MiB umem page 4 KiB at a time (the chunk is counted in umem
    pages but GUP takes 4 KiB ones), dropping mmap_sem in between. A huge page
    replaced meanwhile (here by a COW break) fails the contiguity check with
    -EFAULT, and the sub-page that failed it is never put (the error path releases
    only the pages after it): its reference leaks until the fix of v5.10 removed the
    code."""
    hca, proc, pd, _qp = setup(machine, "gup")
    a = proc.mmap(HUGE, RW, ANON | MAP_HUGETLB)
    proc.write(a, b"h")
    mr = hca.reg_mr(pd, a, HUGE, ODP_RO | IB_ACCESS_HUGETLB)
    child = proc.fork()  # the huge page is now shared, COW
    real_gup = umem_mod.get_user_pages
    calls = []

    def gup(mm, start, n, flags):  # type: ignore[no-untyped-def]
        calls.append(start)
        if len(calls) == 2:  # the head is mapped; mmap_lock was dropped
            proc.write(a, b"w")  # COW break: the parent gets a new huge page
        return real_gup(mm, start, n, flags)

    monkeypatch.setattr(umem_mod, "get_user_pages", gup)
    with pytest.raises(BadAddress):  # 8 KiB: two GUP calls of one 4 KiB page each
        mr.pagefault(a, 2 * PAGE, 0)
    assert calls == [a, a + PAGE]
    new_head = proc.pagemap(a, 1)[0].pfn
    assert machine.phys.extra_refs == {new_head: 1}
    monkeypatch.undo()
    machine.phys.put_page(new_head + 1)  # let the teardown's leak check pass
    child.exit()
    teardown(machine, hca)


# ----- mainline: stale pfn_list entries in a widened UMR run -----------------------------------


@pytest.mark.parametrize("era", ["mainline", "hmm"])
def test_stale_entries_of_a_failed_fault_in_a_widened_umr_run(machine, era):
    """A fault that fails part-way (-EPERM at a read-only VMA) leaves the pfn_list
    entries hmm_range_fault already filled VALID|WRITE; with nothing DMA-mapped,
    npages is 0 and mlx5_ib_invalidate_range returns before clearing them (fork's
    write-protection here). 6.16+ populate_mtt then writes every VALID entry of
    the 8-entry-aligned UMR run of a later fault, so the neighbours of the faulted
    page get writable translations to pages the CPU now shares read-only with the
    child: an RDMA WRITE lands in the child's memory. Modelled as read. The hmm
    era writes the MTTs from its dma_list, which holds only what was mapped."""
    hca, proc, pd, qp = setup(machine, era)
    a = proc.mmap(16 * PAGE, RW, ANON)
    mr = hca.reg_mr(pd, a, 16 * PAGE, ODP_RW)
    proc.mprotect(a + 8 * PAGE, 8 * PAGE, PROT_READ)
    with pytest.raises(NotPermitted):
        hca.advise_mr(pd, WRITE, FLUSH, [IbvSge(a, 16 * PAGE, mr.key)])
    assert not mr.mtt.any() and mr.umem.npages == 0
    child = proc.fork()
    assert qp.rdma_read(mr.key, a, 1) == b"\0"  # a write fault: page 0 leaves the COW
    if era == "mainline":
        assert mapped(mr, 16) == list(range(8))
        qp.rdma_write(mr.key, a + PAGE, b"from the HCA")
        assert child.read(a + PAGE, 12) == b"from the HCA"
    else:
        assert mapped(mr, 16) == [0]
        qp.rdma_write(mr.key, a + PAGE, b"from the HCA")
        assert child.read(a + PAGE, 12) == bytes(12)
        assert proc.read(a + PAGE, 12) == b"from the HCA"
    child.exit()
    teardown(machine, hca)


# ----- bad verbs input ------------------------------------------------------------------------


def test_reg_mr_fields_outside_their_c_types_are_einval(machine):
    hca, proc, pd, _qp = setup(machine)
    a = proc.mmap(4 * PAGE, RW, ANON)
    for addr, length, access in ((1 << 64, PAGE, ODP_RO), (a, 1 << 64, ODP_RO), (a, PAGE, 1 << 32)):
        with pytest.raises(InvalidArgument):
            hca.reg_mr(pd, addr, length, access)
    assert not hca.mkeys and not pd.mrs
    teardown(machine, hca)


@pytest.mark.parametrize(
    "call",
    [
        lambda hca, pd, qp, mr, a: hca.advise_mr(pd, "0", FLUSH, [IbvSge(a, PAGE, mr.key)]),
        lambda hca, pd, qp, mr, a: hca.advise_mr(pd, 0, -1, [IbvSge(a, PAGE, mr.key)]),
        lambda hca, pd, qp, mr, a: hca.advise_mr(pd, 0, True, [IbvSge(a, PAGE, mr.key)]),
        lambda hca, pd, qp, mr, a: hca.advise_mr(pd, 0, FLUSH, [(a, PAGE, mr.key)]),
        lambda hca, pd, qp, mr, a: hca.advise_mr(pd, 0, FLUSH, [IbvSge(a, -1, mr.key)]),
        lambda hca, pd, qp, mr, a: hca.advise_mr(pd, 0, FLUSH, [IbvSge(a, 1 << 32, mr.key)]),
        lambda hca, pd, qp, mr, a: qp.rdma_read(mr.key, a, -1),
        lambda hca, pd, qp, mr, a: qp.rdma_read(mr.key, -a, PAGE),
        lambda hca, pd, qp, mr, a: qp.rdma_read(str(mr.key), a, PAGE),
        lambda hca, pd, qp, mr, a: qp.rdma_write(mr.key, a, "text"),
        lambda hca, pd, qp, mr, a: qp.post_send([IbvSge(a, PAGE, None)]),
        lambda hca, pd, qp, mr, a: qp.post_send("sge"),
        lambda hca, pd, qp, mr, a: qp.post_recv([IbvSge(a, -PAGE, mr.key)], b"x"),
        lambda hca, pd, qp, mr, a: qp.post_recv([IbvSge(a, PAGE, mr.key)], 5),
    ],
)
def test_bad_verbs_input_is_einval_and_changes_nothing(machine, call):
    hca, proc, pd, qp = setup(machine)
    a = proc.mmap(4 * PAGE, RW, ANON)
    mr = hca.reg_mr(pd, a, 4 * PAGE, ODP_RW)
    with pytest.raises(InvalidArgument):
        call(hca, pd, qp, mr, a)
    assert not mr.mtt.any() and not hca.workqueue and hca.stats.page_faults == 0
    assert qp.completions == [] and proc.pagemap(a, 1)[0].kind == "none"
    teardown(machine, hca)


def test_gup_era_has_no_prefetch_no_fault(machine):
    """IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH_NO_FAULT came with the snapshot mode in
    v5.10; v5.3 mlx5_ib_advise_mr knows PREFETCH and PREFETCH_WRITE only."""
    hca, proc, pd, _qp = setup(machine, "gup")
    a = proc.mmap(4 * PAGE, RW, ANON)
    mr = hca.reg_mr(pd, a, 4 * PAGE, ODP_RW)
    with pytest.raises(NotSupported):
        hca.advise_mr(
            pd, IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH_NO_FAULT, FLUSH, [IbvSge(a, PAGE, mr.key)]
        )
    assert not mr.mtt.any() and proc.pagemap(a, 1)[0].kind == "none"
    teardown(machine, hca)


def test_dereg_of_an_mr_that_is_gone_is_enoent(machine):
    """ibv_dereg_mr of a handle already destroyed: the uobject lookup fails, -ENOENT;
    nothing else changes."""
    hca, proc, pd, qp = setup(machine)
    a = proc.mmap(4 * PAGE, RW, ANON)
    proc.write(a, b"keep")
    mr = hca.reg_mr(pd, a, 4 * PAGE, ODP_RW)
    other = hca.reg_mr(pd, a, 4 * PAGE, ODP_RW)
    hca.dereg_mr(mr)
    with pytest.raises(NoEntry):
        hca.dereg_mr(mr)
    assert pd.mrs == [other] and qp.rdma_read(other.key, a, 4) == b"keep"
    teardown(machine, hca)
