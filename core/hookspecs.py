"""The hooks a driver plugin implements (pluggy hookspecs, prefix ``hmmsim_``).

Kernel counterpart: none; this is how hmmsim finds driver models. A plugin is
a module registered under the ``hmmsim.drivers`` entry-point group (or
``hmmsim.bugzoo`` for deliberately broken drivers) with module-level
``@hookimpl`` functions. pluggy is used for discovery and lifecycle only,
never per page.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .driver import Driver

PROJECT = "hmmsim"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def hmmsim_register_drivers() -> list[type[Driver]]:
    """Return the driver classes this plugin provides.

    Called once when a plugin manager is built. Each class must subclass
    ``hmmsim.driver.Driver`` and carry a unique ``name``; a name already
    provided by another plugin is an error reported when drivers are listed.
    """
    return []


@hookspec
def hmmsim_driver_probed(driver: Driver, device: object) -> None:
    """Called after ``Machine.probe`` created a device (lifecycle observers).

    Return value ignored. Observers must not change the device.
    """
