"""The verbs interface of an ODP-capable HCA: access bits, advice, work requests, completions.

Kernel counterparts: ``include/uapi/rdma/ib_user_ioctl_verbs.h`` (``IB_UVERBS_ACCESS_*``,
``IB_UVERBS_ADVISE_MR_*``), ``include/rdma/ib_verbs.h`` (``IB_ACCESS_*`` share the
values), ``include/rdma/ib_umem_odp.h`` (the 2019 ``ODP_*_ALLOWED_BIT`` dma_list bits)
and the mlx5 constants of ``drivers/infiniband/hw/mlx5`` (``odp.c``, ``mlx5_ib.h``,
``umr.h``) as of v6.16.
"""

from __future__ import annotations

import enum
from typing import Final

import attrs
from hmmsim.errors import HmmsimError

# ----- memory-region access flags (ibv_reg_mr) ---------------------------------------------

IB_ACCESS_LOCAL_WRITE: Final = 1 << 0
IB_ACCESS_REMOTE_WRITE: Final = 1 << 1
IB_ACCESS_REMOTE_READ: Final = 1 << 2
IB_ACCESS_REMOTE_ATOMIC: Final = 1 << 3
IB_ACCESS_MW_BIND: Final = 1 << 4
IB_ACCESS_ZERO_BASED: Final = 1 << 5
IB_ACCESS_ON_DEMAND: Final = 1 << 6
IB_ACCESS_HUGETLB: Final = 1 << 7
IB_ACCESS_FLUSH_GLOBAL: Final = 1 << 8
IB_ACCESS_FLUSH_PERSISTENT: Final = 1 << 9
IB_ACCESS_RELAXED_ORDERING: Final = 1 << 20
#: ``IB_ACCESS_OPTIONAL``: bits 20..29, which a driver that does not know one
#: ignores (``IB_UVERBS_ACCESS_OPTIONAL_RANGE``).
IB_ACCESS_OPTIONAL: Final = ((1 << 29) << 1) - (1 << 20)
#: Every bit ``ib_check_mr_access`` lets through (``IB_ACCESS_SUPPORTED``).
IB_ACCESS_SUPPORTED: Final = ((IB_ACCESS_FLUSH_PERSISTENT << 1) - 1) | IB_ACCESS_OPTIONAL
#: Bits that need a device capability mlx5 does not set (``IB_DEVICE_FLUSH_*``).
IB_ACCESS_FLUSH: Final = IB_ACCESS_FLUSH_GLOBAL | IB_ACCESS_FLUSH_PERSISTENT
#: Access bits that make an MR writable (``ib_access_writable``).
IB_ACCESS_WRITABLE: Final = IB_ACCESS_LOCAL_WRITE | IB_ACCESS_REMOTE_WRITE | IB_ACCESS_REMOTE_ATOMIC

#: ``ibv_reg_mr(pd, NULL, SIZE_MAX, ...ON_DEMAND)``: the implicit ODP MR.
IMPLICIT_LENGTH: Final = (1 << 64) - 1

# ----- ibv_advise_mr ---------------------------------------------------------------------

IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH: Final = 0
IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH_WRITE: Final = 1
IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH_NO_FAULT: Final = 2
IB_UVERBS_ADVISE_MR_FLAG_FLUSH: Final = 1 << 0

# ----- the umem's private dma_list bits (v5.3 .. v6.15) -----------------------------------

ODP_READ_ALLOWED_BIT: Final = 1 << 0
ODP_WRITE_ALLOWED_BIT: Final = 1 << 1
ODP_DMA_ADDR_MASK: Final = ~(ODP_READ_ALLOWED_BIT | ODP_WRITE_ALLOWED_BIT)

# ----- mlx5 ------------------------------------------------------------------------------

#: Entries of the page-fault event queue (``MLX5_IB_NUM_PF_EQE``).
MLX5_IB_NUM_PF_EQE: Final = 0x1000
#: Fault records preallocated in the mempool (``MLX5_IB_NUM_PF_DRAIN``).
MLX5_IB_NUM_PF_DRAIN: Final = 64
#: How far a responder fault of unknown length prefetches (``MAX_PREFETCH_LEN``).
MAX_PREFETCH_LEN: Final = 4 << 20
#: A UMR copies translation entries in 64-byte units: 8 MTTs
#: (``MLX5_UMR_MTT_NUM_ENTRIES_ALIGNMENT``).
MLX5_UMR_MTT_NUM_ENTRIES_ALIGNMENT: Final = 8
#: ``MLX5_IMR_MTT_BITS``: MTTs per implicit child (2^18 × 4 KiB = 1 GiB).
MLX5_IMR_MTT_BITS: Final = 30 - 12
MLX5_IMR_MTT_ENTRIES: Final = 1 << MLX5_IMR_MTT_BITS
MLX5_IMR_MTT_SHIFT: Final = MLX5_IMR_MTT_BITS + 12
MLX5_IMR_MTT_SIZE: Final = 1 << MLX5_IMR_MTT_SHIFT
#: Low bits of an MTT entry (``MLX5_IB_MTT_READ`` / ``MLX5_IB_MTT_WRITE``).
MLX5_IB_MTT_READ: Final = 1 << 0
MLX5_IB_MTT_WRITE: Final = 1 << 1
#: A WQE data segment of length 0 means 2 GiB (``pagefault_data_segments``).
ZERO_LENGTH_SGE_BYTES: Final = 1 << 31
#: Responder packets carry at most one MTU of payload.
IB_MTU: Final = 4096

# UMR translation-update flags (``MLX5_IB_UPD_XLT_*``).
MLX5_IB_UPD_XLT_ZAP: Final = 1 << 0
MLX5_IB_UPD_XLT_ENABLE: Final = 1 << 1
MLX5_IB_UPD_XLT_ATOMIC: Final = 1 << 2
MLX5_IB_UPD_XLT_ADDR: Final = 1 << 3
MLX5_IB_UPD_XLT_PD: Final = 1 << 4
MLX5_IB_UPD_XLT_ACCESS: Final = 1 << 5
MLX5_IB_UPD_XLT_INDIRECT: Final = 1 << 6
MLX5_IB_UPD_XLT_DOWNGRADE: Final = 1 << 7

# Page-fault handling flags (``MLX5_PF_FLAGS_*``).
MLX5_PF_FLAGS_DOWNGRADE: Final = 1 << 1
MLX5_PF_FLAGS_SNAPSHOT: Final = 1 << 2
MLX5_PF_FLAGS_ENABLE: Final = 1 << 3


class PageFaultType(enum.IntEnum):
    """The subtypes of an ODP page-fault EQE (``MLX5_PFAULT_SUBTYPE_*``)."""

    WQE = 0
    RDMA = 1


class WcStatus(enum.IntEnum):
    """``enum ibv_wc_status`` values a faulting work request can complete with."""

    SUCCESS = 0
    LOC_PROT_ERR = 4
    REM_ACCESS_ERR = 10
    GENERAL_ERR = 21


@attrs.frozen
class IbvSge:
    """``struct ibv_sge``: one data segment of a work request (or of ``ibv_advise_mr``)."""

    addr: int
    length: int
    lkey: int


@attrs.frozen
class WorkCompletion:
    """``struct ibv_wc`` of one work request; ``errno`` says why a failed one failed."""

    wr_id: int
    status: WcStatus
    byte_len: int = 0
    errno: int = 0


class WorkRequestFailed(HmmsimError):
    """A work request completed with an error completion.

    ``wc`` is the completion; ``cause`` the error the fault handler (or the
    protection check) saw. ``errno`` is the cause's, so callers can treat it
    as that error.
    """

    def __init__(self, wc: WorkCompletion, cause: BaseException | None) -> None:
        super().__init__(f"odp: work request failed ({wc.status.name}): {cause}")
        self.errno_value = getattr(cause, "errno", None) or 5
        self.errno = self.errno_value
        self.wc = wc
        self.cause = cause


__all__ = [
    name
    for name in dir()
    if (name.isupper() or name[0].isupper()) and name not in {"Final", "HmmsimError"}
]
