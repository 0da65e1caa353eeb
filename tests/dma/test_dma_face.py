"""``hmmsim.dma`` is the one import a driver's DMA side needs.

The HMM DMA helpers are defined in ``hmmsim.hmm`` (as in mm/hmm.c) and
re-exported by ``hmmsim.dma`` (as include/linux/hmm-dma.h declares them); the
DMA API and IOMMU domains come from their own modules through the same face.
"""

from __future__ import annotations

import ast
from pathlib import Path

import hmmsim.dma as dma
import hmmsim.dma_mapping as dma_mapping
import hmmsim.hmm as hmm
import hmmsim.iommu as iommu
from helpers import ANON, PAGE, RW
from hmmsim import Machine, MachineConfig, mmu_interval_notifier_insert, mmu_interval_read_begin
from hmmsim.hmm import HMM_PFN_REQ_FAULT, HmmRange, hmm_range_fault

N = 8


class _Ops:
    def invalidate(self, sub, rng, cur_seq):  # type: ignore[no-untyped-def]
        return True


HMM_DMA_NAMES = (
    "HmmDmaMap",
    "hmm_dma_map_alloc",
    "hmm_dma_map_free",
    "hmm_dma_map_pfn",
    "hmm_dma_unmap_pfn",
    "HMM_PFN_DMA_MAPPED",
    "HMM_PFN_P2PDMA",
    "HMM_PFN_P2PDMA_BUS",
)


def test_hmm_dma_helpers_are_reexported_by_hmmsim_dma_as_the_same_objects() -> None:
    for name in HMM_DMA_NAMES:
        assert getattr(dma, name) is getattr(hmm, name), name
        assert name in dma.__all__


def _defined_public_names(path: Path) -> set[str]:
    """The public names a module defines at top level (not the ones it imports)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if not n.startswith("_")}


def test_every_public_name_of_the_dma_api_and_iommu_modules_is_on_the_face() -> None:
    for mod in (dma_mapping, iommu):
        assert mod.__file__ is not None
        public = _defined_public_names(Path(mod.__file__))
        assert len(public) > 5
        missing = sorted(n for n in public if getattr(dma, n, None) is not getattr(mod, n))
        assert not missing, f"{mod.__name__} names missing from hmmsim.dma: {missing}"


def test_a_driver_maps_and_reads_a_range_with_hmmsim_dma_alone() -> None:
    m = Machine(MachineConfig(ram_bytes=16 << 20))
    p = m.spawn()
    a = p.mmap(N * PAGE, RW, ANON)
    p.write(a, b"".join(bytes([i + 1]) * PAGE for i in range(N)))
    sub = mmu_interval_notifier_insert(p.mm, a, N * PAGE, _Ops())
    dev = dma.DmaDevice(m, "face0", domain=dma.IommuDomain(m))
    map_ = dma.HmmDmaMap()
    dma.hmm_dma_map_alloc(dev, map_, N, PAGE)
    rng = HmmRange(sub, a, a + N * PAGE, map_.pfn_list, default_flags=HMM_PFN_REQ_FAULT)
    rng.notifier_seq = mmu_interval_read_begin(sub)
    with p.mm.mmap_lock.read():
        hmm_range_fault(rng)
    for i in range(N):
        bus = dma.hmm_dma_map_pfn(dev, map_, i, None)
        assert dma.dma_read(dev, bus, PAGE) == bytes([i + 1]) * PAGE
        assert int(map_.pfn_list[i]) & dma.HMM_PFN_DMA_MAPPED
    for i in range(N):
        assert dma.hmm_dma_unmap_pfn(dev, map_, i)
    dma.hmm_dma_map_free(dev, map_)
    assert dma.machine_violations(m) == []
