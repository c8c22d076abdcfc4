"""Connection limits for the node's uvicorn servers: a cap on open connections, and read
timeouts for a request's head and body (uvicorn has neither out of the box).

Without them ~1,100 half-open requests use up a 1,024 open-files limit and stop the API, the
console and, at the next handshake, the node.
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
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with limits. At most :data:`MAX_CONNECTIONS` are open: beyond
    that the oldest connection still waiting for a request head is closed to make room (so a
    flood of half-open requests cannot lock real clients out), or, when every connection is
    busy with a request, the new one is closed. A head must be complete within
    :data:`HEAD_TIMEOUT_S` of the connection (or of the previous response), and a body may
    pause at most :data:`BODY_IDLE_TIMEOUT_S` unless the app is the one not reading."""

    refused = False
    deadline: asyncio.TimerHandle | None = None
    since = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= MAX_CONNECTIONS and not self.evict_idle():
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
        super().data_received(data)
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            self.arm(BODY_IDLE_TIMEOUT_S)  # restarts with every chunk
        elif state is h11.IDLE:
            if self.deadline is None:  # the first bytes of a keep-alive connection's next head
                self.arm(HEAD_TIMEOUT_S)
        else:
            self.arm(None)

    def on_response_complete(self) -> None:
        self.since = time.monotonic()
        super().on_response_complete()

    def waiting_for_head(self) -> bool:
        return self.conn.their_state is h11.IDLE and (
            self.cycle is None or self.cycle.response_complete)

    def evict_idle(self) -> bool:
        """Close the oldest connection that waits for a request head; False if none does."""
        idle = [c for c in self.connections
                if isinstance(c, LimitedH11Protocol) and c.waiting_for_head()]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.since)
        self.connections.discard(oldest)  # now: several may arrive before it is lost
        oldest.transport.close()
        return True

    def arm(self, seconds: float | None) -> None:
        """(Re)start the read deadline; ``None`` stops it."""
        if self.deadline is not None:
            self.deadline.cancel()
        self.deadline = None if seconds is None else self.loop.call_later(seconds, self.expire)

    def expire(self) -> None:
        self.deadline = None
        if self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is h11.SEND_BODY and self.flow.read_paused:  # the app is slow, not the client
            self.arm(BODY_IDLE_TIMEOUT_S)
        elif state in (h11.IDLE, h11.SEND_BODY):
            log.debug("HTTP: closing %s, its request did not arrive in time", self.client)
            self.transport.close()
