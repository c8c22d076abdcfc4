"""Named component registries filled by the ``meshcore_register_*`` hooks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy


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
        if name in self._items:
            raise RegistryError(
                f"two plugins register a {self.kind} named {name!r}; "
                f"block one with MESHCORE_DISABLE_PLUGINS"
            )
        self._items[name] = factory

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none installed"
            raise RegistryError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._items)


KINDS = ("transport", "election", "backend", "ui")


def collect(pm: pluggy.PluginManager) -> dict[str, Registry]:
    """Ask every plugin to register its components; returns one Registry per kind."""
    regs = {kind: Registry(kind) for kind in KINDS}
    pm.hook.meshcore_register_transports(register=regs["transport"].register)
    pm.hook.meshcore_register_elections(register=regs["election"].register)
    pm.hook.meshcore_register_backends(register=regs["backend"].register)
    pm.hook.meshcore_register_uis(register=regs["ui"].register)
    return regs
