"""The odp driver: verbs, hugetlb-or-fail per era, prefetch, ZAP runs, implicit MRs, EBUSY,
and the pinned MR beside the ODP one."""

from __future__ import annotations

import numpy as np
import pytest
from hmmsim import (
    MADV_DONTNEED,
    MADV_HUGEPAGE,
    MAP_ANONYMOUS,
    MAP_HUGETLB,
    MAP_PRIVATE,
    PROT_READ,
    PROT_WRITE,
    Machine,
    MachineConfig,
)
from hmmsim.dma import machine_violations
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
    WcStatus,
    WorkRequestFailed,
)
from hmmsim.drivers.odp import umem as umem_mod
from hmmsim.errors import (
    BadAddress,
    Busy,
    InvalidArgument,
    NotPermitted,
    NotSupported,
    Overflow,
)
from hmmsim.hmm import HMM_PFN_DMA_MAPPED
from hmmsim.testing.invariants import check_dma_contract, check_mirror, check_no_leaks

PAGE = 4096
HUGE = 2 << 20
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS
ODP_RO = IB_ACCESS_ON_DEMAND | IB_ACCESS_REMOTE_READ
ODP_RW = ODP_RO | IB_ACCESS_LOCAL_WRITE | IB_ACCESS_REMOTE_WRITE
ERAS = ("mainline", "hmm", "gup")
MTT_R, MTT_W = 1, 2


@pytest.fixture
def machine() -> Machine:
    return Machine(MachineConfig(ram_bytes=128 << 20, thp="madvise", hugetlb_pages={HUGE: 8}))


def setup(machine: Machine, era: str = "mainline", **params: str):  # type: ignore[no-untyped-def]
    hca = machine.probe("odp", era=era, **params)
    proc = machine.spawn()
    pd = hca.alloc_ucontext(proc).alloc_pd()
    return hca, proc, pd, hca.create_qp(pd)


def data(n: int, seed: int = 1) -> bytes:
    return (np.arange(n, dtype=np.uint32) * 2654435761 + seed).astype(np.uint32).tobytes()[:n]


def hugetlb(proc, n: int = 1) -> int:  # type: ignore[no-untyped-def]
    return proc.mmap(n * HUGE, RW, ANON | MAP_HUGETLB)


def thp(proc) -> int:  # type: ignore[no-untyped-def]
    a = (proc.mmap(2 * HUGE, RW, ANON) + HUGE - 1) & ~(HUGE - 1)
    proc.madvise(a, HUGE, MADV_HUGEPAGE)
    proc.write(a, b"t")
    assert proc.pagemap(a, 1)[0].order == 9
    return a


def teardown(machine: Machine, hca) -> None:  # type: ignore[no-untyped-def]
    hca.remove()
    for p in list(machine.processes):
        p.exit()
    check_no_leaks(machine)
    check_dma_contract(machine)


# ----- probe ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [{"era": "5.3"}, {"hugetlb": "yes"}, {"implicit": "2"}, {"hugetlb": "1", "implicit": "1"}],
)
def test_probe_refuses_bad_parameters(machine, params):
    with pytest.raises(InvalidArgument):
        machine.probe("odp", **params)


def test_capabilities_per_variant():
    d = Odp()
    assert d.capabilities_for() & Capability.P2P
    assert not d.capabilities_for() & Capability.HUGE_ONLY
    huge = d.capabilities_for(hugetlb="1", era="hmm")
    assert huge & Capability.HUGE_ONLY and huge & Capability.HUGE_MAPPINGS
    assert not huge & Capability.P2P
    assert Odp.variants == [{}, {"hugetlb": "1", "era": "hmm"}, {"implicit": "1"}]


# ----- registration ---------------------------------------------------------------------------


def test_registration_errors(machine):
    hca, proc, pd, _qp = setup(machine)
    a = proc.mmap(4 * PAGE, RW, ANON)
    with pytest.raises(Overflow):
        hca.reg_mr(pd, (1 << 64) - PAGE, 2 * PAGE, ODP_RO)
    with pytest.raises(InvalidArgument):
        hca.reg_mr(pd, a, 0, ODP_RO)
    with pytest.raises(InvalidArgument):  # remote write without local write
        hca.reg_mr(pd, a, PAGE, IB_ACCESS_ON_DEMAND | IB_ACCESS_REMOTE_WRITE)
    with pytest.raises(InvalidArgument):  # implicit hugetlb
        hca.reg_mr(pd, 0, IMPLICIT_LENGTH, ODP_RO | IB_ACCESS_HUGETLB)
    with pytest.raises(InvalidArgument):
        hca.reg_mr(pd, a, PAGE, 1 << 30)
    teardown(machine, hca)


def test_mainline_registration_is_eopnotsupp_on_a_device_needing_dma_sync(machine):
    hca, proc, pd, _qp = setup(machine)
    hca.dma.coherent = False
    a = proc.mmap(4 * PAGE, RW, ANON)
    with pytest.raises(NotSupported):
        hca.reg_mr(pd, a, 4 * PAGE, ODP_RO)
    hca.dma.coherent = True
    teardown(machine, hca)


def test_registration_snapshot_maps_present_pages_and_faults_nothing(machine):
    hca, proc, pd, qp = setup(machine)
    a = proc.mmap(8 * PAGE, RW, ANON)
    proc.write(a, data(2 * PAGE))
    mr = hca.reg_mr(pd, a, 8 * PAGE, ODP_RW)
    assert [int(w) & 3 for w in mr.mtt[:8]] == [3, 3, 0, 0, 0, 0, 0, 0]
    assert proc.pagemap(a + 2 * PAGE, 1)[0].kind == "none"
    assert hca.stats.page_faults == 0
    assert qp.rdma_read(mr.key, a, 2 * PAGE) == data(2 * PAGE)
    assert hca.stats.page_faults == 0
    teardown(machine, hca)


# ----- device accesses ------------------------------------------------------------------------


@pytest.mark.parametrize("era", ERAS)
def test_rdma_read_and_write_fault_through_the_event_queue(machine, era):
    hca, proc, pd, qp = setup(machine, era)
    a = proc.mmap(16 * PAGE, RW, ANON)
    proc.write(a, data(16 * PAGE))
    proc.madvise(a, 16 * PAGE, MADV_DONTNEED)
    proc.write(a, data(16 * PAGE, 3))
    mr = hca.reg_mr(pd, a, 16 * PAGE, ODP_RW)
    proc.madvise(a, 16 * PAGE, MADV_DONTNEED)
    qp.rdma_write(mr.key, a + PAGE, data(PAGE, 9))
    assert proc.read(a + PAGE, PAGE) == data(PAGE, 9)
    assert hca.stats.rdma_faults >= 1
    assert qp.rdma_read(mr.key, a, 2 * PAGE) == bytes(PAGE) + data(PAGE, 9)
    teardown(machine, hca)


def test_responder_read_fault_maps_the_message_only(machine):
    hca, proc, pd, qp = setup(machine)
    a = proc.mmap(64 * PAGE, RW, ANON)
    mr = hca.reg_mr(pd, a, 64 * PAGE, ODP_RO)
    proc.write(a, data(64 * PAGE))
    proc.madvise(a, 64 * PAGE, MADV_DONTNEED)  # the snapshot mapped nothing now
    assert qp.rdma_read(mr.key, a + 8 * PAGE, 3 * PAGE) == bytes(3 * PAGE)
    valid = (mr.mtt[:64] & np.uint64(MTT_R)) != 0
    # Only the message's pages were faulted (the UMR wrote the 8-aligned run around them).
    assert np.flatnonzero(valid).tolist() == [8, 9, 10]
    teardown(machine, hca)


def test_wqe_data_segments_gather_and_scatter(machine):
    hca, proc, pd, qp = setup(machine)
    a = proc.mmap(8 * PAGE, RW, ANON)
    proc.write(a, data(2 * PAGE))
    mr = hca.reg_mr(pd, a, 8 * PAGE, ODP_RW)
    got = qp.post_send([IbvSge(a, 100, mr.key), IbvSge(a + PAGE, 50, mr.key)])
    assert got == data(2 * PAGE)[:100] + data(2 * PAGE)[PAGE : PAGE + 50]
    qp.post_recv([IbvSge(a + 4 * PAGE, 2 * PAGE, mr.key)], data(PAGE + 10, 4))
    assert proc.read(a + 4 * PAGE, PAGE + 10) == data(PAGE + 10, 4)
    assert hca.stats.wqe_faults == 1
    assert qp.completions[-1].status == WcStatus.SUCCESS
    teardown(machine, hca)


def test_failed_fault_completes_the_work_request_with_an_error(machine):
    hca, proc, pd, qp = setup(machine)
    a = proc.mmap(4 * PAGE, RW, ANON)
    mr = hca.reg_mr(pd, a, 8 * PAGE, ODP_RO)  # the MR is larger than the VMA
    with pytest.raises(WorkRequestFailed) as info:
        qp.rdma_read(mr.key, a + 4 * PAGE, PAGE)
    assert isinstance(info.value.cause, BadAddress)
    assert qp.completions[-1].status == WcStatus.REM_ACCESS_ERR
    with pytest.raises(WorkRequestFailed):  # outside the MR: no fault at all
        qp.rdma_read(mr.key, a + 8 * PAGE, PAGE)
    with pytest.raises(WorkRequestFailed):  # a read-only MR refuses RDMA WRITE
        qp.rdma_write(mr.key, a, b"x")
    teardown(machine, hca)


# ----- hugetlb or fail ------------------------------------------------------------------------


@pytest.mark.parametrize("era", ERAS)
def test_hugetlb_mr_over_hugetlb_memory_maps_huge_entries(machine, era):
    hca, proc, pd, qp = setup(machine, era)
    a = hugetlb(proc)
    proc.write(a, data(PAGE))
    mr = hca.reg_mr(pd, a, HUGE, ODP_RW | IB_ACCESS_HUGETLB)
    assert mr.umem.page_shift == 21
    qp.rdma_write(mr.key, a + 100 * PAGE, data(PAGE, 5))
    assert proc.read(a + 100 * PAGE, PAGE) == data(PAGE, 5)
    assert qp.rdma_read(mr.key, a, PAGE) == data(PAGE)
    assert len(mr.mtt) == 8 and int(mr.mtt[0]) & 3 == 3 and not mr.mtt[1:].any()
    m = hca.open(proc)
    m.mrs[(a >> 21, True)] = mr
    ptes = m.device_ptes(a, 512)
    assert all(p is not None and p.order == 9 for p in ptes)
    check_mirror(m, a, 512)
    teardown(machine, hca)


@pytest.mark.parametrize("era", ERAS)
def test_hugetlb_mr_over_4k_pages_fails_with_einval(machine, era):
    hca, proc, pd, qp = setup(machine, era)
    a = (proc.mmap(2 * HUGE, RW, ANON) + HUGE - 1) & ~(HUGE - 1)
    if era == "gup":
        # v5.3: the VMA must be hugetlb, checked at registration.
        with pytest.raises(InvalidArgument):
            hca.reg_mr(pd, a, HUGE, ODP_RW | IB_ACCESS_HUGETLB)
    else:
        # No VMA check since 2020: the fault's map-order check refuses it.
        mr = hca.reg_mr(pd, a, HUGE, ODP_RW | IB_ACCESS_HUGETLB)
        with pytest.raises(WorkRequestFailed) as info:
            qp.rdma_write(mr.key, a, b"x")
        assert isinstance(info.value.cause, InvalidArgument)
        assert proc.pagemap(a, 1)[0].order == 0  # the fault populated 4 KiB pages
        # And once the memory is populated with 4 KiB pages, the registration
        # snapshot itself sees the small mapping.
        with pytest.raises(InvalidArgument):
            hca.reg_mr(pd, a, HUGE, ODP_RW | IB_ACCESS_HUGETLB)
    teardown(machine, hca)


@pytest.mark.parametrize("era", ERAS)
def test_hugetlb_mirror_refuses_4k_memory_from_read_and_write(machine, era):
    hca = machine.probe("odp", era=era, hugetlb="1")
    proc = machine.spawn()
    m = hca.open(proc)
    # 4 KiB pages over a whole 2 MiB umem page (a hole would be -EFAULT first).
    a = (proc.mmap(2 * HUGE, RW, ANON) + HUGE - 1) & ~(HUGE - 1)
    proc.write(a, data(4 * PAGE))
    with pytest.raises(InvalidArgument):
        m.read(a, PAGE)
    with pytest.raises(InvalidArgument):
        m.write(a, b"x")
    assert proc.read(a, 4 * PAGE) == data(4 * PAGE)
    m.close()
    teardown(machine, hca)


def test_hugetlb_mr_over_thp_fails_in_the_gup_era(machine):
    hca, proc, pd, _qp = setup(machine, "gup")
    a = thp(proc)
    with pytest.raises(InvalidArgument):
        hca.reg_mr(pd, a, HUGE, ODP_RW | IB_ACCESS_HUGETLB)
    teardown(machine, hca)


@pytest.mark.parametrize("era", ["hmm", "mainline"])
def test_hugetlb_mr_over_thp_works_in_the_hmm_eras(machine, era):
    hca, proc, pd, qp = setup(machine, era)
    a = thp(proc)
    mr = hca.reg_mr(pd, a, HUGE, ODP_RW | IB_ACCESS_HUGETLB)
    qp.rdma_write(mr.key, a + 7 * PAGE, data(PAGE, 2))
    assert proc.read(a + 7 * PAGE, PAGE) == data(PAGE, 2)
    assert int(mr.mtt[0]) & 3 == 3
    m = hca.open(proc)
    m.mrs[(a >> 21, True)] = mr
    assert m.device_ptes(a, 1)[0].order == 9
    check_mirror(m, a, 512)
    ro = hca.reg_mr(pd, a, HUGE, ODP_RO | IB_ACCESS_HUGETLB)
    proc.mprotect(a + HUGE - PAGE, PAGE, PROT_READ)  # split the PMD: the entries are zapped
    assert not mr.mtt.any() and not ro.mtt.any()
    with pytest.raises(WorkRequestFailed) as info:  # and now the CPU maps 4 KiB
        qp.rdma_read(ro.key, a, PAGE)
    assert isinstance(info.value.cause, InvalidArgument)
    teardown(machine, hca)


def test_mainline_hugetlb_indexing_maps_the_wrong_page_for_a_second_huge_page(machine):
    """6.16+ reads pfn_list[idx] with idx in umem pages: umem page 1 of a hugetlb MR
    takes its pfn from the second 4 KiB entry of huge page 0 (modelled as read)."""
    hca, proc, pd, _qp = setup(machine, "mainline")
    a = hugetlb(proc, 2)
    proc.write(a, data(PAGE))
    proc.write(a + HUGE, data(PAGE, 6))
    mr = hca.reg_mr(pd, a, 2 * HUGE, ODP_RO | IB_ACCESS_HUGETLB)
    m = hca.open(proc)
    m.mrs[(a >> 21, False)] = mr
    second = m.device_ptes(a + HUGE, 1)[0]
    cpu = proc.pagemap(a + HUGE, 1)[0]
    assert second is not None and second.pfn != cpu.pfn
    assert second.pfn == proc.pagemap(a, 2)[1].pfn  # huge page 0's second sub-page
    with pytest.raises(AssertionError):
        check_mirror(m, a + HUGE, 1)
    assert mr.umem.pfn_list[512] & np.uint64(HMM_PFN_DMA_MAPPED) == 0
    hca.dereg_mr(mr)
    m.close()


def test_hmm_era_hugetlb_mr_of_two_huge_pages_is_consistent(machine):
    hca, proc, pd, qp = setup(machine, "hmm")
    a = hugetlb(proc, 2)
    proc.write(a + HUGE, data(PAGE, 6))
    mr = hca.reg_mr(pd, a, 2 * HUGE, ODP_RO | IB_ACCESS_HUGETLB)
    assert qp.rdma_read(mr.key, a + HUGE, PAGE) == data(PAGE, 6)
    teardown(machine, hca)


# ----- prefetch -------------------------------------------------------------------------------


def test_prefetch_maps_read_only_even_on_a_writable_mr(machine):
    hca, proc, pd, _qp = setup(machine)
    a = proc.mmap(8 * PAGE, RW, ANON)
    mr = hca.reg_mr(pd, a, 8 * PAGE, ODP_RW)
    hca.advise_mr(
        pd, IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH, IB_UVERBS_ADVISE_MR_FLAG_FLUSH,
        [IbvSge(a, 4 * PAGE, mr.key)],
    )  # fmt: skip
    assert [int(w) & 3 for w in mr.mtt[:8]] == [MTT_R] * 4 + [0] * 4
    hca.advise_mr(
        pd, IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH_WRITE, IB_UVERBS_ADVISE_MR_FLAG_FLUSH,
        [IbvSge(a, 2 * PAGE, mr.key)],
    )  # fmt: skip
    assert [int(w) & 3 for w in mr.mtt[:4]] == [3, 3, MTT_R, MTT_R]
    teardown(machine, hca)


def test_prefetch_write_needs_a_writable_mr(machine):
    hca, proc, pd, _qp = setup(machine)
    a = proc.mmap(8 * PAGE, RW, ANON)
    mr = hca.reg_mr(pd, a, 8 * PAGE, ODP_RO)
    with pytest.raises(NotPermitted):  # get_prefetchable_mr: -EPERM
        hca.advise_mr(
            pd, IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH_WRITE, IB_UVERBS_ADVISE_MR_FLAG_FLUSH,
            [IbvSge(a, PAGE, mr.key)],
        )  # fmt: skip
    with pytest.raises(NotSupported):
        hca.advise_mr(pd, 3, IB_UVERBS_ADVISE_MR_FLAG_FLUSH, [IbvSge(a, PAGE, mr.key)])
    with pytest.raises(NotPermitted):  # another PD's key
        other = hca.alloc_ucontext(proc).alloc_pd()
        hca.advise_mr(other, IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH, 0, [IbvSge(a, PAGE, mr.key)])
    teardown(machine, hca)


def test_prefetch_no_fault_is_a_snapshot(machine):
    hca, proc, pd, _qp = setup(machine)
    a = proc.mmap(8 * PAGE, RW, ANON)
    mr = hca.reg_mr(pd, a, 8 * PAGE, ODP_RW)
    proc.write(a + 2 * PAGE, b"p")
    hca.advise_mr(
        pd, IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH_NO_FAULT, IB_UVERBS_ADVISE_MR_FLAG_FLUSH,
        [IbvSge(a, 8 * PAGE, mr.key)],
    )  # fmt: skip
    assert [int(w) & 3 for w in mr.mtt[:8]] == [0, 0, 3, 0, 0, 0, 0, 0]
    assert [e.kind for e in proc.pagemap(a, 8)].count("none") == 7
    teardown(machine, hca)


def test_prefetch_without_flush_is_queued_work(machine):
    hca, proc, pd, _qp = setup(machine)
    a = proc.mmap(8 * PAGE, RW, ANON)
    mr = hca.reg_mr(pd, a, 8 * PAGE, ODP_RW)
    hca.advise_mr(pd, IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH_WRITE, 0, [IbvSge(a, PAGE, mr.key)])
    assert not mr.mtt.any() and mr.num_deferred_work == 1
    hca.flush_workqueue()
    assert int(mr.mtt[0]) & 3 == 3 and mr.num_deferred_work == 0
    teardown(machine, hca)


def test_prefetch_of_unmapped_memory_fails_synchronously_only(machine):
    hca, proc, pd, _qp = setup(machine)
    a = proc.mmap(4 * PAGE, RW, ANON)
    mr = hca.reg_mr(pd, a, 8 * PAGE, ODP_RW)
    sge = [IbvSge(a + 4 * PAGE, PAGE, mr.key)]
    with pytest.raises(BadAddress):
        hca.advise_mr(pd, IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH, IB_UVERBS_ADVISE_MR_FLAG_FLUSH, sge)
    hca.advise_mr(pd, IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH, 0, sge)
    hca.flush_workqueue()  # the error goes nowhere
    teardown(machine, hca)


# ----- invalidation ---------------------------------------------------------------------------


def _mapped_mr(machine, era, npages, holes=()):  # type: ignore[no-untyped-def]
    hca, proc, pd, _qp = setup(machine, era)
    a = proc.mmap(npages * PAGE, RW, ANON)
    for i in range(npages):
        if i not in holes:
            proc.write(a + i * PAGE, b"d")
    mr = hca.reg_mr(pd, a, npages * PAGE, ODP_RW)
    if era == "gup":  # no registration snapshot before v5.10: prefetch what is there
        sges = [IbvSge(a + i * PAGE, PAGE, mr.key) for i in range(npages) if i not in holes]
        hca.advise_mr(pd, IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH_WRITE, 1, sges)
    assert [bool(w) for w in mr.mtt[:npages]] == [i not in holes for i in range(npages)]
    return hca, proc, mr, a


@pytest.mark.parametrize("era", ERAS)
def test_zap_run_widens_to_8_entry_alignment(machine, era):
    hca, proc, mr, a = _mapped_mr(machine, era, 16)
    umrs = hca.stats.umrs
    proc.madvise(a + 3 * PAGE, 3 * PAGE, MADV_DONTNEED)
    assert hca.stats.umrs - umrs == 1
    # One ZAP UMR of [3, 6) is written as the 8-entry unit [0, 8).
    assert [bool(w) for w in mr.mtt[:16]] == [False] * 8 + [True] * 8
    assert hca.stats.page_invalidations == 3
    teardown(machine, hca)


@pytest.mark.parametrize("era", ERAS)
def test_zap_run_closes_only_at_an_8_aligned_invalid_entry(machine, era):
    hca, proc, mr, a = _mapped_mr(machine, era, 16, holes=(7, 8))
    umrs = hca.stats.umrs
    proc.madvise(a, 16 * PAGE, MADV_DONTNEED)
    # Runs [0, 8) (closed at the invalid entry 8, counted) and [9, 16).
    assert hca.stats.umrs - umrs == 2
    assert hca.stats.page_invalidations == (8 - 0 + 1) + (15 - 9 + 1)
    assert not mr.mtt.any()
    teardown(machine, hca)


def test_zap_run_goes_on_over_unaligned_invalid_entries(machine):
    hca, proc, _mr, a = _mapped_mr(machine, "mainline", 16, holes=(3, 4, 5, 6, 7))
    umrs = hca.stats.umrs
    proc.madvise(a, 9 * PAGE, MADV_DONTNEED)
    # Entry 8 is valid, so nothing closes the run [0, 9): one UMR.
    assert hca.stats.umrs - umrs == 1
    assert hca.stats.page_invalidations == 9
    teardown(machine, hca)


def test_invalidation_of_a_non_blockable_range_is_refused(machine):
    from hmmsim.notifier import NotifierRange

    hca, proc, mr, a = _mapped_mr(machine, "mainline", 4)
    rng = NotifierRange(proc.mm, a, a + PAGE, 1, blockable=False)  # type: ignore[arg-type]
    assert mr.invalidate(mr.umem.notifier, rng, 3) is False
    assert int(mr.mtt[0])
    teardown(machine, hca)


def test_invalidation_unmaps_and_dirties_writable_pages(machine):
    hca, proc, pd, qp = setup(machine, "hmm")
    f = machine.create_file(4 * PAGE)
    a = proc.mmap(4 * PAGE, RW, 0x01, file=f)  # MAP_SHARED
    mr = hca.reg_mr(pd, a, 4 * PAGE, ODP_RW)
    qp.rdma_write(mr.key, a, b"dirty")
    live = hca.dma.nr_live
    proc.munmap(a, 4 * PAGE)
    assert hca.dma.nr_live < live
    assert f.pread(0, 5) == b"dirty"
    teardown(machine, hca)


# ----- implicit ODP ---------------------------------------------------------------------------


@pytest.mark.parametrize("era", ["mainline", "hmm"])
def test_implicit_children_are_created_and_destroyed_when_empty(machine, era):
    hca, proc, pd, qp = setup(machine, era)
    imr = hca.reg_mr(pd, 0, IMPLICIT_LENGTH, ODP_RW)
    a = proc.mmap(4 * PAGE, RW, ANON)
    proc.write(a, data(4 * PAGE))
    assert qp.rdma_read(imr.key, a, 4 * PAGE) == data(4 * PAGE)
    idx = a >> 30
    assert list(imr.children) == [idx] and imr.ksm[idx] is imr.children[idx]
    assert hca.stats.implicit_children_created == 1
    child = imr.children[idx]
    assert child.umem.start == idx << 30 and child.umem.end == (idx + 1) << 30
    proc.munmap(a, 4 * PAGE)
    # Out of the xarray at once; the KSM entry and the child go in a work item.
    assert imr.children == {} and imr.ksm[idx] is child
    assert hca.stats.implicit_children_destroyed == 0
    hca.flush_workqueue()
    assert imr.ksm == {} and child.destroyed
    assert hca.stats.implicit_children_destroyed == 1
    b = proc.mmap(PAGE, RW, ANON)
    assert qp.rdma_read(imr.key, b, PAGE) == bytes(PAGE)  # a new child
    assert hca.stats.implicit_children_created == 2
    teardown(machine, hca)


def test_implicit_child_survives_a_partial_invalidation(machine):
    hca, proc, pd, qp = setup(machine)
    imr = hca.reg_mr(pd, 0, IMPLICIT_LENGTH, ODP_RW)
    a = proc.mmap(4 * PAGE, RW, ANON)
    proc.write(a, data(4 * PAGE))
    assert qp.rdma_read(imr.key, a, 4 * PAGE) == data(4 * PAGE)
    proc.munmap(a, PAGE)
    hca.flush_workqueue()
    assert hca.stats.implicit_children_destroyed == 0 and len(imr.children) == 1
    teardown(machine, hca)


# ----- EBUSY ----------------------------------------------------------------------------------


def test_ebusy_after_the_deadline_reaches_the_fault_handler(machine, monkeypatch):
    hca, proc, pd, qp = setup(machine)
    a = proc.mmap(4 * PAGE, RW, ANON)
    mr = hca.reg_mr(pd, a, 4 * PAGE, ODP_RW)
    calls = []

    def busy(rng):  # type: ignore[no-untyped-def]
        calls.append(machine.clock.now_ns)
        machine.clock.advance(300_000_000)  # every walk races an invalidation for 300 ms
        raise Busy("hmm_range_fault: the sequence moved")

    monkeypatch.setattr(umem_mod, "hmm_range_fault", busy)
    with pytest.raises(WorkRequestFailed) as info:
        qp.rdma_write(mr.key, a, b"x")
    assert isinstance(info.value.cause, Busy)
    assert len(calls) == 4  # at 0, 300, 600 and 900 ms; after 1200 ms the -EBUSY is returned
    assert hca.stats.error_resumes == 1
    m = hca.open(proc)
    with pytest.raises(Busy):
        m.read(a, PAGE)
    monkeypatch.undo()
    m.close()
    teardown(machine, hca)


def test_stale_read_retry_loops_without_the_deadline(machine, monkeypatch):
    hca, proc, pd, qp = setup(machine)
    a = proc.mmap(4 * PAGE, RW, ANON)
    mr = hca.reg_mr(pd, a, 4 * PAGE, ODP_RW)
    stale = [5]

    def retry(sub, seq):  # type: ignore[no-untyped-def]
        machine.clock.advance(500_000_000)
        if stale[0]:
            stale[0] -= 1
            return True
        return False

    monkeypatch.setattr(umem_mod, "mmu_interval_read_retry", retry)
    qp.rdma_write(mr.key, a, b"late")  # 3 s of stale retries, still served
    assert hca.stats.stale_retries == 5
    assert proc.read(a, 4) == b"late"
    monkeypatch.undo()
    teardown(machine, hca)


# ----- the pinned MR beside the ODP MR --------------------------------------------------------


def test_pinned_mr_blocks_migration_and_never_sees_invalidations(machine):
    hca, proc, pd, qp = setup(machine)
    a = proc.mmap(4 * PAGE, RW, ANON)
    proc.write(a, data(4 * PAGE))
    pinned = hca.reg_mr(pd, a, 2 * PAGE, IB_ACCESS_LOCAL_WRITE | IB_ACCESS_REMOTE_READ)
    odp = hca.reg_mr(pd, a + 2 * PAGE, 2 * PAGE, ODP_RO)
    assert len(machine.phys.pins) == 2
    # Migration (compaction's mechanism) cannot move pinned pages; ODP pages move.
    status = proc.move_pages(a, 4)
    assert status[:2] == [-16, -16] and status[2:] == [0, 0]
    assert qp.rdma_read(odp.key, a + 2 * PAGE, 2 * PAGE) == data(4 * PAGE)[2 * PAGE :]
    invalidations = hca.stats.invalidations
    proc.madvise(a, 4 * PAGE, MADV_DONTNEED)
    assert hca.stats.invalidations == invalidations + 1  # the ODP MR only
    assert proc.read(a, 4 * PAGE) == bytes(4 * PAGE)
    # The pinned MR still reaches the pages it pinned, with their old data;
    # the ODP MR follows the CPU to the zero page.
    assert qp.rdma_read(pinned.key, a, 2 * PAGE) == data(4 * PAGE)[: 2 * PAGE]
    assert qp.rdma_read(odp.key, a + 2 * PAGE, 2 * PAGE) == bytes(2 * PAGE)
    hca.dereg_mr(pinned)
    assert not machine.phys.pins
    assert not machine_violations(machine)
    teardown(machine, hca)


# ----- the gup era ----------------------------------------------------------------------------


def test_gup_era_dma_list_keeps_access_bits_and_holds_no_page_reference(machine):
    hca, proc, pd, qp = setup(machine, "gup")
    a = proc.mmap(4 * PAGE, RW, ANON)
    mr = hca.reg_mr(pd, a, 4 * PAGE, ODP_RW)
    qp.rdma_write(mr.key, a, b"x")
    umem = mr.umem
    assert int(umem.dma_list[0]) & 3 == 3 and umem.page_list[0] == proc.pagemap(a, 1)[0].pfn
    assert not machine.phys.extra_refs
    assert len(hca.per_mms) == 1 and umem in hca.per_mms[id(proc.mm)].umems
    teardown(machine, hca)


def test_gup_era_write_fault_on_read_only_memory_is_efault(machine):
    hca, proc, pd, qp = setup(machine, "gup")
    a = proc.mmap(4 * PAGE, PROT_READ, ANON)
    mr = hca.reg_mr(pd, a, 4 * PAGE, ODP_RW)
    with pytest.raises(WorkRequestFailed) as info:
        qp.rdma_read(mr.key, a, PAGE)  # a writable MR faults for write
    assert isinstance(info.value.cause, BadAddress)
    teardown(machine, hca)


@pytest.mark.parametrize("era", ERAS)
def test_mirror_round_trip_and_close(machine, era):
    hca = machine.probe("odp", era=era)
    proc = machine.spawn()
    m = hca.open(proc)
    a = proc.mmap(64 * PAGE, RW, ANON)
    m.write(a, data(64 * PAGE, 8))
    assert proc.read(a, 64 * PAGE) == data(64 * PAGE, 8)
    assert m.read(a, 64 * PAGE) == data(64 * PAGE, 8)
    check_mirror(m, a, 64)
    m.close()
    assert all(p is None for p in m.device_ptes(a, 64))
    teardown(machine, hca)


# ----- P2P (mainline: hmm_dma_map_pfn maps peer memory) ---------------------------------------


def test_mainline_mr_reaches_peer_memory_by_bus_address(machine):
    from hmmsim import MAP_SHARED
    from hmmsim.pci import pci_p2pdma_add_resource, pci_p2pmem_allocate_file, pci_topology

    topo = pci_topology(machine)
    hb = topo.add_host_bridge(0x8086, 0x1234)
    _, (d0, d1) = topo.add_switch(topo.add_root_port(hb), ports=2)
    gpu = topo.add_endpoint(d0, "gpu", bars={0: 4 << 20})
    pci_p2pdma_add_resource(gpu, 0, 0, 0)
    nic = topo.add_endpoint(d1, "nic")
    hca = machine.probe("odp", pci=nic)
    proc = machine.spawn()
    pd = hca.alloc_ucontext(proc).alloc_pd()
    qp = hca.create_qp(pd)
    a = proc.mmap(4 * PAGE, RW, MAP_SHARED, file=pci_p2pmem_allocate_file(gpu))
    proc.write(a, b"peer")
    mr = hca.reg_mr(pd, a, 4 * PAGE, ODP_RW)
    assert qp.rdma_read(mr.key, a, 4) == b"peer"
    qp.rdma_write(mr.key, a + PAGE, b"from the nic")
    assert proc.read(a + PAGE, 12) == b"from the nic"
    m = hca.open(proc)
    m.mrs[(a >> 21, True)] = mr
    assert {p.memory for p in m.device_ptes(a, 2) if p is not None} == {"p2p"}
    check_mirror(m, a, 2)
    proc.munmap(a, 4 * PAGE)
    assert not mr.mtt.any()
    teardown(machine, hca)


def test_zero_length_data_segment_means_2gib(machine):
    hca, proc, pd, qp = setup(machine)
    a = proc.mmap(4 * PAGE, RW, ANON)
    mr = hca.reg_mr(pd, a, 4 * PAGE, ODP_RW)
    proc.madvise(a, 4 * PAGE, MADV_DONTNEED)
    # The WQE fault handler reads length 0 as 2 GiB, which leaves the MR: -EFAULT.
    with pytest.raises(WorkRequestFailed) as info:
        qp.post_send([IbvSge(a, 0, mr.key), IbvSge(a, PAGE, mr.key)])
    assert isinstance(info.value.cause, BadAddress)
    assert qp.completions[-1].status == WcStatus.LOC_PROT_ERR
    assert hca.stats.wqe_faults == 1 and hca.stats.error_resumes == 1
    teardown(machine, hca)


def test_a_key_that_is_not_odp_counts_as_mapped_in_a_wqe_fault(machine):
    hca, proc, pd, qp = setup(machine)
    a = proc.mmap(4 * PAGE, RW, ANON)
    proc.write(a, data(4 * PAGE))
    pinned = hca.reg_mr(pd, a, 2 * PAGE, IB_ACCESS_LOCAL_WRITE)
    odp = hca.reg_mr(pd, a + 2 * PAGE, 2 * PAGE, ODP_RW)
    proc.madvise(a + 2 * PAGE, 2 * PAGE, MADV_DONTNEED)
    got = qp.post_send([IbvSge(a, PAGE, pinned.key), IbvSge(a + 2 * PAGE, PAGE, odp.key)])
    assert got == data(4 * PAGE)[:PAGE] + bytes(PAGE)
    assert hca.stats.wqe_faults == 1
    teardown(machine, hca)
