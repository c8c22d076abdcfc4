"""The fast path's plaintext as an anyio ByteStream: a thin Protocol over the record adapter.

:class:`RecordStream` sits on a :class:`.adapter.RecordTransport` the way a splice end does,
and turns its callbacks into an anyio ByteStream (``transport.connect()`` and ``probe``):
real half-close (``send_eof`` sends a sealed EOF and FIN; the peer's EOF leaves sending
intact), and a TCP end without the sealed EOF (a truncation) or a bad record raises
BrokenResourceError. Like anyio's SocketStream, ``send`` returns once the kernel has every
byte (a zero write-buffer limit), so closing loses nothing it accepted.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import cast

import anyio
from anyio.abc import ByteStream

RECEIVE_BYTES = 256 * 1024  # large on purpose: relays iterate with the default size
HIGH_WATER = 1024 * 1024  # plaintext held before reading pauses
DRAIN_TIMEOUT = 60.0
CLOSE_DRAIN = 1.0


class RecordStream(asyncio.Protocol, ByteStream):
    """The Protocol above a RecordTransport, seen from tasks as an anyio ByteStream."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._chunks: deque[bytes] = deque()
        self._held = 0
        self._eof = self._lost = self._closed = self._eof_sent = self._paused = False
        self._error: Exception | None = None
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    # ---------------------------------------------------------------- Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(0)  # send() waits until the kernel has it

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._held += len(data)
        self._readable.set()
        if self._held > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._eof = True
        self._readable.set()
        return True

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost, self._error = True, exc
        self._readable.set()
        self._writable.set()

    # ---------------------------------------------------------------- ByteStream
    def _transport(self) -> asyncio.Transport:
        if self._closed or self.transport is None:
            raise anyio.ClosedResourceError
        return self.transport

    async def receive(self, max_bytes: int = RECEIVE_BYTES) -> bytes:
        await anyio.lowlevel.checkpoint()
        transport = self._transport()
        while not self._chunks:
            if self._eof:
                raise anyio.EndOfStream
            if self._lost:
                why = self._error or ConnectionResetError("the tunnel closed")
                raise anyio.BrokenResourceError(str(why)) from self._error
            self._readable.clear()
            await self._readable.wait()
            transport = self._transport()
        chunk = self._chunks.popleft()
        if len(chunk) > max_bytes:
            self._chunks.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        self._held -= len(chunk)
        if self._paused and self._held <= HIGH_WATER // 2:
            self._paused = False
            transport.resume_reading()
        return chunk

    async def send(self, item: bytes) -> None:
        await anyio.lowlevel.checkpoint()
        transport = self._transport()
        if self._eof_sent:
            raise anyio.ClosedResourceError
        if self._lost:
            raise anyio.BrokenResourceError(str(self._error or "the tunnel closed"))
        transport.write(item)
        await self._drain()

    async def send_eof(self) -> None:
        transport = self._transport()
        if not self._eof_sent and not self._lost:
            self._eof_sent = True
            transport.write_eof()
            with anyio.move_on_after(DRAIN_TIMEOUT):
                await self._drain()

    async def _drain(self) -> None:
        while not self._writable.is_set():
            await self._writable.wait()

    async def aclose(self) -> None:
        if self._closed or self.transport is None:
            return
        transport = self.transport
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_DRAIN):
            await self._drain()
        self._closed = True
        self._readable.set()
        if transport.get_write_buffer_size():
            transport.abort()  # the peer reads nothing: do not hold the socket for it
        else:
            transport.close()
        await anyio.lowlevel.checkpoint()
