"""The nouveau driver plugin: capabilities, probe parameters, probe.

Kernel counterpart: ``drivers/gpu/drm/nouveau`` (SVM on Pascal GPUs), as
``nouveau_svm.c`` and ``nouveau_dmem.c`` use HMM.

``m.probe("nouveau", era=..., family=..., vram=..., pci=...)``:

* ``era`` is ``"mainline"`` (v5.9+, the default), ``"5.8"`` or ``"5.7"``: the
  16-entry fault windows of 2020, with their known defects (see ``history``).
* ``family`` is ``"pascal"`` (the default) or a later family (``"volta"``,
  ``"turing"``, ``"ampere"``). SVM is enabled on Pascal only: on later GPUs a
  killed channel could not be recovered reliably, so ``NOUVEAU_SVM_INIT``
  returns -ENOSYS there.
* ``vram`` is the VRAM size in MiB handed to dmem (default 64; 2 MiB chunks).
* ``pci`` (Python API only) is the ``hmmsim.pci`` function the GPU sits at.
  Without it the GPU gets a function of its own behind its own IOMMU domain.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from hmmsim.driver import Capability, Driver
from hmmsim.errors import InvalidArgument
from hmmsim.pci import PciDev

from .device import ERAS, FAMILIES, NouveauDrm

if TYPE_CHECKING:
    from hmmsim import Machine

_SVM_CAPS = (
    Capability.MIRROR
    | Capability.READ
    | Capability.WRITE
    | Capability.HUGE_MAPPINGS
    | Capability.DEVICE_PRIVATE
    | Capability.MIGRATE
    | Capability.EXCLUSIVE
)


#: Failures of every era, from quirks mainline still has.
_QUIRKS = {
    "teardown/exit_with_mirror_open": (
        "nouveau_mn_ops has no .release: at exit the mm's pages are freed while the GPU "
        "page table and its DMA mappings still point at them, until the client closes "
        "(nouveau_svm.c; not fixed)"
    ),
    "races/notifier_remove_vs_invalidation": (
        "nouveau_vmm_fini clears svmm->vmm under the mutex before nvif_vmm_dtor tears the "
        "GPU page table down: an invalidation in between skips its PFNCLR and pages are "
        "freed under live DMA mappings (no channel is left to use them; not fixed)"
    ),
    "races/migrate_unpopulated_vs_cpu_store": (
        "nouveau_dmem_migrate_chunk hands nouveau_pfns_map the VRAM words it built before "
        "migrate_vma_pages, without looking at which pages migrate_vma_pages really moved: "
        "a CPU store that fills a hole between migrate_vma_setup and migrate_vma_pages keeps "
        "its system page, and the GPU maps the VRAM page that migrate_vma_finalize then "
        "frees (nouveau_dmem.c; not fixed)"
    ),
}
#: The v5.7/v5.8 defect: a retried window asks for what the failed attempt got.
_STALE_REQUESTS = (
    "the request array is the output array and is not refilled after -EBUSY or a stale "
    "read_retry (the v5.8 FIXME; v5.7 reuses it the same way after a stale read_retry): "
    "a read retried after an mprotect asks for a write and is cancelled with -EPERM. "
    "Fixed in v5.9 by 'nouveau/svm: fault one page at a time', which uses "
    "default_flags per fault"
)


class Nouveau(Driver):
    """nouveau with SVM: replayable GPU faults, VRAM as device-private memory."""

    name: ClassVar[str] = "nouveau"
    capabilities: ClassVar[Capability] = _SVM_CAPS
    parameters: ClassVar[dict[str, str]] = {
        "era": "mainline (v5.9+, default) | 5.8 | 5.7: the 16-entry fault windows of 2020",
        "family": "pascal (default) | volta | turing | ampere: SVM is enabled on Pascal only",
        "vram": "VRAM in MiB for device-private memory (default 64, a multiple of 2)",
    }
    variants: ClassVar[list[dict[str, str]]] = [{}]

    @staticmethod
    def _params(params: dict[str, Any]) -> tuple[str, str, int, PciDev | None]:
        unknown = set(params) - {"era", "family", "vram", "pci"}
        if unknown:
            raise InvalidArgument(f"nouveau: unknown parameter(s) {sorted(unknown)}")
        era = str(params.get("era", "mainline"))
        if era not in ERAS:
            raise InvalidArgument(f"nouveau: era must be one of {', '.join(ERAS)}, not {era!r}")
        family = str(params.get("family", "pascal"))
        if family not in FAMILIES:
            raise InvalidArgument(f"nouveau: family must be one of {', '.join(FAMILIES)}")
        try:
            vram = int(params.get("vram", 64))
        except ValueError:
            raise InvalidArgument(f"nouveau: vram {params['vram']!r} is not a number") from None
        if vram <= 0 or vram % 2:
            raise InvalidArgument(f"nouveau: vram {vram} MiB is not a positive multiple of 2")
        pci = params.get("pci")
        if pci is not None and not isinstance(pci, PciDev):
            raise InvalidArgument("nouveau: pci must be an hmmsim.pci function")
        return era, family, vram << 20, pci

    def capabilities_for(self, **params: Any) -> Capability:
        """Pascal has SVM. Before v5.9 the GPU mapped 4 KiB only (no mapping
        order), and atomics were serviced as writes (``make_device_exclusive``
        came in v5.14), so those eras claim neither large mappings nor
        exclusive access."""
        era, family, _vram, _pci = self._params(params)
        if family != "pascal":
            return Capability.NONE
        if era != "mainline":
            return _SVM_CAPS & ~(Capability.HUGE_MAPPINGS | Capability.EXCLUSIVE)
        return _SVM_CAPS

    def expected_failures(self, **params: Any) -> dict[str, str]:
        """The quirks of the real driver that the suite catches, per era."""
        era, _family, _vram, _pci = self._params(params)
        out = dict(_QUIRKS)
        if era != "mainline":
            out["races/read_vs_mprotect"] = _STALE_REQUESTS
        return out

    def probe(self, machine: Machine, **params: Any) -> NouveauDrm:
        era, family, vram, pci = self._params(params)
        return NouveauDrm(self, machine, era, family, vram, pci)
