"""Driver plugins shipped with hmmsim (``hmmsim.drivers.<name>``).

Each subpackage models one real consumer of HMM and registers itself under
the ``hmmsim.drivers`` entry-point group. The plugin framework and the first
driver (dmirror) arrive with the driver-framework issue.
"""
