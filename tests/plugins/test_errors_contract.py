"""Bad input is a typed errno error; a broken kernel contract is ``KernelBug``.

The kernel answers bad syscall and HMM arguments with an errno; it answers
misuse of an in-kernel contract (a put without a get, a lock not held) with
BUG/WARN. These tests pin both halves of that split.
"""

from __future__ import annotations

import errno

import numpy as np
import pytest
from helpers import ANON, PAGE, RW
from hmmsim import (
    BadAddress,
    InvalidArgument,
    KernelBug,
    Machine,
    MachineConfig,
    Overflow,
    mmu_interval_notifier_insert,
    mmu_interval_read_begin,
    mmu_interval_set_seq,
)
from hmmsim.driver import check_user_pages, check_user_range
from hmmsim.gup import FOLL_WRITE, pin_user_pages, unpin_user_page
from hmmsim.hmm import HMM_PFN_REQ_FAULT, HmmRange, hmm_range_fault
from hmmsim.sched import Mutex


class Ops:
    def invalidate(self, sub, rng, cur_seq):  # type: ignore[no-untyped-def]
        mmu_interval_set_seq(sub, cur_seq)
        return True


@pytest.fixture
def machine() -> Machine:
    return Machine(MachineConfig(ram_bytes=32 << 20))


@pytest.mark.parametrize("length", [0, -PAGE, -1, 1 << 64])
def test_notifier_with_empty_negative_or_wrapping_length_is_eoverflow(machine, length):
    p = machine.spawn()
    a = p.mmap(PAGE, RW, ANON)
    with pytest.raises(Overflow) as info:
        mmu_interval_notifier_insert(p.mm, a, length, Ops())
    assert info.value.errno == errno.EOVERFLOW
    # Nothing was half-inserted: the tree is empty and invalidations still work.
    subs = p.mm.notifier_subscriptions
    assert subs is None or list(subs.itree) == []
    p.munmap(a, PAGE)


def test_notifier_reaching_the_last_address_is_accepted(machine):
    p = machine.spawn()
    sub = mmu_interval_notifier_insert(p.mm, (1 << 64) - PAGE, PAGE, Ops())
    assert sub.last == (1 << 64) - 1


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("ram_bytes", -1, "below the minimum"),
        ("ram_bytes", 1 << 20, "below the minimum"),
        ("ram_bytes", "1G", "must be an int"),
        ("ram_bytes", (17 << 20) + 5, "multiple of the page size"),
        ("ram_bytes", True, "must be an int"),
        ("swap_bytes", -PAGE, "below the minimum"),
        ("swap_bytes", 1.5, "must be an int"),
        ("store_data", "yes", "must be a bool"),
        ("thp_use_zero_page", 1, "must be a bool"),
        ("thp", "sometimes", "always, madvise or never"),
        ("hugetlb_pages", [(2 << 20, 1)], "must be a dict"),
        ("hugetlb_pages", {2 << 20: "4"}, "not an int"),
        ("hugetlb_pages", {3 << 20: 1}, "not 2 MiB or 1 GiB"),
    ],
)
def test_machine_config_rejects_bad_sizes_and_types_with_einval(field, value, match):
    with pytest.raises(InvalidArgument, match=match) as info:
        MachineConfig(**{field: value})
    assert info.value.errno == errno.EINVAL


def test_hmm_range_fault_refuses_a_read_only_pfn_array(machine):
    p = machine.spawn()
    a = p.mmap(4 * PAGE, RW, ANON)
    sub = mmu_interval_notifier_insert(p.mm, a, 4 * PAGE, Ops())
    pfns = np.zeros(4, np.uint64)
    pfns.flags.writeable = False
    rng = HmmRange(sub, a, a + 4 * PAGE, pfns, default_flags=HMM_PFN_REQ_FAULT)
    rng.notifier_seq = mmu_interval_read_begin(sub)
    with p.mm.mmap_lock.read(), pytest.raises(InvalidArgument, match="read-only"):
        hmm_range_fault(rng)
    # Nothing was faulted in for a call that was refused.
    assert not any(e.present for e in p.pagemap(a, 4))


def test_hmm_range_fault_without_mmap_lock_is_a_kernel_bug(machine):
    p = machine.spawn()
    a = p.mmap(PAGE, RW, ANON)
    sub = mmu_interval_notifier_insert(p.mm, a, PAGE, Ops())
    rng = HmmRange(sub, a, a + PAGE, np.zeros(1, np.uint64), default_flags=HMM_PFN_REQ_FAULT)
    rng.notifier_seq = mmu_interval_read_begin(sub)
    with pytest.raises(KernelBug, match="mmap_lock"):
        hmm_range_fault(rng)


def test_move_pages_with_a_count_past_task_size_is_efault(machine):
    p = machine.spawn()
    a = p.mmap(PAGE, RW, ANON)
    with pytest.raises(BadAddress, match="TASK_SIZE"):
        p.move_pages(a, 1 << 60)


@pytest.mark.parametrize("pfn", [-1, 1 << 40])
def test_put_page_and_unpin_of_a_pfn_outside_memory_are_einval(machine, pfn):
    with pytest.raises(InvalidArgument, match="not a frame"):
        machine.phys.put_page(pfn)
    with pytest.raises(InvalidArgument, match="not a frame"):
        machine.phys.get_page(pfn)
    with pytest.raises(InvalidArgument, match="not a frame"):
        unpin_user_page(machine, pfn)


def test_put_page_without_get_page_is_a_kernel_bug(machine):
    p = machine.spawn()
    a = p.mmap(PAGE, RW, ANON)
    p.write(a, b"x")
    pfn = p.pagemap(a, 1)[0].pfn
    with pytest.raises(KernelBug, match="without a matching get_page"):
        machine.phys.put_page(pfn)
    assert p.read(a, 1) == b"x"


def test_unpin_of_an_unpinned_page_is_einval_and_pins_balance(machine):
    p = machine.spawn()
    a = p.mmap(PAGE, RW, ANON)
    with p.mm.mmap_lock.read():
        pfns = pin_user_pages(p.mm, a, 1, FOLL_WRITE)
    unpin_user_page(machine, pfns[0])
    with pytest.raises(InvalidArgument, match="not pinned"):
        unpin_user_page(machine, pfns[0])


def test_set_seq_with_an_even_value_is_a_kernel_bug(machine):
    p = machine.spawn()
    sub = mmu_interval_notifier_insert(p.mm, 0x10000, PAGE, Ops())
    with pytest.raises(KernelBug):
        mmu_interval_set_seq(sub, 2)
    assert isinstance(KernelBug("x"), AssertionError)


def test_releasing_a_mutex_nobody_holds_is_a_kernel_bug():
    with pytest.raises(KernelBug, match="unlocked mutex"):
        Mutex("driver").release()


@pytest.mark.parametrize(
    ("addr", "length", "exc"),
    [
        (0x1000, -1, InvalidArgument),
        (-0x1000, 0x1000, InvalidArgument),
        (0x1000, 1 << 62, BadAddress),
        (0x1000, 1.0, InvalidArgument),
    ],
)
def test_check_user_range_types_every_bad_range(addr, length, exc):
    with pytest.raises(exc):
        check_user_range(addr, length, "read")


def test_check_user_pages_rejects_negative_counts_and_unaligned_addresses():
    with pytest.raises(InvalidArgument, match="page count"):
        check_user_pages(0x1000, -1, "migrate_to_device")
    with pytest.raises(InvalidArgument, match="aligned"):
        check_user_pages(0x1001, 1, "migrate_to_device")
    with pytest.raises(BadAddress):
        check_user_pages(0x1000, 1 << 60, "migrate_to_device")
    check_user_pages(0x1000, 0, "migrate_to_device")


@pytest.mark.parametrize(
    ("call", "exc"),
    [
        (lambda m, a: m.read(a, -1), InvalidArgument),
        (lambda m, a: m.read(a, 1 << 62), BadAddress),
        (lambda m, a: m.write(-PAGE, b"x"), InvalidArgument),
        (lambda m, a: m.device_ptes(a, -5), InvalidArgument),
        (lambda m, a: m.device_ptes(a, 1 << 60), BadAddress),
        (lambda m, a: m.migrate_to_device(a, -1), InvalidArgument),
        (lambda m, a: m.migrate_to_device(a, 1 << 60), BadAddress),
        (lambda m, a: m.migrate_to_system(a + 1, 1), InvalidArgument),
        (lambda m, a: m.make_exclusive(a, -1), InvalidArgument),
    ],
)
def test_mirror_methods_type_negative_huge_and_unaligned_arguments(machine, call, exc):
    p = machine.spawn()
    a = p.mmap(4 * PAGE, RW, ANON)
    p.write(a, b"keep")
    mirror = machine.probe("dmirror").open(p)
    with pytest.raises(exc):
        call(mirror, a)
    # Nothing was done: the page is the CPU's, with its data.
    assert p.pagemap(a, 1)[0].kind == "anon" and p.read(a, 4) == b"keep"
    mirror.close()
