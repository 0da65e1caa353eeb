"""The model executor: the same operations on an ``hmmsim.Machine``.

The machine mirrors the host settings the run uses: THP ``madvise``, the
zero page on, no swap, and as many 2 MiB hugetlb pages as the host's pool had
available when the sequence started (the host pool is shared with whatever
else runs there). A CPU access that raises
``SegmentationFault``/``BusError`` kills the simulated process, as the
signal kills the host worker. State comes from the public ``pagemap`` (so
fixes to its decoding are measured), the folio order in ``phys.order`` and
the VMA list.
"""

from __future__ import annotations

import errno

import hmmsim
import numpy as np
from hmmsim.errors import BusError, SegmentationFault
from hmmsim.mm.pagetable import KIND_NONE
from hmmsim.mm.vma import VM_READ, VM_SHARED, VM_WRITE

from .hostkernel import HUGETLB_PAGES
from .ops import (
    BASE,
    MADV,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_HUGE_2MB,
    MAP_HUGETLB,
    MAP_POPULATE,
    MAP_PRIVATE,
    MAP_SHARED,
    MARGIN,
    PAGE,
    WINDOW_BYTES,
    WINDOW_PAGES,
    Op,
    write_data,
)
from .state import (
    EXCLUSIVE,
    LARGE,
    PMD,
    PRESENT,
    SWAPPED,
    ZERO,
    ProcState,
    Result,
    digest,
    page_hashes,
)

RAM_BYTES = 256 << 20


def new_machine(hugetlb_pages: int = HUGETLB_PAGES) -> hmmsim.Machine:
    cfg = hmmsim.MachineConfig(
        ram_bytes=RAM_BYTES,
        swap_bytes=0,
        thp="madvise",
        hugetlb_pages={hmmsim.HUGE_2MB: hugetlb_pages},
        thp_use_zero_page=True,
    )
    return hmmsim.Machine(cfg)


class ModelRun:
    """The simulated processes of one sequence, in the model."""

    def __init__(self, hugetlb_pages: int = HUGETLB_PAGES) -> None:
        self.machine = new_machine(hugetlb_pages)
        #: Available hugetlb pages just before the last op.
        self.last_hugetlb = -1
        self.procs: dict[int, hmmsim.Process] = {}
        #: An op raised something other than an errno or a signal.
        self.crashed = False

    def start(self) -> None:
        p = self.machine.spawn()
        lo, size = BASE - MARGIN, WINDOW_BYTES + 2 * MARGIN
        p.mmap(size, 0, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, addr=lo)
        p.munmap(BASE, WINDOW_BYTES)
        self.procs[0] = p

    def apply(self, op: Op) -> Result:
        p = self.procs[op.proc]
        pool = self.machine.hugetlb_pool(hmmsim.HUGE_2MB)
        self.last_hugetlb = pool.nr_free - pool.reserved
        try:
            return self._run(p, op)
        except (SegmentationFault, BusError) as e:
            del self.procs[op.proc]
            try:
                p.exit()  # the signal kills the process
            except Exception as exc:
                self.crashed = True
                return ("crash", f"exit after a signal: {type(exc).__name__}: {exc}")
            return ("signal", "SIGSEGV" if isinstance(e, SegmentationFault) else "SIGBUS")
        except OSError as e:
            return ("errno", errno.errorcode.get(e.errno or 0, "?"))
        except Exception as e:  # an internal error of the model: no kernel equivalent
            self.crashed = True
            return ("crash", f"{type(e).__name__}: {e}")

    def _run(self, p: hmmsim.Process, op: Op) -> Result:
        a = dict(op.args)
        addr = BASE + a.get("page", 0) * PAGE
        if op.kind == "mmap":
            flags = MAP_ANONYMOUS | (MAP_FIXED_NOREPLACE if a["noreplace"] else MAP_FIXED)
            mk = a["map_kind"]
            flags |= MAP_SHARED if mk in ("shared", "hugetlb_shared") else MAP_PRIVATE
            if mk.startswith("hugetlb"):
                flags |= MAP_HUGETLB | MAP_HUGE_2MB
            if a["populate"]:
                flags |= MAP_POPULATE
            return ("ok", p.mmap(a["npages"] * PAGE, a["prot"], flags, addr=addr))
        if op.kind == "munmap":
            p.munmap(addr, a["npages"] * PAGE)
        elif op.kind == "mprotect":
            p.mprotect(addr, a["npages"] * PAGE, a["prot"])
        elif op.kind == "madvise":
            p.madvise(addr, a["npages"] * PAGE, MADV[a["advice"]])
        elif op.kind == "mremap":
            new = BASE + a["new_page"] * PAGE if a["new_page"] is not None else None
            r = p.mremap(addr, a["old_npages"] * PAGE, a["new_npages"] * PAGE, a["flags"], new)
            return ("ok", r)
        elif op.kind == "read":
            return ("ok", digest(p.read(addr, a["npages"] * PAGE)))
        elif op.kind == "write":
            p.write(addr, write_data(op))
        elif op.kind == "fork":
            self.procs[a["child"]] = p.fork()
        elif op.kind == "exit":
            p.exit()
            del self.procs[op.proc]
        else:
            raise ValueError(op.kind)
        return ("ok", 0)

    def snapshot(self) -> dict[int, ProcState]:
        return {proc: self._state(p) for proc, p in sorted(self.procs.items())}

    def _state(self, p: hmmsim.Process) -> ProcState:
        n = WINDOW_PAGES
        phys = self.machine.phys
        flags = np.zeros(n, np.uint8)
        pfn = np.full(n, -1, np.int64)
        # Decode only the runs of non-empty entries (pagemap is a per-page loop).
        nonempty = p.mm.pt.walk(BASE // PAGE, n).kinds != KIND_NONE
        edges = np.flatnonzero(np.diff(np.concatenate(([0], nonempty.astype(np.int8), [0]))))
        entries = []
        for lo, hi in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
            entries += [(lo + j, e) for j, e in enumerate(p.pagemap(BASE + lo * PAGE, hi - lo))]
        for i, e in entries:
            if e.present:
                f = PRESENT
                pfn[i] = e.pfn
                if e.kind == "zero":
                    f |= ZERO
                if e.order >= 9:
                    f |= PMD
                if e.exclusive:
                    f |= EXCLUSIVE
                flags[i] = f
            elif e.swapped:
                flags[i] = SWAPPED
        idx = np.flatnonzero(pfn >= 0)
        if len(idx):
            large = phys.order[pfn[idx]] > 0
            flags[idx] |= np.where(large, LARGE, 0).astype(np.uint8)
        vmas = []
        readable = np.zeros(n, bool)
        for vma in p.mm.vmas.intersecting(BASE, BASE + WINDOW_BYTES):
            s, e_ = max(vma.start, BASE), min(vma.end, BASE + WINDOW_BYTES)
            perms = (
                ("r" if vma.flags & VM_READ else "-")
                + ("w" if vma.flags & VM_WRITE else "-")
                + "-"
                + ("s" if vma.flags & VM_SHARED else "p")
            )
            vmas.append((s, e_, perms))
            if vma.flags & VM_READ:
                readable[(s - BASE) // PAGE : (e_ - BASE) // PAGE] = True
        hashes = np.zeros(n, np.uint64)
        want = np.flatnonzero((pfn >= 0) & readable)
        if len(want):
            pages = phys.read_pages(pfn[want]).reshape(len(want), PAGE)
            hashes[want] = page_hashes(pages)
        return ProcState(flags, pfn, hashes, vmas)
