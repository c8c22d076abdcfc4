"""Byte relays: pipe two streams together, and local TCP listeners that open tunnels.

``relay()`` pipes two anyio ByteStreams with a task per direction (any transport's streams
work). ``serve_forward`` listens on loopback and relays each connection into a tunnel; a
transport with a faster way (the QUIC plugin splices its TCP fast path in Protocol
callbacks) takes connections through its optional ``take_connection``. A ``Tally`` counts
the bytes each direction carried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from anyio.abc import ByteStream, SocketStream, TaskStatus

CHUNK = 256 * 1024
log = logging.getLogger("meshcore.relay")

Opener = Callable[[], Awaitable[ByteStream]]
Take = Callable[[socket.socket], Awaitable[bool]]  # True: the connection was taken
_CLOSED = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)
Count = Callable[[int], None]


class Tally:
    """Bytes a forward carried: ``sent`` towards the peer, ``received`` back from it, and
    how many connections it relayed. Plain int adds in the relay callbacks and pumps."""

    __slots__ = ("connections", "received", "sent")

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self.connections = 0

    def add_sent(self, n: int) -> None:
        self.sent += n

    def add_received(self, n: int) -> None:
        self.received += n

    def to_dict(self) -> dict[str, Any]:
        return {"bytes_to_peer": self.sent, "bytes_from_peer": self.received,
                "connections": self.connections}


async def _pump(src: ByteStream, dst: ByteStream, count: Count | None = None) -> None:
    try:
        async for chunk in src:
            if count is not None:
                count(len(chunk))
            await dst.send(chunk)
    except _CLOSED:
        pass
    try:
        await dst.send_eof()
    except (NotImplementedError, TypeError):
        # No half-close on TLS (anyio raises NotImplementedError, or TypeError once the
        # session is gone): close fully, or the peer never learns this side ended and e.g. a
        # sequential rpc-server keeps serving a dead connection forever.
        with contextlib.suppress(*_CLOSED), anyio.move_on_after(5):
            await dst.aclose()
    except _CLOSED:
        pass


async def relay(a: ByteStream, b: ByteStream, tally: Tally | None = None) -> None:
    """Copy bytes both ways until both directions end; closes both streams. ``tally``, if
    given, counts a -> b as sent and b -> a as received.

    Nothing is lost at the end: anyio's asyncio SocketStream sets a zero write-buffer limit,
    so ``send`` returns only once the kernel has the bytes and its aborting ``aclose`` drops
    nothing (tests/test_relay.py checks it with a slow reader)."""
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_pump, a, b, tally.add_sent if tally else None)
            tg.start_soon(_pump, b, a, tally.add_received if tally else None)
    finally:
        with anyio.CancelScope(shield=True):
            await a.aclose()
            await b.aclose()


def nodelay(sock: socket.socket | None) -> None:
    """Small writes (one rpc command, one token) leave at once instead of waiting for Nagle."""
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _handle(conn: socket.socket, open_remote: Opener, take: Take | None,
                  tally: Tally | None) -> None:
    nodelay(conn)
    if tally is not None:
        tally.connections += 1
    if take is not None:
        try:
            if await take(conn):
                return
        except Exception as exc:
            log.warning("the transport's relay of a forwarded connection failed: %s", exc)
            conn.close()
            return
    try:
        stream = await open_remote()
    except Exception:
        conn.close()
        return
    await relay(await SocketStream.from_socket(conn), stream, tally)


async def serve_forward(open_remote: Opener, *, host: str = "127.0.0.1",
                        take: Take | None = None, tally: Tally | None = None,
                        task_status: TaskStatus[int]) -> None:
    """Listen on ``host`` at a free port (reported through task_status); each accepted
    connection is offered to ``take`` first (a transport's own fast relay; True: it took
    it), else relayed to a fresh stream from ``open_remote``; ``tally`` counts the bytes."""
    loop = asyncio.get_running_loop()
    listener = socket.create_server((host, 0))
    listener.setblocking(False)
    with listener:
        async with anyio.create_task_group() as tg:
            task_status.started(listener.getsockname()[1])
            while True:
                conn, _ = await loop.sock_accept(listener)
                tg.start_soon(_handle, conn, open_remote, take, tally)
