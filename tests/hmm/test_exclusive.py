"""make_device_exclusive (hmm-core.md §3.6)."""

from __future__ import annotations

import hmmsim
import pytest
from helpers import ANON, MB2, PAGE, RW, EventLog
from hmmsim.exclusive import make_device_exclusive
from hmmsim.mm.debug import verify_machine


def _exclusive(p, a, owner):
    with p.mm.mmap_lock.read():
        return make_device_exclusive(p.mm, a + 5, owner)  # addr is aligned down


def test_exclusive_entry_events_both_ways_and_data(machine, proc):
    log = EventLog(machine)
    a = proc.mmap(2 * PAGE, RW, ANON)
    proc.write(a, b"atomic")
    pfn = proc.pagemap(a, 1)[0].pfn
    owner = object()
    log.clear()
    page, head = _exclusive(proc, a, owner)
    assert page == head == pfn
    assert machine.phys.folio_locked(head)
    assert machine.phys.extra_refs[head] == 1  # locked and referenced for the caller
    assert [(e.event, e.start, e.end, e.owner) for e in log.events] == [
        ("EXCLUSIVE", a, a + PAGE, owner)
    ]
    assert proc.pagemap(a, 1)[0].kind == "device_exclusive"
    machine.phys.folio_unlock(head)
    machine.phys.put_page(head)
    log.clear()
    assert proc.read(a, 6) == b"atomic"  # the CPU takes it back
    assert [(e.event, e.owner) for e in log.events] == [("EXCLUSIVE", None)]
    e = proc.pagemap(a, 1)[0]
    assert e.kind == "anon" and e.writable and e.pfn == pfn
    verify_machine(machine)


def test_exclusive_breaks_cow_first(machine, proc):
    a = proc.mmap(PAGE, RW, ANON)
    proc.write(a, b"cow")
    child = proc.fork()
    shared = proc.pagemap(a, 1)[0].pfn
    page, head = _exclusive(proc, a, "dev")
    assert page == head != shared  # a private copy was made for the parent
    assert child.pagemap(a, 1)[0].pfn == shared
    machine.phys.folio_unlock(head)
    machine.phys.put_page(head)
    assert child.read(a, 3) == b"cow" and proc.read(a, 3) == b"cow"
    verify_machine(machine)


def test_exclusive_splits_a_thp_mapping(make_machine):
    m = make_machine(thp="always")
    p = m.spawn()
    a = p.mmap(MB2, RW, ANON | hmmsim.MAP_POPULATE)
    page, folio = _exclusive(p, a + 3 * PAGE, "dev")
    e = p.pagemap(a + 3 * PAGE, 1)[0]
    assert e.kind == "device_exclusive" and p.pagemap(a, 1)[0].order == 0
    assert e.pfn == page == folio + 3 and m.phys.order[folio] == 9  # the PTE-mapped THP's page 3
    m.phys.folio_unlock(folio)
    m.phys.put_page(folio)
    verify_machine(m)


def test_exclusive_refuses_file_and_hugetlb_pages(make_machine):
    m = make_machine(hugetlb_pages={2 << 20: 1})
    p = m.spawn()
    f = m.create_file(PAGE)
    a = p.mmap(PAGE, RW, hmmsim.MAP_SHARED, file=f)
    with pytest.raises(hmmsim.NotSupported):
        _exclusive(p, a, "dev")
    b = p.mmap(MB2, RW, ANON | hmmsim.MAP_HUGETLB)
    with pytest.raises(hmmsim.NotSupported):
        _exclusive(p, b, "dev")
    verify_machine(m)


def test_exclusive_on_unmapped_address_is_efault(proc):
    with proc.mm.mmap_lock.read(), pytest.raises(hmmsim.BadAddress):
        make_device_exclusive(proc.mm, 0x10000, "dev")


def test_fork_restores_device_exclusive_entries(machine, proc):
    a = proc.mmap(PAGE, RW, ANON)
    proc.write(a, b"fork")
    _page, head = _exclusive(proc, a, "dev")
    machine.phys.folio_unlock(head)
    machine.phys.put_page(head)
    child = proc.fork()
    assert proc.pagemap(a, 1)[0].kind == "anon"
    assert child.pagemap(a, 1)[0].pfn == head
    assert child.read(a, 4) == b"fork"
    verify_machine(machine)
