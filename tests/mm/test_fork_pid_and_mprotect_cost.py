"""A failed fork consumes no pid; mprotect's cost follows the page tables.

Linux's ``copy_process`` calls ``alloc_pid`` after ``copy_mm``, so a fork
that fails copying the address space leaves the pid counter where it was.
``change_protection`` skips empty PMDs: a huge, sparsely populated VMA costs
what is populated.
"""

from __future__ import annotations

import hmmsim
import pytest
from helpers import ANON, PAGE, RW
from hmmsim import MAP_NORESERVE, MAP_POPULATE, PROT_READ
from hmmsim.gup import FOLL_WRITE, pin_user_pages, unpin_user_page
from hmmsim.mm.debug import verify_machine
from hmmsim.mm.pagetable import PageTable


def test_failed_fork_consumes_no_pid(make_machine) -> None:
    m = make_machine()
    p = m.spawn()
    a = p.mmap(4 * PAGE, RW, ANON | MAP_POPULATE)
    with p.mm.mmap_lock.read():
        pfn = pin_user_pages(p.mm, a, 1, FOLL_WRITE)[0]
    hog = m.phys.alloc(0, m.phys.allocator.nr_free)  # no frame for the pinned copy
    procs = list(m.processes)
    with pytest.raises(hmmsim.OutOfMemory):
        p.fork()
    assert m.processes == procs
    m.phys.put(hog)
    child = p.fork()
    assert child.pid == p.pid + 1
    assert child in m.processes
    unpin_user_page(m, pfn)
    verify_machine(m)


def test_mprotect_of_a_sparse_huge_vma_walks_only_populated_tables(
    make_machine, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = make_machine()
    p = m.spawn()
    size = 1 << 40  # 1 TiB, two pages touched 512 GiB apart
    a = p.mmap(size, RW, ANON | MAP_NORESERVE)
    p.write(a, b"x")
    p.write(a + size // 2, b"y")
    walked: list[int] = []
    real = PageTable.walk

    def counting(self, vpn, npages, *, per_page=True):
        if per_page:
            walked.append(npages)
        return real(self, vpn, npages, per_page=per_page)

    monkeypatch.setattr(PageTable, "walk", counting)
    p.mprotect(a, size, PROT_READ)
    assert sum(walked) <= 2 * 512
    monkeypatch.undo()
    assert p.read(a, 1) == b"x" and p.read(a + size // 2, 1) == b"y"
    assert not p.pagemap(a, 1)[0].writable
    with pytest.raises(hmmsim.SegmentationFault):
        p.write(a, b"z")
