"""The ``hmmsim`` command (console script and ``python -m hmmsim``)."""

from __future__ import annotations

import argparse
import sys

from .errors import HmmsimError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hmmsim", description="An executable model of Linux HMM.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="a short printed tour of the memory model")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            return run_demo()
    except HmmsimError as exc:
        print(f"hmmsim: {exc}", file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
