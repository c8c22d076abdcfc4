"""The fast path's listening side: accept, authenticate the key, find the service, splice.

Every accepted connection is a :class:`.adapter.RecordTransport` with an accepting session
(the hello must name a key this node issued over QUIC; :mod:`.session`). Once its OPEN record
names a service, ``lookup(peer id, service)`` gives the local endpoint and the tunnel is
spliced to a new connection to it in Protocol callbacks (:mod:`.splice`: half-close,
backpressure, a reset passed on as a reset), with no task switch per chunk. This is the
worker end of every rpc tunnel, so it sits on the per-token round trip. A connection has
HEADER_TIMEOUT to send its OPEN record and at most MAX_PENDING may be at that stage at once
(each holds a 64 KiB buffer); further ones are dropped at once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

import anyio
from anyio.abc import TaskStatus

from meshcore_transport_quic.adapter import RecordTransport, hot_window
from meshcore_transport_quic.session import PROBE, RecordSession
from meshcore_transport_quic.splice import SpliceEnd, join, new_end

log = logging.getLogger("meshcore.transport.fast")

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


async def close_server(server: asyncio.Server) -> None:
    """Stop listening without losing a connection accepted a moment before.

    asyncio's selector loop accepts in the listening socket's callback but sets the connection
    up in a task one loop pass later; a ``Server.close()`` in between makes that setup fail
    (CPython gh-109564: an AssertionError in ``Server._attach``, swallowed) and leaves the
    accepted socket to the garbage collector: the peer hangs until then, and a test's teardown
    sees an "unclosed transport" ResourceWarning. So accepting stops first, the setups already
    queued run (their connections go through ``_admit``, which drops them), then the server
    closes. uvloop sets a connection up in its accept callback: nothing is queued there."""
    loop = asyncio.get_running_loop()
    try:
        if isinstance(loop, asyncio.SelectorEventLoop):
            for sock in server.sockets:
                loop.remove_reader(sock.fileno())  # no accept from now on
            with anyio.CancelScope(shield=True):  # the serve task is being cancelled
                await asyncio.sleep(0)  # one pass: the queued setups run before it ends
    finally:
        server.close()


class FastPathServer:
    """Accepts fast-path connections; ``keys`` maps a key we issued to the peer holding it,
    ``lookup(peer, service)`` gives the local endpoint (or None to refuse)."""

    def __init__(self, keys: dict[bytes, str], lookup: Lookup,
                 on_cut: Callable[[str], None] | None = None) -> None:
        self.keys = keys
        self.lookup = lookup
        self.on_cut = on_cut  # called with the peer's id when an open tunnel of it is cut
        self.live: set[RecordTransport] = set()  # open connections (tests check for leaks)
        self._connecting: set[asyncio.Task[None]] = set()
        self.stopping = False  # connections accepted from now on are dropped at once

    async def serve(self, port: int, *, task_status: TaskStatus[int]) -> None:
        """Listen (``port``, or any port when it is taken) and serve until cancelled."""
        try:
            sock = listen_socket(port)
        except OSError:
            sock = listen_socket(0)
        server = await asyncio.get_running_loop().create_server(self._accept, sock=sock)
        try:
            task_status.started(sock.getsockname()[1])
            await anyio.sleep_forever()  # not serve_forever(): it closes at once (close_server)
        finally:
            self.stopping = True  # an accept already queued still makes a connection
            for task in list(self._connecting):
                task.cancel()
            for conn in list(self.live):
                conn.fail(ConnectionAbortedError("the node is stopping"))
            self.live.clear()
            await close_server(server)

    def _accept(self) -> RecordTransport:
        return RecordTransport(RecordSession.accepting(self.keys), admit=self._admit,
                               timeout=HEADER_TIMEOUT)

    def _admit(self, conn: RecordTransport) -> bool:
        if self.stopping:  # nobody would close it: the cleanup in serve() has run
            return False
        pending = sum(1 for c in self.live if not c.opened.done())
        if pending >= MAX_PENDING:  # a flood of idle connections must not cost memory
            log.warning("fast path: %d connections have not authenticated yet; dropping "
                        "a new one", pending)
            return False
        self.live.add(conn)
        conn.opened.add_done_callback(lambda _: self._opened(conn))
        conn.closed.add_done_callback(lambda _: self.live.discard(conn))
        return True

    def _opened(self, conn: RecordTransport) -> None:
        """The OPEN record came (or the connection failed first): answer or relay it."""
        if conn.opened.cancelled() or not conn.opened.result() or conn.is_closing():
            return
        peer_id, service = conn.session.peer_id, conn.session.service
        if service == PROBE:
            conn.write(b"\x00")
            conn.write_eof()
            conn.close()
            return
        target = self.lookup(peer_id, service or "")
        if target is None:
            log.warning("fast path: %s asked for unknown service %r", peer_id, service)
            conn.close()
            return
        far = new_end(None, "accept")
        conn.keep_hot(hot_window(service or ""))
        conn.attach(far)
        if self.on_cut is not None:
            conn.closed.add_done_callback(lambda _: self._closed(conn, peer_id))
        task = asyncio.get_running_loop().create_task(self._connect(far, target))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    def _closed(self, conn: RecordTransport, peer_id: str) -> None:
        """An open tunnel ended: cut by the peer's side (reset, or no sealed EOF: its
        process may be gone), not by this node stopping or the local service's end."""
        if isinstance(conn.error, ConnectionError) and not self.stopping and self.on_cut:
            self.on_cut(peer_id)

    async def _connect(self, far: SpliceEnd, target: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()

        async def connect(factory: Callable[[], SpliceEnd]) -> object:
            return await loop.create_connection(factory, *target)

        try:
            await join(far, connect)
        except OSError as exc:
            log.warning("fast path: local service at %s:%s failed: %s", *target, exc)
            far.close()
