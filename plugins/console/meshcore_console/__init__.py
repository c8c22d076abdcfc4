"""Default UI: the web console on :3131 (starlette in the node's task group)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from meshcore import hookimpl

if TYPE_CHECKING:
    from meshcore.components import UI, NodeHandle


def _factory(node: NodeHandle, port: int | None = None) -> UI:
    from meshcore_console.app import Console  # starlette: only when the console runs

    return Console(node, port)


@hookimpl
def meshcore_register_uis(register: Callable[..., None]) -> None:
    register("console", _factory)
