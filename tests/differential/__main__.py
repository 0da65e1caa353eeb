"""``python -m tests.differential``: agreement statistics and first divergences.

Run as root on Linux from the repository root, e.g.::

    .venv/bin/python -m tests.differential --seeds 0:2000 --steps 25 --minimize 5
"""

from __future__ import annotations

import argparse
import signal
import sys

from .classes import INTENTIONAL, KNOWN, classify
from .hostkernel import host_settings, host_support
from .runner import Summary, minimize, run_many


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _progress(s: Summary) -> None:
    print(
        f"... {s.sequences} sequences, {s.agree} agree, {s.seconds:.0f} s",
        file=sys.stderr,
        flush=True,
    )


def _seeds(text: str) -> range:
    lo, _, hi = text.partition(":")
    return range(int(lo), int(hi)) if hi else range(int(lo), int(lo) + 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.differential", description=__doc__)
    ap.add_argument("--seeds", default="0:200", help="seed range lo:hi (or one seed)")
    ap.add_argument("--steps", type=int, default=25, help="operations per sequence")
    ap.add_argument(
        "--minimize",
        type=int,
        default=0,
        metavar="N",
        help="shrink the first N failing sequences to a minimal repro",
    )
    ap.add_argument(
        "--show",
        type=int,
        default=20,
        metavar="N",
        help="print the first divergence of the first N failing sequences",
    )
    args = ap.parse_args(argv)
    # A plain kill (or Ctrl-C in a background job, where SIGINT is ignored) must
    # still unwind through host_settings() so the host's settings come back.
    signal.signal(signal.SIGTERM, _terminate)
    reason = host_support()
    if reason is not None:
        print(f"cannot run on this host: {reason}", file=sys.stderr)
        return 2
    with host_settings():
        summary = run_many(_seeds(args.seeds), args.steps, progress=_progress)
        print(summary.report())
        new = [c for c in summary.first_classes if c not in KNOWN and c not in INTENTIONAL]
        if new:
            print("classes not in classes.KNOWN: " + ", ".join(sorted(new)))
        for r in summary.failures[: args.show]:
            assert r.first is not None
            print(f"seed {r.seed}: {classify(r.first)}: {r.first.describe()}")
        for r in summary.failures[: args.minimize]:
            ops = minimize(r)
            assert r.first is not None
            print(f"seed {r.seed} minimal repro ({classify(r.first)}), {len(ops)} ops:")
            for op in ops:
                print(f"    {op.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
