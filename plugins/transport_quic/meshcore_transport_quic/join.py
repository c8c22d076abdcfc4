"""The join part of the QUIC transport: dial the ``--join`` tokens until the mesh lets us in.

:class:`Join` tries every address of every token through ``dial``; a node whose every peer was
removed dials them again, so a joiner cut off longer than the reconnect window comes back.
"""

from __future__ import annotations

import time

import anyio

from meshcore_transport_quic.links import host_port
from meshcore_transport_quic.state import Dial, DialError, JoinRefused, Mesh, log
from meshcore_transport_quic.token import JoinToken

RETRY_S = 2.0  # from the start of one try of every token address to the next
WARN_EVERY_S = 10.0
JOIN_TIMEOUT_S = 60.0  # the default of ``join_timeout_s`` (--join-timeout)


class JoinTimeout(ConnectionError):
    """No node of the ``--join`` tokens answered within ``join_timeout_s``."""


class Join:
    """Joins one :class:`.state.Mesh` to the mesh its ``tokens`` name (none: a new mesh)."""

    def __init__(self, mesh: Mesh, tokens: list[JoinToken], dial: Dial) -> None:
        self.mesh = mesh
        self.tokens = tokens
        self.dial = dial
        self.why = ""  # why the last round did not join
        self.took = 0.0

    async def round(self) -> bool:
        """Dial every token address in turn until one node lets us in. True when joined;
        raises JoinRefused when every address answered with a refusal."""
        began = time.monotonic()
        try:
            return await self._round()
        finally:
            self.took = time.monotonic() - began  # how long the try took: the real period

    async def _round(self) -> bool:
        refused: dict[str, list[str]] = {}
        unreachable: list[str] = []
        for token in self.tokens:
            for host, port in token.endpoints:
                if self.mesh.links:
                    return True
                try:
                    await self.dial(host, port, token.fingerprint)
                    return True
                except JoinRefused as exc:
                    where, _, reason = str(exc).partition(": ")
                    refused.setdefault(reason, []).append(where)
                except (DialError, OSError) as exc:
                    unreachable.append(str(exc))
        reasons = [f"{why} (from {', '.join(where)})" for why, where in refused.items()]
        if refused and not unreachable:
            raise JoinRefused("the mesh refused this node: " + "; ".join(reasons))
        self.why = "; ".join(reasons + unreachable)
        return False

    def addresses(self) -> str:
        return ", ".join(host_port(h, p) for t in self.tokens for h, p in t.endpoints)

    async def until_joined(self, timeout_s: float, started: float) -> None:
        """Try again every RETRY_S (from one try's start to the next) until joined; after
        ``timeout_s`` from ``started`` (0: never) raise :class:`JoinTimeout`. Says so once,
        then every WARN_EVERY_S."""
        warned, period = 0.0, max(RETRY_S, self.took)
        while True:
            now = time.monotonic()
            left = started + timeout_s - now
            if timeout_s and left <= 0:
                raise JoinTimeout(
                    f"could not join the mesh at {self.addresses()} in {timeout_s:.0f} s "
                    f"({self.why}); check that the node that gave the token still runs and "
                    f"that its UDP port is reachable from here, or wait longer with "
                    f"--join-timeout SECONDS (0 = keep trying)")
            if now - warned >= WARN_EVERY_S:
                warned = now
                until = f"giving up in {left:.0f} s" if timeout_s else "until it answers"
                log.warning("could not join the mesh yet (%s); trying again every %.0f s, %s",
                            self.why, period, until)
            await anyio.sleep(max(0.0, now + RETRY_S - time.monotonic()))
            if await self.round():
                log.info("joined the mesh")
                return
            period = max(RETRY_S, self.took)  # a try of an address that never answers is long

    async def rejoin_when_alone(self) -> None:
        """A joiner whose every peer was removed (e.g. a cut link, longer than the reconnect
        window) dials its tokens again every 2 s, so the mesh heals when the path returns."""
        mesh = self.mesh
        while True:
            await anyio.sleep(2)
            if self.tokens and not mesh.links and not mesh.lost and not mesh.dialing:
                try:
                    if not await self.round():
                        log.debug("rejoining: %s", self.why)
                except JoinRefused as exc:
                    log.warning("rejoining failed: %s", exc)
