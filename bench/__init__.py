"""pytest-benchmark suites of hmmsim's hot paths (``hmmsim.bench``).

Run with ``pytest bench`` from a checkout, or ``pytest --pyargs hmmsim.bench``
against an installed hmmsim. Every benchmark records the model's
deterministic cost counters in ``extra_info``, which stay the same on a noisy
machine while times do not.
"""
