"""A device file's ``mmap`` that fails undoes what it had installed (``unmap_region``).

``FileOperations.mmap`` may install pages itself (``vm_insert_page``) before
it refuses; Linux then zaps the new VMA's range before returning the error,
so no page table entry is left without a VMA and no page reference leaks.
"""

from __future__ import annotations

import pytest
from hmmsim import (
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    PROT_READ,
    PROT_WRITE,
    InvalidArgument,
    Machine,
    MachineConfig,
)
from hmmsim.mm.pfnmap import vm_insert_page
from hmmsim.testing.invariants import check_no_leaks

PAGE = 4096


class InsertsThenRefuses:
    """``f_op->mmap`` that installs its first page, then fails."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.page = -1

    def mmap(self, vma):  # type: ignore[no-untyped-def]
        phys = self.machine.phys
        self.page = phys.alloc_one(0)
        vm_insert_page(vma, vma.start, self.page)
        phys.put_one(self.page)  # the mapping holds it now
        raise InvalidArgument("refused after inserting one page")


def test_failed_device_mmap_leaves_no_pte_and_no_page_behind():
    m = Machine(MachineConfig(ram_bytes=32 << 20))
    p = m.spawn()
    f = InsertsThenRefuses(m)
    hole = p.mmap(2 * PAGE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS)  # where it will go
    p.munmap(hole, 2 * PAGE)
    with pytest.raises(InvalidArgument, match="refused after inserting"):
        p.mmap(2 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, file=f)
    assert p.mm.find_vma(hole) is None or p.mm.find_vma(hole).start >= hole + 2 * PAGE
    assert [e.present for e in p.pagemap(hole, 2)] == [False, False]
    assert int(m.phys.refcount[f.page]) == 0  # the page went back
    p.exit()
    check_no_leaks(m)
