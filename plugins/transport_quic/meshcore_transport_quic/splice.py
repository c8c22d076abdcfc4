"""Callback splice relays: two asyncio Transports joined in Protocol callbacks (each received
chunk is written to the other side inside the socket callback: no task switch, no anyio
stream), with pause/resume backpressure, half-close and resets. Both ends of a fast-path
tunnel use it: the host joins an accepted local connection to a dialed
:class:`.adapter.RecordTransport`, the worker joins an accepted one to its local service.

With ``MESH_LLM_SPLICE_TRACE`` set to a directory, every end notes when each chunk reached it
and its size (:class:`TracedEnd`), so that bench/gpu.py can line up a split's crossings on both
nodes (one machine: one monotonic clock) hop by hop; unset, nothing on the per-chunk path
changes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import socket
import struct
import time
from array import array
from collections.abc import Awaitable, Callable
from typing import cast

import anyio
from anyio.abc import TaskStatus

from meshcore.relay import Count, Opener, Tally, nodelay
from meshcore.relay import serve_forward as _serve_forward

# Given a Protocol factory, connect the tunnel to it and return its Transport; None when no
# raw path is available right now (the caller then uses the stream opener).
RawOpener = Callable[[Callable[[], asyncio.Protocol]], Awaitable["asyncio.Transport | None"]]


def reset(transport: asyncio.BaseTransport | None) -> None:
    """Drop a connection with a TCP reset, so the far end sees an error, not a clean end
    (asyncio's ``abort`` alone still sends FIN when nothing is left unread)."""
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()  # type: ignore[attr-defined]


class SpliceEnd(asyncio.Protocol):
    """One end of a callback relay: what it receives goes to the other end's transport; EOF
    is passed on as a half-close (or a graceful close where the other end has none).
    ``count``, if given, is told the size of every chunk this end receives."""

    def __init__(self, count: Count | None = None) -> None:
        self.count = count
        self.transport: asyncio.Transport | None = None
        self.other: SpliceEnd | None = None
        self.pending: list[bytes] = []
        self.eof = False
        # done once the connection is gone; its result is the error (None: a clean end)
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        nodelay(transport.get_extra_info("socket"))

    def _target(self) -> asyncio.Transport | None:
        return self.other.transport if self.other is not None else None

    def data_received(self, data: bytes) -> None:
        if self.count is not None:
            self.count(len(data))
        other = self.other  # inlined _target(): this is the per-chunk path
        target = other.transport if other is not None else None
        if target is None:  # the other end is still connecting
            self.pending.append(data)
            if self.transport is not None:
                self.transport.pause_reading()
        else:
            target.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        target = self._target()
        if target is not None:
            if target.can_write_eof():
                target.write_eof()  # asyncio sends it after what is still buffered
            else:
                target.close()
            if self.other is not None and self.other.eof:
                self.close()
        return True  # keep our own write side open

    def pause_writing(self) -> None:
        if (src := self._target()) is not None:
            src.pause_reading()

    def resume_writing(self) -> None:
        if (src := self._target()) is not None and not src.is_closing():
            src.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)
        if self.other is not None and self.other.transport is not None:
            if exc is None:
                self.other.transport.close()  # graceful: flushes what it still holds
            else:
                reset(self.other.transport)  # broken or cut: do not pass it on as an end

    def close(self) -> None:
        """Close both ends gracefully (asyncio's ``close`` sends buffered bytes first)."""
        for end in (self, self.other):
            if end is not None and end.transport is not None:
                end.transport.close()


TRACE_ENV = "MESH_LLM_SPLICE_TRACE"
_traced = itertools.count()


def new_end(count: Count | None, side: str) -> SpliceEnd:
    """A tunnel's far end (the bytes from the peer); a :class:`TracedEnd` writing under
    ``$MESH_LLM_SPLICE_TRACE`` when it is set. ``side``: ``dial`` (the host's end of a tunnel)
    or ``accept`` (the worker's). :func:`join` gives the near end the same kind."""
    where = os.environ.get(TRACE_ENV)
    if not where:
        return SpliceEnd(count)
    name = f"{side}-{os.getpid()}-{next(_traced)}-tunnel.trace"
    return TracedEnd(count, os.path.join(where, name))


class TracedEnd(SpliceEnd):
    """A splice end that notes (monotonic ns, bytes) for every chunk it receives, appended to
    ``path`` as native int64 pairs once a second while traffic flows and when it ends (a
    write per chunk would cost more than what it measures)."""

    FLUSH_EVERY_S = 1.0

    def __init__(self, count: Count | None, path: str) -> None:
        super().__init__(count)
        self.path = path
        self.notes = array("q")
        self._timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        self.notes.extend((time.perf_counter_ns(), len(data)))
        super().data_received(data)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.FLUSH_EVERY_S, self.flush)

    def flush(self) -> None:
        self._timer = None
        if self.notes:
            with contextlib.suppress(OSError), open(self.path, "ab") as out:
                self.notes.tofile(out)
            self.notes = array("q")

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.flush()
        super().connection_lost(exc)


def splice(a: SpliceEnd, b: SpliceEnd) -> None:
    """Join two connected ends; bytes, EOF or a loss that came meanwhile are passed on now."""
    a.other, b.other = b, a
    for end, other in ((a, b), (b, a)):
        if other.transport is not None:
            for chunk in end.pending:
                other.transport.write(chunk)
        end.pending = []
        if end.transport is not None and not end.transport.is_closing():
            end.transport.resume_reading()
    for end in (a, b):
        if end.eof:
            end.eof_received()
    for end in (a, b):
        if end.lost.done():  # it died while the other end was connecting
            end.connection_lost(end.lost.result())


async def join(far: SpliceEnd, connect: Callable[[Callable[[], SpliceEnd]], Awaitable[object]],
               count: Count | None = None) -> SpliceEnd:
    """Connect a new end with ``connect(protocol_factory)`` and splice it to ``far``, a
    connected end (OSError when the connection fails)."""
    near = (TracedEnd(count, far.path.removesuffix("tunnel.trace") + "local.trace")
            if isinstance(far, TracedEnd) else SpliceEnd(count))
    await connect(lambda: near)
    splice(near, far)
    return near


def was_cut(end: SpliceEnd) -> bool:
    """Whether ``end``'s connection (a fast-path tunnel) was lost to an error: reset, or ended
    without the sealed EOF (:mod:`.adapter`), as a peer whose process died leaves it. A
    tunnel this side closed or reset ends without an error (``connection_lost(None)``)."""
    return end.lost.done() and isinstance(end.lost.result(), ConnectionError)


async def _serve_raw(conn: socket.socket, remote: asyncio.Transport, far: SpliceEnd,
                     tally: Tally | None, on_cut: Callable[[], None] | None) -> None:
    loop = asyncio.get_running_loop()

    async def accept(factory: Callable[[], SpliceEnd]) -> object:
        return await loop.connect_accepted_socket(factory, conn)

    try:
        near = await join(far, accept, tally.add_sent if tally else None)
    except OSError:
        remote.close()
        return
    try:
        await near.lost
        await far.lost
        if on_cut is not None and was_cut(far):
            on_cut()
    finally:
        # Cancelled (the node stops): drop the connection now.
        for transport in (near.transport, remote):
            if transport is not None and not transport.is_closing():
                transport.abort()


async def take_raw(conn: socket.socket, open_raw: RawOpener, tally: Tally | None,
                   on_cut: Callable[[], None] | None = None) -> bool:
    """Splice an accepted local connection to the tunnel ``open_raw`` gives; False (the
    connection untouched) when it gives none right now. ``on_cut`` is called if the tunnel
    ends :func:`was_cut` (the membership then checks at once whether the peer is gone)."""
    far = new_end(tally.add_received if tally else None, "dial")
    remote = await open_raw(lambda: far)
    if remote is None:
        return False
    await _serve_raw(conn, remote, far, tally, on_cut)
    return True


async def serve_forward(open_remote: Opener, *, open_raw: RawOpener | None = None,
                        tally: Tally | None = None,
                        task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
    """The core's ``serve_forward`` with this splice for each connection ``open_raw`` takes
    (tests and bench/tunnel.py use it directly)."""
    take = None if open_raw is None else functools.partial(take_raw, open_raw=open_raw,
                                                          tally=tally)
    await _serve_forward(open_remote, take=take, tally=tally, task_status=task_status)


