"""The fast path's dialing side: open a sealed-record tunnel to a peer's TCP port.

Negotiated over the QUIC connection: each side tells the other its TCP port and a random
32-byte key (inside the pinned, mesh-secret-proved, encrypted QUIC connection). A fast-path
connection proves knowledge of that key and derives fresh per-connection AES-GCM keys from it
(:mod:`.seal` has the wire format and the reasons, :mod:`.session` the protocol state); the
client's first record names the service, and the server relays the rest of the connection.
One dial, :func:`open_tunnel`, hands the open tunnel to a Protocol as an asyncio Transport
(:mod:`.adapter`): a splice end for ``Transport.open_raw`` (:func:`open_fast_raw`), or the
anyio wrapper (:func:`open_fast`, :func:`probe`). The listening side is :mod:`.fastserver`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import anyio

from meshcore_transport_quic.adapter import RecordTransport, hot_window
from meshcore_transport_quic.seal import SealError
from meshcore_transport_quic.session import PROBE, RecordSession
from meshcore_transport_quic.stream import RecordStream

CONNECT_TIMEOUT = 3.0

P = TypeVar("P", bound=asyncio.Protocol)
ProtocolFactory = Callable[[], asyncio.Protocol]


class FastPathError(ConnectionError):
    pass


async def open_tunnel(host: str, port: int, key: bytes, service: str,
                      protocol_factory: Callable[[], P], hot: float | None = None
                      ) -> tuple[RecordTransport, P]:
    """Connect, agree on the connection's keys, name the service; then hand the tunnel to
    ``protocol_factory()``'s Protocol. FastPathError when any of it fails. ``hot``: its
    polling window (default :func:`.adapter.hot_window` of the service)."""
    loop = asyncio.get_running_loop()
    conn: RecordTransport | None = None
    opened = False
    try:
        with anyio.fail_after(CONNECT_TIMEOUT):
            _, conn = await loop.create_connection(
                lambda: RecordTransport(RecordSession.dialing(key, service)), host, port)
            if not await conn.opened:
                raise conn.error or ConnectionError("the tunnel did not open")
        opened = True
    except (OSError, TimeoutError, SealError) as exc:
        raise FastPathError(f"cannot reach {host}:{port}: {exc!r}") from exc
    finally:
        if not opened and conn is not None:
            conn.abort()  # failed, or cancelled (the node stops): no socket left behind
    conn.keep_hot(hot_window(service) if hot is None else hot)
    protocol = protocol_factory()
    conn.attach(protocol)
    return conn, protocol


async def open_fast(host: str, port: int, key: bytes, service: str) -> RecordStream:
    """The tunnel as an anyio ByteStream (``transport.connect()``)."""
    _, stream = await open_tunnel(host, port, key, service, RecordStream)
    return stream


async def open_fast_raw(host: str, port: int, key: bytes, service: str,
                        protocol_factory: ProtocolFactory, hot: float | None = None
                        ) -> asyncio.Transport:
    """The tunnel handed to ``protocol_factory()``'s Protocol as an asyncio Transport (see
    ``Transport.open_raw`` in meshcore.components); the host side's splice."""
    conn, _ = await open_tunnel(host, port, key, service, protocol_factory, hot)
    return conn


async def probe(host: str, port: int, key: bytes) -> None:
    """Raise FastPathError unless a full fast-path exchange with the peer works."""
    stream = await open_fast(host, port, key, PROBE)
    try:
        with anyio.fail_after(CONNECT_TIMEOUT):
            reply = await stream.receive(1)
    except (TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
        raise FastPathError(f"{host}:{port} refused the fast path key ({exc!r})") from exc
    finally:
        await stream.aclose()
    if reply != b"\x00":
        raise FastPathError(f"{host}:{port} answered {reply!r} to a probe")
