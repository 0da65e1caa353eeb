"""The hooks a driver plugin implements (pluggy hookspecs, prefix ``hmmsim_``).

Kernel counterpart: none; this is how hmmsim finds driver models. A plugin is
a module registered under the ``hmmsim.drivers`` entry-point group (or
``hmmsim.bugzoo`` for deliberately broken drivers) with module-level
``@hookimpl`` functions. pluggy is used for discovery and lifecycle only,
never per page.

Each hookspec says when it fires and how often. ``hmmsim.plugins`` builds a
fresh plugin manager for every run (there is no global one), so "once" below
is never "once per process".
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

    When: every time the registry is read, i.e. on each call of
    ``hmmsim.plugins.driver_classes(pm)``, which every driver lookup goes
    through: each ``Machine.probe`` (via ``find_driver``), each driver spec
    a check resolves, ``hmmsim drivers`` and ``hmmsim check``. Not once per
    plugin manager: a long run calls it many times on one manager.

    How: the plugins' implementations are called one by one in registration
    order (not through ``pm.hook``), so one plugin that raises is set aside
    as broken and the others still count.

    So it must be cheap and pure: build nothing, probe nothing, and return
    the same classes every time.

    Returns:
        The driver classes, each a ``hmmsim.driver.Driver`` subclass with a
        ``name`` no other plugin provides. A plugin that raises, returns
        something else, or repeats another plugin's name is set aside
        (``hmmsim drivers`` lists it; elsewhere it is a ``PluginWarning``
        once per process) and contributes nothing.
    """
    return []


@hookspec
def hmmsim_driver_probed(driver: Driver, device: object) -> None:
    """A device was probed: lifecycle observers (tracing, accounting).

    When: once per successful ``Machine.probe``, after ``Driver.probe``
    returned and before the device is appended to ``machine.devices``.
    Not called when ``probe`` raised, nor for devices a driver builds without
    ``Machine.probe``. Every plugin's implementation is called (pluggy's
    ordinary 1:N call); an exception from one propagates out of
    ``Machine.probe``, and the device is then not in ``machine.devices``.

    Args:
        driver: the fresh ``Driver`` instance ``probe`` was called on.
        device: the ``Device`` it returned.

    Observers must not change the device. The return value is ignored.
    """
