"""The join part of the QUIC transport: dial the ``--join`` tokens until the mesh lets us in.

:class:`Join` tries every address of every token through ``dial``; a node whose every peer was
removed dials them again, so a joiner cut off longer than the reconnect window comes back.
"""

from __future__ import annotations

import anyio

from meshcore_transport_quic.state import Dial, DialError, JoinRefused, Mesh, log
from meshcore_transport_quic.token import JoinToken


class Join:
    """Joins one :class:`.state.Mesh` to the mesh its ``tokens`` name (none: a new mesh)."""

    def __init__(self, mesh: Mesh, tokens: list[JoinToken], dial: Dial) -> None:
        self.mesh = mesh
        self.tokens = tokens
        self.dial = dial

    async def round(self) -> bool:
        """Dial every token address in turn until one node lets us in. True when joined;
        raises JoinRefused when every address answered with a refusal."""
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
        log.warning("could not join the mesh yet (%s); retrying every 2 s",
                    "; ".join(reasons + unreachable))
        return False

    async def until_joined(self) -> None:
        while not await self.round():
            await anyio.sleep(2)

    async def rejoin_when_alone(self) -> None:
        """A joiner whose every peer was removed (e.g. a cut link, longer than the reconnect
        window) dials its tokens again every 2 s, so the mesh heals when the path returns."""
        mesh = self.mesh
        while True:
            await anyio.sleep(2)
            if self.tokens and not mesh.links and not mesh.lost and not mesh.dialing:
                try:
                    await self.round()
                except JoinRefused as exc:
                    log.warning("rejoining failed: %s", exc)
