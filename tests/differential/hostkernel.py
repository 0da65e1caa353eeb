"""The host-kernel executor: simulated processes are real forked processes.

Each simulated process is a worker process driven over a Unix socket
(commands in, results and state snapshots out, pickled with a length
prefix). The first worker is forked from the test process; a ``fork`` op
makes the worker fork, and the grandchild becomes a new worker on a socket
the driver passed it with ``SCM_RIGHTS``. Workers issue the syscalls through
``ctypes.CDLL(None, use_errno=True)`` and touch memory with ``ctypes``
(``string_at``/``memmove``). A touch that faults kills the worker as it would
kill any process; ``faulthandler`` writes the signal's name to the socket on
the way down, so the driver reports ``("signal", "SIGSEGV")`` (or SIGBUS).

State is read from ``/proc/self/pagemap`` (present, swapped, pfn, exclusive
bit 56), ``/proc/kpageflags`` (zero page, compound), the ``PAGEMAP_SCAN``
ioctl (``PAGE_IS_HUGE``: PMD-mapped) and ``/proc/self/maps``.

``host_settings`` neutralises khugepaged and proactive compaction, reserves
hugetlb pages and restores every setting afterwards, also on failure.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import faulthandler
import os
import pickle
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .ops import (
    BASE,
    MADV,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_HUGE_2MB,
    MAP_HUGETLB,
    MAP_POPULATE,
    MAP_PRIVATE,
    MAP_SHARED,
    MARGIN,
    PAGE,
    WINDOW_BYTES,
    WINDOW_PAGES,
    Op,
    write_data,
)
from .state import (
    EXCLUSIVE,
    HASH_WORDS,
    LARGE,
    PMD,
    PRESENT,
    SWAPPED,
    ZERO,
    ProcState,
    Result,
    digest,
    hash_words,
)

#: Hugetlb pages the host pool gets for the run (the model's pool has the same).
HUGETLB_PAGES = 8
_THP = Path("/sys/kernel/mm/transparent_hugepage")
_MAGIC = b"HMS1"
_LOCK = "/tmp/hmmsim-differential.lock"
_PAGEMAP_SCAN = 0xC0606610  # _IOWR('f', 16, struct pm_scan_arg)
_PAGE_IS_HUGE = 1 << 6
#: /proc/vmstat counters that grow when the host could not get a huge page.
FALLBACK_COUNTERS = ("thp_fault_fallback", "thp_collapse_alloc_failed", "thp_fault_fallback_charge")

_KPF_COMPOUND_HEAD = 1 << 15
_KPF_COMPOUND_TAIL = 1 << 16
_KPF_ZERO_PAGE = 1 << 24


class _ScanArg(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in [
            "size",
            "flags",
            "start",
            "end",
            "walk_end",
            "vec",
            "vec_len",
            "max_pages",
            "category_inverted",
            "category_mask",
            "category_anyof_mask",
            "return_mask",
        ]
    ]


class _Region(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("cat", ctypes.c_uint64)]


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
    for name in ("munmap", "madvise", "mprotect"):
        getattr(libc, name).restype = ctypes.c_int
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mremap.restype = ctypes.c_void_p
    libc.mremap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_void_p,
    ]
    libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
    return libc


_MAP_FAILED = ctypes.c_void_p(-1).value


# ----- support and settings ------------------------------------------------------------
def host_support() -> str | None:
    """Why the host cannot run the differential test, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if os.geteuid() != 0:
        return "not root: /proc/self/pagemap hides PFNs and /proc/kpageflags is unreadable"
    try:
        with open("/proc/kpageflags", "rb") as f:
            f.read(8)
    except OSError as e:
        return f"/proc/kpageflags unreadable: {e}"
    if not (_THP / "enabled").exists():
        return "no transparent hugepage support"
    if not Path("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages").exists():
        return "no 2 MiB hugetlb pool"
    libc = _libc()
    lo = BASE - MARGIN
    size = WINDOW_BYTES + 2 * MARGIN
    addr = libc.mmap(lo, size, 3, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
    if addr != lo:
        if addr not in (None, _MAP_FAILED):
            libc.munmap(addr, size)
        return f"window {lo:#x} is not free in this process"
    try:
        ctypes.memset(lo, 1, 1)
        with open("/proc/self/pagemap", "rb") as f:
            entry = struct.unpack("<Q", os.pread(f.fileno(), 8, lo // PAGE * 8))[0]
        if not entry & (1 << 63) or not entry & ((1 << 55) - 1):
            return "/proc/self/pagemap shows no PFNs"
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
        try:
            regions = (_Region * 4)()
            arg = _ScanArg(size=96, start=lo, end=lo + PAGE, vec=ctypes.addressof(regions))
            arg.vec_len = 4
            arg.return_mask = _PAGE_IS_HUGE
            if libc.ioctl(fd, _PAGEMAP_SCAN, ctypes.byref(arg)) < 0:
                return f"PAGEMAP_SCAN ioctl unsupported ({os.strerror(ctypes.get_errno())})"
        finally:
            os.close(fd)
    finally:
        libc.munmap(lo, size)
    return None


def _settings_plan() -> list[tuple[Path, str]]:
    hp = Path("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages")
    plan = [
        (_THP / "enabled", "madvise"),
        (_THP / "defrag", "madvise"),
        (_THP / "use_zero_page", "1"),
        (_THP / "shmem_enabled", "never"),
        (_THP / "khugepaged/defrag", "0"),
        (_THP / "khugepaged/pages_to_scan", "8"),
        (_THP / "khugepaged/scan_sleep_millisecs", "86400000"),
        (_THP / "khugepaged/alloc_sleep_millisecs", "86400000"),
        (Path("/proc/sys/vm/compaction_proactiveness"), "0"),
        (hp, str(int(hp.read_text()) + HUGETLB_PAGES)),
    ]
    # Only PMD-sized THPs: the model has no mTHP.
    for d in sorted(_THP.glob("hugepages-*kB")):
        if d.name != "hugepages-2048kB" and (d / "enabled").exists():
            plan.append((d / "enabled", "never"))
    if (_THP / "hugepages-2048kB/enabled").exists():
        plan.append((_THP / "hugepages-2048kB/enabled", "inherit"))
    return plan


def _current(path: Path) -> str:
    text = path.read_text().strip()
    if "[" in text:  # "always [madvise] never": the bracketed choice
        return text.split("[", 1)[1].split("]", 1)[0]
    return text


@contextlib.contextmanager
def host_settings() -> Iterator[None]:
    """Quiet the host for the run; restore every setting after, also on failure.

    Runs on one host are serialised by a lock file: two overlapping runs would
    otherwise save each other's settings and restore the wrong ones.
    """
    import fcntl  # POSIX only; host_support() has already said this is Linux

    lock = os.open(_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    global _topped_up
    _topped_up = 0
    plan = _settings_plan()
    saved: list[tuple[Path, str, str]] = []
    try:
        for path, value in plan:
            old = _current(path)
            path.write_text(value)
            saved.append((path, old, value))
        with contextlib.suppress(OSError):
            Path("/proc/sys/vm/compact_memory").write_text("1")
        yield
    finally:
        for path, old, value in reversed(saved):
            if path.name == "nr_hugepages":
                # Give back only our pages if someone else changed the pool meanwhile.
                now = int(path.read_text())
                ours = int(value) + _topped_up
                old = old if now == ours else str(max(0, now - HUGETLB_PAGES - _topped_up))
            with contextlib.suppress(OSError):
                path.write_text(old)
        os.close(lock)


_HP = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")
#: Pages ``top_up_hugetlb`` added to the pool during this ``host_settings`` scope.
_topped_up = 0


def hugetlb_available() -> int:
    """Free 2 MiB hugetlb pages nobody has reserved (what a new mapping can get)."""
    return int((_HP / "free_hugepages").read_text()) - int((_HP / "resv_hugepages").read_text())


def top_up_hugetlb() -> None:
    """Give the pool back ``HUGETLB_PAGES`` available pages before a sequence.

    Linux 6.18 leaks a hugetlb reservation when part of a private hugetlb
    mapping is moved by mremap (the reservation outlives the process), and
    the sequences do that: over a long run the host's available count would
    fall to zero and every hugetlb step would diverge. ``host_settings``
    takes these pages back at the end (the leaked reservations stay).
    """
    global _topped_up
    short = HUGETLB_PAGES - hugetlb_available()
    if short > 0:
        nr = _HP / "nr_hugepages"
        with contextlib.suppress(OSError):
            nr.write_text(str(int(nr.read_text()) + short))
            _topped_up += short


def fallback_counters() -> dict[str, int]:
    out = {}
    with open("/proc/vmstat") as f:
        for line in f:
            name, _, value = line.partition(" ")
            if name in FALLBACK_COUNTERS:
                out[name] = int(value)
    return out


# ----- the wire --------------------------------------------------------------------------
def _send(sock: socket.socket, obj: object) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_MAGIC + struct.pack("<I", len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(bytes(buf))
        buf += chunk
    return bytes(buf)


class WorkerDied(Exception):
    """The worker process ended; ``signal`` names the signal when faulthandler said."""

    def __init__(self, sig: str) -> None:
        super().__init__(sig)
        self.signal = sig


def _recv(sock: socket.socket) -> Any:
    try:
        head = _recv_exact(sock, 8)
    except EOFError as e:
        head = e.args[0]
    if head[:4] != _MAGIC or len(head) < 8:
        rest = head
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                rest += chunk
        text = rest.decode(errors="replace")
        for sig in ("Segmentation fault", "Bus error"):
            if sig in text:
                raise WorkerDied("SIGSEGV" if sig.startswith("Seg") else "SIGBUS")
        raise WorkerDied(f"died: {text[:200]!r}")
    (n,) = struct.unpack("<I", head[4:])
    return pickle.loads(_recv_exact(sock, n))


# ----- the worker (runs in the forked process) ------------------------------------------
class _Worker:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.libc = _libc()
        self.pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)
        self.kpf = os.open("/proc/kpageflags", os.O_RDONLY)
        self.regions = (_Region * WINDOW_PAGES)()

    def adopt(self, sock: socket.socket) -> None:
        self.sock = sock
        os.close(self.pagemap)  # pagemap reads the mm of the opener: reopen in the child
        self.pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)
        faulthandler.enable(file=sock.fileno(), all_threads=False)

    def serve(self) -> None:
        while True:
            try:
                msg = _recv(self.sock)
            except WorkerDied:
                return
            cmd = msg[0]
            if cmd == "exit":
                return
            if cmd == "snap":
                _send(self.sock, self.snapshot())
            elif cmd == "op":
                op: Op = msg[1]
                if op.kind == "fork":
                    fds = socket.recv_fds(self.sock, 1, 1)[1]
                    pid = os.fork()
                    if pid == 0:
                        self.sock.close()
                        self.adopt(socket.socket(fileno=fds[0]))
                        continue
                    os.close(fds[0])
                    _send(self.sock, (("ok", 0), {}, pid, -1))
                    continue
                if op.kind == "exit":
                    _send(self.sock, (("ok", 0), {}, 0, -1))
                    return
                avail = hugetlb_available()
                before = fallback_counters()
                result = self.run(op)
                after = fallback_counters()
                delta = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k)}
                _send(self.sock, (result, delta, 0, avail))

    def _ret(self, value: int | None, good: object = 0) -> Result:
        if value is None or value == _MAP_FAILED or value == -1:
            return ("errno", errno.errorcode.get(ctypes.get_errno(), "?"))
        return ("ok", good if good is not None else value)

    def run(self, op: Op) -> Result:
        a = dict(op.args)
        libc = self.libc
        addr = BASE + a.get("page", 0) * PAGE
        if op.kind == "mmap":
            length = a["npages"] * PAGE
            flags = MAP_ANONYMOUS | (MAP_FIXED_NOREPLACE if a["noreplace"] else MAP_FIXED)
            mk = a["map_kind"]
            flags |= MAP_SHARED if mk in ("shared", "hugetlb_shared") else MAP_PRIVATE
            if mk.startswith("hugetlb"):
                flags |= MAP_HUGETLB | MAP_HUGE_2MB
            if a["populate"]:
                flags |= MAP_POPULATE
            r = libc.mmap(addr, length, a["prot"], flags, -1, 0)
            return self._ret(r, None)
        if op.kind == "munmap":
            return self._ret(libc.munmap(addr, a["npages"] * PAGE))
        if op.kind == "mprotect":
            return self._ret(libc.mprotect(addr, a["npages"] * PAGE, a["prot"]))
        if op.kind == "madvise":
            return self._ret(libc.madvise(addr, a["npages"] * PAGE, MADV[a["advice"]]))
        if op.kind == "mremap":
            new = BASE + a["new_page"] * PAGE if a["new_page"] is not None else 0
            r = libc.mremap(addr, a["old_npages"] * PAGE, a["new_npages"] * PAGE, a["flags"], new)
            return self._ret(r, None)
        if op.kind == "read":
            return ("ok", digest(ctypes.string_at(addr, a["npages"] * PAGE)))
        if op.kind == "write":
            # Page by page, in address order, as the model's store loop does:
            # one memmove of the whole range may copy backwards (glibc picks
            # the direction by address), and then a store through two views
            # of the same shmem page (MREMAP_DONTUNMAP) keeps the lower
            # view's bytes, and a store that faults part-way stores nothing
            # below the fault.
            data = write_data(op)
            for off in range(0, len(data), PAGE):
                ctypes.memmove(addr + off, data[off : off + PAGE], PAGE)
            return ("ok", 0)
        raise ValueError(op.kind)

    def snapshot(self) -> ProcState:
        n = WINDOW_PAGES
        raw = np.frombuffer(os.pread(self.pagemap, n * 8, BASE // PAGE * 8), dtype=np.uint64)
        present = (raw >> np.uint64(63)) & np.uint64(1) == 1
        flags = np.where(present, PRESENT, 0).astype(np.uint8)
        flags |= np.where((raw >> np.uint64(62)) & np.uint64(1) == 1, SWAPPED, 0).astype(np.uint8)
        excl = (raw >> np.uint64(56)) & np.uint64(1) == 1
        flags |= np.where(excl, EXCLUSIVE, 0).astype(np.uint8)
        pfn = np.where(present, (raw & np.uint64((1 << 55) - 1)).astype(np.int64), -1)
        # Frame flags, read in runs of consecutive pfns.
        idx = np.flatnonzero(present)
        if len(idx):
            pf = pfn[idx]
            uniq = np.unique(pf)
            kflags = np.empty(len(uniq), np.uint64)
            breaks = np.flatnonzero(np.diff(uniq) != 1) + 1
            lo = 0
            for hi in [*breaks.tolist(), len(uniq)]:
                first = int(uniq[lo])
                buf = os.pread(self.kpf, (hi - lo) * 8, first * 8)
                kflags[lo:hi] = np.frombuffer(buf, dtype=np.uint64)
                lo = hi
            kf = kflags[np.searchsorted(uniq, pf)]
            zero = (kf & np.uint64(_KPF_ZERO_PAGE)) != 0
            large = (kf & np.uint64(_KPF_COMPOUND_HEAD | _KPF_COMPOUND_TAIL)) != 0
            flags[idx] |= np.where(zero, ZERO, 0).astype(np.uint8)
            flags[idx] |= np.where(large, LARGE, 0).astype(np.uint8)
        # PMD-mapped pages.
        arg = _ScanArg(size=96, start=BASE, end=BASE + WINDOW_BYTES)
        arg.vec = ctypes.addressof(self.regions)
        arg.vec_len = WINDOW_PAGES
        arg.category_anyof_mask = _PAGE_IS_HUGE
        arg.return_mask = _PAGE_IS_HUGE
        nreg = self.libc.ioctl(self.pagemap, _PAGEMAP_SCAN, ctypes.byref(arg))
        if nreg < 0:
            raise OSError(ctypes.get_errno(), "PAGEMAP_SCAN")
        for i in range(nreg):
            reg = self.regions[i]
            lo, hi = (reg.start - BASE) // PAGE, (reg.end - BASE) // PAGE
            # PAGE_IS_HUGE marks every hugetlb entry, present or not.
            flags[lo:hi] |= np.where(present[lo:hi], PMD, 0).astype(np.uint8)
        vmas = read_maps()
        hashes = np.zeros(n, np.uint64)
        readable = np.zeros(n, bool)
        for start, end, perms in vmas:
            if perms[0] == "r":
                readable[(start - BASE) // PAGE : (end - BASE) // PAGE] = True
        want = present & readable
        runs = np.flatnonzero(np.diff(np.concatenate(([0], want.astype(np.int8), [0]))))
        for lo, hi in zip(runs[::2].tolist(), runs[1::2].tolist(), strict=True):
            # A view of present, readable pages: reading them faults nothing in.
            ptr = ctypes.cast(BASE + lo * PAGE, ctypes.POINTER(ctypes.c_uint64))
            words = np.ctypeslib.as_array(ptr, shape=(hi - lo, PAGE // 8))
            hashes[lo:hi] = hash_words(words[:, HASH_WORDS])
        return ProcState(flags, pfn, hashes, vmas)


def read_maps() -> list[tuple[int, int, str]]:
    """This process's VMAs clipped to the window, as (start, end, perms)."""
    assert f"{BASE - MARGIN:x}"[:3] == "59f" and f"{BASE:x}"[:3] == "5a0"
    out = []
    lo, hi = BASE, BASE + WINDOW_BYTES
    with open("/proc/self/maps") as f:
        for line in f:
            if line[:3] not in ("59f", "5a0"):  # cheap prefilter: the window's neighbourhood
                continue
            rng, perms = line.split(None, 2)[:2]
            s, e = (int(x, 16) for x in rng.split("-"))
            if e > lo and s < hi:
                out.append((max(s, lo), min(e, hi), perms))
    return out


def _worker_main(sock: socket.socket) -> None:
    # Every process of a sequence runs on one CPU (forked workers inherit it).
    # MADV_FREE parks folios in a per-CPU batch off the LRU, and MADV_PAGEOUT
    # drains only its own CPU's batch: a process that moved to another CPU
    # between the two would find its lazy-free pages still mapped, an outcome
    # of scheduling, not of the kernel's rules the model follows.
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # forked workers reap themselves
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    w = _Worker(sock)
    w.adopt(sock)
    libc = w.libc
    lo, size = BASE - MARGIN, WINDOW_BYTES + 2 * MARGIN
    flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE
    if libc.mmap(lo, size, 0, flags, -1, 0) != lo or libc.munmap(BASE, WINDOW_BYTES):
        _send(sock, ("errno", errno.errorcode.get(ctypes.get_errno(), "?")))
        return
    _send(sock, ("ok", 0))
    w.serve()


def _wait_gone(pid: int, timeout: float) -> None:
    """Wait until process ``pid`` has released its memory (reaped, or a zombie).

    A process tears its mm down on the way out, after the worker's last reply:
    the next snapshot must not see its mappings (mapcounts, hugetlb pages).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.0005)
    raise TimeoutError(f"worker {pid} did not exit within {timeout} s")


# ----- the driver -------------------------------------------------------------------------
class HostRun:
    """The simulated processes of one sequence, as real processes."""

    def __init__(self, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self.workers: dict[int, tuple[socket.socket, int]] = {}
        self.root_pid = 0
        self.last_fallback: dict[str, int] = {}
        #: Available hugetlb pages on the host just before the last op (-1: not read).
        self.last_hugetlb = -1
        self._pending_child: socket.socket

    def start(self) -> None:
        a, b = socket.socketpair()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                a.close()
                _worker_main(b)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        b.close()
        a.settimeout(self.timeout)
        self.root_pid = pid
        self.workers[0] = (a, pid)
        status = _recv(a)
        if status != ("ok", 0):
            self.close()
            raise OSError(f"could not reserve the window on the host: {status}")

    def apply(self, op: Op) -> Result:
        self.send_op(op)
        return self.recv_op(op)

    def send_op(self, op: Op) -> None:
        """Start ``op`` in its worker (``recv_op`` collects it; the model runs meanwhile)."""
        sock, _pid = self.workers[op.proc]
        _send(sock, ("op", op))
        if op.kind == "fork":
            a, b = socket.socketpair()
            socket.send_fds(sock, [b"F"], [b.fileno()])
            b.close()
            a.settimeout(self.timeout)
            self._pending_child = a

    def recv_op(self, op: Op) -> Result:
        sock, _pid = self.workers[op.proc]
        try:
            result, self.last_fallback, child_pid, self.last_hugetlb = _recv(sock)
        except WorkerDied as e:
            self._drop(op.proc, wait=True)
            self.last_fallback = {}
            self.last_hugetlb = -1
            if op.kind == "fork":
                self._pending_child.close()
            return ("signal", e.signal)
        if op.kind == "fork":
            self.workers[op.arg("child")] = (self._pending_child, child_pid)
        elif op.kind == "exit":
            self._drop(op.proc, wait=True)
        return result  # type: ignore[no-any-return]

    def _drop(self, proc: int, wait: bool = False) -> None:
        sock, pid = self.workers.pop(proc)
        sock.close()
        if wait:
            _wait_gone(pid, self.timeout)

    def snapshot(self) -> dict[int, ProcState]:
        self.send_snapshot()
        return self.recv_snapshot()

    def send_snapshot(self) -> None:
        """Ask every worker for its state (they work in parallel with the caller)."""
        for sock, _ in self.workers.values():
            _send(sock, ("snap",))

    def recv_snapshot(self) -> dict[int, ProcState]:
        return {proc: _recv(sock) for proc, (sock, _) in sorted(self.workers.items())}

    def close(self) -> None:
        for proc in list(self.workers):
            sock, _pid = self.workers[proc]
            with contextlib.suppress(OSError):
                _send(sock, ("exit",))
            self._drop(proc)  # a worker also leaves when its socket closes
        if self.root_pid:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.root_pid, 0)
            self.root_pid = 0
