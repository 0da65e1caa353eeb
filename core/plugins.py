"""Finding driver plugins: the plugin manager and the driver registry.

``get_plugin_manager()`` builds a fresh pluggy manager every time (there is
no module-global one): it registers the hookspecs, honours a block list of
plugin names, loads the entry points of the requested group and checks that
every hookimpl matches a hookspec (``check_pending``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import pluggy

from . import hookspecs
from .errors import InvalidArgument, NoEntry

if TYPE_CHECKING:
    from .driver import Driver

DRIVERS_GROUP = "hmmsim.drivers"
BUGZOO_GROUP = "hmmsim.bugzoo"


def get_plugin_manager(
    block: Iterable[str] = (), group: str = DRIVERS_GROUP
) -> pluggy.PluginManager:
    """A fresh plugin manager with the entry points of ``group`` loaded."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in block:
        pm.set_blocked(name)
    pm.load_setuptools_entrypoints(group)
    pm.check_pending()
    return pm


def driver_classes(pm: pluggy.PluginManager) -> dict[str, type[Driver]]:
    """Every driver class the plugins register, by name."""
    from .driver import Driver

    found: dict[str, type[Driver]] = {}
    for batch in pm.hook.hmmsim_register_drivers():
        for cls in batch:
            if not (isinstance(cls, type) and issubclass(cls, Driver)):
                raise InvalidArgument(f"{cls!r} is not a hmmsim.driver.Driver subclass")
            if cls.name in found and found[cls.name] is not cls:
                raise InvalidArgument(f"two plugins provide a driver named {cls.name!r}")
            found[cls.name] = cls
    return found


def find_driver(pm: pluggy.PluginManager, name: str) -> type[Driver]:
    drivers = driver_classes(pm)
    if name not in drivers:
        known = ", ".join(sorted(drivers)) or "none"
        raise NoEntry(f"no driver named {name!r} (installed: {known})")
    return drivers[name]


def plugin_distribution(pm: pluggy.PluginManager, cls: type[Driver]) -> tuple[str, str]:
    """(distribution name, version) of the plugin that provides ``cls``."""
    module = cls.__module__.split(".")
    for plugin, dist in pm.list_plugin_distinfo():
        pname = getattr(plugin, "__name__", "")
        if pname and ".".join(module[: len(pname.split("."))]) == pname:
            return dist.project_name, dist.version
    return "?", "?"


def parse_driver_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``NAME[:key=value,...]`` → (name, params)."""
    name, _, rest = spec.partition(":")
    if not name:
        raise InvalidArgument(f"bad driver spec {spec!r}: no driver name")
    params: dict[str, str] = {}
    if rest:
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise InvalidArgument(f"bad driver parameter {item!r} in {spec!r} (key=value)")
            params[key] = value
    return name, params
