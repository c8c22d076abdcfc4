"""The fast path's listening side, written as asyncio Protocols: TLS through a MemoryBIO, then
every decrypted chunk goes straight to the local service's transport (and back) inside the
socket callbacks, without a task switch per chunk. This is the worker end of every rpc tunnel,
so it sits on the per-token round trip."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from typing import cast

log = logging.getLogger("meshcore.transport.fast")

KEY_BYTES = 32
PROBE = "probe"
HEADER_TIMEOUT = 5.0
RECEIVE_BYTES = 256 * 1024

# (peer id, service) -> local (host, port), or None when refused
Lookup = Callable[[str, str], "tuple[str, int] | None"]


def read_plaintext(tls: ssl.SSLObject) -> tuple[bytes, ssl.SSLError | None]:
    """Everything the MemoryBIO-backed ``tls`` can decrypt now, and the TLS error that stopped
    it (the caller closes the connection on an error)."""
    parts: list[bytes] = []
    while True:
        try:
            data = tls.read(RECEIVE_BYTES)
        except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
            break
        except ssl.SSLError as exc:
            return b"".join(parts), exc
        if not data:
            break
        parts.append(data)
    return b"".join(parts), None


def listen_socket(port: int) -> socket.socket:
    """A TCP listening socket on every interface (dual-stack when IPv6 exists)."""
    for family, addr in ((socket.AF_INET6, ("::", port, 0, 0)), (socket.AF_INET, ("", port))):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(128)
            sock.setblocking(False)
            return sock
        except OSError:
            sock.close()
            if family == socket.AF_INET:
                raise
    raise OSError("no address family could listen")  # pragma: no cover


class _Local(asyncio.Protocol):
    """The connection to the local service; hands everything to its FastConnection."""

    def __init__(self, owner: FastConnection) -> None:
        self.owner = owner

    def data_received(self, data: bytes) -> None:
        self.owner.from_local(data)

    def eof_received(self) -> bool:
        self.owner.local_eof()
        return True

    def pause_writing(self) -> None:
        self.owner.set_remote_reading(False)

    def resume_writing(self) -> None:
        self.owner.set_remote_reading(True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.close()


class FastConnection(asyncio.Protocol):
    """One accepted fast-path connection: handshake, header, then a two-way relay."""

    def __init__(self, ctx: ssl.SSLContext, keys: dict[bytes, str], lookup: Lookup,
                 live: set[FastConnection]) -> None:
        self.keys, self.lookup, self.live = keys, lookup, live
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.ssl = ctx.wrap_bio(self._in, self._out, server_side=True)
        self.tcp: asyncio.Transport | None = None
        self.local: asyncio.Transport | None = None
        self.state = "handshake"  # -> header -> connecting -> relay -> closed
        self.header = b""
        self.pending: list[bytes] = []
        self.remote_done = self.local_done = False
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- remote (TLS) side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tcp = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.live.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timer = asyncio.get_running_loop().call_later(HEADER_TIMEOUT, self.close)

    def data_received(self, data: bytes) -> None:
        self._in.write(data)
        if self.state == "handshake":
            try:
                self.ssl.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                return
            except ssl.SSLError as exc:
                log.debug("fast path: TLS handshake failed: %s", exc)
                self.close()
                return
            self._flush()
            self.state = "header"
        plain = self._decrypt()
        if plain:
            self._on_plain(plain)

    def eof_received(self) -> bool:
        self.remote_done = True
        if self.state == "relay" and self.local is not None and self.local.can_write_eof():
            self.local.write_eof()
        self._close_when_done()
        return True

    def pause_writing(self) -> None:
        if self.local is not None:
            self.local.pause_reading()

    def resume_writing(self) -> None:
        if self.local is not None:
            self.local.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    # ---------------------------------------------------------------- plumbing
    def _decrypt(self) -> bytes:
        plain, error = read_plaintext(self.ssl)
        if error is not None:
            log.debug("fast path: TLS error: %s", error)
            self.close()
        return plain

    def _flush(self) -> None:
        data = self._out.read()
        if data and self.tcp is not None and not self.tcp.is_closing():
            self.tcp.write(data)

    def _on_plain(self, data: bytes) -> None:
        if self.state == "relay" and self.local is not None:
            self.local.write(data)
        elif self.state == "connecting":
            self.pending.append(data)
        elif self.state == "header":
            self.header += data
            if len(self.header) > KEY_BYTES and len(self.header) > KEY_BYTES + self.header[32]:
                self._on_header()

    def _on_header(self) -> None:
        key, size = self.header[:KEY_BYTES], self.header[KEY_BYTES]
        service = self.header[KEY_BYTES + 1:KEY_BYTES + 1 + size].decode("ascii", "replace")
        rest = self.header[KEY_BYTES + 1 + size:]
        peer_id = self.keys.get(key)
        if peer_id is None:
            log.warning("fast path: refused a connection with an unknown key")
            self.close()
            return
        if service == PROBE:
            self.ssl.write(b"\x00")
            self._flush()
            self.close()
            return
        target = self.lookup(peer_id, service)
        if target is None:
            self.close()
            return
        self.state = "connecting"
        self.pending = [rest] if rest else []
        assert self.tcp is not None
        self.tcp.pause_reading()
        self.task = asyncio.get_running_loop().create_task(self._connect(target))

    async def _connect(self, target: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        try:
            local, _ = await loop.create_connection(lambda: _Local(self), *target)
        except OSError as exc:
            log.warning("fast path: local service at %s:%s failed: %s", *target, exc)
            self.close()
            return
        if self.state == "closed":
            local.close()
            return
        self.local = local
        sock = local.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.timer is not None:
            self.timer.cancel()
        for chunk in self.pending:
            local.write(chunk)
        self.pending = []
        self.state = "relay"
        if self.remote_done and local.can_write_eof():
            local.write_eof()
        elif self.tcp is not None:
            self.tcp.resume_reading()

    # ---------------------------------------------------------------- local side
    def from_local(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = self.ssl.write(view[:256 * 1024])
            view = view[written:]
        self._flush()

    def local_eof(self) -> None:
        self.local_done = True
        self._flush()
        if self.tcp is not None and not self.tcp.is_closing() and self.tcp.can_write_eof():
            self.tcp.write_eof()
        self._close_when_done()

    def set_remote_reading(self, on: bool) -> None:
        if self.tcp is not None and not self.tcp.is_closing() and self.state == "relay":
            (self.tcp.resume_reading if on else self.tcp.pause_reading)()

    def _close_when_done(self) -> None:
        if self.remote_done and self.local_done:
            self.close()

    def close(self) -> None:
        """Graceful: asyncio's close() still sends what is buffered."""
        if self.state == "closed":
            return
        self.state = "closed"
        self.live.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        for transport in (self.tcp, self.local):
            if transport is not None:
                transport.close()


async def serve_fast(port: int, ctx: ssl.SSLContext, keys: dict[bytes, str], lookup: Lookup,
                     started: Callable[[int], None]) -> None:
    """Listen (``port``, or any port when it is taken) and serve until cancelled."""
    try:
        sock = listen_socket(port)
    except OSError:
        sock = listen_socket(0)
    live: set[FastConnection] = set()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: FastConnection(ctx, keys, lookup, live), sock=sock)
    try:
        started(sock.getsockname()[1])
        await server.serve_forever()
    finally:
        server.close()
        for conn in list(live):
            if conn.task is not None:
                conn.task.cancel()
            if conn.tcp is not None:
                conn.tcp.abort()
            if conn.local is not None:
                conn.local.abort()
            conn.state = "closed"
        live.clear()
