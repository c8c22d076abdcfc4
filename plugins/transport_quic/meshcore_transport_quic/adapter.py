"""The fast path's one asyncio adapter: a RecordSession on a TCP connection, offered to the
Protocol above it as an asyncio Transport of the plaintext.

:class:`RecordTransport` is the TCP connection's BufferedProtocol (reads land in the session's
record buffer: no copy per read) and, to the Protocol above it (a splice end, or the anyio
wrapper in :mod:`.stream`), an asyncio Transport: ``write`` seals DATA records, ``write_eof``
sends a sealed EOF then FIN (real half-close), reading and writing pause and resume straight
through, ``close`` is asyncio's graceful close (buffered bytes still leave). Every record is
handed on inside the socket callback: no task switch, no anyio stream per chunk. Dialing and
accepting differ only in their session (:mod:`.fastpath`, :mod:`.fastserver`).

A record that does not open, or a TCP end without a sealed EOF (a truncation), is a reset: the
connection is dropped with SO_LINGER 0 and the Protocol above sees ``connection_lost(exc)``,
so that it resets what is behind it too instead of ending it cleanly.

An rpc tunnel keeps its event loop polling for a short window after each record
(:func:`hot_window`, :meth:`RecordTransport.keep_hot`): a split token crosses each relay
after milliseconds of compute, and waking a process that slept that long (a halted vCPU, a
deep C-state) cost more per hop than the relay's own work (docs/benchmarks.md, Issue 13).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, cast

from meshcore.relay import nodelay
from meshcore_transport_quic.seal import DATA, EOF, SealError
from meshcore_transport_quic.session import RecordSession
from meshcore_transport_quic.splice import reset

log = logging.getLogger("meshcore.transport.fast")

HOT_ENV = "MESH_LLM_HOT_US"
HOT_SERVICES = frozenset({"rpc"})  # llama.cpp's rpc: the per-token path of a split
HOT_RPC_S = 0.010  # covers a GPU split's compute between two crossings (2-4 ms for 8B)
HOT_MIN_CPUS = 8  # the poll takes one core while tokens flow: not on small machines


def hot_window(service: str, *, cpus: int | None = None,
               env: Mapping[str, str] | None = None) -> float:
    """Seconds a tunnel to ``service`` keeps its event loop polling after its last record (0:
    it sleeps in epoll like any connection). Only HOT_SERVICES (``rpc``, the per-token
    path): HOT_RPC_S where the node may use at least HOT_MIN_CPUS CPUs, else 0;
    ``MESH_LLM_HOT_US`` overrides it (microseconds; 0 turns it off)."""
    if service not in HOT_SERVICES:
        return 0.0
    value = (os.environ if env is None else env).get(HOT_ENV, "")
    if value.strip():
        return max(0, int(value)) / 1e6
    return HOT_RPC_S if (usable_cpus() if cpus is None else cpus) >= HOT_MIN_CPUS else 0.0


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class RecordTransport(asyncio.BufferedProtocol, asyncio.Transport):
    """Sealed records on one TCP connection, as an asyncio Transport to the layer above.

    ``opened`` resolves True once the tunnel is open (``session.service`` names it) or False
    when it failed first (``error`` says why); ``closed`` once the TCP connection is gone.
    ``admit`` (accepting) may refuse a new connection; ``timeout`` bounds the handshake."""

    def __init__(self, session: RecordSession, *,
                 admit: Callable[[RecordTransport], bool] | None = None,
                 timeout: float | None = None) -> None:
        super().__init__()
        self.session = session
        self._inbox = session.inbox  # reads land in its buffer: no copy, no extra call
        self._open = False
        self.tcp: asyncio.Transport | None = None
        self.upper: asyncio.Protocol | None = None
        self.error: Exception | None = None  # why the connection failed (None: clean)
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[bool] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._admit, self._timeout = admit, timeout
        self._timer: asyncio.TimerHandle | None = None
        self._early: list[bytes] = []  # records that came before the upper Protocol
        self._loop = loop
        self._hot = self._hot_until = 0.0  # keep_hot's window; when the current one ends
        self.polling = False  # the loop is being kept awake for this connection now

    # ---------------------------------------------------------------- TCP side (Protocol)
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp = self.tcp = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if self._admit is not None and not self._admit(self):
            tcp.abort()
            return
        nodelay(tcp.get_extra_info("socket"))
        if self._timeout is not None:
            self._timer = asyncio.get_running_loop().call_later(self._timeout, self._expire)
        if out := self.session.data_to_send():
            tcp.write(out)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._inbox.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self._inbox.buffer_updated(nbytes)
        try:
            events = self.session.receive()
        except SealError as exc:
            log.warning("fast path: dropped a connection: %s", exc)
            self.fail(exc)
            return
        if not self._open and (out := self.session.data_to_send()):
            cast(asyncio.Transport, self.tcp).write(out)  # set in connection_made
        upper = self.upper
        for kind, data in events:
            if kind == DATA:
                if upper is not None:
                    upper.data_received(data)
                else:
                    self._hold(data)
            elif kind == EOF:
                if upper is not None:
                    upper.eof_received()  # we keep our write side open either way
            else:  # OPEN: the tunnel is open
                self._settle(True)
        if self._hot:
            self._touch()

    def _hold(self, data: bytes) -> None:
        """Data before the upper Protocol is attached: keep it, read no more until then."""
        if data:
            self._early.append(data)
            self.pause_reading()

    def eof_received(self) -> bool:
        if not self.session.eof_received:
            why = "closed during the handshake" if self.session.service is None else \
                "the peer closed without a sealed EOF"  # a truncation, not an end
            log.debug("fast path: %s", why)
            self.fail(ConnectionResetError(why))
        return True  # keep our write side open (half-close)

    def pause_writing(self) -> None:
        if self.upper is not None:
            self.upper.pause_writing()

    def resume_writing(self) -> None:
        if self.upper is not None:
            self.upper.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.error is None:
            self.error = exc
        self._settle(False)
        if self.upper is not None:
            self.upper.connection_lost(self.error)
        if not self.closed.done():
            self.closed.set_result(None)

    # ---------------------------------------------------------------- state
    def _settle(self, opened: bool) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._open = self._open or opened
        if not self.opened.done():
            if not opened and self.error is None:
                self.error = ConnectionError("connection lost during the handshake")
            self.opened.set_result(opened)

    def _expire(self) -> None:
        self._timer = None
        if not self.opened.done():
            log.debug("fast path: no OPEN record in time")
            self.fail(TimeoutError("no OPEN record in time"))

    def fail(self, exc: Exception) -> None:
        """Broken: reset the connection; the upper Protocol gets ``exc`` as the reason."""
        if self.error is None:
            self.error = exc
        self._settle(False)
        reset(self.tcp)

    def keep_hot(self, window: float) -> None:
        """After each record in or out, keep the event loop polling (a ready callback, so it
        never sleeps in epoll) for ``window`` seconds; 0 stops it (:func:`hot_window`)."""
        self._hot = window

    def _touch(self) -> None:
        self._hot_until = self._loop.time() + self._hot
        if not self.polling:
            self.polling = True
            self._loop.call_soon(self._tick)

    def _tick(self) -> None:
        tcp = self.tcp
        if self._loop.time() < self._hot_until and tcp is not None and not tcp.is_closing():
            os.sched_yield()  # a runnable thread on this CPU (llama.cpp's) goes first
            self._loop.call_soon(self._tick)
        else:
            self.polling = False

    def attach(self, upper: asyncio.Protocol) -> None:
        """Hand the open tunnel to ``upper``: what arrived meanwhile is passed on now."""
        self.upper = upper
        upper.connection_made(self)
        early, self._early = b"".join(self._early), []
        if early:
            self.resume_reading()
            upper.data_received(early)
        if self.session.eof_received:
            upper.eof_received()
        if self.closed.done():
            upper.connection_lost(self.error)

    # ---------------------------------------------------------------- upper side (Transport)
    def write(self, data: bytes | bytearray | memoryview) -> None:
        tcp = self.tcp
        if not data or tcp is None or tcp.is_closing():
            return
        try:
            records = self.session.send(data)
        except SealError:  # after write_eof (asyncio raises here; a splice may race it)
            return
        for record in records:
            tcp.write(record)
        if self._hot:
            self._touch()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        tcp = self.tcp
        if tcp is None or tcp.is_closing() or self.session.eof_sent:
            return
        tcp.write(self.session.send_eof())
        try:
            tcp.write_eof()  # asyncio sends the FIN after the buffered bytes
        except OSError:  # the peer is gone already (shutdown() raises ENOTCONN)
            tcp.abort()

    def get_write_buffer_size(self) -> int:
        return self.tcp.get_write_buffer_size() if self.tcp is not None else 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self.tcp is not None:
            self.tcp.set_write_buffer_limits(high, low)

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
