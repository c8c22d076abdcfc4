"""The fast path's dialing side as asyncio callbacks, for relays that splice transports.

:func:`open_fast_raw` does what :func:`.fastpath.open_fast` does (hello, keys, OPEN record;
see :mod:`.seal`) but hands the tunnel to a Protocol as an asyncio Transport, so a host-side
relay moves each chunk inside the socket callbacks with no task switch and no anyio stream in
between (``Transport.open_raw`` in meshcore.components).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

import anyio

from meshcore_transport_quic import seal
from meshcore_transport_quic.fastpath import CONNECT_TIMEOUT, FastPathError, log
from meshcore_transport_quic.fastserver import nodelay
from meshcore_transport_quic.splice import reset


class FastTransport(asyncio.BufferedProtocol, asyncio.Transport):
    """The dialing side as asyncio callbacks (no task per chunk): the BufferedProtocol of the
    TCP connection, sealed records, and to the layer above an asyncio Transport with real
    half-close (``write_eof`` sends a sealed EOF, then shuts the TCP write side)."""

    def __init__(self, key: bytes, service: str) -> None:
        super().__init__()
        self.key, self.service = key, service
        self.client_random = seal.new_random()
        self.opener = seal.Opener()
        self.sealer: seal.Sealer | None = None
        self.tcp: asyncio.Transport | None = None
        self.upper: asyncio.Protocol | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._early: list[bytes] = []
        self._eof = False
        self._sent_eof = False
        self._broken: Exception | None = None

    # ---------------------------------------------------------------- TCP side (Protocol)
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tcp = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        nodelay(transport)
        self.tcp.write(seal.hello(self.key, self.client_random))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.opener.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.opener.buffer_updated(nbytes)
        try:
            if self.sealer is None:
                server_random = self.opener.take_clear(seal.RANDOM_BYTES)
                if server_random is None:
                    return
                self.sealer = seal.start(self.opener, self.key, self.client_random,
                                         server_random, client=True)
                assert self.tcp is not None
                self.tcp.write(self.sealer.seal(seal.OPEN, self.service.encode("ascii")))
                if not self.ready.done():  # done: the dialer gave up (timeout) meanwhile
                    self.ready.set_result(None)
            records = self.opener.records()
        except seal.SealError as exc:
            log.warning("fast path: %s", exc)
            self._fail(exc)
            return
        for kind, data in records:
            if kind == seal.DATA and not self._eof:
                if self.upper is None:
                    self._early.append(data)
                else:
                    self.upper.data_received(data)
            elif kind == seal.EOF and not self._eof:
                self._eof = True
                if self.upper is not None:
                    self.upper.eof_received()
            else:
                self._fail(seal.SealError(f"unexpected record {kind}"))
                return

    def _fail(self, exc: Exception) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)
        self._broken = exc
        reset(self.tcp)

    def eof_received(self) -> bool:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed during the handshake"))
        elif not self._eof:  # TCP closed without a sealed EOF: truncated
            self._fail(ConnectionResetError("the peer closed without a sealed EOF"))
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
            self.upper.connection_lost(exc or self._broken)

    # ---------------------------------------------------------------- upper side (Transport)
    def attach(self, upper: asyncio.Protocol) -> None:
        self.upper = upper
        upper.connection_made(self)
        early, self._early = b"".join(self._early), []
        if early:
            upper.data_received(early)
        if self._eof:
            upper.eof_received()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        tcp = self.tcp
        if tcp is None or tcp.is_closing() or self.sealer is None or self._sent_eof:
            return
        for record in self.sealer.seal_data(data):
            tcp.write(record)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self.tcp is not None and not self.tcp.is_closing() and self.sealer is not None \
                and not self._sent_eof:
            self._sent_eof = True
            self.tcp.write(self.sealer.seal(seal.EOF))
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


async def open_fast_raw(host: str, port: int, key: bytes, service: str,
                        protocol_factory: ProtocolFactory) -> asyncio.Transport:
    """Like :func:`.fastpath.open_fast`, but the tunnel is handed to ``protocol_factory()``'s
    Protocol as an asyncio Transport (see ``Transport.open_raw`` in meshcore.components)."""
    loop = asyncio.get_running_loop()
    fast: FastTransport | None = None
    try:
        with anyio.fail_after(CONNECT_TIMEOUT):
            _, fast = await loop.create_connection(lambda: FastTransport(key, service),
                                                   host, port)
            await fast.ready
    except (OSError, TimeoutError, seal.SealError) as exc:
        if fast is not None:
            fast.abort()
        raise FastPathError(f"cannot reach {host}:{port}: {exc!r}") from exc
    fast.attach(protocol_factory())
    return fast
