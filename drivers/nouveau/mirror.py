"""The generic ``Mirror`` of nouveau, built on its native paths.

A ``read`` or ``write`` is GPU loads and stores from a channel: they fault
through the replayable fault buffer exactly as a shader's would, never through
a side door. ``migrate_to_device`` is ``NOUVEAU_SVM_BIND``;
``migrate_to_system`` is CPU touches of the VRAM pages, which migrate them back
one page at a time (nouveau has no ioctl for that direction);
``make_exclusive`` is GPU atomics. ``device_ptes`` reads the GPU page table.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING

from hmmsim.driver import DevicePte, MemoryKind, Mirror, check_user_pages, check_user_range
from hmmsim.errors import HmmsimError, NotSupported
from hmmsim.memremap import page_memory_kind

from . import uapi
from .svm import ChannelKilled
from .uapi import NVIF_VMM_PFNMAP_V0_A, NVIF_VMM_PFNMAP_V0_W
from .vmm import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from hmmsim import Process

    from .device import NouveauDrm

#: Pages per batch of GPU accesses (what a warp's accesses put in the buffer at once).
ACCESS_BATCH = 64


class NouveauMirror(Mirror):
    """A client with SVM enabled (no unmanaged hole) and one channel."""

    def __init__(self, drm: NouveauDrm, process: Process) -> None:
        if drm.svm is None:
            raise NotSupported(f"nouveau: {drm.family} has no SVM support")
        self.drm = drm
        self.process = process
        self.cli = drm.open_file(process)
        self.cli.ioctl(uapi.DRM_NOUVEAU_SVM_INIT, uapi.DrmNouveauSvmInit(0, 0))
        self.channel = self.cli.channel_new()
        self.stats = self.cli.stats

    def __repr__(self) -> str:
        return f"NouveauMirror({self.drm!r}, pid {self.process.pid})"

    def _pieces(self, addr: int, length: int) -> list[tuple[int, int, int]]:
        """(address, offset into the buffer, length) per page touched."""
        out = []
        pos = addr
        end = addr + length
        while pos < end:
            n = min(end, (pos & ~(PAGE_SIZE - 1)) + PAGE_SIZE) - pos
            out.append((pos, pos - addr, n))
            pos += n
        return out

    def _batched(self, accesses: list[tuple[int, str, bytes | None, int]]) -> list[bytes]:
        """Run the accesses in batches. A cancelled fault kills the channel; the
        error is raised as the cause the driver saw (``BadAddress``,
        ``NotPermitted`` ...), and, as an application would, the mirror
        continues on a new channel."""
        out: list[bytes] = []
        for i in range(0, len(accesses), ACCESS_BATCH):
            try:
                out += self.channel.run(accesses[i : i + ACCESS_BATCH])
            except ChannelKilled as exc:
                self.channel = self.cli.channel_new()
                cause = exc.cause
                if isinstance(cause, HmmsimError):
                    raise type(cause)(f"nouveau: GPU fault cancelled: {cause.message}") from exc
                raise
        return out

    def read(self, addr: int, length: int) -> bytes:
        check_user_range(addr, length, "nouveau read")
        pieces = self._pieces(addr, length)
        got = self._batched([(a, "read", None, n) for a, _o, n in pieces])
        return b"".join(got)

    def write(self, addr: int, data: bytes) -> None:
        check_user_range(addr, len(data), "nouveau write")
        mv = memoryview(bytes(data))
        pieces = self._pieces(addr, len(data))
        # Fault every page in for writing first, so a failure stores nothing.
        self._batched([(a, "write", None, 0) for a, _o, _n in pieces])
        self._batched([(a, "write", bytes(mv[o : o + n]), n) for a, o, n in pieces])

    def _kind(self, pfn: int, vram: bool) -> MemoryKind:
        if vram:
            return MemoryKind.DEVICE_PRIVATE
        return page_memory_kind(self.drm.machine, pfn)

    def device_ptes(self, addr: int, npages: int) -> list[DevicePte | None]:
        # Slots are 4 KiB: an unaligned address means the slot it falls in.
        addr &= ~(PAGE_SIZE - 1)
        check_user_pages(addr, npages, "nouveau device_ptes")
        svmm = self.cli.svm
        vmm = svmm.vmm if svmm is not None else None
        out: list[DevicePte | None] = []
        for i in range(npages):
            a = addr + (i << PAGE_SHIFT)
            pte = vmm.lookup(a) if vmm is not None else None
            if pte is None:
                out.append(None)
                continue
            base = a & ~((1 << pte.shift) - 1)
            pfn = pte.pfn + ((a - base) >> PAGE_SHIFT)
            out.append(
                DevicePte(
                    a,
                    pfn,
                    bool(pte.word & NVIF_VMM_PFNMAP_V0_W),
                    bool(pte.word & NVIF_VMM_PFNMAP_V0_A),
                    pte.shift - PAGE_SHIFT,
                    self._kind(pfn, pte.vram),
                )
            )
        return out

    def device_pte_state(self, addr: int, npages: int) -> Hashable | None:
        """The raw GPU entries of the range: ``device_ptes`` is a function of
        them (and of which memory each pfn is, fixed once memory exists)."""
        svmm = self.cli.svm
        vmm = svmm.vmm if svmm is not None else None
        if vmm is None or not len(vmm):
            return None
        state = []
        for i in range(npages):
            pte = vmm.lookup(addr + (i << PAGE_SHIFT))
            if pte is not None:
                state.append((i, pte.word, pte.shift, pte.pfn))
        return tuple(state) or None

    def close(self) -> None:
        self.cli.close()

    def migrate_to_device(self, addr: int, npages: int) -> int:
        check_user_pages(addr, npages, "nouveau migrate_to_device")
        req = uapi.DrmNouveauSvmBind(
            header=uapi.svm_bind_header(
                uapi.NOUVEAU_SVM_BIND_COMMAND__MIGRATE, uapi.NOUVEAU_SVM_BIND_TARGET__GPU_VRAM
            ),
            va_start=addr,
            va_end=addr + npages * PAGE_SIZE,
        )
        self.cli.ioctl(uapi.DRM_NOUVEAU_SVM_BIND, req)
        return sum(1 for p in self._own_vram(addr, npages) if p)

    def _own_vram(self, addr: int, npages: int) -> list[bool]:
        return [
            e.kind == "device_private" and e.pfn is not None and self.drm.is_own_vram(e.pfn)
            for e in self.process.pagemap(addr, npages)
        ]

    def migrate_to_system(self, addr: int, npages: int) -> int:
        check_user_pages(addr, npages, "nouveau migrate_to_system")
        moved = 0
        for i, own in enumerate(self._own_vram(addr, npages)):
            if own:
                self.process.read(addr + i * PAGE_SIZE, 1)  # the CPU fault migrates it back
                moved += 1
        return moved

    def make_exclusive(self, addr: int, npages: int) -> None:
        check_user_pages(addr, npages, "nouveau make_exclusive")
        if npages == 0:
            return
        self._batched([(addr + i * PAGE_SIZE, "atomic", None, 1) for i in range(npages)])
