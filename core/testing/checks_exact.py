"""Conformance checks of exactness: bytes at any offset, and the device-table backdoor.

Two things every other check relies on without testing them:

* **Device loads and stores at byte granularity.** ``Mirror.write`` stores
  exactly the bytes it is given at exactly their address, whatever the
  alignment: the bytes around them, in the same pages, keep their contents
  (``copy_to_user``/``copy_from_user`` through the device's mapping: a store
  that starts inside a page, covers whole pages and ends inside another must
  put each piece at its own offset). ``Mirror.read`` returns the bytes at
  exactly ``[addr, addr + length)``. The other checks mostly move whole,
  aligned pages, where an offset error cancels out.
* **The introspection the invariants read** (``Mirror.device_ptes`` and
  ``Mirror.device_pte_state``, the debug port onto the device page table,
  like a GPU's page-table dump or ``mlx5``'s MTT read-back): one item per
  4 KiB slot, slot addresses page aligned, an unaligned address meaning the
  slot it falls in, any sub-range the same items as the whole, typed errors
  for a bad range; and a fingerprint that is None exactly where nothing is
  mapped and changes whenever an entry does. ``check_mirror`` and the race
  explorer's ``MirrorWatch`` trust both: a backdoor that shows nothing, or a
  fingerprint that never changes, would make every invariant pass vacuously.

Both hold for every driver; they need only ``READ`` (and ``WRITE`` for the
stores).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

from .. import MADV_DONTNEED, MADV_PAGEOUT
from ..driver import Capability, DevicePte
from ..errors import BadAddress, InvalidArgument
from ..mm.uapi import TASK_SIZE
from .env import HUGE, PAGE, CheckSkipped, DriverSpec, Env, environment, needs, pattern

#: pagemap kinds of device memory.
_DEVICE_KINDS = {"device_private", "device_coherent"}

#: (offset, length) of the byte-granular stores and loads, in an 8-page buffer:
#: inside one page, across one page boundary, a head + two whole pages + a
#: tail, an aligned start with a tail, a head ending on a boundary, exactly
#: one page, the buffer's last byte.
_PIECES: tuple[tuple[int, int], ...] = (
    (100, 50),
    (PAGE - 10, 20),
    (PAGE + 1, 3 * PAGE),
    (5 * PAGE, PAGE + 5),
    (6 * PAGE + 7, PAGE - 7),
    (7 * PAGE, PAGE),
    (8 * PAGE - 1, 1),
)
_NPAGES = 8


def _first_difference(got: bytes, want: bytes) -> str:
    """Where two equal-length byte strings first differ, for a message."""
    i = next(i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w)
    return (
        f"byte {i:#x} (page {i // PAGE}, offset {i % PAGE:#x}): {got[i]:#04x}, want {want[i]:#04x}"
    )


def check_write_at_byte_offsets(spec: DriverSpec) -> None:
    """A device store at any offset and length changes exactly its own bytes:
    the CPU reads each piece at its address and the bytes around it intact."""
    with environment(spec) as env:
        needs(env, Capability.WRITE)
        n = _NPAGES
        a = env.mmap(n * PAGE)
        want = bytearray(pattern(n * PAGE, 81))
        env.proc.write(a, bytes(want))
        for seed, (off, length) in enumerate(_PIECES, start=82):
            data = pattern(length, seed)
            env.mirror.write(a + off, data)
            want[off : off + length] = data
            got = env.proc.read(a, n * PAGE)
            if got != want:
                raise AssertionError(
                    f"a device store of {length} bytes at offset {off:#x} left the buffer "
                    f"wrong at {_first_difference(got, bytes(want))}"
                )
        env.check(a, n)


def check_read_at_byte_offsets(spec: DriverSpec) -> None:
    """A device load at any offset and length returns exactly those bytes."""
    with environment(spec) as env:
        needs(env, Capability.READ)
        n = _NPAGES
        a, data = env.filled(n, 91)
        for off, length in _PIECES:
            got = env.mirror.read(a + off, length)
            want = data[off : off + length]
            assert len(got) == length, f"a device load of {length} bytes returned {len(got)}"
            if got != want:
                raise AssertionError(
                    f"a device load of {length} bytes at offset {off:#x} returned the wrong "
                    f"bytes at {_first_difference(got, want)}"
                )
        env.check(a, n)


# ----- the backdoor: device_ptes and device_pte_state -------------------------------------


def _expect(exc: type[Exception], call: Callable[[], object], what: str) -> None:
    try:
        call()
    except exc:
        return
    except Exception as other:
        raise AssertionError(
            f"{what} raised {type(other).__name__}, not {exc.__name__}: {other}"
        ) from other
    raise AssertionError(f"{what} raised nothing, not {exc.__name__}")


def _slots_right(env: Env, addr: int, npages: int) -> list[DevicePte | None]:
    """``device_ptes(addr, npages)``, checked for shape: ``npages`` items, each
    mapped one at its own slot's address; and the same items for an address
    inside the first slot."""
    ptes = env.mirror.device_ptes(addr, npages)
    assert len(ptes) == npages, f"device_ptes({addr:#x}, {npages}) returned {len(ptes)} items"
    for i, p in enumerate(ptes):
        if p is not None:
            assert p.addr == addr + i * PAGE, (
                f"device_ptes item {i} of {addr:#x} has address {p.addr:#x}, "
                f"not its slot's {addr + i * PAGE:#x}"
            )
    inside = env.mirror.device_ptes(addr + 123, npages)
    assert inside == ptes, (
        f"device_ptes({addr + 123:#x}, {npages}) differs from device_ptes({addr:#x}, "
        f"{npages}): an unaligned address means the slot it falls in"
    )
    return ptes


def _state_right(env: Env, addr: int, ptes: list[DevicePte | None]) -> Hashable | None:
    """``device_pte_state`` of the range: None exactly when ``ptes`` maps nothing."""
    state = env.mirror.device_pte_state(addr, len(ptes))
    mapped = sum(p is not None for p in ptes)
    if mapped:
        assert state is not None, (
            f"device_pte_state({addr:#x}, {len(ptes)}) is None, but the device maps "
            f"{mapped} of those slots"
        )
    else:
        assert state is None, (
            f"device_pte_state({addr:#x}, {len(ptes)}) is {state!r}, not None, where the "
            "device maps nothing"
        )
    return state


def check_device_ptes_slots(spec: DriverSpec) -> None:
    """``device_ptes`` gives one item per 4 KiB slot at the slot's own address,
    the same items for any sub-range and for an unaligned start, and refuses a
    bad range with a typed error."""
    with environment(spec) as env:
        needs(env, Capability.READ)
        n = 16
        a = env.mmap(n * PAGE)
        env.proc.write(a, pattern(n * PAGE, 95))
        env.mirror.read(a + 2 * PAGE, 4 * PAGE)
        if Capability.WRITE & env.caps:
            env.mirror.write(a + 9 * PAGE, pattern(2 * PAGE, 96))
        ptes = _slots_right(env, a, n)
        assert any(p is not None for p in ptes[2:6]), "a device read left no device mapping"
        for first, count in ((0, 1), (2, 4), (3, 1), (5, 6), (9, 2), (n - 1, 1), (1, n - 1)):
            sub = _slots_right(env, a + first * PAGE, count)
            assert sub == ptes[first : first + count], (
                f"device_ptes of slots {first}..{first + count - 1} differs from the same "
                f"slots of device_ptes({a:#x}, {n})"
            )
        assert env.mirror.device_ptes(a, 0) == [], "device_ptes of 0 slots is not empty"
        m = env.mirror
        _expect(InvalidArgument, lambda: m.device_ptes(a, -1), "device_ptes of -1 slots")
        _expect(
            InvalidArgument, lambda: m.device_ptes(-PAGE, 1), "device_ptes at a negative address"
        )
        _expect(
            BadAddress, lambda: m.device_ptes(TASK_SIZE - PAGE, 2), "device_ptes past TASK_SIZE"
        )
        env.check(a, n)


def check_device_pte_state_fingerprint(spec: DriverSpec) -> None:
    """``device_pte_state`` is None exactly where the device maps nothing, and
    two ranges' states are equal only if their entries are: the explorer's
    invariant watch re-verifies a range only when its state changes."""
    with environment(spec) as env:
        needs(env, Capability.READ)
        n = 16
        a = env.mmap(n * PAGE)
        env.proc.write(a, pattern(n * PAGE, 97))
        seen: list[tuple[Hashable | None, list[DevicePte | None]]] = []

        def snapshot(what: str) -> None:
            ptes = env.mirror.device_ptes(a, n)
            state = _state_right(env, a, ptes)
            assert env.mirror.device_pte_state(a, n) == state, (
                f"device_pte_state changed {what}, with nothing done in between"
            )
            for first, count in ((0, 2), (2, 4), (6, 10), (12, 4)):
                _state_right(env, a + first * PAGE, ptes[first : first + count])
            for old_state, old in seen:
                if old != ptes:
                    assert old_state != state, (
                        f"device_pte_state is the same {what} as before, but the entries differ"
                    )
            seen.append((state, ptes))

        snapshot("with nothing mapped")
        env.mirror.read(a + 2 * PAGE, 4 * PAGE)
        snapshot("after a device read")
        env.mirror.read(a + 12 * PAGE, 2 * PAGE)
        snapshot("after a second device read")
        if Capability.WRITE & env.caps:
            env.mirror.write(a + 3 * PAGE, pattern(PAGE, 98))
            snapshot("after a device write")
        if not Capability.HUGE_ONLY & env.caps:  # hugetlb is zapped whole, not by 4 KiB
            env.proc.madvise(a + 12 * PAGE, 2 * PAGE, MADV_DONTNEED)
            snapshot("after MADV_DONTNEED dropped mapped pages")
        env.check(a, n)
        size = HUGE if Capability.HUGE_ONLY & env.caps else n * PAGE  # what Env.mmap mapped
        env.proc.munmap(a, size)
        snapshot("after munmap")


# ----- teardown: what eviction hands back ------------------------------------------------


def check_evicted_pages_are_anonymous(spec: DriverSpec) -> None:
    """Pages evicted from device memory (at close, or when the device goes) are
    ordinary anonymous pages again: ``pagemap`` says anon, writable and
    exclusive, and reclaim and page migration handle them with the data intact
    (``migrate_device_pages`` moved the folio's identity, not just its bytes)."""
    with environment(spec) as env:
        needs(env, Capability.MIGRATE)
        if Capability.HUGE_ONLY & env.caps:
            raise CheckSkipped(f"{env.spec} claims HUGE_ONLY: hugetlb is never swapped")
        n = 8
        a, data = env.filled(n, 101)
        assert env.mirror.migrate_to_device(a, n) == n
        env.mirror.close()
        env.device.remove()
        for i, e in enumerate(env.proc.pagemap(a, n)):
            assert e.kind == "anon", f"evicted page {i} is {e.kind}, not anon"
            assert e.writable, f"evicted page {i} came back read-only from a writable mapping"
            assert e.exclusive, f"evicted page {i} came back shared (not anon-exclusive)"
        env.proc.madvise(a, n * PAGE, MADV_PAGEOUT)
        assert {e.kind for e in env.proc.pagemap(a, n)} == {"swap"}, (
            "reclaim did not swap out the evicted pages"
        )
        assert env.proc.read(a, n * PAGE) == data, "evicted pages lost their data in reclaim"
        assert env.proc.move_pages(a, n) == [0] * n, "page migration refused evicted pages"
        assert env.proc.read(a, n * PAGE) == data, "evicted pages lost their data in migration"


def check_migrate_back_sparse_device_pages(spec: DriverSpec) -> None:
    """``migrate_to_system`` over a range moves back every page it finds in
    device memory, however few among system pages (one, two far apart), and
    counts exactly those."""
    with environment(spec) as env:
        needs(env, Capability.MIGRATE)
        n = 16
        a, data = env.filled(n, 111)
        for on_device in ((5,), (3, 11)):
            for i in on_device:
                assert env.mirror.migrate_to_device(a + i * PAGE, 1) == 1
            kinds = [e.kind for e in env.proc.pagemap(a, n)]
            assert {i for i, k in enumerate(kinds) if k in _DEVICE_KINDS} == set(on_device), kinds
            env.check(a, n)
            moved = env.mirror.migrate_to_system(a, n)
            kinds = [e.kind for e in env.proc.pagemap(a, n)]
            left = [i for i, k in enumerate(kinds) if k != "anon"]
            assert not left, (
                f"migrate_to_system of {n} pages left pages {left} of {list(on_device)} "
                f"in device memory: {kinds}"
            )
            assert moved == len(on_device), (
                f"migrate_to_system moved pages {list(on_device)} but returned {moved}"
            )
            assert env.proc.read(a, n * PAGE) == data, "data changed in the round trip"
            env.check(a, n)


EXACT_DATA_CHECKS: list[Callable[[DriverSpec], None]] = [
    check_write_at_byte_offsets,
    check_read_at_byte_offsets,
]
INTROSPECTION_CHECKS: list[Callable[[DriverSpec], None]] = [
    check_device_ptes_slots,
    check_device_pte_state_fingerprint,
]
MIGRATION_CHECKS: list[Callable[[DriverSpec], None]] = [check_migrate_back_sparse_device_pages]
EVICTION_CHECKS: list[Callable[[DriverSpec], None]] = [check_evicted_pages_are_anonymous]
