"""Differential test of the memory model against the host Linux kernel (issue 10).

See docs/differential.md. ``python -m tests.differential --help`` runs it by hand.
"""
