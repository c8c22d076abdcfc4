"""Connection limits for the node's uvicorn servers: a cap on open connections, and read
timeouts for a request's head and body (uvicorn has neither out of the box).

Without them ~1,100 half-open requests use up a 1,024 open-files limit and stop the API, the
console and, at the next handshake, the node; and a body trickled a byte at a time holds its
connection for as long as its sender likes.

A body must come within ``BODY_GRACE_S + received / MIN_BODY_RATE`` seconds of its head (the
bytes counted from the packet that ends the head), the time the app leaves it unread not
counted: a steady sender at :data:`MIN_BODY_RATE` or faster never falls behind, a slower one
has the grace period as slack, and a trickle is answered 408 after about
:data:`BODY_GRACE_S`. The limits are module attributes read at each use (tests shorten them).
"""

from __future__ import annotations

import asyncio
import logging
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("meshcore.http")

MAX_CONNECTIONS = 256  # per server; far below a 1,024 open-files limit
HEAD_TIMEOUT_S = 10.0  # a request head must arrive whole within this
BODY_IDLE_TIMEOUT_S = 15.0  # a request body may pause this long between chunks
BODY_GRACE_S = 30.0  # ... and take this long from its head, plus 1 s per MIN_BODY_RATE bytes:
MIN_BODY_RATE = 8192  # a 64 kbit/s link; to hold 256 connections a sender needs 2 MiB/s
PAUSED_POLL_S = 1.0  # how often a body that the app leaves unread is looked at
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with limits. At most :data:`MAX_CONNECTIONS` are open: beyond
    that the connection furthest behind is closed to make room (the longest waiting for a
    request head, or a request body behind :data:`MIN_BODY_RATE`, answered 408), so neither a
    flood of half-open requests nor trickled bodies lock real clients out; when none is behind
    (each waits for the app, or keeps pace) the new connection is closed.

    Why evict a slow sender rather than refuse the newcomer: the body deadline alone frees a
    trickled connection after :data:`BODY_GRACE_S`, but its sender reconnects at once, wins
    the race for the freed slots and so keeps them all for one request head per slot every
    30 s. A body behind the minimum rate lives on its grace period: closing it costs an
    honest client a retry at most, and a connection that keeps pace, or waits for the app, is
    never the victim.

    A head must be complete within :data:`HEAD_TIMEOUT_S` of the connection (or of the
    previous response); a body may pause at most :data:`BODY_IDLE_TIMEOUT_S` and must keep
    pace (see the module), unless the app is the one not reading (:meth:`app_holds`). That
    starts only in data_received or on_response_complete, both of which re-arm the deadline:
    when it fires while the app holds the body, the app has held it since it was armed, and
    that time is added to the body's deadlines (looked at again every :data:`PAUSED_POLL_S`)."""

    deadline: asyncio.TimerHandle | None = None
    refused, since, due, idle_due = False, 0.0, 0.0, 0.0  # monotonic: since (a head is
    # awaited since then), the body's deadlines (0: none yet)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= MAX_CONNECTIONS and not self.evict():
            self.refused = True
            log.warning("HTTP: %d connections open, refusing another", MAX_CONNECTIONS)
            transport.close()
            return
        super().connection_made(transport)
        self.since = time.monotonic()
        self.arm(HEAD_TIMEOUT_S)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.refused:
            return
        self.arm(None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        super().data_received(data)
        if self.conn.their_state is h11.SEND_BODY:  # a new body starts with BODY_GRACE_S
            self.due = (self.due or now + BODY_GRACE_S) + len(data) / MIN_BODY_RATE
            self.idle_due = now + BODY_IDLE_TIMEOUT_S
            self.arm(min(self.due, self.idle_due) - now)
        elif self.conn.their_state is not h11.IDLE:  # the app has the request
            self.arm(None)

    def on_response_complete(self) -> None:
        self.since, self.due = time.monotonic(), 0.0
        super().on_response_complete()  # may begin a pipelined request
        self.arm(BODY_IDLE_TIMEOUT_S if self.conn.their_state is h11.SEND_BODY else HEAD_TIMEOUT_S)

    def app_holds(self) -> bool:
        """Whether the app leaves the request body unread (uvicorn stops reading while 64 KiB
        of it wait), or has not asked for it yet (``Expect: 100-continue``)."""
        return self.flow.read_paused or self.cycle.waiting_for_100_continue

    def lag(self) -> float:
        """Seconds it is behind: waiting for a request head, or with a body behind
        :data:`MIN_BODY_RATE`; 0 while the app has the request."""
        if self.conn.their_state is h11.SEND_BODY and not self.app_holds():
            return time.monotonic() + BODY_GRACE_S - self.due
        return time.monotonic() - self.since if self.conn.their_state is h11.IDLE else 0.0

    def evict(self) -> bool:
        """Close the connection furthest behind; False if none is."""
        victim = max((c for c in self.connections if isinstance(c, LimitedH11Protocol)),
                     key=lambda c: c.lag())
        if victim.lag() <= 0:
            return False
        self.connections.discard(victim)  # now: several may arrive before it is lost
        victim.give_up(f"evicted for a new connection, {victim.lag():.1f} s behind")
        return True

    def arm(self, seconds: float | None) -> None:
        """(Re)start the read deadline; ``None`` stops it."""
        if self.deadline is not None:
            self.deadline.cancel()
        self.deadline = None if seconds is None else self.loop.call_later(
            seconds, self.expire, time.monotonic())

    def give_up(self, why: str) -> None:
        """Close it; a request body gets a 408 (unless the response has begun) and a warning."""
        if self.conn.their_state is h11.SEND_BODY:
            log.warning("HTTP: closing the request of %s:%s, %s", *(self.client or "??"), why)
            if not self.cycle.response_started:  # the app sees a client gone
                self.cycle.disconnected = True
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
                                     b"Content-Length: %d\r\n\r\n%s" % (len(why), why.encode()))
        self.transport.close()

    def expire(self, armed: float) -> None:
        self.deadline, now, state = None, time.monotonic(), self.conn.their_state
        body = state is h11.SEND_BODY and not self.transport.is_closing()
        if body and self.due and self.app_holds():  # since armed (see above): not counted
            self.due, self.idle_due = self.due + now - armed, self.idle_due + now - armed
            self.arm(PAUSED_POLL_S)
        elif body and min(self.due, self.idle_due) > now:  # the app read again meanwhile
            self.arm(min(self.due, self.idle_due) - now)
        elif state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():  # too slow
            self.give_up(f"its body came too slowly (< {MIN_BODY_RATE} B/s, or a pause)")
