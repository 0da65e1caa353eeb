"""nouveau: a model of the NVIDIA open driver's SVM (shared virtual memory).

``m.probe("nouveau")`` gives a ``NouveauDrm``. ``drm.open_file(process)`` is
the native interface: a client with the ``DRM_NOUVEAU_SVM_INIT`` and
``DRM_NOUVEAU_SVM_BIND`` ioctls and GPU channels whose accesses fault through
the replayable fault buffer. ``drm.open(process)`` is the generic mirror the
conformance suite drives, built on those paths.
"""

from __future__ import annotations

from hmmsim import hookimpl

from .device import NouveauChannel, NouveauCli, NouveauDrm
from .driver import Nouveau
from .mirror import NouveauMirror
from .svm import ChannelKilled, NoSys, NouveauSvm, NouveauSvmm
from .uapi import (
    DRM_NOUVEAU_SVM_BIND,
    DRM_NOUVEAU_SVM_INIT,
    NOUVEAU_SVM_BIND_COMMAND__MIGRATE,
    NOUVEAU_SVM_BIND_TARGET__GPU_VRAM,
    DrmNouveauSvmBind,
    DrmNouveauSvmInit,
    svm_bind_header,
)


@hookimpl
def hmmsim_register_drivers() -> list[type[Nouveau]]:
    return [Nouveau]


__all__ = [
    "DRM_NOUVEAU_SVM_BIND",
    "DRM_NOUVEAU_SVM_INIT",
    "NOUVEAU_SVM_BIND_COMMAND__MIGRATE",
    "NOUVEAU_SVM_BIND_TARGET__GPU_VRAM",
    "ChannelKilled",
    "DrmNouveauSvmBind",
    "DrmNouveauSvmInit",
    "NoSys",
    "Nouveau",
    "NouveauChannel",
    "NouveauCli",
    "NouveauDrm",
    "NouveauMirror",
    "NouveauSvm",
    "NouveauSvmm",
    "hmmsim_register_drivers",
    "svm_bind_header",
]
