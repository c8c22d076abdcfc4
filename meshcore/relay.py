"""Byte relays: pipe two streams together, and local TCP listeners that open tunnels.

Two ways to relay. ``relay()`` pipes two anyio ByteStreams with a task per direction (any
transport's streams work). ``serve_forward(..., open_raw=...)`` splices two asyncio
Transports with Protocol callbacks instead: each received chunk is written to the other side
inside the socket callback (no task switch, no anyio stream), with pause/resume backpressure.
It is used when the transport can hand a tunnel out as an asyncio Transport (the QUIC
plugin's TCP fast path); otherwise it falls back to ``relay()``. Either way a
``Tally`` passed to ``serve_forward`` counts the bytes each direction carried.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any, cast

import anyio
from anyio.abc import ByteStream, SocketStream, TaskStatus

CHUNK = 256 * 1024

Opener = Callable[[], Awaitable[ByteStream]]
# Given a Protocol factory, connect the tunnel to it and return its Transport; None when no
# raw path is available right now (the caller then uses the stream opener).
RawOpener = Callable[[Callable[[], asyncio.Protocol]], Awaitable["asyncio.Transport | None"]]
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


def reset(transport: asyncio.BaseTransport | None) -> None:
    """Drop a connection with a TCP reset, so the far end sees an error, not a clean end
    (asyncio's ``abort`` alone still sends FIN when nothing is left unread)."""
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()  # type: ignore[attr-defined]


class SpliceEnd(asyncio.Protocol):
    """One end of a callback relay: what it receives goes to the other end's transport; EOF
    is passed on as a half-close (or a graceful close where the other end has none).
    ``count``, if given, is told the size of every chunk this end receives."""

    def __init__(self, count: Count | None = None) -> None:
        self.count = count
        self.transport: asyncio.Transport | None = None
        self.other: SpliceEnd | None = None
        self.pending: list[bytes] = []
        self.eof = False
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        nodelay(transport.get_extra_info("socket"))

    def _target(self) -> asyncio.Transport | None:
        return self.other.transport if self.other is not None else None

    def data_received(self, data: bytes) -> None:
        if self.count is not None:
            self.count(len(data))
        target = self._target()
        if target is None:  # the other end is still connecting
            self.pending.append(data)
            if self.transport is not None:
                self.transport.pause_reading()
        else:
            target.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        target = self._target()
        if target is not None:
            if target.can_write_eof():
                target.write_eof()  # asyncio sends it after what is still buffered
            else:
                target.close()
            if self.other is not None and self.other.eof:
                self.close()
        return True  # keep our own write side open

    def pause_writing(self) -> None:
        if (src := self._target()) is not None:
            src.pause_reading()

    def resume_writing(self) -> None:
        if (src := self._target()) is not None and not src.is_closing():
            src.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        if self.other is not None and self.other.transport is not None:
            if exc is None:
                self.other.transport.close()  # graceful: flushes what it still holds
            else:
                reset(self.other.transport)  # broken or cut: do not pass it on as an end

    def close(self) -> None:
        """Close both ends gracefully (asyncio's ``close`` sends buffered bytes first)."""
        for end in (self, self.other):
            if end is not None and end.transport is not None:
                end.transport.close()


def splice(a: SpliceEnd, b: SpliceEnd) -> None:
    """Join two connected ends; bytes or EOF that arrived meanwhile are passed on now."""
    a.other, b.other = b, a
    for end in (a, b):
        for chunk in end.pending:
            end.other.transport.write(chunk)  # type: ignore[union-attr]
        end.pending = []
        if end.transport is not None and not end.transport.is_closing():
            end.transport.resume_reading()
    for end in (a, b):
        if end.eof:
            end.eof_received()


async def _serve_raw(conn: socket.socket, remote: asyncio.Transport, far: SpliceEnd,
                     tally: Tally | None) -> None:
    loop = asyncio.get_running_loop()
    near = SpliceEnd(tally.add_sent if tally else None)
    try:
        await loop.connect_accepted_socket(lambda: near, conn)
    except OSError:
        remote.close()
        return
    splice(near, far)
    if far.lost.done() and near.transport is not None:  # the tunnel died while we connected
        near.transport.close()
    try:
        await near.lost
        await far.lost
    finally:
        # Cancelled (the node stops): drop the connection now.
        for transport in (near.transport, remote):
            if transport is not None and not transport.is_closing():
                transport.abort()


async def _handle(conn: socket.socket, open_remote: Opener, open_raw: RawOpener | None,
                  tally: Tally | None) -> None:
    nodelay(conn)
    if tally is not None:
        tally.connections += 1
    if open_raw is not None:
        far = SpliceEnd(tally.add_received if tally else None)
        try:
            remote = await open_raw(lambda: far)
        except Exception:
            remote = None
            conn.close()
            return
        if remote is not None:
            await _serve_raw(conn, remote, far, tally)
            return
    try:
        stream = await open_remote()
    except Exception:
        conn.close()
        return
    await relay(await SocketStream.from_socket(conn), stream, tally)


async def serve_forward(open_remote: Opener, *, host: str = "127.0.0.1",
                        open_raw: RawOpener | None = None, tally: Tally | None = None,
                        task_status: TaskStatus[int]) -> None:
    """Listen on ``host`` at a free port (reported through task_status); each accepted
    connection is relayed to the tunnel from ``open_raw`` when it gives one (callback
    splice), else to a fresh stream from ``open_remote`` (``relay()``); ``tally`` counts
    the bytes of every connection."""
    loop = asyncio.get_running_loop()
    listener = socket.create_server((host, 0))
    listener.setblocking(False)
    with listener:
        async with anyio.create_task_group() as tg:
            task_status.started(listener.getsockname()[1])
            while True:
                conn, _ = await loop.sock_accept(listener)
                tg.start_soon(_handle, conn, open_remote, open_raw, tally)
