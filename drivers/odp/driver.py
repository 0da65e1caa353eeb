"""The odp driver plugin: an mlx5 HCA with RDMA on-demand paging, in three eras.

Kernel counterpart: ``drivers/infiniband/core/umem_odp.c`` and
``drivers/infiniband/hw/mlx5/odp.c`` (see ``history`` for the eras).

``m.probe("odp", hugetlb=..., implicit=..., era=..., pci=...)``:

* ``era`` is ``"mainline"`` (v6.16+, ``hmm_dma_map``; the default), ``"hmm"``
  (v5.10 .. v6.15, ``hmm_range_fault`` with the umem's own ``dma_list``) or
  ``"gup"`` (v5.3 .. v5.4, ``get_user_pages_remote`` and one per-mm notifier).
* ``hugetlb`` ``"1"``: the generic mirror's MRs carry ``IB_ACCESS_HUGETLB``;
  the device then refuses memory the CPU does not map huge (``HUGE_ONLY``).
* ``implicit`` ``"1"``: the generic mirror uses implicit ODP MRs over the
  whole address space (1 GiB children).
* ``pci`` (Python API only): the ``hmmsim.pci`` function the HCA sits at.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from hmmsim.driver import Capability, Driver, Parameter
from hmmsim.errors import InvalidArgument
from hmmsim.pci import PciDev

from .device import OdpHca
from .history import ERAS

if TYPE_CHECKING:
    from hmmsim import Machine

_BASE = Capability.MIRROR | Capability.READ | Capability.WRITE

#: The 6.16+ hugetlb indexing: pfn_list is filled in 4 KiB units but read in
#: umem-page units by populate_mtt, the invalidation and the unmap.
MAINLINE_HUGETLB_INDEXING = (
    "6.16+ (hmm_dma_map era) indexes the umem's pfn_list in umem pages in populate_mtt, "
    "mlx5_ib_invalidate_range and ib_umem_odp_unmap_dma_pages, while "
    "ib_umem_odp_map_dma_and_lock fills it in 4 KiB units: consistent only for 4 KiB "
    "umems; a hugetlb MR's second huge page is mapped from the wrong entry (not fixed)"
)


_GUP_EFAULT = (
    "v5.3 ib_umem_odp_map_dma_pages faults through get_user_pages_remote, which reports a "
    "write to a read-only VMA as -EFAULT; -EPERM came with hmm_range_fault in v5.10"
)
_GUP_HUGE_PIECES = (
    "v5.3 GUPs a huge umem page in 4 KiB pieces over several get_user_pages_remote calls, "
    "dropping mmap_sem in between; a huge page replaced meanwhile (COW break, migration) "
    "fails the sub-page contiguity check with -EFAULT instead of retrying, and leaks the "
    "reference of the sub-page that failed it (gone in v5.10)"
)


class Odp(Driver):
    """mlx5 with ODP: MRs whose pages are faulted by the HCA and zapped by notifiers."""

    name: ClassVar[str] = "odp"
    capabilities: ClassVar[Capability] = _BASE
    parameters: ClassVar[dict[str, Parameter | str]] = {
        "era": Parameter(
            "mainline (v6.16+ hmm_dma_map) | hmm (v5.10..v6.15) | gup (v5.3..v5.4)",
            ERAS,
            "mainline",
        ),
        "hugetlb": Parameter("1: the mirror's MRs are IB_ACCESS_HUGETLB", ("0", "1"), "0"),
        "implicit": Parameter("1: the mirror uses implicit ODP MRs", ("0", "1"), "0"),
    }
    variants: ClassVar[list[dict[str, str]]] = [
        {},
        {"hugetlb": "1", "era": "hmm"},
        {"implicit": "1"},
    ]

    #: Parameters a preset subclass probes with when none are given.
    preset: ClassVar[dict[str, str]] = {}

    @classmethod
    def _params(cls, given: dict[str, Any]) -> tuple[str, bool, bool, PciDev | None]:
        params = {**cls.preset, **given}
        unknown = set(params) - {"era", "hugetlb", "implicit", "pci"}
        if unknown:
            raise InvalidArgument(f"odp: unknown parameter(s) {sorted(unknown)}")
        era = str(params.get("era", "mainline"))
        if era not in ERAS:
            raise InvalidArgument(f"odp: era must be one of {', '.join(ERAS)}, not {era!r}")
        flags = []
        for key in ("hugetlb", "implicit"):
            v = str(params.get(key, "0"))
            if v not in ("0", "1"):
                raise InvalidArgument(f"odp: {key} must be 0 or 1, not {v!r}")
            flags.append(v == "1")
        if flags[0] and flags[1]:
            raise InvalidArgument("odp: implicit ODP MRs cannot be IB_ACCESS_HUGETLB")
        pci = params.get("pci")
        if pci is not None and not isinstance(pci, PciDev):
            raise InvalidArgument("odp: pci must be an hmmsim.pci function")
        return era, flags[0], flags[1], pci

    def capabilities_for(self, **params: Any) -> Capability:
        """MIRROR, READ, WRITE; HUGE_MAPPINGS and HUGE_ONLY for hugetlb MRs; P2P in
        the mainline era (``hmm_dma_map_pfn`` maps P2P pages) with 4 KiB MRs only:
        peer memory is mapped in 4 KiB pages (``vm_insert_page``), which a hugetlb
        MR refuses with -EINVAL like any other small mapping."""
        era, hugetlb, _implicit, _pci = self._params(params)
        caps = _BASE
        if hugetlb:
            caps |= Capability.HUGE_MAPPINGS | Capability.HUGE_ONLY
        elif era == "mainline":
            caps |= Capability.P2P
        return caps

    def expected_failures(self, **params: Any) -> dict[str, str]:
        """The 2019 (gup) era's behaviours the suite catches; none for the others
        (``MAINLINE_HUGETLB_INDEXING`` does not show with the mirror's one-huge-page
        MRs; the odp tests show it with larger ones)."""
        era, hugetlb, _implicit, _pci = self._params(params)
        if era != "gup":
            return {}
        out = {"permissions/permission_errors": _GUP_EFAULT}
        if hugetlb:
            out["races/write_vs_fork"] = _GUP_HUGE_PIECES
            out["races/read_vs_page_migration"] = _GUP_HUGE_PIECES
        return out

    def probe(self, machine: Machine, **params: Any) -> OdpHca:
        era, hugetlb, implicit, pci = self._params(params)
        return OdpHca(self, machine, era, hugetlb, implicit, pci)


class OdpHugetlbHmm(Odp):
    """``odp`` preset to ``era=hmm, hugetlb=1``: what the bug zoo builds the mutants
    of hugetlb-only code from (a mutant is probed without parameters)."""

    preset: ClassVar[dict[str, str]] = {"era": "hmm", "hugetlb": "1"}
    variants: ClassVar[list[dict[str, str]]] = [{}]


class OdpGup(Odp):
    """``odp`` preset to ``era=gup`` (v5.3), for the bug zoo's mutants of the GUP era."""

    preset: ClassVar[dict[str, str]] = {"era": "gup"}
    variants: ClassVar[list[dict[str, str]]] = [{}]
