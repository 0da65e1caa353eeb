"""What both executors report after a step: results and per-page process state.

A ``ProcState`` covers the window (``ops.WINDOW_PAGES`` pages) of one simulated
process: a bit field per page (present, swapped, zero page, PMD-mapped, large
folio, exclusively mapped), the frame number (only used to build equivalence
classes across processes, never compared as a value), a 64-bit hash of the
contents of present readable pages, and the VMAs clipped to the window.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .ops import PAGE

PRESENT = 1
SWAPPED = 2
ZERO = 4
PMD = 8
LARGE = 16
EXCLUSIVE = 32
BIT_NAMES = {
    PRESENT: "present",
    SWAPPED: "swapped",
    ZERO: "zero_page",
    PMD: "pmd_mapped",
    LARGE: "large_folio",
    EXCLUSIVE: "exclusive",
}

#: A VMA as /proc/pid/maps shows it: (start, end, "rwxp"/"rw-s" perms).
VmaRow = tuple[int, int, str]
#: ("ok", value) | ("errno", "ENOMEM") | ("signal", "SIGSEGV")
Result = tuple[str, object]

#: Words of a page that enter its hash. Every page the sequences store is
#: either zero or ``ops.write_data``: a unique 8-byte mark in word 0 and one
#: fill byte everywhere else, so these words identify it; sampling them keeps
#: the snapshot cheap (no copy of whole pages on the host).
HASH_WORDS = np.array([0, 1, 257, 511])
_MULT = np.array(
    [0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93],
    dtype=np.uint64,
)


def hash_words(words: np.ndarray) -> np.ndarray:
    """A 64-bit hash per row of sampled words ((n, len(HASH_WORDS)) uint64); never 0."""
    with np.errstate(over="ignore"):
        h = (words * _MULT).sum(axis=1, dtype=np.uint64)
    return h | np.uint64(1)


def page_hashes(pages: np.ndarray) -> np.ndarray:
    """The hash of each page of a (n, 4096) uint8 array."""
    words = np.ascontiguousarray(pages).view(np.uint64).reshape(len(pages), PAGE // 8)
    return hash_words(words[:, HASH_WORDS])


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


@dataclass
class ProcState:
    flags: np.ndarray  # uint8 per page
    pfn: np.ndarray  # int64 per page, -1 where not present
    hashes: np.ndarray  # uint64 per page, 0 where not present or not readable
    vmas: list[VmaRow]


def frame_classes(states: list[ProcState]) -> np.ndarray:
    """Label each present page of the processes by which frame it shares.

    Labels are numbered by first occurrence (process order, then address), so
    two runs share a labelling exactly when the same pages share frames.
    """
    pfns = np.concatenate([s.pfn for s in states]) if states else np.zeros(0, np.int64)
    out = np.full(len(pfns), -1, np.int64)
    present = pfns >= 0
    if present.any():
        _, first, inv = np.unique(pfns[present], return_index=True, return_inverse=True)
        rank = np.empty(len(first), np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(len(first))
        out[present] = rank[inv]
    return out
