"""The 5.7-era ``hmm_range_fault``: driver-defined pfn formats.

Kernel counterpart: ``include/linux/hmm.h`` and ``mm/hmm.c`` of v4.20 to v5.7,
before the fixed ``HMM_PFN_*`` layout of v5.8 replaced them (the change the
project's seed 004 discusses). Only nouveau's v5.7 era uses this module.

In that API the driver chose its own encoding:

* ``flags[HMM_PFN_VALID]``, ``flags[HMM_PFN_WRITE]`` and
  ``flags[HMM_PFN_DEVICE_PRIVATE]`` are the bits that mean valid, writable and
  device-private in the driver's words. The same VALID and WRITE bits, on
  input, ask for a fault and a write fault.
* ``values[HMM_PFN_ERROR]``, ``values[HMM_PFN_NONE]`` and
  ``values[HMM_PFN_SPECIAL]`` are whole words written for an entry the device
  must not use, an entry that is not present, and a special mapping.
* A valid entry is ``pfn << pfn_shift | flags...``. Nouveau used
  ``pfn_shift = 12`` so HMM wrote its PFNMAP words directly.
* The input of entry ``i`` is ``(pfns[i] & pfn_flags_mask) | default_flags``.

The output array is the input array, as in the kernel. Departure: an attempt
that fails leaves the array as the driver wrote it (the kernel leaves the
entries it had walked overwritten with outputs).

Special mappings (a PFN map's special PTEs) come back as ``values[HMM_PFN_ERROR]``,
not ``values[HMM_PFN_SPECIAL]``: the modern walk reports both as ERROR.

The walk itself is the modern one (``hmmsim.hmm.hmm_range_fault``), so fault
and invalidation behaviour is the current kernel's. Only the input and output
encodings are the 5.7 ones, and the output carries no mapping order (5.7 had
none).
"""

from __future__ import annotations

from typing import Final

import attrs
import numpy as np
from numpy.typing import NDArray

from .errors import InvalidArgument
from .hmm import (
    HMM_PFN_ERROR,
    HMM_PFN_ORDER_SHIFT,
    HMM_PFN_REQ_FAULT,
    HMM_PFN_REQ_WRITE,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    HmmRange,
    hmm_range_fault,
)
from .notifier import IntervalNotifier

#: Indexes of ``HmmRangeV57.flags`` (``enum hmm_pfn_flag_e``).
HMM_PFN_VALID_IDX: Final = 0
HMM_PFN_WRITE_IDX: Final = 1
HMM_PFN_DEVICE_PRIVATE_IDX: Final = 2
HMM_PFN_FLAG_MAX: Final = 3
#: Indexes of ``HmmRangeV57.values`` (``enum hmm_pfn_value_e``).
HMM_PFN_ERROR_IDX: Final = 0
HMM_PFN_NONE_IDX: Final = 1
HMM_PFN_SPECIAL_IDX: Final = 2
HMM_PFN_VALUE_MAX: Final = 3

_MASK64: Final = (1 << 64) - 1
_PFN_FIELD: Final = (1 << HMM_PFN_ORDER_SHIFT) - 1


@attrs.define(eq=False)
class HmmRangeV57:
    """``struct hmm_range`` of v5.7, with the driver's encoding tables."""

    notifier: IntervalNotifier
    start: int
    end: int
    pfns: NDArray[np.uint64]
    flags: tuple[int, int, int]
    values: tuple[int, int, int]
    pfn_shift: int
    default_flags: int = 0
    pfn_flags_mask: int = 0
    dev_private_owner: object | None = None
    notifier_seq: int = 0


def hmm_range_fault_v57(rng: HmmRangeV57) -> None:
    """``hmm_range_fault`` of v5.7: fault what the driver's words ask, write its words.

    Raises what ``hmm_range_fault`` raises (``Busy``, ``BadAddress``,
    ``NotPermitted``, ``InvalidArgument``), and then leaves ``pfns`` as it was.
    """
    if len(rng.flags) != HMM_PFN_FLAG_MAX or len(rng.values) != HMM_PFN_VALUE_MAX:
        raise InvalidArgument("hmm_range_fault_v57: flags and values need 3 entries each")
    pfns = rng.pfns
    valid, write, devpriv = rng.flags
    inputs = (pfns & np.uint64(rng.pfn_flags_mask & _MASK64)) | np.uint64(
        rng.default_flags & _MASK64
    )
    req = np.where((inputs & np.uint64(valid)) != 0, np.uint64(HMM_PFN_REQ_FAULT), np.uint64(0))
    req |= np.where((inputs & np.uint64(write)) != 0, np.uint64(HMM_PFN_REQ_WRITE), np.uint64(0))
    modern = HmmRange(
        rng.notifier,
        rng.start,
        rng.end,
        req,
        pfn_flags_mask=HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE,
        dev_private_owner=rng.dev_private_owner,
        notifier_seq=rng.notifier_seq,
    )
    hmm_range_fault(modern)
    _encode(rng, modern.hmm_pfns, valid, write, devpriv)


def _encode(
    rng: HmmRangeV57, out: NDArray[np.uint64], valid: int, write: int, devpriv: int
) -> None:
    """Turn modern outputs into the driver's words (vectorised)."""
    u = np.uint64
    is_valid = (out & u(HMM_PFN_VALID)) != 0
    is_error = (out & u(HMM_PFN_ERROR)) != 0
    pfn = out & u(_PFN_FIELD)
    words = (pfn << u(rng.pfn_shift)) | u(valid)
    words |= np.where((out & u(HMM_PFN_WRITE)) != 0, u(write), u(0))
    owner = rng.dev_private_owner
    if owner is not None and devpriv:
        phys = rng.notifier.mm.machine.phys
        dev = is_valid & (pfn >= u(phys.ram_pages))
        if dev.any():
            idx = np.flatnonzero(dev)
            owners = phys.pgmap_owners(pfn[idx].astype(np.int64))
            mine = idx[np.array([o is owner for o in owners], dtype=np.bool_)]
            words[mine] |= u(devpriv)
    words = np.where(is_valid, words, u(rng.values[HMM_PFN_NONE_IDX] & _MASK64))
    words = np.where(is_error, u(rng.values[HMM_PFN_ERROR_IDX] & _MASK64), words)
    rng.pfns[:] = words


__all__ = [
    "HMM_PFN_DEVICE_PRIVATE_IDX",
    "HMM_PFN_ERROR_IDX",
    "HMM_PFN_FLAG_MAX",
    "HMM_PFN_NONE_IDX",
    "HMM_PFN_SPECIAL_IDX",
    "HMM_PFN_VALID_IDX",
    "HMM_PFN_VALUE_MAX",
    "HMM_PFN_WRITE_IDX",
    "HmmRangeV57",
    "hmm_range_fault_v57",
]
