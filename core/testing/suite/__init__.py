"""The conformance suite: ``pytest --pyargs hmmsim.testing.suite --hmmsim-driver NAME``."""
