"""The fast path's listening side, written as asyncio Protocols: the sealed-record handshake
(:mod:`.seal`), then every opened record goes straight to the local service's transport (and
back, sealed) inside the socket callbacks, without a task switch per chunk. This is the
worker end of every rpc tunnel, so it sits on the per-token round trip."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import cast

from meshcore_transport_quic import seal
from meshcore_transport_quic.splice import reset

log = logging.getLogger("meshcore.transport.fast")

KEY_BYTES = 32
PROBE = "probe"
HEADER_TIMEOUT = 5.0
MAX_PENDING = 64  # connections still in the hello / OPEN stage (64 KiB buffer each)

# (peer id, service) -> local (host, port), or None when refused
Lookup = Callable[[str, str], "tuple[str, int] | None"]


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


def nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


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


class FastConnection(asyncio.BufferedProtocol):
    """One accepted fast-path connection: hello, keys, OPEN record, then a two-way relay."""

    def __init__(self, keys: dict[bytes, str], lookup: Lookup,
                 live: set[FastConnection]) -> None:
        self.keys, self.lookup, self.live = keys, lookup, live
        self.opener = seal.Opener()
        self.sealer: seal.Sealer | None = None
        self.peer_id = ""
        self.tcp: asyncio.Transport | None = None
        self.local: asyncio.Transport | None = None
        self.state = "hello"  # -> open -> connecting -> relay -> closed
        self.pending: list[bytes] = []
        self.remote_done = self.local_done = False
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- remote (sealed) side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tcp = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        pending = sum(1 for conn in self.live if conn.state in ("hello", "open"))
        if pending >= MAX_PENDING:  # a flood of idle connections must not cost memory
            log.warning("fast path: %d connections have not authenticated yet; dropping "
                        "a new one", pending)
            self.state = "closed"
            self.tcp.abort()
            return
        self.live.add(self)
        nodelay(transport)
        self.timer = asyncio.get_running_loop().call_later(HEADER_TIMEOUT, self.close)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.opener.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        if self.state == "closed":
            return
        self.opener.buffer_updated(nbytes)
        try:
            if self.state == "hello" and not self._on_hello():
                return
            records = self.opener.records()
        except seal.SealError as exc:
            log.warning("fast path: dropped a connection: %s", exc)
            self.abort()
            return
        for kind, data in records:
            if self.state == "closed":
                return
            if kind == seal.DATA:
                self._on_data(data)
            elif kind == seal.OPEN and self.state == "open":
                self._on_open(data.decode("ascii", "replace"))
            elif kind == seal.EOF and not self.remote_done:
                self._on_eof()
            else:
                log.warning("fast path: unexpected record %d in state %s", kind, self.state)
                self.abort()
                return

    def _on_hello(self) -> bool:
        data = self.opener.take_clear(seal.HELLO_BYTES)
        if data is None:
            return False
        ident, client_random = seal.parse_hello(data)
        found = [(k, p) for k, p in list(self.keys.items()) if seal.key_id(k) == ident]
        if not found:
            raise seal.SealError("unknown key (not issued to a connected peer)")
        key, peer_id = found[0]
        server_random = seal.new_random()
        self.sealer = seal.start(self.opener, key, client_random, server_random,
                                 client=False)
        self.peer_id = peer_id
        self.state = "open"
        assert self.tcp is not None
        self.tcp.write(server_random)
        return True

    def eof_received(self) -> bool:
        if not self.remote_done:  # a TCP close without a sealed EOF: truncated
            if self.state != "closed":
                log.debug("fast path: peer closed without a sealed EOF")
            self.abort()
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
    def _send(self, kind: int, data: bytes = b"") -> None:
        if self.tcp is not None and not self.tcp.is_closing() and self.sealer is not None:
            self.tcp.write(self.sealer.seal(kind, data))

    def _on_data(self, data: bytes) -> None:
        if self.state == "relay" and self.local is not None:
            self.local.write(data)
        elif self.state == "connecting":
            self.pending.append(data)
        else:
            log.warning("fast path: data before the OPEN record")
            self.abort()

    def _on_eof(self) -> None:
        self.remote_done = True
        if self.state == "relay" and self.local is not None and self.local.can_write_eof():
            self.local.write_eof()
        self._close_when_done()

    def _on_open(self, service: str) -> None:
        if service == PROBE:
            self._send(seal.DATA, b"\x00")
            self._send(seal.EOF)
            self.close()
            return
        target = self.lookup(self.peer_id, service)
        if target is None:
            log.warning("fast path: %s asked for unknown service %r", self.peer_id, service)
            self.close()
            return
        self.state = "connecting"
        self.task = asyncio.get_running_loop().create_task(self._connect(target))

    async def _connect(self, target: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        assert self.tcp is not None
        self.tcp.pause_reading()
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
        nodelay(local)
        if self.timer is not None:
            self.timer.cancel()
        for chunk in self.pending:
            local.write(chunk)
        self.pending = []
        self.state = "relay"
        if self.remote_done and local.can_write_eof():
            local.write_eof()
        elif not self.tcp.is_closing():
            self.tcp.resume_reading()

    # ---------------------------------------------------------------- local side
    def from_local(self, data: bytes) -> None:
        if self.tcp is not None and not self.tcp.is_closing() and self.sealer is not None:
            for record in self.sealer.seal_data(data):
                self.tcp.write(record)

    def local_eof(self) -> None:
        self.local_done = True
        self._send(seal.EOF)
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

    def abort(self) -> None:
        """Broken or truncated: both ends see a reset, not a clean end."""
        self.state = "closed"
        self.live.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None:
            self.task.cancel()
        for transport in (self.tcp, self.local):
            reset(transport)


async def serve_fast(port: int, keys: dict[bytes, str], lookup: Lookup,
                     live: set[FastConnection], started: Callable[[int], None]) -> None:
    """Listen (``port``, or any port when it is taken) and serve until cancelled."""
    try:
        sock = listen_socket(port)
    except OSError:
        sock = listen_socket(0)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: FastConnection(keys, lookup, live), sock=sock)
    try:
        started(sock.getsockname()[1])
        await server.serve_forever()
    finally:
        server.close()
        for conn in list(live):
            conn.abort()
        live.clear()
