"""Test support that ships with hmmsim: helpers for tests of the core and of drivers.

``devmem.Device`` is a minimal device with its own memory (no mirror): it
migrates pages to its memory and back and serves ``migrate_to_ram``, so the
HMM core can be exercised without a driver plugin.
"""
