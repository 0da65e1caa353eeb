"""MADV_COLLAPSE and mremap corner cases, each checked against Linux 6.18 on the host.

Found by running random mmap/madvise/munmap/mremap sequences over THP-sized
regions on the host and on the model and comparing return codes, pagemap
and data.
"""

from __future__ import annotations

import errno

import hmmsim
import pytest
from hmmsim.errors import HmmsimError

M = 1 << 20
H = 2 * M
RW = hmmsim.PROT_READ | hmmsim.PROT_WRITE
ANON_FIXED = hmmsim.MAP_PRIVATE | hmmsim.MAP_ANONYMOUS | hmmsim.MAP_FIXED
BASE = 0x100000000000


def _setup(vmas, fill=True):
    m = hmmsim.Machine(hmmsim.MachineConfig(ram_bytes=64 << 20, thp="madvise"))
    p = m.spawn()
    for off, length, prot in vmas:
        assert p.mmap(length, prot, ANON_FIXED, addr=BASE + off) == BASE + off
        if fill and prot & hmmsim.PROT_WRITE:
            p.write(BASE + off, b"\x07" * length)
    return p


def _errno(f, *args) -> int:
    try:
        f(*args)
    except HmmsimError as exc:
        return -exc.errno
    return 0


@pytest.mark.parametrize(
    ("vmas", "start", "length", "want"),
    [
        ([(0, 12288, RW)], 0, H, -errno.EINVAL),  # no aligned PMD fits the VMA
        ([(0, M, RW), (H, H, RW)], 0, 2 * H, -errno.EINVAL),  # first VMA too small: stop
        ([(M, 4 * M, RW)], 4 * M, H, -errno.ENOMEM),  # VMA could hold a THP; then a hole
        ([(0, H, RW)], 0, 2 * H, -errno.ENOMEM),
        ([(0, 3 * M, RW)], H, H, -errno.ENOMEM),
        ([(0, 2 * H, RW)], 0, H, 0),
    ],
)
def test_madv_collapse_on_a_vma_too_small_for_a_pmd_is_einval(vmas, start, length, want):
    p = _setup(vmas)
    assert _errno(p.madvise, BASE + start, length, hmmsim.MADV_COLLAPSE) == want


def test_mremap_fixed_move_may_span_a_vma_and_the_hole_after_it():
    """Linux 6.17+: an MREMAP_MAYMOVE|MREMAP_FIXED move of unchanged length may span
    several VMAs and gaps (only a gap at the start is -EFAULT)."""
    p = _setup([(0, M // 2, RW)])
    flags = hmmsim.MREMAP_MAYMOVE | hmmsim.MREMAP_FIXED
    target = BASE + 64 * M
    assert p.mremap(BASE, M, M, flags, new_addr=target) == target
    assert p.read(target, M // 2) == b"\x07" * (M // 2)
    assert p.mm.find_vma(BASE) is None or p.mm.find_vma(BASE).start >= target


def _chunk_state(p, addr):
    e = p.pagemap(addr, 1)[0]
    if not e.present:
        return "none"
    return "thp" if e.order == 9 and e.kind == "anon" else e.kind + str(e.order)


def _touch(p, how):
    if how == "write":
        p.write(BASE, b"\x01")
    elif how == "read":
        p.read(BASE, 1)


@pytest.mark.parametrize(
    ("advice", "touch", "want", "state"),
    [
        (hmmsim.MADV_HUGEPAGE, "read", 0, "zero9"),  # the huge zero PMD counts as done
        (None, "read", -errno.EINVAL, "zero0"),  # a 4 KiB zero page: no anon_vma yet
        (hmmsim.MADV_HUGEPAGE, None, -errno.EINVAL, "none"),  # never touched: no anon_vma
        (None, "write", 0, "thp"),
    ],
)
def test_madv_collapse_needs_an_anon_vma_and_keeps_the_huge_zero_page(advice, touch, want, state):
    p = _setup([(0, 2 * H, RW)], fill=False)
    if advice is not None:
        p.madvise(BASE, 2 * H, advice)
    _touch(p, touch)
    assert _errno(p.madvise, BASE, H, hmmsim.MADV_COLLAPSE) == want
    assert _chunk_state(p, BASE) == state


@pytest.mark.parametrize(
    ("populate", "want", "states"),
    [
        ("second", -errno.EINVAL, ("none", "anon0")),  # stops at the empty first chunk
        ("first", -errno.EINVAL, ("thp", "none")),  # the first is done before the stop
        ("one page each", 0, ("thp", "thp")),
        ("first emptied", -errno.EINVAL, ("none", "anon0")),  # a PTE table of nothing
    ],
)
def test_madv_collapse_stops_at_a_chunk_without_any_page(populate, want, states):
    p = _setup([(0, 2 * H, RW)], fill=False)
    p.madvise(BASE, 2 * H, hmmsim.MADV_NOHUGEPAGE)  # 4 KiB faults until the collapse
    if populate == "second":
        p.write(BASE + H, b"\x01" * H)
    elif populate == "first":
        p.write(BASE, b"\x01" * H)
    elif populate == "one page each":
        p.write(BASE + 8192, b"\x01")
        p.write(BASE + H + 8192, b"\x01")
    else:
        p.write(BASE, b"\x01" * 2 * H)
        p.madvise(BASE, H, hmmsim.MADV_DONTNEED)
    p.madvise(BASE, 2 * H, hmmsim.MADV_HUGEPAGE)  # clears VM_NOHUGEPAGE for the collapse
    assert _errno(p.madvise, BASE, 2 * H, hmmsim.MADV_COLLAPSE) == want
    assert (_chunk_state(p, BASE), _chunk_state(p, BASE + H)) == states


def _write_fault_maps_a_thp(p, addr) -> bool:
    p.write(addr, b"\x01")
    e = p.pagemap(addr, 1)[0]
    return e.kind == "anon" and e.order == 9


def test_mmap_fixed_over_a_mapping_frees_its_page_tables_so_a_thp_can_fault_in():
    """MAP_FIXED unmaps the old mapping with its page tables (free_pgtables), so
    the new MADV_HUGEPAGE mapping takes a THP at the first write, as on the host."""
    p = _setup([(0, 2 * H, RW)])  # 4 KiB pages (no MADV_HUGEPAGE): a PTE table per PMD
    assert p.mmap(2 * H, RW, ANON_FIXED, addr=BASE) == BASE
    p.madvise(BASE, 2 * H, hmmsim.MADV_HUGEPAGE)
    assert _write_fault_maps_a_thp(p, BASE + H)


def test_mremap_fixed_over_a_mapping_frees_its_page_tables_so_a_thp_can_fault_in():
    """The mapping an MREMAP_FIXED move replaces goes with its page tables: the
    moved, empty MADV_HUGEPAGE mapping then takes a THP at the first write."""
    p = _setup([(0, 2 * H, RW)])
    assert p.mmap(2 * H, RW, ANON_FIXED, addr=BASE + 8 * H) == BASE + 8 * H  # untouched
    p.madvise(BASE + 8 * H, 2 * H, hmmsim.MADV_HUGEPAGE)
    flags = hmmsim.MREMAP_MAYMOVE | hmmsim.MREMAP_FIXED
    assert p.mremap(BASE + 8 * H, 2 * H, 2 * H, flags, new_addr=BASE) == BASE
    assert _write_fault_maps_a_thp(p, BASE + H)
