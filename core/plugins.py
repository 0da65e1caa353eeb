"""Finding driver plugins: the plugin manager and the driver registry.

``get_plugin_manager()`` builds a fresh pluggy manager every time (there is
no module-global one): it registers the hookspecs, honours a block list of
plugin names, loads the entry points of the requested group and checks that
every hookimpl matches a hookspec.

A plugin that cannot be used — its module fails to import, its hooks do not
match the hookspecs, its ``hmmsim_register_drivers`` raises or returns
something that is not a driver class, or it claims a driver name another
plugin already provides — is set aside as a ``BrokenPlugin`` (its name and the
reason) and every other plugin keeps working. ``hmmsim drivers`` lists the
broken ones; everywhere else each is reported once per process as a
``PluginWarning``.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import attrs
import pluggy

from . import hookspecs
from .errors import InvalidArgument, NoEntry

if TYPE_CHECKING:
    from .driver import Driver

DRIVERS_GROUP = "hmmsim.drivers"
BUGZOO_GROUP = "hmmsim.bugzoo"


class PluginWarning(UserWarning):
    """A plugin could not be loaded; the others are used without it."""


@attrs.frozen
class BrokenPlugin:
    """A plugin set aside: the entry point's name and why it cannot be used."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"plugin {self.name!r} cannot be loaded: {self.reason}"


#: Broken plugins already reported as a warning in this process (reported once).
_warned: set[tuple[str, str]] = set()


class PluginManager(pluggy.PluginManager):
    """A pluggy manager that remembers the plugins it had to set aside."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        #: Plugins that could not be loaded or registered, in discovery order.
        self.broken: list[BrokenPlugin] = []
        #: Plugin name → (distribution name, version) of the entry points loaded.
        self.dists: dict[str, tuple[str, str]] = {}

    def set_aside(self, name: str, reason: str) -> None:
        if all(b.name != name for b in self.broken):
            self.broken.append(BrokenPlugin(name, reason))


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _load_entry_points(pm: PluginManager, group: str) -> None:
    """Load and register every entry point of ``group``; set aside the ones that fail."""
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group != group or pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
                continue
            try:
                plugin = ep.load()
                pm.register(plugin, name=ep.name)
            except Exception as exc:  # any import-time error of third-party code
                pm.set_aside(ep.name, _reason(exc))
                continue
            pm.dists[ep.name] = (dist.metadata["Name"] or "?", dist.version or "?")
    # Hookimpls that match no hookspec: drop the plugin that has them.
    for hname in list(pm.hook.__dict__):
        if hname.startswith("_"):
            continue
        caller = getattr(pm.hook, hname)
        if caller.has_spec():
            continue
        for impl in caller.get_hookimpls():
            if not impl.optionalhook and pm.get_plugin(impl.plugin_name) is not None:
                pm.set_aside(impl.plugin_name, f"unknown hook {hname!r}")
                pm.unregister(name=impl.plugin_name)


def get_plugin_manager(block: Iterable[str] = (), group: str = DRIVERS_GROUP) -> PluginManager:
    """A fresh plugin manager with the entry points of ``group`` loaded.

    A plugin that cannot be loaded is in ``pm.broken``; the rest are registered.
    """
    pm = PluginManager()
    pm.add_hookspecs(hookspecs)
    for name in block:
        pm.set_blocked(name)
    _load_entry_points(pm, group)
    return pm


def broken_plugins(pm: pluggy.PluginManager) -> list[BrokenPlugin]:
    """The plugins ``pm`` set aside (after ``driver_classes`` also those whose hook failed)."""
    return list(getattr(pm, "broken", []))


def warn_broken(pm: pluggy.PluginManager) -> None:
    """Warn once per process about each plugin ``pm`` had to set aside."""
    for b in broken_plugins(pm):
        key = (b.name, b.reason)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(str(b), PluginWarning, stacklevel=3)


def mark_reported(pm: pluggy.PluginManager) -> None:
    """The caller reported ``pm``'s broken plugins itself: do not warn about them again."""
    _warned.update((b.name, b.reason) for b in broken_plugins(pm))


def driver_classes(pm: pluggy.PluginManager, *, warn: bool = True) -> dict[str, type[Driver]]:
    """Every driver class the plugins register, by name.

    A plugin whose ``hmmsim_register_drivers`` raises, returns something that
    is not a ``Driver`` subclass, or repeats a name another plugin provides is
    set aside (``pm.broken``) and contributes nothing; ``warn`` reports the
    broken plugins once per process as a ``PluginWarning``.
    """
    from .driver import Driver

    found: dict[str, type[Driver]] = {}
    owner: dict[str, str] = {}
    for impl in pm.hook.hmmsim_register_drivers.get_hookimpls():  # registration order
        pname = impl.plugin_name
        try:
            batch: Any = impl.function()
            classes = list(batch or [])
        except Exception as exc:  # third-party code: one bad plugin, not a crash
            _set_aside(pm, pname, f"hmmsim_register_drivers raised {_reason(exc)}")
            continue
        bad = [c for c in classes if not (isinstance(c, type) and issubclass(c, Driver))]
        if bad:
            _set_aside(pm, pname, f"{bad[0]!r} is not a hmmsim.driver.Driver subclass")
            continue
        clash = [c.name for c in classes if c.name in found and found[c.name] is not c]
        if clash:
            _set_aside(
                pm, pname, f"driver {clash[0]!r} is already provided by plugin {owner[clash[0]]!r}"
            )
            continue
        for cls in classes:
            found[cls.name] = cls
            owner[cls.name] = pname
    if warn:
        warn_broken(pm)
    return found


def _set_aside(pm: pluggy.PluginManager, name: str, reason: str) -> None:
    if isinstance(pm, PluginManager):
        pm.set_aside(name, reason)
    else:  # a plain pluggy manager a caller built by hand: nowhere to keep it
        raise InvalidArgument(f"plugin {name!r}: {reason}")


def find_driver(pm: pluggy.PluginManager, name: str) -> type[Driver]:
    drivers = driver_classes(pm)
    if name not in drivers:
        known = ", ".join(sorted(drivers)) or "none"
        hint = "".join(f"; {b}" for b in broken_plugins(pm) if b.name == name)
        raise NoEntry(f"no driver named {name!r} (installed: {known}){hint}")
    return drivers[name]


def plugin_distribution(pm: pluggy.PluginManager, cls: type[Driver]) -> tuple[str, str]:
    """(distribution name, version) of the plugin that provides ``cls``."""
    module = cls.__module__.split(".")
    dists = getattr(pm, "dists", {})
    for pname, plugin in pm.list_name_plugin():
        modname = getattr(plugin, "__name__", "")
        if pname in dists and modname and ".".join(module[: len(modname.split("."))]) == modname:
            found: tuple[str, str] = dists[pname]
            return found
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
            if key in params:
                raise InvalidArgument(f"driver parameter {key!r} given twice in {spec!r}")
            params[key] = value
    return name, params
