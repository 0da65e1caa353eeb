"""The nouveau DRM device, its clients (open files) and their GPU channels.

Kernel counterparts: ``struct nouveau_drm`` (one per GPU), ``struct
nouveau_cli`` (one per open of ``/dev/dri/renderD*``), and a channel created
on the client's SVM VMM, whose GPU accesses fault into the replayable fault
buffer.

A GPU access from a channel (``NouveauChannel.access`` or ``run`` for many)
completes against the client's GPU page table when the entry allows it.
Otherwise the GPU writes a fault-buffer entry and stalls; the fault work item
runs (``NouveauSvm.fault``); after the replay the access is tried again. A
cancelled fault kills the channel, and every later access from it fails with
``ChannelKilled``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from hmmsim import sched
from hmmsim.dma import dma_debug_device_teardown
from hmmsim.driver import Device, Driver, MirrorStats
from hmmsim.errors import Busy, InvalidArgument
from hmmsim.memremap import MEMORY_DEVICE_PRIVATE
from hmmsim.pci import PciDev, default_pci_function

from . import uapi
from .dmem import NouveauDmem
from .svm import ChannelKilled, NouveauSvm, NouveauSvmm, svm_bind, svm_init
from .uapi import ACCESS_KINDS, FAULT_ACCESS_PREFETCH, FaultEntry
from .vmm import NEED_ATOMIC, NEED_READ, NEED_WRITE, PAGE_SIZE

if TYPE_CHECKING:
    from hmmsim import Machine, Process

    from .mirror import NouveauMirror

ERAS: Final = ("mainline", "5.8", "5.7")
#: GPU families; SVM is only enabled on Pascal (Volta+ could not recover a killed channel).
FAMILIES: Final = ("pascal", "volta", "turing", "ampere")
_NEED: Final = {0: NEED_READ, 1: NEED_WRITE, 2: NEED_ATOMIC, 3: 0}
#: Before v5.9 an atomic was serviced as a write: the A bit was never set.
_NEED_OLD: Final = {0: NEED_READ, 1: NEED_WRITE, 2: NEED_WRITE, 3: 0}
#: Rounds of fault-and-replay after which a GPU access is declared livelocked.
MAX_REPLAY_ROUNDS: Final = 10_000


class NouveauDrm(Device):
    """``struct nouveau_drm``: the GPU, its VRAM (dmem), fault buffer and clients."""

    def __init__(
        self,
        driver: Driver,
        machine: Machine,
        era: str,
        family: str,
        vram_bytes: int,
        pci: PciDev | None,
    ) -> None:
        super().__init__(driver, machine)
        self.era = era
        self.family = family
        self.pci = (
            pci if pci is not None else default_pci_function(machine, f"nouveau{self.owner_id}")
        )
        if self.pci.dma is None:
            raise InvalidArgument(f"nouveau: {self.pci!r} is not an endpoint function")
        self.dma = self.pci.dma
        self.svm: NouveauSvm | None = NouveauSvm(self) if family == "pascal" else None
        self.dmem = NouveauDmem(self, vram_bytes)
        self.clients: list[NouveauCli] = []
        self.channels: dict[int, NouveauChannel] = {}
        self._next_inst = 0x1000

    def __repr__(self) -> str:
        return f"NouveauDrm(#{self.owner_id}, {self.family}, era={self.era})"

    def is_own_vram(self, pfn: int) -> bool:
        pgmap = self.machine.phys.pgmap_of(pfn)
        return pgmap is not None and pgmap.type == MEMORY_DEVICE_PRIVATE and pgmap.owner is self

    def open_file(self, process: Process) -> NouveauCli:
        """Open the render node: a new client bound to ``process``."""
        cli = NouveauCli(self, process)
        self.clients.append(cli)
        return cli

    def open(self, process: Process) -> NouveauMirror:
        """The generic mirror: a client with SVM enabled and one channel."""
        from .mirror import NouveauMirror

        return NouveauMirror(self, process)

    def new_inst(self) -> int:
        self._next_inst += 0x1000
        return self._next_inst

    def kill_channel(self, inst: int, cause: Exception | None = None) -> None:
        chan = self.channels.get(inst)
        if chan is not None and not chan.killed:
            chan.killed = True
            chan.cause = cause

    def remove(self) -> None:
        """Driver unload: close every client, evict VRAM, report DMA leaks."""
        for cli in list(self.clients):
            cli.close()
        self.dmem.fini()
        dma_debug_device_teardown(self.dma)


class NouveauCli:
    """``struct nouveau_cli``: one open file, its SVM and its channels."""

    def __init__(self, drm: NouveauDrm, process: Process) -> None:
        self.drm = drm
        self.process = process
        self.svm: NouveauSvmm | None = None
        self.channels: list[NouveauChannel] = []
        self.stats = MirrorStats()
        self.closed = False
        #: ``cli->mutex``: serialises the client's ioctls (SVM_INIT checks and sets).
        self.mutex = sched.Mutex(f"nouveau{drm.owner_id}.cli")

    def ioctl(self, nr: int, arg: Any) -> int:
        """``drm_ioctl`` for the SVM commands; returns 0 or raises the errno."""
        if self.closed:
            raise InvalidArgument("nouveau: ioctl on a closed file")
        if nr == uapi.DRM_NOUVEAU_SVM_INIT:
            svm_init(self, arg)
        elif nr == uapi.DRM_NOUVEAU_SVM_BIND:
            svm_bind(self, arg)
        else:
            raise InvalidArgument(f"nouveau: unknown ioctl {nr:#x}")
        return 0

    def channel_new(self) -> NouveauChannel:
        """A channel on the client's VMM (its instance routes faults to this svmm)."""
        drm = self.drm
        chan = NouveauChannel(self, drm.new_inst())
        self.channels.append(chan)
        drm.channels[chan.inst] = chan
        if drm.svm is not None and self.svm is not None:
            with drm.svm.mutex:
                drm.svm.inst[chan.inst] = self.svm
        return chan

    def close(self) -> None:
        """``nouveau_drm_postclose``: channels go, then the SVM (``nouveau_svmm_fini``)."""
        if self.closed:
            return
        self.closed = True
        drm = self.drm
        for chan in self.channels:
            chan.killed = True
            drm.channels.pop(chan.inst, None)
            if drm.svm is not None:
                with drm.svm.mutex:
                    drm.svm.inst.pop(chan.inst, None)
        if self.svm is not None:
            self.svm.fini()
        if self in drm.clients:
            drm.clients.remove(self)


class NouveauChannel:
    """A GPU channel on an SVM VMM: its accesses fault and replay."""

    def __init__(self, cli: NouveauCli, inst: int) -> None:
        self.cli = cli
        self.inst = inst
        self.killed = False
        self.cause: Exception | None = None
        self.faults = 0

    def __repr__(self) -> str:
        return f"NouveauChannel(inst={self.inst:#x}{', killed' if self.killed else ''})"

    def access(self, addr: int, kind: str, data: bytes | None = None, length: int = 1) -> bytes:
        """One GPU access of ``kind`` (read, write, atomic, prefetch) within a page."""
        return self.run([(addr, kind, data, length)])[0]

    def run(self, accesses: list[tuple[int, str, bytes | None, int]]) -> list[bytes]:
        """GPU accesses issued together: all faults of a round go into one batch.

        Each access stays within one page. Returns what each load read
        (``b""`` for stores and prefetches).

        Raises:
            ChannelKilled: a fault was cancelled (now or before).
            Busy: the accesses never completed (livelock guard).
            InvalidArgument: an unknown kind, or an access crossing a page.
        """
        drm = self.cli.drm
        svm = drm.svm
        needs = _NEED if drm.era == "mainline" else _NEED_OLD
        codes = []
        for addr, kind, _data, length in accesses:
            if kind not in ACCESS_KINDS:
                raise InvalidArgument(f"nouveau: unknown GPU access kind {kind!r}")
            if (addr & (PAGE_SIZE - 1)) + max(length, 1) > PAGE_SIZE:
                raise InvalidArgument(f"nouveau: access at {addr:#x} crosses a page")
            codes.append(ACCESS_KINDS[kind])
        results: list[bytes | None] = [None] * len(accesses)
        pending = list(range(len(accesses)))
        rounds = 0
        while pending:
            if self.killed:
                raise ChannelKilled(
                    f"nouveau: {self!r} was killed by a cancelled fault", self.cause
                )
            svmm = self.cli.svm
            vmm = svmm.vmm if svmm is not None else None
            sched.point("nouveau:gpu_access")
            still: list[int] = []
            for i in pending:
                addr, _kind, data, length = accesses[i]
                need = needs[codes[i]]
                if codes[i] == FAULT_ACCESS_PREFETCH and rounds:
                    results[i] = b""  # a prefetch completes once its fault was replayed
                elif need and vmm is not None and vmm.satisfies(addr, need):
                    results[i] = vmm.access(addr, need, data, length) if length else b""
                else:
                    still.append(i)
            pending = still
            if not pending:
                break
            if svm is None or svmm is None:
                raise ChannelKilled("nouveau: GPU fault on a channel without SVM")
            rounds += 1
            if rounds > MAX_REPLAY_ROUNDS:
                raise Busy(f"nouveau: GPU accesses from {self!r} never completed")
            for i in pending:
                addr = accesses[i][0]
                entry = FaultEntry(
                    self.inst,
                    addr & ~(PAGE_SIZE - 1),
                    drm.machine.clock.now_ns,
                    0,
                    0,
                    0,
                    codes[i],
                    0,
                    0,
                )
                if not svm.buffer.push(entry):
                    break  # the ring is full: the rest fault again after the replay
                # Counted once the buffer holds it: a fault the full ring
                # dropped is raised (and counted) again after the replay.
                self.faults += 1
                self.cli.stats.faults += 1
            svm.fault()
        return [r if r is not None else b"" for r in results]
