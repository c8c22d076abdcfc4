"""Default transport: aioquic between nodes, pinned certificates, mesh-secret proof, tunnels."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from meshcore import hookimpl

if TYPE_CHECKING:
    from meshcore.components import NodeHandle, Transport


def _factory(node: NodeHandle) -> Transport:
    from meshcore_transport_quic.transport import QuicTransport

    return QuicTransport(node)


@hookimpl
def meshcore_register_transports(register: Callable[..., None]) -> None:
    register("quic", _factory)
