"""meshcore.relay: relayed connections lose no bytes at the end and propagate half-close."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
from anyio.abc import ByteStream, SocketAttribute, SocketStream
from meshcore_transport_quic.splice import RawOpener, serve_forward

from meshcore.relay import relay

pytestmark = pytest.mark.anyio

# The small upload fits the relay's buffer plus the small kernel buffers while the service
# still sleeps, so the relay ends with it unsent; the large one ends while the service reads.
SIZES = [120_001, 1_000_003]
Opener = Callable[[], Awaitable[ByteStream]]


class SlowService:
    """A TCP service that half-closes at once, sleeps, then reads everything slowly with a
    tiny receive window: a relay towards it finishes while the upload's tail is still in the
    relay's buffers (the case an aborting close loses)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # accepted ones inherit
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with self.sock:
            while True:
                try:
                    conn, _ = self.sock.accept()
                except OSError:
                    return
                with conn:
                    conn.shutdown(socket.SHUT_WR)
                    time.sleep(0.4)
                    parts = []
                    while chunk := conn.recv(4096):
                        parts.append(chunk)
                        time.sleep(0.0005)
                    self.received.append(b"".join(parts))

    def close(self) -> None:
        self.sock.close()  # wakes accept() on Linux via shutdown below
        self.thread.join(0.1)


def small_sndbuf_opener(port: int) -> Opener:
    """A TCP stream to ``port`` with a fixed, small kernel send buffer (no autotuning), so
    bytes the relay writes stay in the relay's own buffer for a while."""
    async def open_remote() -> ByteStream:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        return await SocketStream.from_socket(sock)
    return open_remote


def payload(size: int) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[:size]


def small_sndbuf_raw_opener(port: int) -> RawOpener:
    """The same, handed out as an asyncio Transport (the callback splice path)."""
    async def open_raw(factory: Callable[[], asyncio.Protocol]) -> asyncio.Transport | None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", port))
        transport, _ = await loop.create_connection(factory, sock=sock)
        return transport
    return open_raw


async def no_stream() -> ByteStream:
    raise AssertionError("the raw path was not used")


def upload(port: int, size: int) -> bytes:
    """Send ``size`` bytes, half-close, read until the relay closes; returns what came back."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(payload(size))
        sock.shutdown(socket.SHUT_WR)
        back = b""
        while chunk := sock.recv(65536):
            back += chunk
        return back


def check(service: SlowService, rounds: int, size: int) -> None:
    deadline = time.monotonic() + 30
    while len(service.received) < rounds and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(service.received) == rounds
    for got in service.received:
        assert len(got) == size, f"the relay lost {size - len(got)} tail bytes"
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload(size)).digest()


def forward_starter(path: str, service_port: int) -> Any:
    """``serve_forward`` set up for one host-side path: anyio streams, or the callback splice
    (``open_raw``); the splice path gets a stream opener that fails if it is ever used."""
    if path == "streams":
        return functools.partial(serve_forward, small_sndbuf_opener(service_port))
    return functools.partial(serve_forward, no_stream,
                             open_raw=small_sndbuf_raw_opener(service_port))


@pytest.mark.parametrize("path", ["streams", "splice"])
@pytest.mark.parametrize("size", SIZES)
async def test_forward_flushes_the_tail_before_closing(path: str, size: int) -> None:
    """Both host-side paths close gracefully: bytes still buffered in the relay leave."""
    service = SlowService()
    try:
        async with anyio.create_task_group() as tg:
            port = await tg.start(forward_starter(path, service.port))
            for _ in range(2):
                assert await anyio.to_thread.run_sync(upload, port, size) == b""
            await anyio.to_thread.run_sync(check, service, 2, size)
            tg.cancel_scope.cancel()
    finally:
        service.close()


@pytest.mark.parametrize("size", SIZES)
async def test_relay_flushes_the_tail_before_closing(size: int) -> None:
    """relay() itself (the serve_inbound path, anyio streams on both sides)."""
    service = SlowService()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(SocketAttribute.local_port)
    opener = small_sndbuf_opener(service.port)

    async def handle(client: ByteStream) -> None:
        await relay(client, await opener())

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, handle)
            assert await anyio.to_thread.run_sync(upload, port, size) == b""
            await anyio.to_thread.run_sync(check, service, 1, size)
            tg.cancel_scope.cancel()
    finally:
        await listener.aclose()
        service.close()


@pytest.mark.parametrize("raw", [False, True], ids=["streams", "splice"])
async def test_forward_propagates_half_close_both_ways(raw: bool) -> None:
    """The client's EOF reaches the service while the answer still flows back."""

    async def answer_after_eof(stream: ByteStream) -> None:
        async with stream:
            body = b""
            async for chunk in stream:
                body += chunk
            await stream.send(len(body).to_bytes(8, "big") + body[::-1])

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    target = listener.extra(SocketAttribute.local_port)

    async def open_remote() -> ByteStream:
        return await anyio.connect_tcp("127.0.0.1", target)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, answer_after_eof)
            open_raw = small_sndbuf_raw_opener(target) if raw else None
            port = await tg.start(functools.partial(serve_forward, open_raw=open_raw),
                                  no_stream if raw else open_remote)
            back = await anyio.to_thread.run_sync(upload, port, 1_000_003)
            assert int.from_bytes(back[:8], "big") == 1_000_003
            assert back[8:] == payload(1_000_003)[::-1]
            tg.cancel_scope.cancel()
    finally:
        await listener.aclose()
