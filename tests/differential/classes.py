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

_MERGE = (
    "only VMA boundaries differ: Linux merges (or leaves unsplit) compatible VMAs where the "
    "model splits them, e.g. mprotect to the protection a VMA already has, the source of "
    "MREMAP_DONTUNMAP, a MAP_FIXED mmap next to a compatible VMA"
)
_POPULATE = (
    "MAP_POPULATE differs: Linux populates nothing in a PROT_NONE mapping (and does "
    "populate a readable hugetlb one); the model does the opposite"
)
_MADV_THP_HUGETLB = (
    "Linux accepts MADV_HUGEPAGE/NOHUGEPAGE on a hugetlb VMA as a no-op; the model "
    "returns EINVAL (it treats VM_DONTEXPAND as special)"
)
_HTLB_RESV = (
    "a private hugetlb page fault gets SIGBUS in the model where Linux finds a page "
    "(reservation accounting after MAP_FIXED replacement, fork or COW)"
)
_PAGEOUT = (
    "MADV_PAGEOUT with no swap: Linux still unmaps the pages (and splits a THP) before "
    "finding no swap slot; the model leaves them mapped"
)
_MULTI_VMA = (
    "Linux (6.17+) moves a source range that spans several VMAs with MREMAP_FIXED, "
    "each VMA keeping its flags; the model returns EFAULT"
)
_CRASH = "the model trips 'folio refcount underflow' on a private hugetlb page"
_EXCL = (
    "pagemap bit 56 (PM_MMAP_EXCLUSIVE): Linux reports an anon page mapped once as "
    "exclusive where the model does not (or the reverse), after this step"
)
_EXCL_ITEM = "pagemap exclusive bit"
_OBSERVED = "observed, not analysed yet: "
_HTLB = "not assigned (hugetlb reservations)"
_HTLB_FIXED = (
    "after a MAP_FIXED hugetlb mmap over existing mappings the VMAs differ in extent or "
    "protection, not only in merging (observed, not analysed yet)"
)
_VMAS = "mmap/mremap/MAP_FIXED page tables (VMA merge)"
_MADV = "mprotect/madvise/collapse"

#: Known model defects on main: class -> (reason, issue-10 item).
KNOWN: dict[str, tuple[str, str]] = {
    # madvise
    "result@madvise_COLLAPSE": (
        "Linux collapses a chunk of shmem that has pages into a shmem THP (forced "
        "collapse); the model has no shmem THPs and returns EOPNOTSUPP",
        _MADV,
    ),
    "zero_page@madvise_COLLAPSE/anon": (
        "after MADV_COLLAPSE Linux still maps the (huge) zero page where the model put a THP",
        _MADV,
    ),
    "result@madvise_FREE": (
        "MADV_FREE on a hugetlb mapping is EINVAL in Linux; the model accepts it",
        _MADV,
    ),
    "result@madvise_HUGEPAGE": (_MADV_THP_HUGETLB, _MADV),
    "result@madvise_NOHUGEPAGE": (_MADV_THP_HUGETLB, _MADV),
    "present@madvise_PAGEOUT/anon": (_PAGEOUT, _MADV),
    "present@madvise_PAGEOUT/shared": (_PAGEOUT, _MADV),
    "pmd_mapped@madvise_PAGEOUT/anon": (_PAGEOUT, _MADV),
    "pmd_mapped@mprotect/anon": (
        "mprotect of part of a THP to the protection it already has changes nothing in "
        "Linux; the model splits the PMD",
        _MADV,
    ),
    "result@mprotect": (_OBSERVED + "Linux succeeds, the model returns EINVAL", _MADV),
    "vmas@mprotect/hugetlb": (
        "mprotect over a range covering hugetlb VMAs: Linux changes them, the model leaves "
        "one with its old protection",
        _MADV,
    ),
    # faults
    "present@read/shared": (
        "a read fault on shmem maps the neighbouring cached pages too (fault-around) in Linux",
        "shmem fault-around",
    ),
    "present@write/anon": (
        _OBSERVED + "a write fault that maps a THP in Linux maps small pages in the model",
        "not assigned (THP fault eligibility)",
    ),
    "pmd_mapped@write/anon": (
        _OBSERVED + "a write fault's PMD mapping differs (THP eligibility or zero-page COW)",
        "huge zero page write",
    ),
    "present@fork/anon": (_OBSERVED + "pages present after fork differ", "fork"),
    # MAP_POPULATE
    "present@mmap_anon_populate/anon": (_POPULATE, _VMAS),
    "present@mmap_shared_populate/shared": (_POPULATE, _VMAS),
    "present@mmap_hugetlb_populate/hugetlb": (_POPULATE, _VMAS),
    "present@mmap_hugetlb_shared_populate/hugetlb_shared": (_POPULATE, _VMAS),
    # VMA layout and mremap
    "vma_merge": (_MERGE, _VMAS),
    "result@mremap_shrink": (
        "Linux shrinks a range that spans several VMAs (it unmaps the tail first); the model "
        "returns EFAULT",
        _VMAS,
    ),
    "result@mremap_fixed": (_MULTI_VMA, _VMAS),
    "result@mremap_dontunmap": (_MULTI_VMA + " (also with MREMAP_DONTUNMAP)", _VMAS),
    "result@mremap_grow": (_OBSERVED + "Linux grows in place, the model returns EINVAL", _VMAS),
    "result@mmap_hugetlb": (_OBSERVED + "a MAP_FIXED hugetlb mmap's result differs", _VMAS),
    "result@mmap_hugetlb_populate": (
        _OBSERVED + "a MAP_FIXED|MAP_POPULATE hugetlb mmap's result differs",
        _VMAS,
    ),
    "vmas@mprotect/anon": (_OBSERVED + "VMA protections differ after mprotect", _MADV),
    "vmas@mmap_hugetlb/anon": (_HTLB_FIXED, _VMAS),
    "vmas@mmap_hugetlb/shared": (_HTLB_FIXED, _VMAS),
    "vmas@mmap_hugetlb/hugetlb": (_HTLB_FIXED, _VMAS),
    "vmas@mmap_hugetlb/hugetlb_shared": (_HTLB_FIXED, _VMAS),
    "vmas@mmap_hugetlb_populate/anon": (_HTLB_FIXED, _VMAS),
    "vmas@mmap_hugetlb_populate/shared": (_HTLB_FIXED, _VMAS),
    "vmas@mmap_hugetlb_populate/hugetlb_shared": (_HTLB_FIXED, _VMAS),
    "vmas@mmap_hugetlb_shared/anon": (_HTLB_FIXED, _VMAS),
    "vmas@mmap_hugetlb_shared/hugetlb_shared": (_HTLB_FIXED, _VMAS),
    "vmas@mmap_hugetlb_shared_populate/anon": (_HTLB_FIXED, _VMAS),
    "vmas@mmap_hugetlb_shared_populate/shared": (_HTLB_FIXED, _VMAS),
    # hugetlb
    "result@write": (_HTLB_RESV, _HTLB),
    "result@read": (_HTLB_RESV, _HTLB),
    "crash@mmap_hugetlb_populate": (_CRASH, _HTLB),
    "crash@write": (_CRASH, _HTLB),
    "contents@mmap_hugetlb_populate/hugetlb": (
        "a populated private hugetlb page holds stale bytes in the model; Linux hands out "
        "zeroed huge pages",
        _HTLB,
    ),
    # pagemap exclusive bit (bit 56)
    "exclusive@mremap_fixed/anon": (_EXCL, _EXCL_ITEM),
    "exclusive@mremap_dontunmap/anon": (_EXCL, _EXCL_ITEM),
    "exclusive@mmap_anon/anon": (_EXCL, _EXCL_ITEM),
    "exclusive@mmap_shared/anon": (_EXCL, _EXCL_ITEM),
    "exclusive@mmap_shared_populate/anon": (_EXCL, _EXCL_ITEM),
    "exclusive@madvise_NOHUGEPAGE/anon": (_EXCL, _EXCL_ITEM),
    "exclusive@madvise_DONTNEED/anon": (_EXCL, _EXCL_ITEM),
    "exclusive@munmap/anon": (_EXCL, _EXCL_ITEM),
    "exclusive@write/anon": (_EXCL, _EXCL_ITEM),
    "exclusive@write/shared": (_EXCL, _EXCL_ITEM),
    "contents@write/hugetlb_shared": (
        _OBSERVED + "bytes of a shared hugetlb page differ after a write",
        "fork",
    ),
    "contents@write/shared": (
        _OBSERVED + "bytes of a shared page differ after a write (COW/shmem sharing)",
        "fork",
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
