"""Compare the host's and the model's step results and states, page by page.

``compare_step`` returns every ``Divergence`` of one step, most basic first
(syscall result, which processes live, VMAs, then per-page bits, frame
sharing, contents), each with a class name ``field@step-category[/backing]``
that ``classes.classify`` refines and looks up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .ops import BASE, PAGE, WINDOW_PAGES, Op
from .state import BIT_NAMES, ProcState, Result, frame_classes


@dataclass(frozen=True)
class Divergence:
    step: int
    op: Op
    #: result procs vmas vma_merge present swapped zero_page pmd_mapped large_folio
    #: exclusive frames contents crash
    field: str
    proc: int | None
    page: int | None
    host: object
    model: object
    backing: str = ""
    #: Host /proc/vmstat THP fallback counters that grew during this step.
    host_fallback: tuple[tuple[str, int], ...] = ()
    #: Available hugetlb pages (host, model) just before this step.
    hugetlb_avail: tuple[int, int] = (-1, -1)

    @property
    def key(self) -> str:
        base = f"{self.field}@{self.op.category()}"
        return f"{base}/{self.backing}" if self.backing else base

    def describe(self) -> str:
        where = ""
        if self.proc is not None:
            where = f" P{self.proc}"
        if self.page is not None:
            where += f" page W+{self.page * PAGE:#x}"
        return (
            f"step {self.step} [{self.op.describe()}]:{where} {self.field}: "
            f"host={self.host!r} model={self.model!r}"
        )


@dataclass
class StepStats:
    pages: int = 0
    agreeing: int = 0


def compare_step(
    step: int,
    op: Op,
    host_result: Result,
    model_result: Result,
    host: dict[int, ProcState],
    model: dict[int, ProcState],
    backing: Callable[[int, int], str],
    host_fallback: dict[str, int],
    pools: tuple[int, int],
    stats: StepStats,
) -> list[Divergence]:
    """All divergences of one step; ``stats`` counts page-steps compared and agreeing."""
    fb = tuple(sorted(host_fallback.items()))
    out: list[Divergence] = []

    def div(field: str, proc: int | None, page: int | None, h: object, m: object) -> None:
        b = backing(proc, page) if proc is not None and page is not None else ""
        out.append(Divergence(step, op, field, proc, page, h, m, b, fb, pools))

    if host_result != model_result:
        div("result", op.proc, None, host_result, model_result)
    if sorted(host) != sorted(model):
        div("procs", None, None, sorted(host), sorted(model))
    common = sorted(set(host) & set(model))
    for proc in common:
        if host[proc].vmas != model[proc].vmas:
            hv, mv = host[proc].vmas, model[proc].vmas
            first = next(
                (i for i, (x, y) in enumerate(zip(hv, mv, strict=False)) if x != y),
                min(len(hv), len(mv)),
            )
            h = _fmt_vma(hv[first]) if first < len(hv) else None
            m = _fmt_vma(mv[first]) if first < len(mv) else None
            page = None
            for v in (
                hv[first] if first < len(hv) else None,
                mv[first] if first < len(mv) else None,
            ):
                if v is not None:
                    page = (v[0] - BASE) // PAGE
                    break
            same_pages = _page_perms(hv) == _page_perms(mv)
            div("vma_merge" if same_pages else "vmas", proc, page, h, m)
    if not common:
        return out
    hs = [host[p] for p in common]
    ms = [model[p] for p in common]
    hf = np.concatenate([s.flags for s in hs])
    mf = np.concatenate([s.flags for s in ms])
    hc = frame_classes(hs)
    mc = frame_classes(ms)
    hh = np.concatenate([s.hashes for s in hs])
    mh = np.concatenate([s.hashes for s in ms])
    bad = (hf != mf) | (hc != mc) | (hh != mh)
    stats.pages += len(hf)
    stats.agreeing += int(len(hf) - np.count_nonzero(bad))
    for bit, name in BIT_NAMES.items():
        diff = np.flatnonzero((hf & bit) != (mf & bit))
        if len(diff):
            i = int(diff[0])
            proc, page = common[i // WINDOW_PAGES], i % WINDOW_PAGES
            div(name, proc, page, bool(hf[i] & bit), bool(mf[i] & bit))
    diff = np.flatnonzero(hc != mc)
    if len(diff):
        i = int(diff[0])
        proc, page = common[i // WINDOW_PAGES], i % WINDOW_PAGES
        div("frames", proc, page, _sharers(hc, i, common), _sharers(mc, i, common))
    diff = np.flatnonzero(hh != mh)
    if len(diff):
        i = int(diff[0])
        proc, page = common[i // WINDOW_PAGES], i % WINDOW_PAGES
        div("contents", proc, page, f"{int(hh[i]):016x}", f"{int(mh[i]):016x}")
    return out


def _page_perms(vmas: list[tuple[int, int, str]]) -> bytes:
    """The permissions of every page of the window (b"" where unmapped)."""
    out = bytearray(WINDOW_PAGES * 4)
    for start, end, perms in vmas:
        lo, hi = (start - BASE) // PAGE, (end - BASE) // PAGE
        out[lo * 4 : hi * 4] = perms.encode()[:4] * (hi - lo)
    return bytes(out)


def _fmt_vma(v: tuple[int, int, str]) -> str:
    return f"[W+{v[0] - BASE:#x}, W+{v[1] - BASE:#x}) {v[2]}"


def _sharers(labels: np.ndarray, i: int, procs: list[int]) -> str:
    """The pages sharing page i's frame, as 'P0:W+0x1000 P1:W+0x1000' (at most 4)."""
    if labels[i] < 0:
        return "not present"
    same = np.flatnonzero(labels == labels[i])
    names = [f"P{procs[j // WINDOW_PAGES]}:W+{(j % WINDOW_PAGES) * PAGE:#x}" for j in same[:4]]
    more = f" +{len(same) - 4}" if len(same) > 4 else ""
    return " ".join(names) + more
