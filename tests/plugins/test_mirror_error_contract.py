"""The ``Raises:`` sections of ``hmmsim.driver.Mirror`` hold for the shipped drivers.

Each case is one documented error, on dmirror and nouveau; where the
docstring says the drivers differ (nouveau's ioctl maps every
``make_device_exclusive`` error to -EINVAL), the case says which is which.
"""

from __future__ import annotations

import pytest
from hmmsim import (
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    BadAddress,
    InvalidArgument,
    Machine,
    MachineConfig,
    NotPermitted,
    NotSupported,
)
from hmmsim.driver import DevicePte, Mirror

PAGE = 4096
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS


@pytest.fixture(params=["dmirror", "nouveau"])
def env(request):  # type: ignore[no-untyped-def]
    m = Machine(MachineConfig(ram_bytes=64 << 20))
    p = m.spawn()
    mirror = m.probe(request.param).open(p)
    # Mapped first, the hole last: a later mmap would reuse the hole's address.
    none = p.mmap(PAGE, PROT_NONE, ANON)
    ro = p.mmap(PAGE, PROT_READ, ANON)
    hole = p.mmap(PAGE, RW, ANON)
    p.munmap(hole, PAGE)
    yield request.param, m, p, mirror, {"none": none, "ro": ro, "hole": hole}
    mirror.close()


def test_read_of_a_hole_or_prot_none_is_bad_address(env):
    _n, _m, _p, mirror, at = env
    for where in ("hole", "none"):
        with pytest.raises(BadAddress):
            mirror.read(at[where], 1)


def test_write_to_read_only_is_not_permitted_and_to_a_hole_bad_address(env):
    _n, _m, p, mirror, at = env
    with pytest.raises(NotPermitted):
        mirror.write(at["ro"], b"z")
    assert p.read(at["ro"], 1) == b"\0"
    with pytest.raises(BadAddress):
        mirror.write(at["hole"], b"z")


@pytest.mark.parametrize("op", ["read", "write"])
def test_bad_byte_ranges_are_typed(env, op):
    _n, _m, _p, mirror, _at = env
    call = (lambda a: mirror.read(a, 1)) if op == "read" else (lambda a: mirror.write(a, b"z"))
    with pytest.raises(InvalidArgument):
        call(-1)
    with pytest.raises(BadAddress):
        call(1 << 47)


@pytest.mark.parametrize("op", ["migrate_to_device", "migrate_to_system", "make_exclusive"])
def test_bad_page_ranges_are_typed(env, op):
    _n, _m, _p, mirror, _at = env
    fn = getattr(mirror, op)
    with pytest.raises(InvalidArgument):
        fn(0x10001, 1)  # unaligned
    with pytest.raises(InvalidArgument):
        fn(0x10000, -1)
    with pytest.raises(BadAddress):
        fn(1 << 47, 1)


def test_exclusive_access_to_a_file_page(env):
    name, m, p, mirror, _at = env
    f = m.create_file(PAGE)
    a = p.mmap(PAGE, RW, MAP_SHARED, file=f)
    p.write(a, b"f")
    expected = {"dmirror": NotSupported, "nouveau": InvalidArgument}[name]
    with pytest.raises(expected):
        mirror.make_exclusive(a, 1)


def test_migrate_of_a_hole(env):
    name, _m, _p, mirror, at = env
    if name == "dmirror":
        with pytest.raises(InvalidArgument):
            mirror.migrate_to_device(at["hole"], 1)
    else:  # SVM_BIND skips what no VMA covers
        assert mirror.migrate_to_device(at["hole"], 1) == 0


def test_close_twice_is_harmless(env):
    _n, _m, _p, mirror, _at = env
    mirror.close()
    mirror.close()


def test_optional_operations_default_to_not_supported():
    class Minimal(Mirror):
        def read(self, addr: int, length: int) -> bytes:
            return b""

        def write(self, addr: int, data: bytes) -> None:
            return None

        def device_ptes(self, addr: int, npages: int) -> list[DevicePte | None]:
            return [None] * npages

        def close(self) -> None:
            return None

    m = Minimal()
    for call in (
        lambda: m.migrate_to_device(0, 1),
        lambda: m.migrate_to_system(0, 1),
        lambda: m.make_exclusive(0, 1),
    ):
        with pytest.raises(NotSupported):
            call()
    assert m.device_pte_state(0, 4) is None
