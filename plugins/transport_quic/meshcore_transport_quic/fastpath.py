"""The data-plane fast path: direct TLS 1.3 over TCP between two authenticated peers.

Negotiated over the QUIC connection: each side tells the other its TCP port and a random
32-byte key (inside the authenticated, encrypted QUIC handshake). A fast-path connection is
TLS to the pinned certificate (the client checks the server's fingerprint), then the client
sends ``key | u8 len | service name``; the server maps the key back to the peer that was given
it, and relays the rest of the connection untouched. ``probe`` answers one byte and closes.
This module is the dialing side (:class:`FastStream`, :func:`open_fast`); the listening side
is :mod:`.fastserver`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl

import anyio
from anyio.abc import ByteStream, SocketAttribute, TaskStatus

from meshcore_transport_quic.fastserver import PROBE, RECEIVE_BYTES, Lookup, serve_fast
from meshcore_transport_quic.identity import Identity, fingerprint

log = logging.getLogger("meshcore.transport.fast")

CONNECT_TIMEOUT = 3.0
DRAIN_TIMEOUT = 60.0
RECORD_BATCH = 256 * 1024


class FastPathError(ConnectionError):
    pass


def server_context(identity: Identity) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(identity.cert_path, identity.key_path)
    return ctx


def client_context() -> ssl.SSLContext:
    # No CA check: the peer's certificate is pinned by fingerprint after the handshake.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _nodelay(stream: ByteStream) -> None:
    with contextlib.suppress(Exception):
        sock = stream.extra(SocketAttribute.raw_socket)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class FastStream(ByteStream):
    """TLS over a TCP SocketStream with real half-close.

    anyio's TLSStream has no ``send_eof`` and, on the peer's EOF, also shuts its own write
    side, so a relay loses the tail of the other direction. Here ``send_eof`` shuts only the
    TCP write side (no close_notify), and a received EOF leaves sending intact.
    """

    def __init__(self, tcp: ByteStream, ctx: ssl.SSLContext, *, server: bool) -> None:
        self.tcp = tcp
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.ssl = ctx.wrap_bio(self._in, self._out, server_side=server)
        self._send_lock = asyncio.Lock()  # uncontended acquire does not yield (anyio's does)
        self._eof = False
        self._pending = b""

    async def _flush(self) -> None:
        if not self._out.pending:
            return
        async with self._send_lock:  # bytes leave the BIO and reach TCP in order
            data = self._out.read()
            if data:
                await self.tcp.send(data)

    async def _fill(self) -> None:
        await self._flush()
        try:
            self._in.write(await self.tcp.receive(RECEIVE_BYTES))
        except anyio.EndOfStream:
            self._eof = True
            raise

    async def handshake(self) -> None:
        while True:
            try:
                self.ssl.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._fill()
        await self._flush()

    def peer_certificate(self) -> bytes | None:
        return self.ssl.getpeercert(binary_form=True)

    async def receive(self, max_bytes: int = RECEIVE_BYTES) -> bytes:
        # The default is large on purpose: relays iterate with the default size.
        if self._pending:
            data, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
            return data
        while True:
            data = self._read_records(max_bytes)
            if data:
                return data
            if self._eof:
                raise anyio.EndOfStream
            await self._fill()

    async def receive_exactly(self, size: int) -> bytes:
        while len(self._pending) < size:
            self._pending += self._read_records(RECEIVE_BYTES) or await self._refill()
        data, self._pending = self._pending[:size], self._pending[size:]
        return data

    async def _refill(self) -> bytes:
        if self._eof:
            raise anyio.IncompleteRead
        await self._fill()
        return b""

    def _read_records(self, max_bytes: int) -> bytes:
        """Every decrypted byte available now, up to ``max_bytes`` (a read returns one TLS
        record of at most 16 KiB; batching them saves a loop turn per record)."""
        parts: list[bytes] = []
        size = 0
        while size < max_bytes:
            try:
                data = self.ssl.read(max_bytes - size)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self._eof = True
                break
            except ssl.SSLError as exc:
                if parts:
                    break
                raise anyio.BrokenResourceError(str(exc)) from exc
            if not data:
                self._eof = True
                break
            parts.append(data)
            size += len(data)
        return b"".join(parts)

    async def send(self, item: bytes) -> None:
        view = memoryview(item)
        while view:
            written = self.ssl.write(view[:RECORD_BATCH])
            view = view[written:]
            await self._flush()

    async def send_eof(self) -> None:
        await self._flush()
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

    def __init__(self, identity: Identity, keys: dict[bytes, str], lookup: Lookup) -> None:
        self.identity = identity
        self.keys = keys
        self.lookup = lookup

    async def serve(self, port: int, *, task_status: TaskStatus[int]) -> None:
        await serve_fast(port, server_context(self.identity), self.keys, self.lookup,
                         task_status.started)


async def open_fast(host: str, port: int, fp: bytes, key: bytes, service: str) -> ByteStream:
    """Connect, check the pinned fingerprint, send the header; the stream is then raw bytes."""
    try:
        with anyio.fail_after(CONNECT_TIMEOUT):
            tcp = await anyio.connect_tcp(host, port)
            _nodelay(tcp)
            stream = FastStream(tcp, client_context(), server=False)
            try:
                await stream.handshake()
            except BaseException:
                await tcp.aclose()
                raise
    except (OSError, TimeoutError, ssl.SSLError, anyio.EndOfStream,
            anyio.BrokenResourceError) as exc:
        raise FastPathError(f"cannot reach {host}:{port}: {exc!r}") from exc
    der = stream.peer_certificate()
    if der is None or fingerprint(der) != fp:
        await stream.aclose()
        raise FastPathError(f"{host}:{port} presented another certificate than the peer's")
    name = service.encode("ascii")
    await stream.send(key + bytes([len(name)]) + name)
    return stream


async def probe(host: str, port: int, fp: bytes, key: bytes) -> None:
    """Raise FastPathError unless a full fast-path exchange with the peer works."""
    stream = await open_fast(host, port, fp, key, PROBE)
    try:
        with anyio.fail_after(CONNECT_TIMEOUT):
            reply = await stream.receive(1)
    except (TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
        raise FastPathError(f"{host}:{port} refused the fast path key ({exc!r})") from exc
    finally:
        await stream.aclose()
    if reply != b"\x00":
        raise FastPathError(f"{host}:{port} answered {reply!r} to a probe")
