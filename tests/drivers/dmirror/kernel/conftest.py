"""Fixtures of hmm-tests.c (`hmm` and `hmm2`) on dmirror; see hmmtest.py."""

from __future__ import annotations

from hmmtest import hmm, hmm2, machine, variant  # noqa: F401
