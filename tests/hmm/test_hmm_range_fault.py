"""hmm_range_fault: every entry kind of hmm-core.md §7 under the three request
columns, sticky bits, partial outputs, fault granularity, holes, races."""

from __future__ import annotations

import hmmsim
import numpy as np
import pytest
from helpers import ANON, MB2, PAGE, RW
from hmmsim import sched
from hmmsim.hmm import (
    HMM_PFN_DMA_MAPPED,
    HMM_PFN_ERROR,
    HMM_PFN_P2PDMA,
    HMM_PFN_REQ_FAULT,
    HMM_PFN_REQ_WRITE,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    HmmRange,
    hmm_pfn_to_map_order,
    hmm_pfn_to_page,
    hmm_pfn_to_phys,
    hmm_range_fault,
)
from hmmsim.mm.physmem import HUGE_ZERO_PFN, ZERO_PFN
from hmmsim.testing.devmem import Device

NOREQ, FAULT, WRITE = 0, HMM_PFN_REQ_FAULT, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE
V, W, E = HMM_PFN_VALID, HMM_PFN_WRITE, HMM_PFN_ERROR
O9, O18 = 9 << 53, 18 << 53


class Mirror:
    """Interval-notifier ops of a device: records events, skips its own migrations."""

    def __init__(self, owner=None):
        self.owner = owner
        self.events = []

    def invalidate(self, sub, rng, cur_seq):
        self.events.append(rng.event.name)
        if rng.event == hmmsim.MMU_NOTIFY_MIGRATE and rng.owner is self.owner:
            return True
        hmmsim.mmu_interval_set_seq(sub, cur_seq)
        return True


def fault(p, start, npages, flags, owner=None, pfns=None, mask=0):
    """One read_begin + hmm_range_fault; returns the array (or raises)."""
    sub = hmmsim.mmu_interval_notifier_insert(p.mm, start, npages * PAGE, Mirror(owner))
    try:
        arr = np.zeros(npages, np.uint64) if pfns is None else pfns
        rng = HmmRange(
            sub,
            start,
            start + npages * PAGE,
            arr,
            default_flags=flags,
            pfn_flags_mask=mask,
            dev_private_owner=owner,
        )
        rng.notifier_seq = hmmsim.mmu_interval_read_begin(sub)
        with p.mm.mmap_lock.read():
            hmm_range_fault(rng)
        return arr
    finally:
        hmmsim.mmu_interval_notifier_remove(sub)


def fault_retrying(p, start, npages, flags, owner=None):
    """The caller pattern: retry on Busy; returns (array, number of Busy)."""
    sub = hmmsim.mmu_interval_notifier_insert(p.mm, start, npages * PAGE, Mirror(owner))
    busy = 0
    try:
        while True:
            arr = np.zeros(npages, np.uint64)
            rng = HmmRange(
                sub, start, start + npages * PAGE, arr, default_flags=flags, dev_private_owner=owner
            )
            rng.notifier_seq = hmmsim.mmu_interval_read_begin(sub)
            try:
                with p.mm.mmap_lock.read():
                    hmm_range_fault(rng)
            except hmmsim.Busy:
                busy += 1
                assert busy < 5
                continue
            if not hmmsim.mmu_interval_read_retry(sub, rng.notifier_seq):
                return arr, busy
    finally:
        hmmsim.mmu_interval_notifier_remove(sub)


@pytest.fixture
def m(make_machine):
    return make_machine(
        ram_bytes=256 << 20, swap_bytes=16 << 20, thp="madvise", hugetlb_pages={2 << 20: 4}
    )


@pytest.fixture
def p(m):
    return m.spawn()


def pfn_at(p, addr):
    return p.pagemap(addr, 1)[0].pfn


# ----- one test per row of §7, three request columns each ------------------------------


@pytest.mark.parametrize("req", [NOREQ, FAULT, WRITE])
def test_row_no_vma(p, req):
    a = p.mmap(PAGE, RW, ANON)
    p.munmap(a, PAGE)
    if req:
        with pytest.raises(hmmsim.BadAddress):
            fault(p, a, 1, req)
    else:
        assert fault(p, a, 1, req).tolist() == [E]


@pytest.mark.parametrize("kind", ["pfnmap", "unreadable"])
@pytest.mark.parametrize("req", [NOREQ, FAULT, WRITE])
def test_row_io_pfnmap_or_unreadable_vma(p, req, kind):
    from hmmsim.mm.pfnmap import remap_pfn_range

    class Bar:
        def mmap(self, vma):
            remap_pfn_range(vma, vma.start, 0x100, vma.length)

    if kind == "pfnmap":
        a = p.mmap(PAGE, RW, hmmsim.MAP_SHARED, file=Bar())
    else:
        a = p.mmap(PAGE, hmmsim.PROT_NONE, ANON)
    if req:
        with pytest.raises(hmmsim.BadAddress):
            fault(p, a, 1, req)
    else:
        assert fault(p, a, 1, req).tolist() == [E]


@pytest.mark.parametrize("req", [NOREQ, FAULT, WRITE])
def test_row_none(p, req):
    a = p.mmap(PAGE, RW, ANON)
    out = fault(p, a, 1, req)
    if req == NOREQ:
        assert out.tolist() == [0]
    elif req == FAULT:
        assert out.tolist() == [V | ZERO_PFN]  # a read fault maps the zero page
    else:
        assert out.tolist() == [V | W | pfn_at(p, a)] and pfn_at(p, a) != ZERO_PFN


def test_row_none_write_request_on_read_only_vma_is_eperm(p):
    a = p.mmap(PAGE, hmmsim.PROT_READ, ANON)
    with pytest.raises(hmmsim.NotPermitted):
        fault(p, a, 1, WRITE)
    assert p.pagemap(a, 1)[0].kind == "none"


@pytest.mark.parametrize("req", [NOREQ, FAULT, WRITE])
def test_row_present_read_only(p, req):
    a = p.mmap(PAGE, RW, ANON)
    p.write(a, b"x")
    p.fork()  # write-protects the page for COW
    pfn = pfn_at(p, a)
    if req != WRITE:
        assert fault(p, a, 1, req).tolist() == [V | pfn]
        return
    with pytest.raises(hmmsim.Busy):  # the COW emitted CLEAR; the next pass sees it
        fault(p, a, 1, req)
    out, busy = fault_retrying(p, a, 1, req)
    assert busy == 0 and out.tolist() == [V | W | pfn_at(p, a)] and pfn_at(p, a) != pfn


@pytest.mark.parametrize("req", [NOREQ, FAULT, WRITE])
def test_row_present_writable(p, req):
    a = p.mmap(PAGE, RW, ANON)
    p.write(a, b"x")
    assert fault(p, a, 1, req).tolist() == [V | W | pfn_at(p, a)]


@pytest.mark.parametrize("req", [NOREQ, FAULT, WRITE])
def test_row_zero_page(p, req):
    a = p.mmap(PAGE, RW, ANON)
    p.read(a, 1)
    if req != WRITE:
        assert fault(p, a, 1, req).tolist() == [V | ZERO_PFN]
        return
    with pytest.raises(hmmsim.Busy):
        fault(p, a, 1, req)
    out, _ = fault_retrying(p, a, 1, req)
    assert out.tolist() == [V | W | pfn_at(p, a)] and pfn_at(p, a) != ZERO_PFN


@pytest.mark.parametrize("req", [NOREQ, FAULT, WRITE])
def test_row_special_pte(p, req):
    from hmmsim.mm.pfnmap import vm_insert_page, vmf_insert_pfn

    m = p.machine
    page = m.phys.alloc_one(0)

    class Dev:
        def mmap(self, vma):
            vm_insert_page(vma, vma.start, page)  # VM_MIXEDMAP
            vmf_insert_pfn(vma, vma.start + PAGE, 0x123)  # special PTE

    a = p.mmap(2 * PAGE, RW, hmmsim.MAP_SHARED, file=Dev())
    assert fault(p, a, 1, NOREQ).tolist() == [V | W | page]  # a normal page is reported
    if req:
        with pytest.raises(hmmsim.BadAddress):
            fault(p, a + PAGE, 1, req)
    else:
        assert fault(p, a + PAGE, 1, req).tolist() == [E]


@pytest.mark.parametrize("req", [NOREQ, FAULT, WRITE])
def test_row_protnone_numa_hint(p, req):
    from hmmsim.mm.mprotect import change_prot_numa

    a = p.mmap(PAGE, RW, ANON)
    p.write(a, b"x")
    pfn = pfn_at(p, a)
    with p.mm.mmap_lock.write():
        change_prot_numa(p.mm.find_vma(a), a, a + PAGE)
    out = fault(p, a, 1, req)
    if req == NOREQ:
        assert out.tolist() == [pfn]  # pfn bits only, no VALID
    else:
        assert out.tolist() == [V | W | pfn]  # the hint fault restored it


@pytest.mark.parametrize("req", [NOREQ, FAULT, WRITE])
def test_row_swap(p, req):
    a = p.mmap(PAGE, RW, ANON)
    p.write(a, b"x")
    p.madvise(a, PAGE, hmmsim.MADV_PAGEOUT)
    out = fault(p, a, 1, req)
    if req == NOREQ:
        assert out.tolist() == [0]
    elif req == FAULT:
        # do_swap_page maps an exclusive page writable even on a read fault.
        assert out.tolist() == [V | W | pfn_at(p, a)]
    else:
        assert out.tolist() == [V | W | pfn_at(p, a)]
    assert p.read(a, 1) == b"x"


@pytest.mark.parametrize("req", [NOREQ, FAULT, WRITE])
def test_row_migration_entry(p, m, req):
    from hmmsim.migrate import (
        MIGRATE_VMA_SELECT_SYSTEM,
        MigrateVma,
        migrate_vma_finalize,
        migrate_vma_pages,
        migrate_vma_setup,
    )

    a = p.mmap(PAGE, RW, ANON)
    p.write(a, b"x")
    pfn = pfn_at(p, a)
    args = MigrateVma(
        p.mm.find_vma(a),
        a,
        a + PAGE,
        np.zeros(1, np.uint64),
        np.zeros(1, np.uint64),
        flags=MIGRATE_VMA_SELECT_SYSTEM,
    )
    with p.mm.mmap_lock.read():
        migrate_vma_setup(args)  # leaves a migration entry until finalize
    assert p.pagemap(a, 1)[0].kind == "migration"
    if req == NOREQ:
        assert fault(p, a, 1, req).tolist() == [0]
        with p.mm.mmap_lock.read():
            migrate_vma_finalize(args)
        return
    with pytest.raises(hmmsim.Deadlock):  # nobody else could ever finish it
        fault(p, a, 1, req)

    class OtherCpu:  # the migration finishes while hmm_range_fault waits
        def current(self):
            return "cpu0"

        def point(self, label):
            return None

        def block(self, reason, ready):
            migrate_vma_pages(args)
            migrate_vma_finalize(args)
            assert ready()

    prev = sched.set_active(OtherCpu())
    try:
        out = fault(p, a, 1, req)
    finally:
        sched.set_active(prev)
    assert out.tolist() == [V | W | pfn]  # rewalked after the wait


@pytest.mark.parametrize("req", [NOREQ, FAULT, WRITE])
@pytest.mark.parametrize("writable", [True, False])
def test_row_device_private_owned(p, m, req, writable):
    dev = Device(m)
    a = p.mmap(PAGE, RW, ANON)
    p.write(a, b"x")
    dev.migrate_to_device(p, a, 1)
    if not writable:
        p.mprotect(a, PAGE, hmmsim.PROT_READ)
        p.mprotect(a, PAGE, RW)  # VMA writable again, entry stays read-only
    dpfn = pfn_at(p, a)
    out = fault(p, a, 1, req, owner=dev)
    # Reported as is, never faulted; a write request is not satisfied.
    assert out.tolist() == [V | (W if writable else 0) | dpfn]
    assert dev.faults == 0


@pytest.mark.parametrize("req", [NOREQ, FAULT, WRITE])
def test_row_device_private_foreign(p, m, req):
    dev = Device(m)
    other = object()
    a = p.mmap(PAGE, RW, ANON)
    p.write(a, b"x")
    dev.migrate_to_device(p, a, 1)
    if req == NOREQ:
        assert fault(p, a, 1, req, owner=other).tolist() == [0]
        return
    with pytest.raises(hmmsim.Busy):  # migrate_to_ram sent MIGRATE (dev's owner)
        fault(p, a, 1, req, owner=other)
    assert dev.faults == 1 and p.pagemap(a, 1)[0].kind == "anon"
    out, _ = fault_retrying(p, a, 1, req, owner=other)
    assert out.tolist() == [V | W | pfn_at(p, a)] or (
        req == FAULT and out.tolist() == [V | pfn_at(p, a)]
    )


@pytest.mark.parametrize("req", [NOREQ, FAULT, WRITE])
def test_row_device_exclusive(p, m, req):
    from hmmsim.exclusive import make_device_exclusive

    a = p.mmap(PAGE, RW, ANON)
    p.write(a, b"x")
    owner = object()
    with p.mm.mmap_lock.read():
        _page, head = make_device_exclusive(p.mm, a, owner)
    m.phys.folio_unlock(head)
    m.phys.put_page(head)
    assert p.pagemap(a, 1)[0].kind == "device_exclusive"
    if req == NOREQ:
        assert fault(p, a, 1, req).tolist() == [0]
        return
    sub = hmmsim.mmu_interval_notifier_insert(p.mm, a, PAGE, rec := Mirror())
    with pytest.raises(hmmsim.Busy):  # restore sent EXCLUSIVE with no owner
        fault(p, a, 1, req)
    assert rec.events == ["EXCLUSIVE"]
    hmmsim.mmu_interval_notifier_remove(sub)
    assert fault(p, a, 1, req).tolist() == [V | W | head]


@pytest.mark.parametrize("req", [NOREQ, FAULT, WRITE])
def test_row_hwpoison(p, m, req):
    a = p.mmap(PAGE, RW, ANON)
    p.write(a, b"x")
    m.memory_failure(pfn_at(p, a))
    if req:
        with pytest.raises(hmmsim.BadAddress):
            fault(p, a, 1, req)
    else:
        assert fault(p, a, 1, req).tolist() == [0]


def _thp(p, write=True):
    a = p.mmap(MB2, RW, ANON)
    p.madvise(a, MB2, hmmsim.MADV_HUGEPAGE)
    if write:
        p.write(a, b"t")
    else:
        p.read(a, 1)
    return a


@pytest.mark.parametrize("req", [NOREQ, FAULT, WRITE])
def test_row_thp_pmd(p, req):
    a = _thp(p)
    head = pfn_at(p, a)
    out = fault(p, a + 5 * PAGE, 3, req)
    assert out.tolist() == [V | W | O9 | (head + 5 + i) for i in range(3)]
    assert hmm_pfn_to_map_order(int(out[0])) == 9


@pytest.mark.parametrize("req", [NOREQ, FAULT, WRITE])
def test_row_read_only_thp_and_huge_zero_pmd(p, req):
    a = _thp(p, write=False)  # the huge zero page
    out_rw = None
    if req != WRITE:
        out = fault(p, a + PAGE, 2, req)
        assert out.tolist() == [V | O9 | (HUGE_ZERO_PFN + 1), V | O9 | (HUGE_ZERO_PFN + 2)]
        return
    with pytest.raises(hmmsim.Busy):
        fault(p, a + PAGE, 2, req)
    out_rw, _ = fault_retrying(p, a + PAGE, 2, req)
    assert all(int(x) & V and int(x) & W for x in out_rw)


@pytest.mark.parametrize("req", [NOREQ, FAULT, WRITE])
def test_row_pmd_migration_entry(p, req):
    from hmmsim.migrate import (
        MIGRATE_VMA_SELECT_COMPOUND,
        MIGRATE_VMA_SELECT_SYSTEM,
        MigrateVma,
        migrate_vma_finalize,
        migrate_vma_setup,
    )

    a = _thp(p)
    args = MigrateVma(
        p.mm.find_vma(a),
        a,
        a + MB2,
        np.zeros(512, np.uint64),
        np.zeros(512, np.uint64),
        flags=MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_SELECT_COMPOUND,
    )
    with p.mm.mmap_lock.read():
        migrate_vma_setup(args)
    assert p.pagemap(a, 1)[0].kind == "migration" and p.pagemap(a, 1)[0].order == 9
    if req == NOREQ:
        assert fault(p, a, 2, req).tolist() == [0, 0]
    else:
        with pytest.raises(hmmsim.Deadlock):
            fault(p, a, 2, req)
    with p.mm.mmap_lock.read():
        migrate_vma_finalize(args)
    assert p.pagemap(a, 1)[0].order == 9 and p.read(a, 1) == b"t"


@pytest.mark.parametrize("req", [NOREQ, FAULT, WRITE])
def test_row_device_private_pmd(p, m, req):
    dev = Device(m, npages=1024)
    a = _thp(p)
    dev.migrate_to_device(p, a, 512, compound=True)
    head = pfn_at(p, a)
    out = fault(p, a + 2 * PAGE, 2, req, owner=dev)
    assert out.tolist() == [V | W | O9 | (head + 2), V | W | O9 | (head + 3)]
    other = object()
    if req == NOREQ:  # an absent PMD with no request: ERROR, unlike a PTE
        assert fault(p, a + 2 * PAGE, 2, req, owner=other).tolist() == [E, E]
    else:  # foreign device-private PMD: faulted back
        out, _ = fault_retrying(p, a + 2 * PAGE, 2, req, owner=other)
        assert all(int(x) & V for x in out)
        assert dev.faults >= 1


@pytest.mark.parametrize("req", [NOREQ, FAULT, WRITE])
def test_row_hugetlb(p, req):
    a = p.mmap(MB2, RW, ANON | hmmsim.MAP_HUGETLB)
    if req == NOREQ:
        # Not faulted yet: the PMD table exists only once something is mapped.
        assert fault(p, a, 2, req).tolist() == [0, 0]
        p.write(a, b"h")
    out = fault(p, a + 7 * PAGE, 2, req)
    head = pfn_at(p, a)
    w = 0 if req == FAULT else W  # a read fault maps a private huge page read-only
    assert out.tolist() == [V | w | O9 | (head + 7), V | w | O9 | (head + 8)]


def test_row_hugetlb_request_comes_from_the_first_entry_only(p):
    a = p.mmap(MB2, RW, ANON | hmmsim.MAP_HUGETLB)
    p.read(a, 1)  # maps the huge page read-only (private, exclusive)
    c = p.fork()
    arr = np.zeros(2, np.uint64)
    arr[1] = HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE  # ignored: not the first entry
    out = fault(p, a, 2, 0, pfns=arr, mask=HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE)
    head = pfn_at(p, a)
    assert out.tolist() == [V | O9 | head, V | O9 | (head + 1)]
    del c


def test_row_hugetlb_1g_is_order_18(make_machine):
    m = make_machine(ram_bytes=3 << 30, hugetlb_pages={1 << 30: 1}, store_data=False)
    p = m.spawn()
    a = p.mmap(1 << 30, RW, ANON | hmmsim.MAP_HUGETLB | hmmsim.MAP_HUGE_1GB)
    out = fault(p, a + 5 * PAGE, 1, WRITE)
    head = pfn_at(p, a)
    assert out.tolist() == [V | W | O18 | (head + 5)]


# ----- the rest of the algorithm ------------------------------------------------------


def test_helpers():
    e = V | W | (9 << 53) | 0x1234
    assert hmm_pfn_to_page(e) == 0x1234
    assert hmm_pfn_to_phys(e) == 0x1234 << 12
    assert hmm_pfn_to_map_order(e) == 9
    assert hmmsim.hmm.HMM_PFN_FLAGS == 0xFFE0_0000_0000_0000
    assert hmmsim.hmm.HMM_PFN_INOUT_FLAGS == 0x1C00_0000_0000_0000
    assert hmmsim.hmm.HMM_RANGE_DEFAULT_TIMEOUT == 1000


def test_sticky_dma_bits_survive_every_outcome(p):
    a = p.mmap(2 * PAGE, RW, ANON)
    p.write(a, b"x")
    sticky = np.uint64(HMM_PFN_DMA_MAPPED | HMM_PFN_P2PDMA)
    arr = np.full(3, sticky, np.uint64)
    fault(p, a, 3, NOREQ, pfns=arr)  # VALID, 0 (none), ERROR (no VMA past the end)
    assert (arr & sticky).tolist() == [int(sticky)] * 3
    assert (arr & ~sticky).tolist() == [V | W | pfn_at(p, a), 0, E]


def test_partial_outputs_on_failure(p):
    a = p.mmap(4 * PAGE, RW, ANON)
    p.write(a, b"x")
    p.mprotect(a + 2 * PAGE, 2 * PAGE, hmmsim.PROT_READ)
    arr = np.zeros(4, np.uint64)
    arr[2] = HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE
    arr[3] = 0xABC  # an input that must survive
    with pytest.raises(hmmsim.NotPermitted):
        fault(p, a, 4, 0, pfns=arr, mask=HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE)
    assert arr.tolist()[:2] == [V | W | pfn_at(p, a), 0]
    assert arr.tolist()[2:] == [HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE, 0xABC]


def test_one_needed_fault_faults_the_rest_of_the_walk_chunk(p, m):
    a = p.mmap(MB2, RW, ANON)  # THP not madvised: PTEs
    p.write(a, b"t")  # the PTE table exists: each PTE decides alone (no pte_hole)
    arr = np.zeros(4, np.uint64)
    arr[1] = HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE
    fault(p, a + 8 * PAGE, 4, 0, pfns=arr, mask=HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE)
    assert arr[0] == 0 and all(int(x) & (V | W) == V | W for x in arr[1:])
    # every page from the needing one to the end of the walk chunk (clipped to
    # the range) was write-faulted, whatever its own request
    kinds = [e.kind for e in p.pagemap(a, 512)]
    assert kinds[:9] == ["anon"] + ["none"] * 8 and kinds[9:12] == ["anon"] * 3
    assert kinds[12:] == ["none"] * 500


def test_range_spanning_vmas_and_a_hole(p):
    a = p.mmap(6 * PAGE, RW, ANON)
    p.munmap(a + 2 * PAGE, PAGE)
    p.mprotect(a + 3 * PAGE, PAGE, hmmsim.PROT_READ)
    p.write(a, b"x")
    out = fault(p, a, 6, NOREQ)
    assert out.tolist() == [V | W | pfn_at(p, a), 0, E, 0, 0, 0]
    with pytest.raises(hmmsim.BadAddress):
        fault(p, a, 6, FAULT)
    out = fault(p, a + 3 * PAGE, 3, FAULT)
    assert out.tolist() == [V | ZERO_PFN] * 3


def test_empty_and_malformed_ranges(p):
    a = p.mmap(PAGE, RW, ANON)
    sub = hmmsim.mmu_interval_notifier_insert(p.mm, a, PAGE, Mirror())
    with p.mm.mmap_lock.read():
        for rng in (
            HmmRange(sub, a, a, np.zeros(0, np.uint64)),
            HmmRange(sub, a, a + PAGE, np.zeros(2, np.uint64)),
            HmmRange(sub, a, a + PAGE, np.zeros(1, np.int64)),
        ):
            with pytest.raises(hmmsim.InvalidArgument):
                hmm_range_fault(rng)
    with pytest.raises(AssertionError):  # mmap_lock not held
        hmm_range_fault(HmmRange(sub, a, a + PAGE, np.zeros(1, np.uint64)))


def test_hmm_range_fault_takes_no_references(p, m):
    a = p.mmap(4 * PAGE, RW, ANON)
    p.write(a, b"x" * 4 * PAGE)
    before = m.phys.refcount.copy()
    fault(p, a, 4, WRITE)
    assert (m.phys.refcount == before).all()


# ----- races: the read_begin / read_retry protocol -------------------------------------


def test_invalidation_between_read_begin_and_the_walk_gives_busy(p):
    a = p.mmap(2 * PAGE, RW, ANON)
    p.write(a, b"x")
    sub = hmmsim.mmu_interval_notifier_insert(p.mm, a, 2 * PAGE, Mirror())
    rng = HmmRange(sub, a, a + 2 * PAGE, np.zeros(2, np.uint64))
    rng.notifier_seq = hmmsim.mmu_interval_read_begin(sub)
    p.madvise(a, PAGE, hmmsim.MADV_DONTNEED)  # another CPU
    with p.mm.mmap_lock.read(), pytest.raises(hmmsim.Busy):
        hmm_range_fault(rng)


def test_invalidation_in_the_middle_of_a_multi_pass_walk_gives_busy(p):
    a = p.mmap(4 * PAGE, RW, ANON)
    p.write(a + 3 * PAGE, b"x")
    sub = hmmsim.mmu_interval_notifier_insert(p.mm, a, 4 * PAGE, Mirror())
    rng = HmmRange(sub, a, a + 4 * PAGE, np.zeros(4, np.uint64), default_flags=FAULT)
    rng.notifier_seq = hmmsim.mmu_interval_read_begin(sub)
    passes = []

    class OtherCpu:
        def current(self):
            return "cpu0"

        def point(self, label):
            if label == "hmm_range_fault:pass":
                passes.append(label)
                # Between passes, another CPU unmaps the page the walk reported.
                p.mm.mmap_lock.readers.clear()
                p.madvise(a + 3 * PAGE, PAGE, hmmsim.MADV_DONTNEED)
                p.mm.mmap_lock.readers["cpu0"] = 1

        def block(self, reason, ready):
            raise AssertionError("nothing should sleep here")

    prev = sched.set_active(OtherCpu())
    try:
        with p.mm.mmap_lock.read(), pytest.raises(hmmsim.Busy):
            hmm_range_fault(rng)
    finally:
        sched.set_active(prev)
    assert passes  # the fault of the first page ended a pass


def test_read_retry_under_the_driver_lock_sees_an_invalidation_after_the_walk(p):
    lock = sched.Mutex("driver")

    class Locked(Mirror):
        def invalidate(self, sub, rng, cur_seq):
            with lock:
                hmmsim.mmu_interval_set_seq(sub, cur_seq)
            return True

    a = p.mmap(PAGE, RW, ANON)
    p.write(a, b"x")
    sub = hmmsim.mmu_interval_notifier_insert(p.mm, a, PAGE, Locked())
    rng = HmmRange(sub, a, a + PAGE, np.zeros(1, np.uint64))
    rng.notifier_seq = hmmsim.mmu_interval_read_begin(sub)
    with p.mm.mmap_lock.read():
        hmm_range_fault(rng)  # succeeds: the snapshot is taken
    p.munmap(a, PAGE)  # lands after the walk, before the driver takes its lock
    with lock:
        assert hmmsim.mmu_interval_read_retry(sub, rng.notifier_seq)
