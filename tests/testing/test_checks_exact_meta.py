"""The exactness checks (``hmmsim.testing.checks_exact``) fail on drivers broken
the way the mutants that survived ``hmmsim check --driver dmirror`` were.

Each broken driver is dmirror with one method changed, registered under its
own name through a test plugin; each test shows the check failing with the
rule it names, and passing on unmodified dmirror (the control). Every
installed driver passes the checks in ``hmmsim check``
(tests/test_conformance_suite.py runs the whole catalogue).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import attrs
import numpy as np
import pytest
from helpers import register_test_drivers
from hmmsim.drivers.dmirror import Dmirror, DmirrorDevice, DmirrorFile
from hmmsim.drivers.dmirror import device as dmirror_device
from hmmsim.drivers.dmirror import migrate as dmirror_migrate
from hmmsim.migrate import MIGRATE_PFN_MIGRATE, MIGRATE_PFN_VALID
from hmmsim.mm.pagetable import PAGE_SIZE
from hmmsim.testing import checks_exact as ce
from hmmsim.testing.checks import CHECKS, DriverSpec, check_id, installed_specs, run_check

PAGE = PAGE_SIZE
_U64 = np.uint64

# ----- the broken mirrors ---------------------------------------------------------------------


class StoreAtPageStartFile(DmirrorFile):
    """A sub-page device store lands at the start of its first page (the offset
    into the page is lost), as a driver that copies to the page, not the byte."""

    def _store(self, pfns: Any, off: int, data: memoryview) -> None:
        super()._store(pfns, 0, data)


class StoreMiddleShiftedFile(DmirrorFile):
    """A store with a head piece puts its whole middle pages one page too far:
    the surviving mutant ``_store`` ``k = 1 -> 2``."""

    def _store(self, pfns: Any, off: int, data: memoryview) -> None:
        head = min(len(data), PAGE - off) if off else 0
        full = (len(data) - head) // PAGE
        if not head or not full or len(pfns) < full + 2:
            super()._store(pfns, off, data)
            return
        phys = self.machine.phys
        phys.write(int(pfns[0]), off, data[:head])
        for j in range(full):
            body = data[head + j * PAGE : head + (j + 1) * PAGE]
            phys.write(int(pfns[2 + j]), 0, body)
        tail = data[head + full * PAGE :]
        if len(tail):
            phys.write(int(pfns[-1]), 0, tail)


class LoadFromPageStartFile(DmirrorFile):
    """A sub-page device load returns its bytes from the page's start."""

    def read(self, addr: int, length: int) -> bytes:
        return super().read(addr & ~(PAGE - 1), length)


class UnalignedSlotsFile(DmirrorFile):
    """``device_ptes`` of an unaligned address gives slot addresses off by the
    in-page offset (odp's ``device_ptes`` until this check)."""

    def device_ptes(self, addr: int, npages: int) -> list[Any]:
        ptes = super().device_ptes(addr, npages)
        return [
            None if p is None else attrs.evolve(p, addr=addr + i * PAGE) for i, p in enumerate(ptes)
        ]


class UncheckedRangeFile(DmirrorFile):
    """``device_ptes`` checks no range: the surviving mutant ``device_ptes``
    ``~(PAGE_SIZE - 1) -> (PAGE_SIZE - 1)`` (a range past TASK_SIZE is accepted)."""

    def device_ptes(self, addr: int, npages: int) -> list[Any]:
        if npages < 0 or addr < 0:
            return super().device_ptes(addr, npages)
        vpn = addr // PAGE
        out: list[Any] = []
        for i in range(npages):
            mapped = vpn + i in self.pt
            out.append(super().device_ptes((vpn + i) * PAGE, 1)[0] if mapped else None)
        return out


class StateEmptyTupleFile(DmirrorFile):
    """``device_pte_state`` walks an empty range once anything is mapped, so it
    returns ``()`` (not None) everywhere: the surviving mutant
    ``device_pte_state`` ``vpn + npages -> vpn - npages``."""

    def device_pte_state(self, addr: int, npages: int) -> Hashable | None:
        return None if not self.pt else ()


class StateNeverNoneOrChangesFile(DmirrorFile):
    """``device_pte_state`` says only whether the range maps anything: right about
    None, but the same fingerprint for different entries."""

    def device_pte_state(self, addr: int, npages: int) -> Hashable | None:
        vpn = addr // PAGE
        return "mapped" if any(v in self.pt for v in range(vpn, vpn + npages)) else None


class LoneDevicePageKeptFile(DmirrorFile):
    """``migrate_to_system`` leaves a device page behind when it is the only
    one migrating in its window: the surviving mutant
    ``_alloc_and_copy_to_ram_order0`` ``len(idx) == 0 -> == 1``."""

    @staticmethod
    def alloc_and_copy_to_ram(args: Any) -> bool | None:
        want = _U64(MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE)
        if int(((args.src[: args.npages] & want) == want).sum()) == 1:
            return True  # done nothing: dst stays 0, the page stays on the device
        return None


#: Devices whose eviction skips ``migrate_device_pages`` (see the fixture).
_SKIP_MIGRATE_PAGES: list[object] = []


class IdentityLostDevice(DmirrorDevice):
    """Eviction copies the bytes into new pages and finalizes, without
    ``migrate_device_pages``: the new pages never get the folio's anon
    identity (``PG_anon``, ``mapping``, dirty): the surviving mutant
    ``evict_chunk`` ``migrate_device_pages(...) -> pass``."""

    def evict_chunk(self, chunk: Any) -> None:
        _SKIP_MIGRATE_PAGES.append(self)
        try:
            super().evict_chunk(chunk)
        finally:
            _SKIP_MIGRATE_PAGES.pop()


# ----- their drivers --------------------------------------------------------------------------


def _driver(
    name: str,
    file_cls: type[DmirrorFile] = DmirrorFile,
    dev_cls: type[DmirrorDevice] = DmirrorDevice,
) -> type[Dmirror]:
    class Dev(dev_cls):  # type: ignore[valid-type,misc]
        def open(self, process: Any) -> DmirrorFile:
            return file_cls(self, process)

    class Drv(Dmirror):
        def probe(self, machine: Any, **params: Any) -> DmirrorDevice:
            return Dev(self, machine, str(params.get("memory", "private")))

    Drv.name = name
    Drv.__name__ = Drv.__qualname__ = name
    return Drv


BROKEN: list[type[Dmirror]] = [
    _driver("broken_store_at_page_start", StoreAtPageStartFile),
    _driver("broken_store_middle_shifted", StoreMiddleShiftedFile),
    _driver("broken_load_from_page_start", LoadFromPageStartFile),
    _driver("broken_unaligned_slots", UnalignedSlotsFile),
    _driver("broken_unchecked_range", UncheckedRangeFile),
    _driver("broken_state_empty_tuple", StateEmptyTupleFile),
    _driver("broken_state_never_changes", StateNeverNoneOrChangesFile),
    _driver("broken_eviction_identity", dev_cls=IdentityLostDevice),
    _driver("broken_lone_device_page_kept", LoneDevicePageKeptFile),
]


@pytest.fixture(autouse=True)
def broken_drivers(monkeypatch: pytest.MonkeyPatch) -> None:
    register_test_drivers(monkeypatch, list(BROKEN), "broken-exact-drivers")
    real_pages = dmirror_device.migrate_device_pages

    def pages(*args: Any) -> None:
        if not _SKIP_MIGRATE_PAGES:
            real_pages(*args)

    monkeypatch.setattr(dmirror_device, "migrate_device_pages", pages)
    # dmirror's migration steps are functions of its migrate module that take
    # the open file (as in test_hmm.c): the broken file bends one per file.
    real_to_ram = dmirror_migrate.alloc_and_copy_to_ram

    def to_ram(dmirror: Any, args: Any) -> bool:
        if isinstance(dmirror, LoneDevicePageKeptFile):
            done = LoneDevicePageKeptFile.alloc_and_copy_to_ram(args)
            if done is not None:
                return done
        return bool(real_to_ram(dmirror, args))

    monkeypatch.setattr(dmirror_migrate, "alloc_and_copy_to_ram", to_ram)


def _fails(name: str, check: Any, match: str, memory: str = "private") -> None:
    spec = DriverSpec(name, (("memory", memory),))
    r = run_check(spec, "x", check)
    assert r.outcome == "failed", f"{name} passed {check.__name__}"
    assert match in r.message, r.message
    control = run_check(DriverSpec("dmirror", (("memory", memory),)), "x", check)
    assert control.outcome == "passed", control.message


# ----- the checks -----------------------------------------------------------------------------


def test_write_at_byte_offsets_catches_a_store_that_loses_its_page_offset() -> None:
    _fails(
        "broken_store_at_page_start",
        ce.check_write_at_byte_offsets,
        "a device store of 50 bytes at offset 0x64 left the buffer wrong at byte 0x0",
    )


def test_write_at_byte_offsets_catches_whole_pages_stored_one_page_too_far() -> None:
    _fails(
        "broken_store_middle_shifted",
        ce.check_write_at_byte_offsets,
        "a device store of 12288 bytes at offset 0x1001 left the buffer wrong at byte 0x2000",
    )


def test_read_at_byte_offsets_catches_a_load_from_the_page_start() -> None:
    _fails(
        "broken_load_from_page_start",
        ce.check_read_at_byte_offsets,
        "a device load of 50 bytes at offset 0x64 returned the wrong bytes at byte 0x0",
    )


def test_device_ptes_slots_catches_slot_addresses_off_by_the_offset() -> None:
    _fails(
        "broken_unaligned_slots",
        ce.check_device_ptes_slots,
        "an unaligned address means the slot it falls in",
    )


def test_device_ptes_slots_catches_a_range_past_task_size_accepted() -> None:
    _fails(
        "broken_unchecked_range",
        ce.check_device_ptes_slots,
        "device_ptes past TASK_SIZE raised nothing, not BadAddress",
    )


def test_pte_state_fingerprint_catches_a_state_that_is_never_none() -> None:
    _fails(
        "broken_state_empty_tuple",
        ce.check_device_pte_state_fingerprint,
        "is (), not None, where the device maps nothing",
    )


def test_pte_state_fingerprint_catches_a_state_blind_to_entry_changes() -> None:
    _fails(
        "broken_state_never_changes",
        ce.check_device_pte_state_fingerprint,
        "device_pte_state is the same after a second device read as before, but the entries differ",
    )


@pytest.mark.parametrize("memory", ["private", "coherent"])
def test_evicted_pages_catches_eviction_without_migrate_device_pages(memory: str) -> None:
    _fails(
        "broken_eviction_identity",
        ce.check_evicted_pages_are_anonymous,
        "evicted page 0 is file, not anon",
        memory,
    )


@pytest.mark.parametrize("memory", ["private", "coherent"])
def test_migrate_back_sparse_catches_a_lone_device_page_left_behind(memory: str) -> None:
    _fails(
        "broken_lone_device_page_kept",
        ce.check_migrate_back_sparse_device_pages,
        "migrate_to_system of 16 pages left pages [5] of [5] in device memory",
        memory,
    )


def test_exact_checks_are_in_the_catalogue_and_pass_on_every_installed_driver() -> None:
    """Registered in ``CHECKS`` under their areas; every installed driver
    variant passes or skips them, each in well under a second."""
    ids = {check_id(area, c) for area, cs in CHECKS.items() for c in cs}
    assert {
        "coherence/write_at_byte_offsets",
        "coherence/read_at_byte_offsets",
        "introspection/device_ptes_slots",
        "introspection/device_pte_state_fingerprint",
        "teardown/evicted_pages_are_anonymous",
        "device-memory/migrate_back_sparse_device_pages",
    } <= ids
    mine = [(area, c) for area, cs in CHECKS.items() for c in cs if c.__module__ == ce.__name__]
    assert len(mine) == 6
    for spec in installed_specs():
        if spec.name.startswith("broken_"):
            continue
        for area, c in mine:
            r = run_check(spec, area, c)
            assert r.outcome in ("passed", "skipped"), f"{spec} {r.id}: {r.message}"
            assert r.seconds < 2.0, f"{spec} {r.id} took {r.seconds:.2f}s"
