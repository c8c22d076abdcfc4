"""The data-plane fast path: direct TLS 1.3 over TCP between two authenticated peers.

Negotiated over the QUIC connection: each side tells the other its TCP port and a random
32-byte key (inside the authenticated, encrypted QUIC handshake). A fast-path connection is
TLS to the pinned certificate (the client checks the server's fingerprint), then the client
sends ``key | u8 len | service name``; the server maps the key back to the peer that was given
it, and relays the rest of the connection untouched. ``probe`` answers one byte and closes.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable

import anyio
from anyio.abc import ByteStream, SocketAttribute, TaskStatus
from anyio.streams.buffered import BufferedByteStream
from anyio.streams.tls import TLSAttribute, TLSListener, TLSStream

from meshcore_transport_quic.identity import Identity, fingerprint

log = logging.getLogger("meshcore.transport.fast")

KEY_BYTES = 32
PROBE = "probe"
HEADER_TIMEOUT = 5.0
CONNECT_TIMEOUT = 3.0
DRAIN_TIMEOUT = 60.0

Inbound = Callable[[str, str, ByteStream], Awaitable[None]]  # (peer id, service, stream)


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
    """A TLS stream with half-close: ``send_eof`` shuts the TCP write side (anyio's TLSStream
    has no send_eof, and relays need it so each direction can end on its own)."""

    def __init__(self, tls: TLSStream) -> None:
        self.tls = tls

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self.tls.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        await self.tls.send(item)

    async def send_eof(self) -> None:
        await self.tls.transport_stream.send_eof()
        await self._drain(DRAIN_TIMEOUT)

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._drain(1.0)
        await self.tls.aclose()

    async def _drain(self, timeout: float) -> None:
        # anyio's SocketStream.aclose() aborts the transport, discarding bytes still in
        # asyncio's write buffer (up to 64 KiB): wait until the kernel has them all.
        transport = getattr(self.tls.transport_stream, "_transport", None)
        if transport is None:
            return
        with anyio.move_on_after(timeout):
            while transport.get_write_buffer_size() and not transport.is_closing():
                await anyio.sleep(0.002)


class FastPathServer:
    """Accepts fast-path connections; ``keys`` maps a key we issued to the peer holding it."""

    def __init__(self, identity: Identity, keys: dict[bytes, str], inbound: Inbound) -> None:
        self.identity = identity
        self.keys = keys
        self.inbound = inbound

    async def serve(self, port: int, *, task_status: TaskStatus[int]) -> None:
        try:
            listener = await anyio.create_tcp_listener(local_port=port)
        except OSError:
            listener = await anyio.create_tcp_listener(local_port=0)
        tls = TLSListener(listener, server_context(self.identity), standard_compatible=False,
                          handshake_timeout=HEADER_TIMEOUT)
        async with listener:
            task_status.started(listener.extra(SocketAttribute.local_port))
            await tls.serve(self._handle)

    async def _handle(self, stream: TLSStream) -> None:
        _nodelay(stream)
        buffered = BufferedByteStream(FastStream(stream))
        try:
            with anyio.fail_after(HEADER_TIMEOUT):
                key = await buffered.receive_exactly(KEY_BYTES)
                size = (await buffered.receive_exactly(1))[0]
                service = (await buffered.receive_exactly(size)).decode("ascii", "replace")
        except (TimeoutError, anyio.IncompleteRead, anyio.BrokenResourceError, OSError):
            await buffered.aclose()
            return
        peer_id = self.keys.get(key)
        if peer_id is None:
            log.warning("fast path: refused a connection with an unknown key")
            await buffered.aclose()
            return
        if service == PROBE:
            with contextlib.suppress(Exception):
                await buffered.send(b"\x00")
            await buffered.aclose()
            return
        await self.inbound(peer_id, service, buffered)


async def open_fast(host: str, port: int, fp: bytes, key: bytes, service: str) -> ByteStream:
    """Connect, check the pinned fingerprint, send the header; the stream is then raw bytes."""
    try:
        with anyio.fail_after(CONNECT_TIMEOUT):
            stream = await anyio.connect_tcp(host, port, ssl_context=client_context(),
                                             tls_standard_compatible=False)
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        raise FastPathError(f"cannot reach {host}:{port}: {exc or type(exc).__name__}") from exc
    _nodelay(stream)
    der = stream.extra(TLSAttribute.peer_certificate_binary)
    if der is None or fingerprint(der) != fp:
        await stream.aclose()
        raise FastPathError(f"{host}:{port} presented another certificate than the peer's")
    name = service.encode("ascii")
    await stream.send(key + bytes([len(name)]) + name)
    return FastStream(stream)


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
