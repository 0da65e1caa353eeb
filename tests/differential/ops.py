"""Seeded random operation sequences for the differential test.

Every operation works inside one fixed window of the address space (``BASE``,
``WINDOW_PAGES`` pages, 2 MiB aligned), so that the host kernel and the model
see the same addresses: mmaps are always ``MAP_FIXED`` or
``MAP_FIXED_NOREPLACE`` and mremap moves only with ``MREMAP_FIXED``.

The generator keeps a rough shadow of each process's mappings (page state
only) to choose mostly meaningful targets; it never consults either executor,
so a sequence depends on its seed alone and replays identically against any
version of the model. The shadow may be wrong after an operation fails on
purpose (e.g. a NOREPLACE clash); that only changes which operations are
picked next, never what is compared.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PAGE = 4096
HPAGE = 2 << 20
PMD_PAGES = 512
#: Start of the window (2 MiB aligned, far from where the host places mappings).
BASE = 0x5A00_0000_0000
WINDOW_PAGES = 2048
WINDOW_BYTES = WINDOW_PAGES * PAGE
#: PROT_NONE guard mappings kept on both sides of the window.
MARGIN = HPAGE
MAX_PROCS = 3

PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
MAP_POPULATE, MAP_HUGETLB, MAP_FIXED_NOREPLACE = 0x8000, 0x40000, 0x100000
MAP_HUGE_2MB = 21 << 26
MREMAP_MAYMOVE, MREMAP_FIXED, MREMAP_DONTUNMAP = 1, 2, 4
MADV = {
    "DONTNEED": 4,
    "FREE": 8,
    "HUGEPAGE": 14,
    "NOHUGEPAGE": 15,
    "PAGEOUT": 21,
    "COLLAPSE": 25,
}

# Shadow page kinds.
NONE, ANON, SHARED, HTLB_PRIV, HTLB_SHARED = 0, 1, 2, 3, 4
KIND_NAMES = {ANON: "anon", SHARED: "shared", HTLB_PRIV: "hugetlb", HTLB_SHARED: "hugetlb_shared"}


@dataclass(frozen=True)
class Op:
    """One step: ``kind`` applied by simulated process ``proc`` (a stable id)."""

    kind: str  # mmap munmap mprotect madvise mremap read write fork exit
    proc: int
    args: tuple[tuple[str, Any], ...] = ()
    #: Fills written data; unique per step of a sequence.
    tag: int = 0

    def arg(self, name: str) -> Any:
        return dict(self.args)[name]

    def describe(self) -> str:
        """The op as a C-like call with addresses relative to the window."""
        a = dict(self.args)

        def off(name: str) -> str:
            return f"W+{a[name] * PAGE:#x}"

        if self.kind == "mmap":
            return (
                f"P{self.proc}: mmap({off('page')}, {a['npages']}p, prot={a['prot']}, "
                f"{a['map_kind']}{' POPULATE' if a['populate'] else ''}"
                f"{' NOREPLACE' if a['noreplace'] else ' FIXED'})"
            )
        if self.kind in ("munmap", "read", "write"):
            return f"P{self.proc}: {self.kind}({off('page')}, {a['npages']}p)"
        if self.kind == "mprotect":
            return f"P{self.proc}: mprotect({off('page')}, {a['npages']}p, {a['prot']})"
        if self.kind == "madvise":
            return f"P{self.proc}: madvise({off('page')}, {a['npages']}p, {a['advice']})"
        if self.kind == "mremap":
            dest = f", new={off('new_page')}" if a["new_page"] is not None else ""
            return (
                f"P{self.proc}: mremap({off('page')}, {a['old_npages']}p -> "
                f"{a['new_npages']}p, flags={a['flags']}{dest})"
            )
        if self.kind == "fork":
            return f"P{self.proc}: fork() -> P{a['child']}"
        return f"P{self.proc}: exit()"

    def category(self) -> str:
        """What kind of step this is, precise enough to name a divergence class."""
        a = dict(self.args)
        if self.kind == "mmap":
            return f"mmap_{a['map_kind']}{'_populate' if a['populate'] else ''}"
        if self.kind == "madvise":
            return f"madvise_{a['advice']}"
        if self.kind == "mremap":
            f = a["flags"]
            if f & MREMAP_DONTUNMAP:
                return "mremap_dontunmap"
            if f & MREMAP_FIXED:
                return "mremap_fixed"
            return "mremap_grow" if a["new_npages"] > a["old_npages"] else "mremap_shrink"
        return self.kind


def write_data(op: Op) -> bytes:
    """The bytes a ``write`` op stores: every page distinct, every step distinct."""
    n = op.arg("npages")
    pages = np.full((n, PAGE), (op.tag * 37 + 11) & 0xFF, dtype=np.uint8)
    marks = (np.uint64(op.tag) << np.uint64(20)) + np.arange(n, dtype=np.uint64)
    pages[:, :8] = marks.view(np.uint8).reshape(n, 8)
    return pages.tobytes()


@dataclass
class _Shadow:
    kind: np.ndarray = field(default_factory=lambda: np.zeros(WINDOW_PAGES, np.uint8))
    prot: np.ndarray = field(default_factory=lambda: np.zeros(WINDOW_PAGES, np.uint8))

    def copy(self) -> _Shadow:
        return _Shadow(self.kind.copy(), self.prot.copy())


class Generator:
    """Builds one sequence of ``nsteps`` operations from ``seed``."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.procs: dict[int, _Shadow] = {0: _Shadow()}
        self.next_id = 1

    # ----- helpers ---------------------------------------------------------------
    def _mapped_runs(self, sh: _Shadow) -> list[tuple[int, int]]:
        """Maximal runs [lo, hi) of pages that are mapped with one kind and prot."""
        key = sh.kind.astype(np.int32) * 16 + sh.prot
        edges = np.flatnonzero(np.diff(key)) + 1
        bounds = [0, *edges.tolist(), WINDOW_PAGES]
        return [(lo, hi) for lo, hi in itertools.pairwise(bounds) if sh.kind[lo] != NONE]

    def _range_in(self, lo: int, hi: int, huge: bool) -> tuple[int, int]:
        """A sub-range [page, page + n) of [lo, hi), aligned for hugetlb."""
        r = self.rng
        if huge:
            lo_h, hi_h = -(-lo // PMD_PAGES), hi // PMD_PAGES
            if hi_h <= lo_h:
                return lo, hi - lo
            a = r.randrange(lo_h, hi_h)
            b = r.randrange(a + 1, hi_h + 1)
            return a * PMD_PAGES, (b - a) * PMD_PAGES
        shape = r.random()
        if shape < 0.3:  # whole run
            return lo, hi - lo
        if shape < 0.5 and hi - lo >= PMD_PAGES:  # one aligned PMD inside it
            lo_h, hi_h = -(-lo // PMD_PAGES), hi // PMD_PAGES
            if hi_h > lo_h:
                a = r.randrange(lo_h, hi_h)
                return a * PMD_PAGES, PMD_PAGES
        start = r.randrange(lo, hi)
        n = min(hi - start, r.choice((1, 1, 2, 3, 8, 17, 64, 300)))
        return start, n

    def _target(self, sh: _Shadow, want_prot: int = 0) -> tuple[int, int, int] | None:
        runs = [
            (lo, hi)
            for lo, hi in self._mapped_runs(sh)
            if (int(sh.prot[lo]) & want_prot) == want_prot
        ]
        if not runs:
            return None
        lo, hi = self.rng.choice(runs)
        kind = int(sh.kind[lo])
        page, n = self._range_in(lo, hi, kind in (HTLB_PRIV, HTLB_SHARED))
        return page, n, kind

    def _random_range(self, huge: bool) -> tuple[int, int]:
        r = self.rng
        if huge:
            a = r.randrange(0, WINDOW_PAGES // PMD_PAGES)
            b = r.randrange(a + 1, min(a + 2, WINDOW_PAGES // PMD_PAGES) + 1)
            return a * PMD_PAGES, (b - a) * PMD_PAGES
        size = r.choice((1, 4, 16, 100, PMD_PAGES, PMD_PAGES, 2 * PMD_PAGES, 700))
        if r.random() < 0.5:
            start = r.randrange(0, WINDOW_PAGES // PMD_PAGES) * PMD_PAGES
        else:
            start = r.randrange(0, WINDOW_PAGES)
        return start, max(1, min(size, WINDOW_PAGES - start))

    # ----- one operation -------------------------------------------------------------
    def step(self, tag: int) -> Op:
        r = self.rng
        pid = r.choice(sorted(self.procs))
        sh = self.procs[pid]
        has_maps = bool(sh.kind.any())
        weights = {
            "mmap": 30 if not has_maps else 14,
            "write": 22,
            "read": 12,
            "madvise": 16,
            "mprotect": 6,
            "munmap": 6,
            "mremap": 8,
            "fork": 5 if len(self.procs) < MAX_PROCS else 0,
            "exit": 2 if len(self.procs) > 1 else 0,
        }
        if not has_maps:
            weights.update(write=0, read=0, madvise=0, mprotect=0, munmap=0, mremap=0)
        kind = r.choices(list(weights), list(weights.values()))[0]
        op = getattr(self, f"_gen_{kind}")(pid, sh, tag)
        self._apply(op)
        return op

    def _gen_mmap(self, pid: int, sh: _Shadow, tag: int) -> Op:
        r = self.rng
        map_kind = r.choices(("anon", "shared", "hugetlb", "hugetlb_shared"), (60, 22, 12, 6))[0]
        huge = map_kind.startswith("hugetlb")
        page, n = self._random_range(huge)
        prot = r.choices((PROT_READ | PROT_WRITE, PROT_READ, PROT_NONE), (75, 15, 10))[0]
        args = {
            "page": page,
            "npages": n,
            "prot": prot,
            "map_kind": map_kind,
            "populate": r.random() < 0.2,
            "noreplace": r.random() < 0.25,
        }
        return Op("mmap", pid, tuple(args.items()), tag)

    def _touch(self, kind: str, pid: int, sh: _Shadow, tag: int) -> Op:
        want = PROT_WRITE if kind == "write" else PROT_READ
        t = self._target(sh, want)
        if t is None or self.rng.random() < 0.03:  # sometimes a touch that faults
            page, n = self._random_range(False)
        else:
            page, n, _ = t
        return Op(kind, pid, (("page", page), ("npages", n)), tag)

    def _gen_write(self, pid: int, sh: _Shadow, tag: int) -> Op:
        return self._touch("write", pid, sh, tag)

    def _gen_read(self, pid: int, sh: _Shadow, tag: int) -> Op:
        return self._touch("read", pid, sh, tag)

    def _gen_madvise(self, pid: int, sh: _Shadow, tag: int) -> Op:
        r = self.rng
        t = self._target(sh)
        page, n = (t[0], t[1]) if t is not None else self._random_range(False)
        if r.random() < 0.3:  # widen to whole PMDs: collapse and THP advice act per PMD
            lo = page // PMD_PAGES * PMD_PAGES
            hi = min(WINDOW_PAGES, -(-(page + n) // PMD_PAGES) * PMD_PAGES)
            page, n = lo, hi - lo
        advice = r.choices(list(MADV), (20, 10, 8, 22, 8, 16))[0]
        return Op("madvise", pid, (("page", page), ("npages", n), ("advice", advice)), tag)

    def _gen_mprotect(self, pid: int, sh: _Shadow, tag: int) -> Op:
        t = self._target(sh)
        page, n = (t[0], t[1]) if t is not None else self._random_range(False)
        prot = self.rng.choice((PROT_NONE, PROT_READ, PROT_READ | PROT_WRITE))
        return Op("mprotect", pid, (("page", page), ("npages", n), ("prot", prot)), tag)

    def _gen_munmap(self, pid: int, sh: _Shadow, tag: int) -> Op:
        t = self._target(sh)
        page, n = (t[0], t[1]) if t is not None else self._random_range(False)
        return Op("munmap", pid, (("page", page), ("npages", n)), tag)

    def _gen_mremap(self, pid: int, sh: _Shadow, tag: int) -> Op:
        r = self.rng
        t = self._target(sh)
        if t is None:
            return self._gen_munmap(pid, sh, tag)
        page, n, kind = t
        huge = kind in (HTLB_PRIV, HTLB_SHARED)
        unit = PMD_PAGES if huge else 1
        mode = r.choices(("shrink", "grow", "fixed", "dontunmap"), (20, 25, 35, 20))[0]
        new_page = None
        if mode == "shrink" and n // unit > 1:
            new_n, flags = r.randrange(1, n // unit) * unit, 0
        elif mode == "grow":
            new_n, flags = n + r.choice((1, 3, PMD_PAGES)) * unit, 0
            new_n = min(new_n, WINDOW_PAGES - page)
        else:
            new_n = n
            flags = MREMAP_MAYMOVE | MREMAP_FIXED
            if mode == "dontunmap":
                flags |= MREMAP_DONTUNMAP
            elif r.random() < 0.3:
                new_n = n + unit
            dst, _ = self._random_range(huge)
            if r.random() < 0.4 and not huge:  # keep the offset inside a PMD
                dst = dst // PMD_PAGES * PMD_PAGES + page % PMD_PAGES
            new_page = min(dst, WINDOW_PAGES - new_n)
            if new_page < 0:
                new_page, new_n = 0, min(new_n, WINDOW_PAGES)
        args = {
            "page": page,
            "old_npages": n,
            "new_npages": max(unit, new_n),
            "flags": flags,
            "new_page": new_page,
        }
        return Op("mremap", pid, tuple(args.items()), tag)

    def _gen_fork(self, pid: int, sh: _Shadow, tag: int) -> Op:
        child = self.next_id
        self.next_id += 1
        return Op("fork", pid, (("child", child),), tag)

    def _gen_exit(self, pid: int, sh: _Shadow, tag: int) -> Op:
        return Op("exit", pid, (), tag)

    # ----- shadow update -------------------------------------------------------------
    def _apply(self, op: Op) -> None:
        sh = self.procs[op.proc]
        a = dict(op.args)
        if op.kind == "mmap":
            sl = slice(a["page"], a["page"] + a["npages"])
            if a["noreplace"] and sh.kind[sl].any():
                return
            kinds = {"anon": ANON, "shared": SHARED, "hugetlb": HTLB_PRIV}
            sh.kind[sl] = kinds.get(a["map_kind"], HTLB_SHARED)
            sh.prot[sl] = a["prot"]
        elif op.kind == "munmap":
            sl = slice(a["page"], a["page"] + a["npages"])
            sh.kind[sl] = NONE
            sh.prot[sl] = 0
        elif op.kind == "mprotect":
            sl = slice(a["page"], a["page"] + a["npages"])
            if sh.kind[sl].all():
                sh.prot[sl] = a["prot"]
        elif op.kind == "mremap":
            self._apply_mremap(sh, a)
        elif op.kind == "fork":
            self.procs[a["child"]] = sh.copy()
        elif op.kind == "exit":
            del self.procs[op.proc]

    def _apply_mremap(self, sh: _Shadow, a: dict[str, Any]) -> None:
        lo, n, new_n = a["page"], a["old_npages"], a["new_npages"]
        if not sh.kind[lo : lo + n].all():
            return
        kind, prot = int(sh.kind[lo]), int(sh.prot[lo])
        if a["new_page"] is None:
            if new_n < n:
                sh.kind[lo + new_n : lo + n] = NONE
            elif not sh.kind[lo + n : lo + new_n].any():
                sh.kind[lo : lo + new_n] = kind
                sh.prot[lo : lo + new_n] = prot
            return
        dst = a["new_page"]
        if dst < lo + n and lo < dst + new_n:
            return  # overlapping move: EINVAL
        if not a["flags"] & MREMAP_DONTUNMAP:
            sh.kind[lo : lo + n] = NONE
        sh.kind[dst : dst + new_n] = kind
        sh.prot[dst : dst + new_n] = prot


def generate(seed: int, nsteps: int) -> list[Op]:
    """The sequence of ``nsteps`` operations for ``seed`` (pure function of both)."""
    gen = Generator(seed)
    ops = []
    for i in range(nsteps):
        if not gen.procs:
            break
        ops.append(gen.step(tag=(seed % 100_000) * 1000 + i + 1))
    return ops
