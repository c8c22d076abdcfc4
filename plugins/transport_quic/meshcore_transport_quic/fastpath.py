"""The data-plane fast path: sealed records over a direct TCP connection between two peers.

Negotiated over the QUIC connection: each side tells the other its TCP port and a random
32-byte key (inside the pinned, mesh-secret-proved, encrypted QUIC connection). A fast-path
connection proves knowledge of that key and derives fresh per-connection AES-GCM keys from it
(:mod:`.seal` has the wire format and the reasons); the client's first record names the
service, and the server relays the rest of the connection. ``probe`` gets one byte and EOF.
This module is the dialing side as an anyio stream (:class:`FastStream`, :func:`open_fast`);
:mod:`.fastclient` is the same as asyncio callbacks, :mod:`.fastserver` the listening side.
"""

from __future__ import annotations

import contextlib
import logging
import socket

import anyio
from anyio.abc import ByteStream, SocketAttribute, TaskStatus

from meshcore_transport_quic import seal
from meshcore_transport_quic.fastserver import PROBE, FastConnection, Lookup, serve_fast

log = logging.getLogger("meshcore.transport.fast")

CONNECT_TIMEOUT = 3.0
DRAIN_TIMEOUT = 60.0
RECEIVE_BYTES = 256 * 1024


class FastPathError(ConnectionError):
    pass


def _nodelay(stream: ByteStream) -> None:
    with contextlib.suppress(Exception):
        sock = stream.extra(SocketAttribute.raw_socket)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class FastStream(ByteStream):
    """Sealed records over a TCP SocketStream, with real half-close: ``send_eof`` sends a
    sealed EOF and shuts the TCP write side; the peer's EOF leaves sending intact. A TCP end
    without the sealed EOF is a truncation and raises BrokenResourceError."""

    def __init__(self, tcp: ByteStream, key: bytes) -> None:
        self.tcp = tcp
        self.key = key
        self.opener = seal.Opener()
        self.sealer: seal.Sealer | None = None
        self._pending = b""
        self._eof = False

    async def handshake(self, service: str) -> None:
        client_random = seal.new_random()
        await self.tcp.send(seal.hello(self.key, client_random))
        while (server_random := self.opener.take_clear(seal.RANDOM_BYTES)) is None:
            self.opener.feed(await self.tcp.receive())
        self.sealer = seal.start(self.opener, self.key, client_random, server_random,
                                 client=True)
        await self.tcp.send(bytes(self.sealer.seal(seal.OPEN, service.encode("ascii"))))

    async def _fill(self) -> None:
        """Wait for at least one more record; its bytes land in ``_pending``."""
        while True:
            try:
                records = self.opener.records()
            except seal.SealError as exc:
                raise anyio.BrokenResourceError(str(exc)) from exc
            parts = []
            for kind, data in records:
                if kind == seal.DATA and not self._eof:
                    parts.append(data)
                elif kind == seal.EOF and not self._eof:
                    self._eof = True
                else:
                    raise anyio.BrokenResourceError(f"unexpected record {kind}")
            if parts or records:
                self._pending += b"".join(parts)
                return
            try:
                self.opener.feed(await self.tcp.receive(RECEIVE_BYTES))
            except anyio.EndOfStream:
                raise anyio.BrokenResourceError("peer closed without a sealed EOF") from None

    async def receive(self, max_bytes: int = RECEIVE_BYTES) -> bytes:
        # The default is large on purpose: relays iterate with the default size.
        while not self._pending:
            if self._eof:
                raise anyio.EndOfStream
            await self._fill()
        data, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
        return data

    async def receive_exactly(self, size: int) -> bytes:
        while len(self._pending) < size:
            if self._eof:
                raise anyio.IncompleteRead
            await self._fill()
        data, self._pending = self._pending[:size], self._pending[size:]
        return data

    async def send(self, item: bytes) -> None:
        assert self.sealer is not None
        await self.tcp.send(b"".join(self.sealer.seal_data(item)))

    async def send_eof(self) -> None:
        assert self.sealer is not None
        await self.tcp.send(bytes(self.sealer.seal(seal.EOF)))
        await self.tcp.send_eof()
        await self._drain(DRAIN_TIMEOUT)

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._drain(1.0)
        await self.tcp.aclose()

    async def _drain(self, timeout: float) -> None:
        # anyio's SocketStream.aclose() aborts the transport, discarding bytes still in
        # asyncio's write buffer (up to 64 KiB): wait until the kernel has them all.
        transport = getattr(self.tcp, "_transport", None)
        if transport is None:
            return
        with anyio.move_on_after(timeout):
            while transport.get_write_buffer_size() and not transport.is_closing():
                await anyio.sleep(0.002)


class FastPathServer:
    """Accepts fast-path connections; ``keys`` maps a key we issued to the peer holding it,
    ``lookup(peer, service)`` gives the local endpoint (or None to refuse)."""

    def __init__(self, keys: dict[bytes, str], lookup: Lookup) -> None:
        self.keys = keys
        self.lookup = lookup
        self.live: set[FastConnection] = set()  # open connections (tests check for leaks)

    async def serve(self, port: int, *, task_status: TaskStatus[int]) -> None:
        await serve_fast(port, self.keys, self.lookup, self.live, task_status.started)


async def open_fast(host: str, port: int, key: bytes, service: str) -> FastStream:
    """Connect, agree on the connection's keys, name the service; then the stream is the
    service's bytes."""
    try:
        with anyio.fail_after(CONNECT_TIMEOUT):
            tcp = await anyio.connect_tcp(host, port)
            _nodelay(tcp)
            stream = FastStream(tcp, key)
            try:
                await stream.handshake(service)
            except BaseException:
                await tcp.aclose()
                raise
    except (OSError, TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError) as exc:
        raise FastPathError(f"cannot reach {host}:{port}: {exc!r}") from exc
    return stream


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
