"""odp: a model of RDMA on-demand paging on an mlx5 HCA, in three kernel eras.

``m.probe("odp")`` gives an ``OdpHca``. Its verbs are the native interface:
``alloc_ucontext(process).alloc_pd()``, ``reg_mr`` / ``dereg_mr`` /
``advise_mr`` with the ``IB_ACCESS_*`` and ``IB_UVERBS_ADVISE_MR_*`` names, and
QPs whose RDMA READ/WRITE (responder) and WQE data segments (requester)
fault through the page-fault event queue. ``hca.open(process)`` is the
generic mirror the conformance suite drives, built on those paths.
"""

from __future__ import annotations

from hmmsim import hookimpl

from .device import OdpHca, OdpStats, Pd, Qp, Ucontext
from .driver import Odp
from .mirror import OdpMirror
from .mr import OdpMr
from .uapi import (
    IB_ACCESS_HUGETLB,
    IB_ACCESS_LOCAL_WRITE,
    IB_ACCESS_ON_DEMAND,
    IB_ACCESS_REMOTE_READ,
    IB_ACCESS_REMOTE_WRITE,
    IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH,
    IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH_NO_FAULT,
    IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH_WRITE,
    IB_UVERBS_ADVISE_MR_FLAG_FLUSH,
    IMPLICIT_LENGTH,
    IbvSge,
    WcStatus,
    WorkCompletion,
    WorkRequestFailed,
)
from .umem import IbUmemOdp


@hookimpl
def hmmsim_register_drivers() -> list[type[Odp]]:
    return [Odp]


__all__ = [
    "IB_ACCESS_HUGETLB",
    "IB_ACCESS_LOCAL_WRITE",
    "IB_ACCESS_ON_DEMAND",
    "IB_ACCESS_REMOTE_READ",
    "IB_ACCESS_REMOTE_WRITE",
    "IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH",
    "IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH_NO_FAULT",
    "IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH_WRITE",
    "IB_UVERBS_ADVISE_MR_FLAG_FLUSH",
    "IMPLICIT_LENGTH",
    "IbUmemOdp",
    "IbvSge",
    "Odp",
    "OdpHca",
    "OdpMirror",
    "OdpMr",
    "OdpStats",
    "Pd",
    "Qp",
    "Ucontext",
    "WcStatus",
    "WorkCompletion",
    "WorkRequestFailed",
    "hmmsim_register_drivers",
]
