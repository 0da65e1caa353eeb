"""fork of populated 4 KiB anonymous memory: the model against the host kernel.

Target (issue "reliability", fork): the model's fork of 16 MiB to 1 GiB of
populated 4 KiB pages takes at most the host kernel's time per page. Both are
measured in the same run, best of a few rounds of wall-clock time:

- the kernel: this process maps and populates the same size (ctypes
  ``mmap`` + ``MADV_POPULATE_WRITE``, THP off for the range), then times
  ``os.fork()`` with a child that ``_exit``\\s at once and a parent that
  ``waitpid``\\s (so the child's teardown is included). The same fork without
  the mapping is the fixed cost of forking this interpreter; ``kernel_net``
  subtracts it.
- the model: ``Process.fork()`` of a process with the same populated mapping;
  the child's ``exit()`` is timed separately (``model_exit``).

``extra_info`` holds nanoseconds per page for each, plus the fixed cost.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from typing import Any

import hmmsim
import pytest
from hmmsim import MAP_ANONYMOUS, MAP_POPULATE, MAP_PRIVATE, PROT_READ, PROT_WRITE

MIB = 1 << 20
PAGE = 4096
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS
SMOKE = os.environ.get("HMMSIM_BENCH_SMALL") == "1"
SIZES = [16 * MIB, 64 * MIB] if SMOKE else [16 * MIB, 256 * MIB, 1024 * MIB]
ROUNDS = 5

_MADV_NOHUGEPAGE = 15
_MADV_POPULATE_WRITE = 23


def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def _best_fork_ns(rounds: int) -> int:
    """Best wall-clock time of fork + the child's immediate exit + waitpid."""
    best = 1 << 62
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        best = min(best, time.perf_counter_ns() - t0)
    return best


def _host_fork(size: int) -> tuple[int, int]:
    """(best fork time with ``size`` populated, best fork time without it) in ns."""
    libc = _libc()
    addr = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, ANON, -1, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        pytest.skip(f"host mmap failed: errno {ctypes.get_errno()}")
    try:
        libc.madvise(addr, size, _MADV_NOHUGEPAGE)  # 4 KiB pages, as the model's
        if libc.madvise(addr, size, _MADV_POPULATE_WRITE) != 0:
            ctypes.memset(addr, 1, size)  # a kernel without MADV_POPULATE_WRITE
        with_mapping = _best_fork_ns(ROUNDS)
    finally:
        libc.munmap(addr, size)
    return with_mapping, _best_fork_ns(ROUNDS)


@pytest.mark.benchmark(group="fork")
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s // MIB}MiB")
def test_fork_populated_against_host_kernel(benchmark: Any, size: int) -> None:
    npages = size // PAGE
    kernel_ns, empty_ns = _host_fork(size)

    m = hmmsim.Machine(hmmsim.MachineConfig(ram_bytes=2 * size + 64 * MIB, thp="never"))
    p = m.spawn()
    a = p.mmap(size, RW, ANON | MAP_POPULATE)
    p.fork().exit()  # first use of the code paths (lazy imports) stays out of the timing
    # Own rounds (pytest-benchmark runs a disabled benchmark only once).
    forks: list[int] = []
    exits: list[int] = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter_ns()
        child = p.fork()
        t1 = time.perf_counter_ns()
        child.exit()
        exits.append(time.perf_counter_ns() - t1)
        forks.append(t1 - t0)
    state: dict[str, Any] = {}

    def setup() -> tuple[tuple[()], dict[str, Any]]:
        child = state.pop("child", None)
        if child is not None:
            child.exit()
        return (), {}

    def run() -> None:
        state["child"] = p.fork()

    benchmark.pedantic(run, setup=setup, rounds=3, iterations=1)
    setup()
    assert p.read(a + size - PAGE, 1) == b"\0"
    info = benchmark.extra_info
    info["pages"] = npages
    info["model_fork_ns_per_page"] = min(forks) / npages
    info["model_exit_ns_per_page"] = min(exits) / npages
    info["kernel_fork_ns_per_page"] = kernel_ns / npages
    info["kernel_net_ns_per_page"] = max(kernel_ns - empty_ns, 0) / npages
    info["kernel_empty_fork_us"] = empty_ns / 1000
    print(f"\nfork {size // MIB} MiB: " + ", ".join(f"{k}={v:.1f}" for k, v in info.items()))
    assert min(forks) <= kernel_ns, info
