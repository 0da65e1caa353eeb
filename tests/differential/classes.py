"""Named divergence classes: the intentional ones, and the known model defects.

A divergence's class is ``field@step-category[/backing]``: which compared
field first differs (``result``, ``procs``, ``vmas``, ``present``,
``swapped``, ``zero_page``, ``pmd_mapped``, ``large_folio``, ``exclusive``,
``frames``, ``contents``, or ``crash`` when the model raised an internal
error), the category of the step that produced it (``mmap_anon``,
``madvise_COLLAPSE``, ``mremap_dontunmap``, ``fork`` …) and, for page fields,
the backing of the page in the model (``anon``, ``shared``, ``hugetlb``,
``hugetlb_shared``, ``unmapped``). That triple is the predicate: a class
matches exactly the divergences with that field, step category and backing.
One class is semantic instead: ``vma_merge``, VMA lists that differ while
every page of the window has the same permissions (mapped or not, ``rwxp``)
on both sides, i.e. only the boundaries between compatible VMAs differ.

``INTENTIONAL`` classes are differences kept on purpose; the runner ignores
them by name and ends the sequence there (the states cannot be resynchronised).
``KNOWN`` lists the model defects still seen after the issue-10 fixes, each
with its reason and what would fix it; the default test fails on any first
divergence outside both lists. docs/differential.md mirrors both lists.
"""

from __future__ import annotations

from .compare import Divergence

#: Differences kept on purpose: name -> reason.
INTENTIONAL: dict[str, str] = {
    "host_thp_fallback": (
        "the host could not allocate a 2 MiB folio (its /proc/vmstat thp_fault_fallback or "
        "thp_collapse_alloc_failed grew during the step) where the model, whose memory is "
        "never fragmented, got one; the model has no fragmentation to reproduce it"
    ),
    "hugetlb_pool_contention": (
        "the host's 2 MiB hugetlb pool is shared with other programs: when its available "
        "page count differed from the model's just before the step, an ENOMEM or SIGBUS "
        "on one side only is that difference, not a model defect"
    ),
}

_HTLB_VMAS = (
    "observed on seeds 61724, 61735, 61802, 62951, not analysed: after a MAP_FIXED "
    "hugetlb mmap over existing mappings the VMAs differ in extent (the mmap failed on one "
    "side after the old mappings were unmapped, or mapped a different range)"
)

#: Known model defects: class -> (reason, what it would take).
#:
#: What is left after the issue-10 fixes; every class here was seen as a first
#: divergence on unseen seeds (docs/differential.md, "Measured"). Each was
#: reproduced on the host; none is a difference kept on purpose.
KNOWN: dict[str, tuple[str, str]] = {
    "vma_merge": (
        "only VMA boundaries differ. Seen: the VMA left behind by MREMAP_DONTUNMAP of a "
        "whole faulted VMA does not merge back with its neighbour in Linux 6.18 when a "
        "later mprotect makes their flags equal (it does when nothing was faulted before "
        "the move); the model merges it (seed 52223, checked on the host). Not analysed: "
        "a MAP_FIXED anon mmap or an mremap next to a compatible VMA that Linux merges "
        "and the model does not (seeds 60414, 60513, 61059), and MADV_NOHUGEPAGE over "
        "VMAs built by multi-VMA mremap moves (seed 51920)",
        "identify 6.18's merge rule for a VMA whose anon_vma was unlinked by dontunmap_complete",
    ),
    "result@madvise_COLLAPSE": (
        "observed on seeds 60043 and 62575, not analysed: Linux collapses a chunk where the "
        "model returns EINVAL; the model's VMA there may be smaller than the kernel's (the "
        "vma_merge class decides whether a 2 MiB chunk fits)",
        "the vma_merge rules",
    ),
    "present@madvise_PAGEOUT/shared": (
        "observed on seeds 62208 and 62872, not analysed: after MADV_PAGEOUT of shmem a page "
        "is still mapped in the model where Linux unmapped it",
        "shmem reclaim",
    ),
    "exclusive@write/anon": (
        "observed once (seed 61244), not analysed: pagemap bit 56 of a page of another "
        "process after a write differs",
        "pagemap exclusive bit",
    ),
    "result@mmap_hugetlb": (
        "observed once (seed 61543), not analysed: a MAP_FIXED hugetlb mmap gets ENOMEM in "
        "the model where Linux succeeds (hugetlb reservations after fork/COW, as below)",
        "hugetlb reservations",
    ),
    "vmas@mmap_hugetlb/hugetlb": (_HTLB_VMAS, "hugetlb reservations"),
    "vmas@mmap_hugetlb/hugetlb_shared": (_HTLB_VMAS, "hugetlb reservations"),
    "vmas@mmap_hugetlb_shared/hugetlb_shared": (_HTLB_VMAS, "hugetlb reservations"),
    "present@madvise_PAGEOUT/anon": (
        "observed on seed 10491 (and twice on seeds 50000-52999 before), not analysed: "
        "after MADV_PAGEOUT of private anonymous pages with no swap, Linux still maps a "
        "page the model no longer maps (a lazy-free page discarded on one side only?)",
        "anonymous reclaim without swap",
    ),
    "pmd_mapped@write/anon": (
        "observed once (seed 10570), not analysed: a write fault maps a THP by a PMD in "
        "Linux where the model maps small pages (THP eligibility after the VMA changes)",
        "THP fault eligibility",
    ),
    "result@mmap_hugetlb_populate": (
        "a MAP_POPULATE private hugetlb mmap after fork and COW of another private hugetlb "
        "mapping: the model runs out of hugetlb pages (ENOMEM) where Linux succeeds (seed "
        "51270, a 13-step repro); reservation accounting across fork/COW, not analysed",
        "hugetlb reservations",
    ),
}


def host_thp_fallback(d: Divergence) -> bool:
    """The host fell back to small pages where the model mapped a THP."""
    return (
        bool(d.host_fallback)
        and d.field in ("pmd_mapped", "large_folio")
        and d.host is False
        and d.model is True
    )


_POOL_OUTCOMES = (("errno", "ENOMEM"), ("signal", "SIGBUS"))


def hugetlb_pool_contention(d: Divergence) -> bool:
    """A hugetlb allocation outcome differs while the two pools differed."""
    host_avail, model_avail = d.hugetlb_avail
    return (
        d.field == "result"
        and host_avail >= 0
        and host_avail != model_avail
        and (d.host in _POOL_OUTCOMES or d.model in _POOL_OUTCOMES)
    )


def is_intentional(d: Divergence) -> bool:
    return host_thp_fallback(d) or hugetlb_pool_contention(d)


def classify(d: Divergence) -> str:
    """The class name of a divergence (an intentional name, else its key)."""
    if host_thp_fallback(d):
        return "host_thp_fallback"
    if hugetlb_pool_contention(d):
        return "hugetlb_pool_contention"
    if d.field == "vma_merge":
        return "vma_merge"
    return d.key
