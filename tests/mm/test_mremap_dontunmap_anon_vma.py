"""MREMAP_DONTUNMAP of a whole VMA unlinks the anon_vma of the VMA left behind.

Checked on the Linux 6.18 host (differential seed 0): after the move, a read
of the old range maps the zero page without preparing an anon_vma, so fork
copies nothing of it; when only part of the VMA moved, the VMA keeps its
anon_vma and fork copies the zero-page PTE.
"""

from __future__ import annotations

import pytest
from helpers import ANON, PAGE, RW
from hmmsim import MAP_FIXED, MREMAP_DONTUNMAP, MREMAP_FIXED, MREMAP_MAYMOVE
from hmmsim.mm.debug import verify_machine

BASE = 0x4000_0000
MOVE = MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP


@pytest.mark.parametrize(("moved", "child_sees_it"), [(58, False), (50, True)])
def test_fork_after_dontunmap_copies_the_old_range_only_if_part_moved(
    proc, machine, moved, child_sees_it
) -> None:
    a = proc.mmap(58 * PAGE, RW, ANON | MAP_FIXED, addr=BASE)
    proc.write(a + 0x12000, b"\x01" * (2 * PAGE))
    new = BASE + 0x400000
    assert proc.mremap(a, moved * PAGE, moved * PAGE, MOVE, new) == new
    assert proc.read(a + 0xF000, 1) == b"\x00"  # the zero page, in the old range
    assert proc.pagemap(a + 0xF000, 1)[0].present
    child = proc.fork()
    assert child.pagemap(a + 0xF000, 1)[0].present is child_sees_it
    assert child.read(new + 0x12000, 1) == b"\x01"
    verify_machine(machine)
