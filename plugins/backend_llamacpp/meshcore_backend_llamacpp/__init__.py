"""Default backend: llama.cpp's llama-server (host) and ggml-rpc-server (workers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from meshcore import hookimpl


def _factory(node: Any) -> Any:
    from meshcore_backend_llamacpp.backend import LlamaCppBackend

    return LlamaCppBackend(node)


@hookimpl
def meshcore_register_backends(register: Callable[..., None]) -> None:
    register("llamacpp", _factory)
