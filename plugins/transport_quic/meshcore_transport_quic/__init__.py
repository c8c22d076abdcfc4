"""Default transport: aioquic between nodes, pinned certificates, mesh-secret proof, tunnels."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from meshcore import hookimpl


def _factory(node: Any) -> Any:
    from meshcore_transport_quic.transport import QuicTransport

    return QuicTransport(node)


@hookimpl
def meshcore_register_transports(register: Callable[..., None]) -> None:
    register("quic", _factory)
