"""The model's own memory on the host: reserved, not committed.

A machine maps its metadata and page contents as private anonymous host
memory that is filled on first touch. Those mappings are MAP_NORESERVE, so a
modelled machine larger than the host's RAM and swap can be built (as long as
the run does not touch all of it), and a process holding one can still fork
(the explorer's and the bug zoo's workers) under Linux's default heuristic
overcommit, which refuses any single accounted mapping larger than RAM + swap.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hmmsim import MAP_ANONYMOUS, MAP_PRIVATE, PROT_READ, PROT_WRITE, Machine, MachineConfig


def _host_bytes() -> int:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return (int(info["MemTotal"].split()[0]) + int(info["SwapTotal"].split()[0])) << 10


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/meminfo and forks")
def test_a_machine_larger_than_the_host_can_be_built_used_and_forked():
    gib = 1 << 30
    ram = (_host_bytes() // gib + 4) * gib
    m = Machine(MachineConfig(ram_bytes=ram, store_data=True))
    p = m.spawn()
    a = p.mmap(1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
    p.write(a, b"big")
    pid = os.fork()
    if pid == 0:
        os._exit(0 if p.read(a, 3) == b"big" else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
