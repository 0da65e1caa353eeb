"""hmm-tests.c tests whose parent and child run at the same time, ported so.

test_hmm_tests.py runs the child to completion before the parent goes on.
Where the kernel test's parent works while its child runs (``exclusive_cow``:
both increment the buffer, then the parent reaps the child), these ports run
the two as concurrent actors under the deterministic scheduler, over many
interleavings, with the machine's invariants checked at the end of each.
"""

from __future__ import annotations

from hmmsim.drivers.dmirror import HMM_DMIRROR_EXCLUSIVE
from hmmsim.explore import ScenarioRun, explore
from hmmsim.mm.debug import verify_machine
from hmmsim.sched import PCT
from hmmtest import HmmBuffer, N, P, dmirror_cmd, iota, new_buffer


def _exclusive_cow_scenario(hmm, npages: int):
    proc = hmm.proc

    def scenario() -> ScenarioRun:
        buf = new_buffer(proc, npages)
        i = iota(npages * P // 4)
        buf.fill(i)
        assert dmirror_cmd(hmm.fd, HMM_DMIRROR_EXCLUSIVE, buf, npages) == 0
        assert buf.cpages == npages
        child = proc.fork()
        cbuf = HmmBuffer(child, buf.ptr, buf.size, bytearray(0))
        seen: dict[str, object] = {}

        def increment(name: str, b: HmmBuffer) -> None:
            got = b.ints()
            seen[name + " read"] = bool((got == i).all())
            b.fill(got + 1)
            seen[name + " after"] = bool((b.ints() == i + 1).all())

        def child_actor() -> None:
            increment("child", cbuf)
            child.exit()

        def final(_result: object) -> None:
            assert seen == {
                "child read": True,
                "child after": True,
                "parent read": True,
                "parent after": True,
            }
            assert child.exited  # the parent's waitpid: the child exited normally
            verify_machine(hmm.machine)
            buf.free()

        return ScenarioRun(
            [("child", child_actor), ("parent", lambda: increment("parent", buf))],
            final=final,
        )

    return scenario


def test_exclusive_cow_parent_and_child_at_once(hmm):
    """T27 with parent and child incrementing at once (PCT, depth 3): each sees
    only its own increments, whatever the interleaving of the COW breaks of
    pages that were device-exclusive at fork time."""
    result = explore(_exclusive_cow_scenario(hmm, N), PCT(seed=1, depth=3, steps=400), 12)
    assert not result.failures, result.failures[:1]
    assert result.schedules == 12
