"""Named component registries filled by the ``meshcore_register_*`` hooks."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from meshcore.config import NodeConfig


class RegistryError(LookupError):
    """Unknown or duplicate component name; the message lists what is known."""


class Registry:
    """``name -> factory`` for one kind of component (transport, election, backend, ui)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., Any]] = {}

    def register(self, name: str, factory: Callable[..., Any]) -> None:
        if not isinstance(name, str) or not name:
            raise RegistryError(f"{self.kind} names must be non-empty strings, got {name!r}")
        if not callable(factory):
            raise RegistryError(f"{self.kind} {name!r}: the factory must be callable, "
                                f"got {factory!r}")
        if name in self._items:
            raise RegistryError(
                f"two plugins register a {self.kind} named {name!r}; "
                f"block one with MESHCORE_DISABLE_PLUGINS"
            )
        self._items[name] = factory

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

    def __contains__(self, name: object) -> bool:
        return name in self._items


KINDS = ("transport", "election", "backend", "ui")


def collect(pm: pluggy.PluginManager) -> dict[str, Registry]:
    """Ask every plugin to register its components; returns one Registry per kind."""
    regs = {kind: Registry(kind) for kind in KINDS}
    pm.hook.meshcore_register_transports(register=regs["transport"].register)
    pm.hook.meshcore_register_elections(register=regs["election"].register)
    pm.hook.meshcore_register_backends(register=regs["backend"].register)
    pm.hook.meshcore_register_uis(register=regs["ui"].register)
    return regs


def check_config(regs: dict[str, Registry], config: NodeConfig) -> None:
    """Raise :class:`RegistryError` unless every component ``config`` names is registered."""
    regs["election"].get(config.election, "--election")
    regs["transport"].get(config.transport, "--transport")
    if not config.client:
        regs["backend"].get(config.backend, "--backend")
    if config.console_port is not None:
        regs["ui"].get("console", "--console")
