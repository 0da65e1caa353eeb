"""nouveau: the native SVM interface, the fault buffer, eras and quirks (exact outcomes)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import ANON, PAGE, RW
from hmmsim import (
    MADV_HUGEPAGE,
    MAP_FIXED,
    PROT_NONE,
    PROT_READ,
    Again,
    Busy,
    InvalidArgument,
    Machine,
    MachineConfig,
    mmu_interval_notifier_insert,
    mmu_interval_read_begin,
    mmu_interval_set_seq,
)
from hmmsim.dma import machine_violations
from hmmsim.driver import Capability
from hmmsim.drivers.nouveau import (
    DRM_NOUVEAU_SVM_BIND,
    DRM_NOUVEAU_SVM_INIT,
    NOUVEAU_SVM_BIND_COMMAND__MIGRATE,
    NOUVEAU_SVM_BIND_TARGET__GPU_VRAM,
    ChannelKilled,
    DrmNouveauSvmBind,
    DrmNouveauSvmInit,
    NoSys,
    svm_bind_header,
)
from hmmsim.drivers.nouveau.history import PFN_FLAGS_V57, PFN_VALUES_V57
from hmmsim.drivers.nouveau.uapi import (
    FAULT_ACCESS_ATOMIC,
    FAULT_ACCESS_READ,
    NVIF_VMM_PFNMAP_V0_A,
    NVIF_VMM_PFNMAP_V0_HOST,
    NVIF_VMM_PFNMAP_V0_V,
    NVIF_VMM_PFNMAP_V0_VRAM,
    NVIF_VMM_PFNMAP_V0_W,
    FaultEntry,
    decode_fault,
    encode_fault,
)
from hmmsim.hmm_legacy import HmmRangeV57, hmm_range_fault_v57
from hmmsim.notifier import (
    MMU_NOTIFY_CLEAR,
    NotifierRange,
    invalidate_range_start_nonblock,
)
from hmmsim.plugins import find_driver, get_plugin_manager

V, W, A = NVIF_VMM_PFNMAP_V0_V, NVIF_VMM_PFNMAP_V0_W, NVIF_VMM_PFNMAP_V0_A
HUGE = 2 << 20
MIGRATE_TO_VRAM = svm_bind_header(
    NOUVEAU_SVM_BIND_COMMAND__MIGRATE, NOUVEAU_SVM_BIND_TARGET__GPU_VRAM
)


class SeqOnly:
    def invalidate(self, sub, rng, cur_seq):  # type: ignore[no-untyped-def]
        mmu_interval_set_seq(sub, cur_seq)
        return True


@pytest.fixture
def machine() -> Machine:
    return Machine(MachineConfig(ram_bytes=64 << 20, thp="madvise"))


def client(machine, era="mainline", hole=(0, 0)):  # type: ignore[no-untyped-def]
    drm = machine.probe("nouveau", era=era)
    p = machine.spawn()
    cli = drm.open_file(p)
    cli.ioctl(DRM_NOUVEAU_SVM_INIT, DrmNouveauSvmInit(*hole))
    return drm, p, cli, cli.channel_new()


def vmm(cli):  # type: ignore[no-untyped-def]
    assert cli.svm is not None and cli.svm.vmm is not None
    return cli.svm.vmm


# ----- the native interface ---------------------------------------------------------------


def test_svm_init_is_enosys_after_pascal_and_ebusy_twice(machine):
    volta = machine.probe("nouveau", family="volta")
    cli = volta.open_file(machine.spawn())
    with pytest.raises(NoSys) as info:
        cli.ioctl(DRM_NOUVEAU_SVM_INIT, DrmNouveauSvmInit(0, 0))
    assert info.value.errno == 38
    _, _, cli, _ = client(machine)
    with pytest.raises(Busy):
        cli.ioctl(DRM_NOUVEAU_SVM_INIT, DrmNouveauSvmInit(0, 0))


@pytest.mark.parametrize(
    "req",
    [
        DrmNouveauSvmBind(MIGRATE_TO_VRAM, 0x10000, 0x20000, reserved0=1),
        DrmNouveauSvmBind(MIGRATE_TO_VRAM | (1 << 48), 0x10000, 0x20000),
        DrmNouveauSvmBind(MIGRATE_TO_VRAM, 0x20000, 0x20000),
        DrmNouveauSvmBind(svm_bind_header(1, NOUVEAU_SVM_BIND_TARGET__GPU_VRAM), 0x10000, 0x20000),
        DrmNouveauSvmBind(svm_bind_header(0, 1 << 30), 0x10000, 0x20000),
        DrmNouveauSvmBind(MIGRATE_TO_VRAM, 0x10000, 0x20000, stride=PAGE),
    ],
)
def test_svm_bind_rejects_each_malformed_request_with_einval(machine, req):
    _, _, cli, _ = client(machine)
    with pytest.raises(InvalidArgument):
        cli.ioctl(DRM_NOUVEAU_SVM_BIND, req)


def test_svm_bind_migrates_to_vram_maps_the_gpu_and_reports_zero(machine):
    drm, p, cli, chan = client(machine)
    a = p.mmap(8 * PAGE, RW, ANON)
    p.write(a, b"".join(bytes([i]) * PAGE for i in range(8)))
    req = DrmNouveauSvmBind(MIGRATE_TO_VRAM, a + 1, a + 8 * PAGE - 1, npages=12345)
    cli.ioctl(DRM_NOUVEAU_SVM_BIND, req)
    assert req.result == 0  # the UAPI promises a page count; the driver reports 0
    assert {e.kind for e in p.pagemap(a, 8)} == {"device_private"}
    for i in range(8):
        pte = vmm(cli).lookup(a + i * PAGE)
        assert pte is not None and pte.word & 0xFF == V | W | NVIF_VMM_PFNMAP_V0_VRAM
        assert pte.word & ~0xFFF == drm.dmem.page_addr(p.pagemap(a + i * PAGE, 1)[0].pfn)
    # The migration's own MIGRATE invalidations were skipped by the whole-mm notifier.
    assert cli.svm.stats.migrate_skipped == 1
    assert chan.access(a + 3 * PAGE, "read", length=1) == b"\x03"
    assert drm.dmem.copies == 8


def test_a_new_chunk_hands_out_its_last_page_and_frees_onto_a_lifo_list(machine):
    drm, p, cli, _ = client(machine)
    a = p.mmap(2 * PAGE, RW, ANON)
    p.write(a, b"xy")
    cli.ioctl(DRM_NOUVEAU_SVM_BIND, DrmNouveauSvmBind(MIGRATE_TO_VRAM, a, a + 2 * PAGE))
    chunk = drm.dmem.chunks[0]
    first = p.pagemap(a, 1)[0].pfn
    assert first == chunk.pfns.stop - 1
    assert p.pagemap(a + PAGE, 1)[0].pfn == chunk.pfns.stop - 2
    assert len(drm.dmem.free_pages) == 510
    p.munmap(a, PAGE)
    assert drm.dmem.free_pages[-1] == first


# ----- the fault buffer and the fault path -----------------------------------------------------


def test_fault_entry_round_trips_through_its_32_bytes():
    e = FaultEntry(0x1234_5678_9A, 0x7F00_1234_5000, 99, 5, 0x1F, 1, FAULT_ACCESS_ATOMIC, 0x7F, 3)
    raw = encode_fault(e)
    assert len(raw) == 32
    assert decode_fault(raw) == (e, True)
    assert decode_fault(encode_fault(e, valid=False)) == (e, False)


def test_an_entry_without_its_valid_bit_is_dropped_not_cancelled(machine):
    drm, _p, _, chan = client(machine)
    drm.svm.buffer.push(FaultEntry(chan.inst, 0x1000, 0, 0, 0, 0, FAULT_ACCESS_READ, 0, 0), False)
    drm.svm.fault()
    assert drm.svm.dropped_invalid == 1 and drm.svm.cancelled == [] and not chan.killed


def test_read_fault_maps_one_host_page_with_the_cpu_permission(machine):
    drm, p, cli, chan = client(machine)
    a = p.mmap(4 * PAGE, RW, ANON)
    p.write(a + PAGE, b"cpu")
    assert chan.access(a + PAGE, "read", length=3) == b"cpu"
    pte = vmm(cli).lookup(a + PAGE)
    pfn = p.pagemap(a + PAGE, 1)[0].pfn
    assert pte.word == (pfn << 12) | V | W | NVIF_VMM_PFNMAP_V0_HOST
    assert pte.shift == 12 and len(vmm(cli)) == 1
    assert drm.svm.replays == 1 and drm.svm.batches == 1
    assert drm.dma.nr_live == 1  # the PTE writer DMA-mapped the host page


def test_thp_is_mapped_whole_only_where_the_cpu_maps_it_whole(machine):
    _drm, p, cli, chan = client(machine)
    raw = p.mmap(2 * HUGE, RW, ANON)
    a = (raw + HUGE - 1) & ~(HUGE - 1)
    p.madvise(a, HUGE, MADV_HUGEPAGE)
    p.write(a, b"t")
    chan.access(a + 5 * PAGE, "read")
    pte = vmm(cli).lookup(a + 5 * PAGE)
    assert pte.shift == 21 and pte.pfn == p.pagemap(a, 1)[0].pfn  # head of the CPU mapping
    # Once the CPU maps the same folio with PTEs, a new fault maps 4 KiB.
    p.mprotect(a + PAGE, PAGE, PROT_READ)  # splits the PMD; the GPU entry is cleared
    assert vmm(cli).lookup(a + 5 * PAGE) is None
    chan.access(a + 5 * PAGE, "read")
    assert vmm(cli).lookup(a + 5 * PAGE).shift == 12


def test_faults_at_one_page_are_serviced_once_weakest_first(machine):
    drm, p, cli, chan = client(machine)
    a = p.mmap(PAGE, RW, ANON)
    p.write(a, b"w")
    chan.run([(a, "write", b"W", 1), (a, "read", None, 1)])
    # One group: the read head got V|W, which satisfies the folded write.
    assert drm.svm.batches == 1 and drm.svm.replays == 1
    assert cli.stats.fault_rounds == 1
    assert p.read(a, 1) == b"W"


def test_a_stronger_fault_folded_after_a_read_head_faults_again(machine):
    drm, p, cli, chan = client(machine)
    a = p.mmap(PAGE, RW, ANON)
    p.read(a, 1)  # the zero page: a read fault gives V only
    chan.run([(a, "read", None, 1), (a, "write", b"Z", 1)])
    # Batch 1: the read head gets V only (the zero page); the fold test looks at
    # the head's access class, so the write is folded anyway and replayed
    # unserviced. It faults again in batch 2, which breaks COW.
    assert drm.svm.batches == 2 and drm.svm.replays == 2
    # hmm_range_fault calls: one in batch 1; in batch 2 the COW break the walk
    # made invalidated the range, so read_retry threw it away and it ran again.
    assert (cli.stats.fault_rounds, cli.stats.retries) == (3, 1)
    assert p.read(a, 1) == b"Z"


def test_gpu_access_to_unmapped_memory_cancels_and_kills_the_channel(machine):
    drm, p, cli, chan = client(machine)
    a = p.mmap(PAGE, RW, ANON)
    p.munmap(a, PAGE)
    with pytest.raises(ChannelKilled):
        chan.access(a, "read")
    assert [f.addr for f in drm.svm.cancelled] == [a]
    with pytest.raises(ChannelKilled):
        chan.access(a, "read")  # a killed channel stays dead
    fresh = cli.channel_new()
    b = p.mmap(PAGE, RW, ANON)
    assert fresh.access(b, "read") == b"\x00"


def test_atomic_flag_is_never_reset_within_a_batch(machine):
    _drm, p, cli, chan = client(machine)
    a = p.mmap(2 * PAGE, RW, ANON)
    p.write(a, b"ab")
    p.write(a + PAGE, b"cd")
    chan.run([(a, "atomic", None, 1), (a + PAGE, "read", None, 1)])
    # The read after the first atomic fault took the atomic path too.
    assert [e.kind for e in p.pagemap(a, 2)] == ["device_exclusive", "device_exclusive"]
    assert vmm(cli).lookup(a + PAGE).word & A
    p.write(a, b"x")  # the CPU takes its page back: an EXCLUSIVE invalidation
    assert p.pagemap(a, 1)[0].kind == "anon"
    assert vmm(cli).lookup(a) is None


def test_whole_mm_notifier_refuses_non_blockable_invalidations(machine):
    _, p, cli, chan = client(machine)
    a = p.mmap(PAGE, RW, ANON)
    chan.access(a, "read")
    rng = NotifierRange(p.mm, a, a + PAGE, MMU_NOTIFY_CLEAR, None, blockable=False)
    with pytest.raises(Again):
        invalidate_range_start_nonblock(rng)
    assert vmm(cli).lookup(a) is not None  # nothing was claimed


def test_invalidation_straddling_the_unmanaged_hole_is_cleared_in_two_calls(machine):
    p_hint = 0x7000_0000_0000
    _drm, p, cli, chan = client(machine, hole=(p_hint + 4 * PAGE, 4 * PAGE))
    a = p.mmap(16 * PAGE, RW, ANON | MAP_FIXED, addr=p_hint)
    for i in (0, 1, 10, 11):
        chan.access(a + i * PAGE, "read")
    calls = vmm(cli).pfnclr_calls
    p.munmap(a, 16 * PAGE)
    # [start, hole end) then [hole end, end): the first call includes the hole.
    assert vmm(cli).pfnclr_calls - calls == 2
    assert len(vmm(cli)) == 0


def test_no_dma_mapping_outlives_the_gpu_entries(machine):
    drm, p, _cli, chan = client(machine)
    a = p.mmap(8 * PAGE, RW, ANON)
    chan.run([(a + i * PAGE, "write", b"x", 1) for i in range(8)])
    assert drm.dma.nr_live == 8
    p.munmap(a, 8 * PAGE)
    assert drm.dma.nr_live == 0 and machine_violations(machine) == []


def test_cpu_fault_on_vram_migrates_exactly_one_page_back(machine):
    _drm, p, cli, _chan = client(machine)
    a = p.mmap(4 * PAGE, RW, ANON)
    p.write(a, b"".join(bytes([i + 1]) * PAGE for i in range(4)))
    cli.ioctl(DRM_NOUVEAU_SVM_BIND, DrmNouveauSvmBind(MIGRATE_TO_VRAM, a, a + 4 * PAGE))
    assert p.read(a + 2 * PAGE, 1) == b"\x03"
    assert [e.kind for e in p.pagemap(a, 4)] == [
        "device_private",
        "device_private",
        "anon",
        "device_private",
    ]
    assert vmm(cli).lookup(a + 2 * PAGE) is None  # PFNCLR before the copy
    assert cli.stats.migrations_to_system == 1


def test_remove_evicts_every_chunk_and_leaves_no_mapping(machine):
    drm, p, cli, _chan = client(machine)
    a = p.mmap(4 * PAGE, RW, ANON)
    p.write(a, b"keep")
    cli.ioctl(DRM_NOUVEAU_SVM_BIND, DrmNouveauSvmBind(MIGRATE_TO_VRAM, a, a + 4 * PAGE))
    drm.remove()
    assert [e.kind for e in p.pagemap(a, 4)] == ["anon"] * 4
    assert p.read(a, 4) == b"keep"
    assert drm.dmem.chunks == [] and drm.dma.nr_live == 0


# ----- eras ------------------------------------------------------------------------------------


def test_unknown_era_is_einval(machine):
    with pytest.raises(InvalidArgument, match="era"):
        machine.probe("nouveau", era="5.6")


def test_v58_window_spans_first_to_last_fault_with_gaps_padded(machine):
    drm, p, cli, chan = client(machine, era="5.8")
    a = p.mmap(16 * PAGE, RW, ANON)
    reads = [(a, "read", None, 1), (a + 2 * PAGE, "read", None, 1)]
    chan.run([*reads, (a + 5 * PAGE, "write", b"5", 1)])
    # One hmm_range_fault over [a, a + 6 pages): the gaps asked nothing, but the
    # page table was missing, so the whole span was faulted with the ORed need
    # (a write), and every entry came back valid and was mapped 4 KiB.
    assert [e.kind for e in p.pagemap(a, 8)] == ["anon"] * 6 + ["none"] * 2
    ptes = [vmm(cli).lookup(a + i * PAGE) for i in range(8)]
    assert [pte is not None for pte in ptes] == [True] * 6 + [False] * 2
    assert all(pte.shift == 12 and pte.word & W for pte in ptes[:6])
    assert drm.svm.batches == 1 and drm.svm.replays == 1
    assert p.read(a + 5 * PAGE, 1) == b"5"


def test_v58_prefetch_of_a_missing_page_is_cancelled_but_v57_faults_it_in(machine):
    _drm, p, _cli, chan = client(machine, era="5.8")
    a = p.mmap(PAGE, RW, ANON)
    with pytest.raises(ChannelKilled):
        chan.access(a, "prefetch")
    assert not p.pagemap(a, 1)[0].present
    _drm7, p7, _cli7, chan7 = client(machine, era="5.7")
    b = p7.mmap(PAGE, RW, ANON)
    chan7.access(b, "prefetch")
    assert p7.pagemap(b, 1)[0].present and not chan7.killed


def test_v57_hmm_writes_pfnmap_words_through_the_drivers_tables(machine):
    _drm, p, _cli, _chan = client(machine, era="5.7")
    a = p.mmap(4 * PAGE, RW, ANON)
    p.write(a, b"x")
    p.mprotect(a + 3 * PAGE, PAGE, PROT_NONE)
    sub = mmu_interval_notifier_insert(
        p.mm, a, 4 * PAGE, type("O", (), {"invalidate": lambda self, s, r, c: True})()
    )
    pfns = np.array([V | W, 0, 0, 0], dtype=np.uint64)
    rng = HmmRangeV57(
        sub, a, a + 4 * PAGE, pfns, PFN_FLAGS_V57, PFN_VALUES_V57, 12, pfn_flags_mask=(1 << 64) - 1
    )
    rng.notifier_seq = mmu_interval_read_begin(sub)
    with p.mm.mmap_lock.read():
        hmm_range_fault_v57(rng)
    pfn = p.pagemap(a, 1)[0].pfn
    assert int(pfns[0]) == (pfn << 12) | V | W
    assert int(pfns[1]) == 0  # NONE: not present, nothing asked
    assert int(pfns[3]) == PFN_VALUES_V57[0]  # ERROR: PROT_NONE


def test_eras_declare_what_they_had_and_their_expected_failures(machine):
    drv = find_driver(get_plugin_manager(), "nouveau")()
    assert Capability.EXCLUSIVE in drv.capabilities_for()
    assert Capability.EXCLUSIVE not in drv.capabilities_for(era="5.8")
    assert Capability.HUGE_MAPPINGS not in drv.capabilities_for(era="5.7")
    assert drv.capabilities_for(family="volta") == Capability.NONE
    assert "races/read_vs_mprotect" in drv.expected_failures(era="5.8")
    assert "races/read_vs_mprotect" not in drv.expected_failures()


def test_a_pfnmap_that_fails_half_way_still_unmaps_what_it_replaced(machine):
    drm, p, cli, chan = client(machine)
    a = p.mmap(PAGE, RW, ANON)
    chan.access(a, "read")
    assert drm.dma.nr_live == 1
    flushes = vmm(cli).tlb_flushes
    with pytest.raises(InvalidArgument):  # a word for a pfn outside memory
        vmm(cli).pfnmap(a, 12, [((1 << 40) << 12) | V])
    assert vmm(cli).lookup(a) is None
    assert vmm(cli).tlb_flushes == flushes + 1 and drm.dma.nr_live == 0


def test_v58_atomic_is_serviced_as_a_write(machine):
    _drm, p, cli, chan = client(machine, era="5.8")
    a = p.mmap(PAGE, RW, ANON)
    p.write(a, b"a")
    chan.access(a, "atomic")
    pte = vmm(cli).lookup(a)
    assert pte.word & W and not pte.word & A
    assert p.pagemap(a, 1)[0].kind == "anon"  # no device-exclusive entry before v5.14


def test_gpu_store_into_a_clean_writable_shmem_page_survives_reclaim(machine):
    from hmmsim import MADV_PAGEOUT, MAP_ANONYMOUS, MAP_SHARED

    _drm, p, _cli, chan = client(machine)
    a = p.mmap(PAGE, RW, MAP_SHARED | MAP_ANONYMOUS)
    assert p.read(a, 1) == b"\x00"  # a read fault: writable, clean
    chan.access(a, "write", b"G", 1)  # already writable: no write fault dirties it
    p.madvise(a, PAGE, MADV_PAGEOUT)
    assert p.read(a, 1) == b"G"


# ----- the PCI function ---------------------------------------------------------------------


def test_probe_with_a_pci_function_maps_host_pages_through_that_functions_iommu(machine):
    from hmmsim.pci import pci_topology

    topo = pci_topology(machine)
    rp = topo.add_root_port(topo.add_host_bridge(0x8086, 0x2030))
    gpu_fn = topo.add_endpoint(rp, "gk104", vendor=0x10DE, bars={1: 256 << 20})
    assert gpu_fn.dma is not None and gpu_fn.dma.domain is not None
    drm = machine.probe("nouveau", pci=gpu_fn)
    assert drm.pci is gpu_fn and drm.dma is gpu_fn.dma
    p = machine.spawn()
    cli = drm.open_file(p)
    cli.ioctl(DRM_NOUVEAU_SVM_INIT, DrmNouveauSvmInit(0, 0))
    chan = cli.channel_new()
    a = p.mmap(PAGE, RW, ANON)
    p.write(a, b"pci")
    assert chan.access(a, "read", length=3) == b"pci"
    assert gpu_fn.dma.nr_live == 1 and gpu_fn.dma.domain.ptes == 1
    with pytest.raises(InvalidArgument, match=r"hmmsim\.pci function"):
        machine.probe("nouveau", pci="0000:01:00.0")
    cli.close()
    assert gpu_fn.dma.nr_live == 0 and machine_violations(machine) == []
