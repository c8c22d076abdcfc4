"""The fast path's dialing side as asyncio callbacks, for relays that splice transports.

:func:`open_fast_raw` does what :func:`.fastpath.open_fast` does (TLS to the pinned
certificate, key, service name) but hands the tunnel to a Protocol as an asyncio Transport,
so a host-side relay moves each chunk inside the socket callbacks with no task switch and no
anyio stream in between (``Transport.open_raw`` in meshcore.components).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import Any, cast

import anyio

from meshcore_transport_quic.fastpath import (
    CONNECT_TIMEOUT,
    RECORD_BATCH,
    FastPathError,
    client_context,
    log,
)
from meshcore_transport_quic.fastserver import read_plaintext
from meshcore_transport_quic.identity import fingerprint


class FastTransport(asyncio.Protocol, asyncio.Transport):
    """The dialing side as asyncio callbacks (no task per chunk): the Protocol of the TCP
    connection, TLS through a MemoryBIO, and to the layer above an asyncio Transport with
    real half-close (``write_eof`` shuts the TCP write side, like :class:`FastStream`)."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        super().__init__()
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.ssl = ctx.wrap_bio(self._in, self._out, server_side=False)
        self.tcp: asyncio.Transport | None = None
        self.upper: asyncio.Protocol | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._early: list[bytes] = []
        self._eof = False

    # ---------------------------------------------------------------- TCP side (Protocol)
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tcp = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._handshake()

    def _handshake(self) -> None:
        try:
            self.ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as exc:
            if not self.ready.done():
                self.ready.set_exception(exc)
            return
        self._flush()
        if not self.ready.done():
            self.ready.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._in.write(data)
        if not self.ready.done():
            self._handshake()
            if not self.ready.done():
                return
        plain = self._decrypt()
        if not plain:
            return
        if self.upper is None:
            self._early.append(plain)
        else:
            self.upper.data_received(plain)

    def _decrypt(self) -> bytes:
        plain, error = read_plaintext(self.ssl)
        if error is not None:
            log.debug("fast path: TLS error: %s", error)
            self.abort()
        return plain

    def eof_received(self) -> bool:
        self._eof = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed during the TLS handshake"))
        elif self.upper is not None:
            self.upper.eof_received()
        return True  # keep our write side open (half-close)

    def pause_writing(self) -> None:
        if self.upper is not None:
            self.upper.pause_writing()

    def resume_writing(self) -> None:
        if self.upper is not None:
            self.upper.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc or ConnectionError("connection lost"))
        elif self.upper is not None:
            self.upper.connection_lost(exc)

    # ---------------------------------------------------------------- upper side (Transport)
    def attach(self, upper: asyncio.Protocol) -> None:
        self.upper = upper
        upper.connection_made(self)
        early, self._early = b"".join(self._early), []
        if early:
            upper.data_received(early)
        if self._eof:
            upper.eof_received()

    def _flush(self) -> None:
        data = self._out.read()
        if data and self.tcp is not None and not self.tcp.is_closing():
            self.tcp.write(data)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            written = self.ssl.write(view[:RECORD_BATCH])
            view = view[written:]
        self._flush()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self._flush()
        if self.tcp is not None and not self.tcp.is_closing():
            self.tcp.write_eof()  # asyncio sends it after the buffered bytes

    def get_write_buffer_size(self) -> int:
        return self.tcp.get_write_buffer_size() if self.tcp is not None else 0

    def pause_reading(self) -> None:
        if self.tcp is not None and not self.tcp.is_closing():
            self.tcp.pause_reading()

    def resume_reading(self) -> None:
        if self.tcp is not None and not self.tcp.is_closing():
            self.tcp.resume_reading()

    def is_reading(self) -> bool:
        return self.tcp is not None and self.tcp.is_reading()

    def is_closing(self) -> bool:
        return self.tcp is None or self.tcp.is_closing()

    def close(self) -> None:
        """Graceful: asyncio's close() still sends what is buffered."""
        if self.tcp is not None:
            self.tcp.close()

    def abort(self) -> None:
        if self.tcp is not None:
            self.tcp.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.tcp.get_extra_info(name, default) if self.tcp is not None else default


ProtocolFactory = Callable[[], asyncio.Protocol]


async def open_fast_raw(host: str, port: int, fp: bytes, key: bytes, service: str,
                        protocol_factory: ProtocolFactory) -> asyncio.Transport:
    """Like :func:`open_fast`, but the tunnel is handed to ``protocol_factory()``'s Protocol
    as an asyncio Transport (see ``Transport.open_raw`` in meshcore.components)."""
    loop = asyncio.get_running_loop()
    tls: FastTransport | None = None
    try:
        with anyio.fail_after(CONNECT_TIMEOUT):
            _, tls = await loop.create_connection(lambda: FastTransport(client_context()),
                                                  host, port)
            await tls.ready
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        if tls is not None:
            tls.abort()
        raise FastPathError(f"cannot reach {host}:{port}: {exc!r}") from exc
    der = tls.ssl.getpeercert(binary_form=True)
    if der is None or fingerprint(der) != fp:
        tls.abort()
        raise FastPathError(f"{host}:{port} presented another certificate than the peer's")
    name = service.encode("ascii")
    tls.write(key + bytes([len(name)]) + name)
    tls.attach(protocol_factory())
    return tls
