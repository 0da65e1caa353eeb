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

#: Known model defects: class -> (reason, what it would take).
#:
#: What is left after the issue-10 fixes; every class here was seen as a first
#: divergence on unseen seeds (docs/differential.md, "Measured"); none is a
#: difference kept on purpose.
KNOWN: dict[str, tuple[str, str]] = {
    "vma_merge": (
        "only VMA boundaries differ. Seen before the last mremap merge fixes on seeds "
        "52223, 60414, 60513, 61059, 51920, 63079 and 65355, which agree now (each rule "
        "found has a test in tests/mm/test_differential_anon_fidelity.py); kept until a "
        "run on unseen seeds shows no case left",
        "the merge rule of whatever case is seen next",
    ),
    "exclusive@write/anon": (
        "observed once (seed 61244) and not reproduced since (six reruns agree): pagemap "
        "bit 56 of another process's page after a write, next to a process exiting by "
        "SIGSEGV; probably the host's timing around that exit",
        "a reproducible case",
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
