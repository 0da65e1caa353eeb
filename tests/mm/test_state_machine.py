"""Random sequences of mm operations on several processes, checked against a
plain reference model of memory contents and against the folio/swap
accounting invariants (``verify_machine``).

Contents are not read back after every step: a read faults every page in, so
no rule would ever act on a swapped-out or never-touched page. Instead one
rule reads back a single sampled page (as a program would), and every page is
compared at the end of each sequence (``teardown``). ``ACTED_ON`` counts, by
pagemap kind, the pages the rules acted on; a test below requires swapped-out
and empty pages among them."""

from __future__ import annotations

import contextlib
import os
from collections import Counter

import attrs
import hmmsim
from hmmsim import (
    MADV_DONTNEED,
    MADV_PAGEOUT,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    MAP_SHARED,
    MREMAP_MAYMOVE,
    PROT_READ,
    PROT_WRITE,
)
from hmmsim.mm.debug import verify_machine
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

PAGE = 4096
ZERO = bytes(PAGE)
KINDS = ("anon", "anon_thp", "shmem", "file_shared", "file_private")

#: Pages the rules acted on, by their pagemap kind just before the rule.
ACTED_ON: Counter[str] = Counter()


@attrs.define
class Region:
    start: int
    npages: int
    kind: str
    obj: int  # index into objects (shmem/file), -1 for anon
    pgoff: int
    writable: bool = True


@attrs.define
class ModelProc:
    proc: hmmsim.Process = attrs.field(repr=lambda p: f"pid {p.pid}")
    regions: list[Region] = attrs.field(factory=list)
    private: dict[int, bytes] = attrs.field(factory=dict)  # vpn -> COW/anon content

    def region_at(self, vpn: int) -> Region | None:
        for r in self.regions:
            if r.start <= vpn < r.start + r.npages:
                return r
        return None


class MemoryModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.m = hmmsim.Machine(
            hmmsim.MachineConfig(ram_bytes=32 << 20, swap_bytes=8 << 20, thp="always")
        )
        self.procs = [ModelProc(self.m.spawn())]
        self.files: list[hmmsim.File] = [self.m.create_file(16 * PAGE) for _ in range(2)]
        # Contents of each shared object page: objects[obj][index]
        self.objects: list[dict[int, bytes]] = [{}, {}]
        self.shm: dict[int, int] = {}  # region identity -> object index for shmem

    # ----- helpers --------------------------------------------------------------
    def expected(self, mp: ModelProc, vpn: int) -> bytes:
        r = mp.region_at(vpn)
        assert r is not None
        if r.kind in ("shmem", "file_shared"):
            return self.objects[r.obj].get(r.pgoff + vpn - r.start, ZERO)
        if vpn in mp.private:
            return mp.private[vpn]
        if r.kind == "file_private":
            return self.objects[r.obj].get(r.pgoff + vpn - r.start, ZERO)
        return ZERO

    def pick(self, data: st.DataObject) -> tuple[ModelProc, Region]:
        live = [mp for mp in self.procs if mp.regions]
        mp = data.draw(st.sampled_from(live))
        return mp, data.draw(st.sampled_from(mp.regions))

    def has_regions(self) -> bool:
        return any(mp.regions for mp in self.procs)

    def note(self, mp: ModelProc, vpn: int, npages: int) -> None:
        """Count the states of the pages a rule is about to act on."""
        for e in mp.proc.pagemap(vpn << 12, npages):
            ACTED_ON[e.kind] += 1

    def note_all(self, mp: ModelProc) -> None:
        for r in mp.regions:
            self.note(mp, r.start, r.npages)

    # ----- rules ------------------------------------------------------------------
    @rule(data=st.data(), kind=st.sampled_from(KINDS), npages=st.integers(1, 6))
    def mmap(self, data, kind, npages):
        mp = data.draw(st.sampled_from(self.procs))
        p = mp.proc
        rw = PROT_READ | PROT_WRITE
        if kind in ("anon", "anon_thp"):
            if kind == "anon_thp":
                npages = 512  # 2 MiB: THP-aligned, so faults map huge pages
            a = p.mmap(npages * PAGE, rw, MAP_PRIVATE | MAP_ANONYMOUS)
            mp.regions.append(Region(a >> 12, npages, "anon", -1, 0))
        elif kind == "shmem":
            a = p.mmap(npages * PAGE, rw, MAP_SHARED | MAP_ANONYMOUS)
            self.objects.append({})
            mp.regions.append(Region(a >> 12, npages, kind, len(self.objects) - 1, 0))
            self.files.append(p.mm.find_vma(a).file)
        else:
            fi = data.draw(st.integers(0, 1))
            off = data.draw(st.integers(0, 16 - npages))
            flags = MAP_SHARED if kind == "file_shared" else MAP_PRIVATE
            a = p.mmap(npages * PAGE, rw, flags, file=self.files[fi], offset=off * PAGE)
            mp.regions.append(Region(a >> 12, npages, kind, fi, off))

    @precondition(has_regions)
    @rule(data=st.data(), fill=st.integers(1, 255), length=st.integers(1, 300))
    def write(self, data, fill, length):
        mp, r = self.pick(data)
        i = data.draw(st.integers(0, r.npages - 1))
        off = data.draw(st.integers(0, PAGE - length))
        vpn = r.start + i
        addr = (vpn << 12) + off
        self.note(mp, vpn, 1)
        if not r.writable:
            try:
                mp.proc.write(addr, bytes([fill]) * length)
            except hmmsim.SegmentationFault:
                return
            raise AssertionError("write to a read-only mapping succeeded")
        mp.proc.write(addr, bytes([fill]) * length)
        page = bytearray(self.expected(mp, vpn))
        page[off : off + length] = bytes([fill]) * length
        if r.kind in ("shmem", "file_shared"):
            self.objects[r.obj][r.pgoff + i] = bytes(page)
        else:
            mp.private[vpn] = bytes(page)

    @precondition(has_regions)
    @rule(data=st.data(), fill=st.integers(1, 255))
    def populate(self, data, fill):
        """Write one byte into every page of a region (up to 8 pages), so that
        later rules find whole populated ranges to page out, move or unmap."""
        mp, r = self.pick(data)
        if not r.writable:
            return
        n = min(r.npages, 8)
        self.note(mp, r.start, n)
        for i in range(n):
            vpn = r.start + i
            mp.proc.write((vpn << 12) + i, bytes([fill]))
            page = bytearray(self.expected(mp, vpn))
            page[i] = fill
            if r.kind in ("shmem", "file_shared"):
                self.objects[r.obj][r.pgoff + i] = bytes(page)
            else:
                mp.private[vpn] = bytes(page)

    @precondition(has_regions)
    @rule(data=st.data())
    def munmap(self, data):
        mp, r = self.pick(data)
        lo = data.draw(st.integers(0, r.npages - 1))
        hi = data.draw(st.integers(lo + 1, r.npages))
        self.note(mp, r.start + lo, hi - lo)
        mp.proc.munmap((r.start + lo) << 12, (hi - lo) << 12)
        mp.regions.remove(r)
        for v in range(r.start + lo, r.start + hi):
            mp.private.pop(v, None)
        if lo:
            mp.regions.append(attrs.evolve(r, npages=lo))
        if hi < r.npages:
            mp.regions.append(
                attrs.evolve(r, start=r.start + hi, npages=r.npages - hi, pgoff=r.pgoff + hi)
            )

    @precondition(has_regions)
    @rule(data=st.data(), writable=st.booleans())
    def mprotect(self, data, writable):
        mp, r = self.pick(data)
        prot = PROT_READ | (PROT_WRITE if writable else 0)
        self.note(mp, r.start, r.npages)
        mp.proc.mprotect(r.start << 12, r.npages << 12, prot)
        r.writable = writable

    @precondition(lambda self: len(self.procs) < 4)
    @rule(data=st.data())
    def fork(self, data):
        mp = data.draw(st.sampled_from(self.procs))
        self.note_all(mp)
        child = mp.proc.fork()
        self.procs.append(ModelProc(child, [attrs.evolve(r) for r in mp.regions], dict(mp.private)))

    @precondition(lambda self: len(self.procs) > 1)
    @rule(data=st.data())
    def exit(self, data):
        mp = data.draw(st.sampled_from(self.procs))
        self.note_all(mp)
        mp.proc.exit()
        self.procs.remove(mp)

    @precondition(has_regions)
    @rule(data=st.data())
    def dontneed(self, data):
        mp, r = self.pick(data)
        self.note(mp, r.start, r.npages)
        mp.proc.madvise(r.start << 12, r.npages << 12, MADV_DONTNEED)
        for v in range(r.start, r.start + r.npages):
            mp.private.pop(v, None)

    @precondition(has_regions)
    @rule(data=st.data())
    def pageout(self, data):
        # Anonymous regions first: they are the ones that go to swap.
        anon = [(mp, r) for mp in self.procs for r in mp.regions if r.kind == "anon"]
        if anon and data.draw(st.booleans()):
            mp, r = data.draw(st.sampled_from(anon))
        else:
            mp, r = self.pick(data)
        self.note(mp, r.start, r.npages)
        mp.proc.madvise(r.start << 12, r.npages << 12, MADV_PAGEOUT)

    @precondition(has_regions)
    @rule(data=st.data(), fill=st.integers(1, 255))
    def populate_and_pageout(self, data, fill):
        """A program that fills a buffer and then comes under memory pressure:
        the one way most pages end up swapped out for the next rules."""
        self.populate(data, fill)
        self.pageout(data)

    @rule(pages=st.integers(1, 64))
    def reclaim(self, pages):
        self.m.reclaim(pages * PAGE)

    @precondition(has_regions)
    @rule(data=st.data())
    def move_pages(self, data):
        mp, r = self.pick(data)
        self.note(mp, r.start, r.npages)
        mp.proc.move_pages(r.start << 12, r.npages)

    @precondition(has_regions)
    @rule(data=st.data(), grow=st.integers(0, 3))
    def mremap(self, data, grow):
        mp, r = self.pick(data)
        if r.kind != "anon":
            grow = 0  # growing past the end of the object would only give SIGBUS
        self.note(mp, r.start, r.npages)
        new = (
            mp.proc.mremap(r.start << 12, r.npages << 12, (r.npages + grow) << 12, MREMAP_MAYMOVE)
            >> 12
        )
        moved = {
            v - r.start + new: c for v, c in mp.private.items() if r.start <= v < r.start + r.npages
        }
        for v in range(r.start, r.start + r.npages):
            mp.private.pop(v, None)
        mp.private.update(moved)
        r.start = new
        r.npages += grow

    @rule(fi=st.integers(0, 1), index=st.integers(0, 15), fill=st.integers(1, 255))
    def file_write(self, fi, index, fill):
        self.files[fi].pwrite(index * PAGE + 10, bytes([fill]) * 20)
        page = bytearray(self.objects[fi].get(index, ZERO))
        page[10:30] = bytes([fill]) * 20
        self.objects[fi][index] = bytes(page)

    @precondition(has_regions)
    @rule(data=st.data())
    def map_fixed_over(self, data):
        mp, r = self.pick(data)
        i = data.draw(st.integers(0, r.npages - 1))
        self.note(mp, r.start + i, 1)
        mp.proc.mmap(
            PAGE,
            PROT_READ | PROT_WRITE,
            MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
            addr=(r.start + i) << 12,
        )
        mp.regions.remove(r)
        mp.private.pop(r.start + i, None)
        if i:
            mp.regions.append(attrs.evolve(r, npages=i))
        mp.regions.append(Region(r.start + i, 1, "anon", -1, 0))
        if i + 1 < r.npages:
            mp.regions.append(
                attrs.evolve(
                    r, start=r.start + i + 1, npages=r.npages - i - 1, pgoff=r.pgoff + i + 1
                )
            )

    @precondition(has_regions)
    @rule(data=st.data())
    def collapse(self, data):
        mp, r = self.pick(data)
        if r.kind != "anon":
            return
        self.note(mp, r.start, r.npages)
        # A chunk that cannot be collapsed fails with EAGAIN, as in the kernel;
        # a VMA too small for a PMD or never written, or a chunk with no page,
        # with EINVAL; either way the contents must not change.
        with contextlib.suppress(hmmsim.Again, hmmsim.InvalidArgument):
            mp.proc.madvise(r.start << 12, r.npages << 12, hmmsim.MADV_COLLAPSE)

    @precondition(has_regions)
    @rule(data=st.data())
    def read_one_page(self, data):
        """A sampled read-back: one page, which the read itself faults in."""
        mp, r = self.pick(data)
        i = data.draw(st.integers(0, r.npages - 1))
        self.note(mp, r.start + i, 1)
        got = mp.proc.read((r.start + i) << 12, PAGE)
        assert got == self.expected(mp, r.start + i), (
            f"pid {mp.proc.pid} {r.kind} page {i} of {r.start << 12:#x}"
        )

    # ----- checks -------------------------------------------------------------------
    @invariant()
    def accounting_is_consistent(self):
        verify_machine(self.m)

    def teardown(self):
        """Every page's contents, once, at the end of the sequence."""
        for mp in self.procs:
            for r in mp.regions:
                got = mp.proc.read(r.start << 12, r.npages << 12)
                for i in range(r.npages):
                    want = self.expected(mp, r.start + i)
                    assert got[i * PAGE : (i + 1) * PAGE] == want, (
                        f"pid {mp.proc.pid} {r.kind} page {i} of {r.start << 12:#x}"
                    )
        verify_machine(self.m)


MemoryModel.TestCase.settings = settings(
    max_examples=int(os.environ.get("HMMSIM_STATEFUL_EXAMPLES", "150")),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestMemoryModel = MemoryModel.TestCase


def test_state_machine_acts_on_swapped_out_and_empty_pages():
    """The rules act on pages in every state, swapped-out and empty ones included."""
    ACTED_ON.clear()
    run_state_machine_as_test(
        MemoryModel,
        settings=settings(
            max_examples=20,
            stateful_step_count=40,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
    counts = dict(ACTED_ON)
    print(f"page states acted on: {sorted(counts.items())}")
    assert counts.get("swap", 0) >= 25, sorted(counts.items())
    assert counts.get("none", 0) >= 100, counts
