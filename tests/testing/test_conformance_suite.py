"""The conformance suite over every installed driver (each in its declared variants)."""

from hmmsim.testing.suite.test_conformance import test_conformance

__all__ = ["test_conformance"]
