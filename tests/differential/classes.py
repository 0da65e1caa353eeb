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

``INTENTIONAL`` classes are differences kept on purpose; the runner ignores
them by name and ends the sequence there (the states cannot be resynchronised).
``KNOWN`` lists the model defects measured on main when this test was
written, each with its reason and the item of issue 10 that fixes it; the
default test fails on any first divergence outside both lists, and the lead
shrinks ``KNOWN`` as the fixes merge. docs/differential.md mirrors both lists.
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

#: Known model defects on main: class -> (reason, issue-10 item).
KNOWN: dict[str, tuple[str, str]] = {}


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
    return d.key
