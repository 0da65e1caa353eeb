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

    def probe(self, machine: Machine, **params: Any) -> DmirrorDevice:
        unknown = set(params) - set(self.parameters)
        if unknown:
            raise InvalidArgument(f"dmirror: unknown parameter(s) {', '.join(sorted(unknown))}")
        return DmirrorDevice(self, machine, str(params.get("memory", "private")))
