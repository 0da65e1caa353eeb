"""dmirror's migrate_to_ram takes the size to migrate from the VmFault, never from
the CPU page table: a device THP the CPU maps with one PMD comes back whole, one
the CPU maps with PTEs comes back one page at a time."""

from __future__ import annotations

import hmmsim
from hmmsim import MAP_ANONYMOUS, MAP_PRIVATE, PROT_READ, PROT_WRITE
from hmmsim.drivers.dmirror import DmirrorDevice

PAGE = 4096
HUGE = 2 << 20


def _device_thp(monkeypatch):
    orders: list[int] = []
    real = DmirrorDevice.migrate_to_ram

    def spy(self, vmf):
        orders.append(vmf.order)
        return real(self, vmf)

    monkeypatch.setattr(DmirrorDevice, "migrate_to_ram", spy)
    m = hmmsim.Machine(hmmsim.MachineConfig(ram_bytes=64 << 20, thp="always"))
    p = m.spawn()
    fd = m.probe("dmirror").open(p)
    a = p.mmap(2 * HUGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
    base = (a + HUGE - 1) & ~(HUGE - 1)
    p.write(base, b"\x07" * HUGE)
    assert p.pagemap(base, 1)[0].order == 9
    assert fd.migrate_to_device(base, HUGE // PAGE) == HUGE // PAGE
    assert p.pagemap(base, 1)[0].kind == "device_private"
    return p, base, orders


def test_a_cpu_fault_on_a_pmd_mapped_device_thp_migrates_the_whole_thp(monkeypatch):
    p, base, orders = _device_thp(monkeypatch)
    assert p.read(base + 5 * PAGE, 1) == b"\x07"
    assert orders == [9]
    kinds = {e.kind for e in p.pagemap(base, HUGE // PAGE)}
    assert kinds == {"anon"}


def test_a_cpu_fault_on_a_pte_mapped_device_thp_migrates_one_page(monkeypatch):
    p, base, orders = _device_thp(monkeypatch)
    p.mprotect(base, PAGE, PROT_READ)  # splits the device-private PMD into PTEs
    assert p.read(base + 5 * PAGE, 1) == b"\x07"
    assert orders == [0]
    kinds = [e.kind for e in p.pagemap(base, 8)]
    assert kinds[5] == "anon" and kinds.count("device_private") == 7
