"""``hmmsim.__all__``: stated explicitly, every name real, the documented public names all in it."""

from __future__ import annotations

import types

import hmmsim
from hmmsim.mm import uapi

#: The names the documented public API promises at the top level.
DOCUMENTED_NAMES = {
    "Machine",
    "MachineConfig",
    "Process",
    "File",
    "PagemapEntry",
    # errors (each an OSError subclass with its errno) and the contract breaker
    "Busy",
    "BadAddress",
    "NotPermitted",
    "InvalidArgument",
    "OutOfMemory",
    "NoEntry",
    "Again",
    "Overflow",
    "NotSupported",
    "SegmentationFault",
    "BusError",
    "KernelBug",
    # the MMU-notifier API
    "mmu_interval_notifier_insert",
    "mmu_interval_notifier_remove",
    "mmu_interval_read_begin",
    "mmu_interval_read_retry",
    "mmu_interval_set_seq",
    "IntervalNotifier",
    "NotifierRange",
    "MmuNotifyEvent",
    # the plugin faces a driver imports from hmmsim
    "hookimpl",
    "Driver",
    "Device",
    "Mirror",
    "Capability",
}

LINUX_PREFIXES = ("PROT_", "MAP_", "MADV_", "MREMAP_", "MMU_NOTIFY_")
#: Masks the model builds for its own checks; not Linux uapi names.
MODEL_MASKS = {"PROT_MASK", "MAP_KNOWN_FLAGS"}


def test_all_is_a_literal_list_without_duplicates():
    assert isinstance(hmmsim.__all__, list)
    assert len(hmmsim.__all__) == len(set(hmmsim.__all__))


def test_every_name_in_all_exists():
    missing = [n for n in hmmsim.__all__ if not hasattr(hmmsim, n)]
    assert missing == []


def test_all_holds_nothing_private_and_not_annotations():
    assert "annotations" not in hmmsim.__all__
    assert [n for n in hmmsim.__all__ if n.startswith("_")] == []


def test_all_holds_no_module_but_errors_and_sched():
    modules = {n for n in hmmsim.__all__ if isinstance(getattr(hmmsim, n), types.ModuleType)}
    assert modules == {"errors", "sched"}


def test_documented_public_names_are_all_exported():
    assert DOCUMENTED_NAMES - set(hmmsim.__all__) == set()


def test_every_linux_constant_is_exported():
    linux = {n for n in dir(uapi) if n.startswith(LINUX_PREFIXES)} - MODEL_MASKS
    linux |= {n for n in dir(hmmsim) if n.startswith(LINUX_PREFIXES)}
    assert linux - set(hmmsim.__all__) == set()


def test_every_error_class_is_exported():
    errors = set(hmmsim.errors.__all__)
    assert errors - set(hmmsim.__all__) == set()


def test_star_import_gives_exactly_all():
    ns: dict[str, object] = {}
    exec("from hmmsim import *", ns)
    assert set(ns) - {"__builtins__"} == set(hmmsim.__all__)


def test_version_is_the_installed_distributions():
    import importlib.metadata

    assert hmmsim.__version__ == importlib.metadata.version("hmmsim")
    assert "__version__" not in hmmsim.__all__
