"""Default backend: llama.cpp's llama-server (host) and ggml-rpc-server (workers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from meshcore import hookimpl

if TYPE_CHECKING:
    import typer

    from meshcore.components import Backend, NodeHandle


def _factory(node: NodeHandle) -> Backend:
    from meshcore_backend_llamacpp.backend import LlamaCppBackend  # heavy: only when used

    return LlamaCppBackend(node)


@hookimpl
def meshcore_register_backends(register: Callable[..., None]) -> None:
    register("llamacpp", _factory)


@hookimpl
def meshcore_register_commands(app: typer.Typer) -> None:
    """``download`` and ``models`` (GGUF models) and ``bundle`` (an offline install with
    this machine's llama.cpp binaries); their modules import anything heavy inside."""
    from meshcore_backend_llamacpp import bundle, model_commands

    app.command("download")(model_commands.download)
    app.command("models")(model_commands.models)
    app.command("bundle")(bundle.bundle)
