"""Plugin manager factory: entry points of group ``meshcore``, blocking and tracing by env."""

from __future__ import annotations

import logging
import os
import sys
import weakref
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from meshcore import PROJECT, __version__, hookspecs

log = logging.getLogger("meshcore.plugins")

DISABLE_ENV = "MESHCORE_DISABLE_PLUGINS"
TRACE_ENV = "MESHCORE_TRACE_HOOKS"


class PluginLoadError(RuntimeError):
    """An installed plugin could not be loaded; the message names it and how to block it."""


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
    if load_entry_points:
        load_entry_point_plugins(pm)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginLoadError(f"plugin {exc.plugin!r} implements an unknown hook: {exc}; "
                              f"fix the plugin or block it with {DISABLE_ENV}") from None
    if os.environ.get(TRACE_ENV):
        pm.trace.root.setwriter(lambda msg: sys.stderr.write(f"[hooks] {msg}"))
        pm.enable_tracing()
    return pm


def load_entry_point_plugins(pm: pluggy.PluginManager) -> None:
    """Register every ``meshcore`` entry point that is not blocked.

    Unlike pluggy's loader, a plugin that fails to import, or two distributions claiming one
    plugin name, is an error that names the plugin (pluggy silently keeps the first).
    """
    seen: dict[str, EntryPoint] = {}
    for ep in entry_points(group=PROJECT):
        if pm.is_blocked(ep.name):
            continue
        if (first := seen.get(ep.name)) is not None:
            if first.value != ep.value:
                raise PluginLoadError(
                    f"two installed plugins are named {ep.name!r} ({first.value} and "
                    f"{ep.value}); uninstall one or block both with {DISABLE_ENV}={ep.name}")
            continue
        seen[ep.name] = ep
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:
            raise PluginLoadError(
                f"plugin {ep.name!r} ({ep.value}) failed to load: {type(exc).__name__}: "
                f"{exc}; fix or uninstall it, or block it with {DISABLE_ENV}={ep.name}"
            ) from exc


def describe_plugins(pm: pluggy.PluginManager) -> list[dict[str, Any]]:
    """What ``mesh-llm plugins`` prints: name, version and hooks of each loaded plugin."""
    versions = {ep.name: ep.dist.version if ep.dist else "unknown"
                for ep in reversed(list(entry_points(group=PROJECT)))}  # the first one wins
    out = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: item[0]):
        if plugin is None:
            continue
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        out.append({"name": name, "version": versions.get(name, __version__),
                    "hooks": hooks})
    return out


def call_contained(pm: pluggy.PluginManager, hook: str, **kwargs: Any) -> list[Any]:
    """Call ``hook`` on each plugin in turn; a plugin that raises is logged ("plugin X, hook
    Y: ...") and skipped, so an observer's bug never stops the node. Non-None results."""
    results: list[Any] = []
    for impl, call in each_plugin(pm, hook):
        try:
            result = call(**kwargs)
        except Exception as exc:
            log.error("plugin %s, hook %s: %s: %s (skipped)", impl.plugin_name, hook,
                      type(exc).__name__, exc)
            continue
        results.extend(r for r in result if r is not None)
    return results


_CALLERS: weakref.WeakKeyDictionary[pluggy.PluginManager, dict[str, Any]] = (
    weakref.WeakKeyDictionary())


def each_plugin(pm: pluggy.PluginManager, hook: str) -> list[tuple[Any, Any]]:
    """``(hookimpl, caller)`` per plugin implementing ``hook``, in pluggy's call order; each
    caller calls that plugin alone (through pluggy, so MESHCORE_TRACE_HOOKS still shows it).
    Built once per plugin set: the API's observer hook runs twice per request."""
    impls = tuple(reversed(getattr(pm.hook, hook).get_hookimpls()))
    cached = _CALLERS.setdefault(pm, {}).get(hook)
    if cached is None or cached[0] != impls:
        plugins = [impl.plugin for impl in impls]
        cached = (impls, [(impl, pm.subset_hook_caller(
            hook, [p for p in plugins if p is not impl.plugin])) for impl in impls])
        _CALLERS[pm][hook] = cached
    callers: list[tuple[Any, Any]] = cached[1]
    return callers
