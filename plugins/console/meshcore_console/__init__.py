"""Default UI: the web console on :3131 (starlette in the node's task group)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from meshcore import hookimpl


def _factory(node: Any) -> Any:
    from meshcore_console.app import Console

    return Console(node)


@hookimpl
def meshcore_register_uis(register: Callable[..., None]) -> None:
    register("console", _factory)
