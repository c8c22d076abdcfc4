"""Plugin manager factory: entry points of group ``meshcore``, blocking and tracing by env."""

from __future__ import annotations

import os
import sys
from importlib.metadata import entry_points
from typing import Any

import pluggy

from meshcore import PROJECT, hookspecs

DISABLE_ENV = "MESHCORE_DISABLE_PLUGINS"
TRACE_ENV = "MESHCORE_TRACE_HOOKS"
BUILTIN = "meshcore.testing"  # the fake backend and memory transport, always available


def disabled_plugins() -> set[str]:
    """Names listed in ``MESHCORE_DISABLE_PLUGINS`` (comma separated)."""
    return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


def get_plugin_manager(*, load_entry_points: bool = True) -> pluggy.PluginManager:
    """A fresh plugin manager with every hookspec and the installed plugins loaded.

    Nothing happens at import time; call this once per node (tests call it per test).
    ``MESHCORE_DISABLE_PLUGINS=a,b`` blocks plugins by entry-point name and
    ``MESHCORE_TRACE_HOOKS=1`` prints every hook call to stderr.
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in disabled_plugins():
        pm.set_blocked(name)
    if not pm.is_blocked(BUILTIN):
        from meshcore import testing

        pm.register(testing, name=BUILTIN)
    if load_entry_points:
        pm.load_setuptools_entrypoints(PROJECT)
    pm.check_pending()
    if os.environ.get(TRACE_ENV):
        pm.trace.root.setwriter(lambda msg: sys.stderr.write(f"[hooks] {msg}"))
        pm.enable_tracing()
    return pm


def describe_plugins(pm: pluggy.PluginManager, *,
                     include_all: bool = False) -> list[dict[str, Any]]:
    """What ``mesh-llm plugins`` prints: name, version and hooks of each loaded plugin."""
    versions = {id(plugin): dist.version for plugin, dist in pm.list_plugin_distinfo()}
    out = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: item[0]):
        if plugin is None:
            continue
        if name.startswith("meshcore.") and not include_all:
            continue
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        entry: dict[str, Any] = {"name": name, "hooks": hooks}
        entry["version"] = versions.get(id(plugin), _core_version())
        out.append(entry)
    return out


def _core_version() -> str:
    from meshcore import __version__

    return __version__


def entry_point_names() -> list[str]:
    """Names of every installed ``meshcore`` entry point, blocked ones included."""
    return sorted(ep.name for ep in entry_points(group=PROJECT))
