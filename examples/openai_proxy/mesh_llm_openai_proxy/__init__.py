"""mesh-llm plugin: the ``openai-proxy`` backend (entry point ``openai-proxy``, group meshcore).

A node started with ``--backend openai-proxy`` hosts an existing OpenAI-compatible server
(option ``proxy_url``), or a tiny built-in echo model, for every node of the mesh. This module
stays light (``mesh-llm --help`` imports it): the backend is imported by its factory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshcore import hookimpl

if TYPE_CHECKING:
    from meshcore.components import Backend, NodeHandle
    from meshcore.hookspecs import Register

__version__ = "0.1.0"
BACKEND_NAME = "openai-proxy"


def _factory(node: NodeHandle) -> Backend:
    from mesh_llm_openai_proxy.backend import OpenAIProxyBackend

    return OpenAIProxyBackend(node)


@hookimpl
def meshcore_register_backends(register: Register) -> None:
    register(BACKEND_NAME, _factory)


__all__ = ["BACKEND_NAME", "__version__", "meshcore_register_backends"]
