"""The dmirror driver: its class, capabilities, parameters and probe.

Kernel counterpart: lib/test_hmm.c's module init (``hmm_dmirror_init``),
which creates the private and coherent ``/dev/hmm_dmirror*`` devices; here
one ``m.probe("dmirror", memory="private" | "coherent")`` creates one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from hmmsim.driver import Capability, Driver, Parameter
from hmmsim.errors import InvalidArgument

from .device import DmirrorDevice

if TYPE_CHECKING:
    from hmmsim import Machine


#: test_hmm.c's race between a device fault and migrate_to_ram, with the rule it breaks.
_OWN_MIGRATE_SKIP = (
    "dmirror_interval_invalidate returns at once for its own MMU_NOTIFY_MIGRATE events, "
    "without mmu_interval_set_seq: a device fault that read a device-private pfn just "
    "before a CPU fault's migrate_to_ram (dmirror_devmem_fault) moved the page back "
    "still passes mmu_interval_read_retry and maps the freed device page "
    "(lib/test_hmm.c; not fixed). Rule: an invalidation that can change what a "
    "concurrent hmm_range_fault returned must advance the interval's sequence under "
    "the driver lock, even one the driver otherwise ignores"
)


class Dmirror(Driver):
    """The ``dmirror`` driver: ``m.probe("dmirror", memory="private" | "coherent")``."""

    name = "dmirror"
    capabilities = (
        Capability.MIRROR
        | Capability.READ
        | Capability.WRITE
        | Capability.MIGRATE
        | Capability.EXCLUSIVE
        | Capability.DEVICE_PRIVATE
    )
    parameters: ClassVar[Mapping[str, Parameter | str]] = {
        "memory": Parameter(
            "the kind of device memory: unaddressable device-private or CPU-coherent",
            choices=("private", "coherent"),
            default="private",
        ),
    }
    #: What ``hmmsim check`` and the suite test when no variant is named.
    variants: ClassVar[list[dict[str, str]]] = [{"memory": "private"}, {"memory": "coherent"}]

    def capabilities_for(self, **params: Any) -> Capability:
        if params.get("memory", "private") == "coherent":
            return (self.capabilities & ~Capability.DEVICE_PRIVATE) | Capability.DEVICE_COHERENT
        return self.capabilities

    def expected_failures(self, **params: Any) -> dict[str, str]:
        """lib/test_hmm.c's own race, kept: private memory only (coherent
        memory is read in place, no migrate_to_ram)."""
        if params.get("memory", "private") != "private":
            return {}
        return {"races/read_device_memory_vs_cpu_fault_back": _OWN_MIGRATE_SKIP}

    def probe(self, machine: Machine, **params: Any) -> DmirrorDevice:
        unknown = set(params) - set(self.parameters)
        if unknown:
            raise InvalidArgument(f"dmirror: unknown parameter(s) {', '.join(sorted(unknown))}")
        return DmirrorDevice(self, machine, str(params.get("memory", "private")))
