"""Named component registries filled by the ``meshcore_register_*`` hooks."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pluggy

from meshcore.config import NodeConfig
from meshcore.plugins import each_plugin


class RegistryError(LookupError):
    """Unknown or duplicate component name; the message lists what is known."""


class Registry:
    """``name -> factory`` for one kind of component (transport, election, backend, ui)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., Any]] = {}
        self._plugins: dict[str, str] = {}  # name -> the plugin that registered it

    def register(self, name: str, factory: Callable[..., Any], *, plugin: str = "?") -> None:
        if not isinstance(name, str) or not name:
            raise RegistryError(f"{self.kind} names must be non-empty strings, got {name!r}")
        if not callable(factory):
            raise RegistryError(f"{self.kind} {name!r}: the factory must be callable, "
                                f"got {factory!r}")
        if name in self._items:
            raise RegistryError(
                f"two plugins register a {self.kind} named {name!r} ({self._plugins[name]} and "
                f"{plugin}); block one with MESHCORE_DISABLE_PLUGINS"
            )
        self._items[name] = factory
        self._plugins[name] = plugin

    def get(self, name: str, option: str | None = None) -> Callable[..., Any]:
        """The factory registered as ``name``; ``option`` names the CLI flag for the error."""
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none installed"
            given = f" (from {option})" if option else ""
            raise RegistryError(
                f"unknown {self.kind} {name!r}{given}; known: {known}. "
                f"Pick a known one or install the plugin that provides it"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def plugin_of(self, name: str) -> str:
        return self._plugins.get(name, "?")

    def factories(self) -> dict[str, Callable[..., Any]]:
        return dict(self._items)

    def by_plugin(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name in sorted(self._items):
            out.setdefault(self._plugins[name], []).append(name)
        return out

    def __contains__(self, name: object) -> bool:
        return name in self._items


KINDS = ("transport", "election", "backend", "ui")


def collect(pm: pluggy.PluginManager) -> dict[str, Registry]:
    """Ask every plugin to register its components; returns one Registry per kind. Each
    plugin is called on its own, so every name remembers which plugin registered it."""
    regs = {kind: Registry(kind) for kind in KINDS}
    for kind in KINDS:
        for impl, call in each_plugin(pm, f"meshcore_register_{kind}s"):
            register = functools.partial(regs[kind].register, plugin=impl.plugin_name)
            try:
                call(register=register)
            except RegistryError:
                raise
            except Exception as exc:
                raise RegistryError(f"plugin {impl.plugin_name}, hook meshcore_register_"
                                    f"{kind}s: {type(exc).__name__}: {exc}") from exc
    return regs


def check_config(regs: dict[str, Registry], config: NodeConfig) -> None:
    """Raise :class:`RegistryError` unless every component ``config`` names is registered."""
    regs["election"].get(config.election, "--election")
    regs["transport"].get(config.transport, "--transport")
    if not config.client:
        regs["backend"].get(config.backend, "--backend")
    for name in config.ui_ports():
        regs["ui"].get(name, "--ui" if name in config.uis else "--console")
