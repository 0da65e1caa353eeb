"""dmirror behaviours that no hmm-tests.c test pins down, checked against lib/test_hmm.c:

* FAIL_ALLOC on the way back to RAM: spent by the first migrating page; for
  an order-0 page it is a failed allocation (VM_FAULT_OOM on a CPU fault,
  -ENOMEM from MIGRATE_TO_SYS);
* the snapshot's temporary notifier takes the mirror's mutex, and refuses a
  non-blockable invalidation when it cannot;
* SNAPSHOT copies each 32-page window out as it goes;
* the huge zero page is not the zero page for SNAPSHOT (``is_zero_pfn``).
"""

from __future__ import annotations

import errno

import hmmsim
import pytest
from hmmsim.drivers.dmirror import (
    HMM_DMIRROR_FLAG_FAIL_ALLOC,
    HMM_DMIRROR_FLAGS,
    HMM_DMIRROR_MIGRATE_TO_DEV,
    HMM_DMIRROR_MIGRATE_TO_SYS,
    HMM_DMIRROR_PROT_PMD,
    HMM_DMIRROR_PROT_READ,
    HMM_DMIRROR_PROT_WRITE,
    HMM_DMIRROR_SNAPSHOT,
)
from hmmsim.drivers.dmirror.mirror import FAULT_WINDOW, _SnapshotOps
from hmmsim.errors import Deadlock
from hmmsim.mm.debug import verify_machine
from hmmsim.notifier import (
    MmuNotifyEvent,
    NotifierRange,
    mmu_interval_notifier_insert,
    mmu_interval_notifier_remove,
)
from hmmtest import ANON, RW, H, HmmBuffer, P, dmirror_cmd, iota, new_buffer

ENOMEM, EFAULT = -errno.ENOMEM, -errno.EFAULT
NPAGES = 4


def on_device(hmm, buf: HmmBuffer, npages: int) -> HmmBuffer:
    """Fill ``buf`` with iota and migrate it to the device (order-0 pages)."""
    buf.fill(iota(npages * P // 4))
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf, npages) == 0
    assert buf.cpages == npages
    return buf


def device_kind(hmm) -> str:
    return "device_coherent" if hmm.coherent else "device_private"


def fail_alloc(hmm, buf: HmmBuffer) -> None:
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_FLAGS, buf, HMM_DMIRROR_FLAG_FAIL_ALLOC) == 0


def test_fail_alloc_on_cpu_fault_of_order0_page_is_oom_retried_by_the_fault_handler(hmm):
    """dmirror_devmem_fault returns VM_FAULT_OOM once (the flag is spent).
    Since 5.16 ``pagefault_out_of_memory`` does not OOM-kill: it warns that
    the error leaked out to the #PF handler and the fault is retried, which
    then moves the page back. The CPU's load sees its data."""
    if hmm.coherent:
        pytest.skip("the CPU reaches coherent memory without a fault")
    buf = on_device(hmm, new_buffer(hmm.proc, NPAGES), NPAGES)
    fail_alloc(hmm, buf)
    assert (buf.ints(1) == iota(1)).all()
    assert [w.where for w in hmm.machine.kernel_warnings] == ["pagefault_out_of_memory"]
    assert hmm.proc.pagemap(buf.ptr, 1)[0].kind == "anon"
    assert (buf.ints() == iota(NPAGES * P // 4)).all()
    verify_machine(hmm.machine)


def test_fail_alloc_on_migrate_to_sys_of_order0_pages_is_enomem(hmm):
    buf = on_device(hmm, new_buffer(hmm.proc, NPAGES), NPAGES)
    fail_alloc(hmm, buf)
    buf.cpages = -1
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_MIGRATE_TO_SYS, buf, NPAGES) == ENOMEM
    assert buf.cpages == -1  # counters are not copied back on failure
    assert [e.kind for e in hmm.proc.pagemap(buf.ptr, NPAGES)] == [device_kind(hmm)] * NPAGES
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_MIGRATE_TO_SYS, buf, NPAGES) == 0
    assert buf.cpages == NPAGES
    assert [e.kind for e in hmm.proc.pagemap(buf.ptr, NPAGES)] == ["anon"] * NPAGES
    assert (buf.ints() == iota(NPAGES * P // 4)).all()
    verify_machine(hmm.machine)


def test_fail_alloc_on_return_is_spent_by_the_first_migrating_page_not_the_first_window(hmm):
    """A first 512-page window with nothing on the device leaves the flag set;
    the THP-sized range of the second window then meets it: a private device
    THP comes back as base pages, a coherent device's order-0 page fails."""
    base = hmm.proc.mmap(3 * H, RW, ANON)
    ptr = (base + H - 1) & ~(H - 1)
    hmm.proc.madvise(ptr + H, H, hmmsim.MADV_HUGEPAGE)
    whole = HmmBuffer(hmm.proc, ptr, 2 * H, bytearray(2 * H))
    data = iota(2 * H // 4)
    whole.fill(data)
    second = HmmBuffer(hmm.proc, ptr + H, H, bytearray(H))
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_MIGRATE_TO_DEV, second, H // P) == 0
    fail_alloc(hmm, whole)
    ret = dmirror_cmd(hmm.fd, HMM_DMIRROR_MIGRATE_TO_SYS, whole, 2 * H // P)
    if hmm.coherent:
        assert ret == ENOMEM
        assert hmm.proc.pagemap(ptr + H, 1)[0].kind == "device_coherent"
        assert dmirror_cmd(hmm.fd, HMM_DMIRROR_MIGRATE_TO_SYS, whole, 2 * H // P) == 0
    else:
        assert ret == 0
        assert whole.cpages == H // P
        entries = hmm.proc.pagemap(ptr + H, H // P)
        assert {(e.kind, e.order) for e in entries} == {("anon", 0)}
    assert (whole.ints() == data).all()
    verify_machine(hmm.machine)


def _snapshot_notifier(hmm, buf: HmmBuffer):
    ops = _SnapshotOps(hmm.fd)
    sub = mmu_interval_notifier_insert(hmm.proc.mm, buf.ptr, buf.size, ops)
    return ops, sub


def _unmap_range(hmm, buf: HmmBuffer, blockable: bool) -> NotifierRange:
    return NotifierRange(
        hmm.proc.mm, buf.ptr, buf.ptr + buf.size, MmuNotifyEvent.UNMAP, None, blockable
    )


def test_snapshot_notifier_refuses_nonblockable_invalidation_while_mirror_is_locked(hmm):
    buf = new_buffer(hmm.proc, NPAGES)
    ops, sub = _snapshot_notifier(hmm, buf)
    try:
        seq = sub.invalidate_seq
        hmm.fd.mutex.holder = "another cpu"
        try:
            assert ops.invalidate(sub, _unmap_range(hmm, buf, blockable=False), seq | 7) is False
            assert sub.invalidate_seq == seq
        finally:
            hmm.fd.mutex.holder = None
        assert ops.invalidate(sub, _unmap_range(hmm, buf, blockable=False), seq | 7) is True
        assert sub.invalidate_seq == seq | 7
        assert not hmm.fd.mutex.held()
    finally:
        mmu_interval_notifier_remove(sub)


def test_snapshot_notifier_waits_for_mirror_lock_when_blockable(hmm):
    buf = new_buffer(hmm.proc, NPAGES)
    ops, sub = _snapshot_notifier(hmm, buf)
    try:
        seq = sub.invalidate_seq
        hmm.fd.mutex.holder = "another cpu"
        try:
            # With no other CPU to release it, waiting is a deadlock in the model.
            with pytest.raises(Deadlock):
                ops.invalidate(sub, _unmap_range(hmm, buf, blockable=True), seq | 7)
            assert sub.invalidate_seq == seq
        finally:
            hmm.fd.mutex.holder = None
        assert ops.invalidate(sub, _unmap_range(hmm, buf, blockable=True), seq | 7) is True
        assert sub.invalidate_seq == seq | 7
    finally:
        mmu_interval_notifier_remove(sub)


def test_snapshot_copies_out_window_by_window_before_a_short_buffer_faults(hmm):
    npages = 2 * FAULT_WINDOW
    buf = new_buffer(hmm.proc, npages)
    buf.fill(iota(npages * P // 4))
    short = FAULT_WINDOW + 8
    snap = HmmBuffer(hmm.proc, buf.ptr, buf.size, bytearray(b"\xee" * short))
    snap.cpages = -1
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_SNAPSHOT, snap, npages) == EFAULT
    assert snap.cpages == -1
    assert bytes(snap.mirror[:FAULT_WINDOW]) == bytes([HMM_DMIRROR_PROT_WRITE]) * FAULT_WINDOW
    assert bytes(snap.mirror[FAULT_WINDOW:]) == b"\xee" * 8


def test_snapshot_of_huge_zero_page_is_read_pmd_not_zero(hmm):
    base = hmm.proc.mmap(2 * H, hmmsim.PROT_READ, ANON)
    ptr = (base + H - 1) & ~(H - 1)
    hmm.proc.madvise(ptr, H, hmmsim.MADV_HUGEPAGE)
    hmm.proc.read(ptr, 4)
    e = hmm.proc.pagemap(ptr, 1)[0]
    assert (e.kind, e.order) == ("zero", 9)
    snap = HmmBuffer(hmm.proc, ptr, H, bytearray(H // P))
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_SNAPSHOT, snap, H // P) == 0
    assert snap.cpages == H // P
    assert set(snap.mirror) == {HMM_DMIRROR_PROT_READ | HMM_DMIRROR_PROT_PMD}


def test_migrate_to_sys_moves_only_device_pages_of_a_mixed_window_and_erases_their_entries(hmm):
    npages = 64
    buf = new_buffer(hmm.proc, npages)
    data = iota(npages * P // 4)
    buf.fill(data)
    for k in range(0, npages, 2):
        page = HmmBuffer(hmm.proc, buf.ptr + k * P, P, bytearray(P))
        assert dmirror_cmd(hmm.fd, HMM_DMIRROR_MIGRATE_TO_DEV, page, 1) == 0
    kinds = [e.kind for e in hmm.proc.pagemap(buf.ptr, npages)]
    assert kinds == [device_kind(hmm), "anon"] * (npages // 2)
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_MIGRATE_TO_SYS, buf, npages) == 0
    assert buf.cpages == npages // 2
    assert [e.kind for e in hmm.proc.pagemap(buf.ptr, npages)] == ["anon"] * npages
    assert hmm.fd.device_ptes(buf.ptr, npages) == [None] * npages
    assert (buf.ints() == data).all()
    verify_machine(hmm.machine)


def test_migrate_to_sys_out_of_memory_midway_moves_what_got_a_copy_and_keeps_the_rest(hmm):
    """RAM runs out after some pages of a window got their copy: -ENOMEM. The
    pages that got a copy move back with their metadata (pages and finalize
    always run), the rest stay on the device, every byte intact."""
    npages = 64
    buf = on_device(hmm, new_buffer(hmm.proc, npages), npages)
    phys = hmm.machine.phys
    hog = phys.alloc(0, phys.allocator.nr_free - 10)  # raw pages: no owner to account them
    try:
        assert dmirror_cmd(hmm.fd, HMM_DMIRROR_MIGRATE_TO_SYS, buf, npages) == ENOMEM
        kinds = [e.kind for e in hmm.proc.pagemap(buf.ptr, npages)]
        moved = kinds.count("anon")
        assert 0 < moved <= 10 and kinds == ["anon"] * moved + [device_kind(hmm)] * (npages - moved)
        assert phys.allocator.nr_free == 10 - moved
    finally:
        phys.put(hog)
    verify_machine(hmm.machine)
    assert dmirror_cmd(hmm.fd, HMM_DMIRROR_MIGRATE_TO_SYS, buf, npages) == 0
    assert buf.cpages == npages - moved
    assert [e.kind for e in hmm.proc.pagemap(buf.ptr, npages)] == ["anon"] * npages
    assert (buf.ints() == iota(npages * P // 4)).all()
    verify_machine(hmm.machine)
