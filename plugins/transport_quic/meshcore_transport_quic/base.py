"""Shared state of the QUIC transport and the helpers its parts use (see transport.py)."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVarTuple, Unpack

import anyio
from anyio.abc import TaskGroup

from meshcore.components import NodeHandle
from meshcore_transport_quic.auth import PeerInfo
from meshcore_transport_quic.fastlinks import FastLinks
from meshcore_transport_quic.frames import FrameError, Kind
from meshcore_transport_quic.identity import Identity
from meshcore_transport_quic.links import PeerLink, local_addresses
from meshcore_transport_quic.quicstream import MeshProtocol, QuicByteStream
from meshcore_transport_quic.wire import DEFAULT_DATAGRAM, send_gossip

log = logging.getLogger("meshcore.transport.quic")
Ts = TypeVarTuple("Ts")

ERR_AUTH, ERR_DUPLICATE, ERR_TIMEOUT, ERR_LEAVING = 0x101, 0x102, 0x103, 0x104
ERR_PROTOCOL = 0x105
LEAVING = "node leaving the mesh"
AUTH_TIMEOUT = 5.0
HANDSHAKE_TIMEOUT = 3.0
HINT_DELAY = 1.5  # the larger id waits this long for the smaller one to dial
MAX_HINTED = 256  # hinted peers waiting to be dialed; more hints are dropped
HINT_DIALS = 8  # hinted peers dialed at once
ADDRESS_TTL_S = 30.0


class DialError(ConnectionError):
    """Nobody answered (or the handshake timed out): worth retrying."""


class JoinRefused(ConnectionError):
    """The node answered and refused us (or is not the pinned node): retrying will not help."""


@dataclass
class Departed:
    """A removed peer that is still redialed: where it was, and when to try next."""

    fp: bytes
    addrs: list[tuple[str, int]]  # not the dead link itself: it holds the closed connection
    since: float
    next_try: float
    backoff: float


class TransportBase:
    """Attributes and helpers shared by the handshake, gossip and membership parts."""

    def __init__(self, node: NodeHandle) -> None:
        self.node = node
        opts = node.config.options
        self.heartbeat_s = float(opts.get("quic_heartbeat_s", 1.0))
        self.dead_after_s = float(opts.get("quic_dead_after_s", 5.0))
        self.reconnect_s = float(opts.get("quic_reconnect_s", 10.0))
        self.heal_s = float(opts.get("quic_heal_s", 5.0))
        self.datagram = int(opts.get("quic_max_datagram", DEFAULT_DATAGRAM))
        self.advertise: list[str] | None = opts.get("quic_addresses")
        self.boot = secrets.token_hex(8)
        self.identity: Identity | None = None
        self.secret = b""
        self.port: int | None = None
        self.v6 = True
        self.links: dict[str, PeerLink] = {}
        self.bindings: dict[str, bytes] = {}  # node id -> certificate fingerprint
        self.boots: dict[str, str] = {}
        self.lost: dict[str, float] = {}  # peer id -> reconnect deadline
        self.dialing: set[str] = set()
        self.hinted: set[str] = set()  # hinted peers waiting for (or in) a dial
        self.hint_slots = anyio.Semaphore(HINT_DIALS)
        # Peers removed after a lost connection (not a clean leave): redialed with backoff so
        # the mesh heals when the path returns, whichever side started it.
        self.departed: dict[str, Departed] = {}
        self.fast = FastLinks(bool(opts.get("quic_fast_path", True)))  # the TCP fast path
        self._published_rtt: dict[str, float] = {}
        self._addresses: tuple[float, list[str]] | None = None
        self._tg: TaskGroup | None = None
        self._client_udp: set[asyncio.BaseTransport] = set()

    # ------------------------------------------------------------------ helpers

    def _my_addresses(self) -> list[str]:
        """This node's addresses, read at most every ADDRESS_TTL_S: every handshake sends
        them, and reading interfaces costs file descriptors a flood may have used up."""
        if self.advertise:
            return list(self.advertise)
        now = time.monotonic()
        if self._addresses is None or now - self._addresses[0] > ADDRESS_TTL_S:
            try:
                self._addresses = (now, local_addresses(self.v6))
            except OSError as exc:
                if self._addresses is None:
                    raise
                log.warning("could not read this machine's addresses (%s); using the last", exc)
        return list(self._addresses[1])

    @property
    def tg(self) -> TaskGroup:
        assert self._tg is not None
        return self._tg

    def _spawn(self, proto: MeshProtocol | None, what: str,
               func: Callable[[Unpack[Ts]], Awaitable[object]], *args: *Ts) -> None:
        """Run ``func(*args)`` in the transport's task group, fenced: whatever a peer sent,
        an exception in it is logged once with the peer and costs that peer its connection,
        never the node (the task group would otherwise end the transport and the node)."""

        async def fenced() -> None:
            try:
                await func(*args)
            except Exception as exc:
                who = (proto.peer_id or proto.peer_addr) if proto is not None else "a peer"
                log.warning("%s with %s failed (%s: %.200s); closing that connection", what,
                            who, type(exc).__name__, exc)
                if proto is not None and proto.terminated is None:
                    proto.close(ERR_PROTOCOL, "protocol error")

        self.tg.start_soon(fenced)

    def _info(self, fast_key: bytes) -> dict[str, Any]:
        return {"addrs": self._my_addresses(), "port": self.port,
                "fast": self.fast.offer(fast_key),
                "peer": self.node.state.me.to_dict()}

    async def _send(self, link: PeerLink, kind: Kind, body: dict[str, Any]) -> None:
        try:
            await send_gossip(link.proto, kind, body)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, FrameError) as exc:
            log.debug("could not send %s to %s: %s", kind.name, link.id, exc)

    @property
    def identity_(self) -> Identity:
        assert self.identity is not None
        return self.identity

    # ------------------------------------------------------------------ implemented by parts

    def _adopt(self, proto: MeshProtocol, peer_id: str, fp: bytes, boot: str,
               info: PeerInfo, *, dialed: bool) -> PeerLink:
        raise NotImplementedError

    async def _watch(self, link: PeerLink, udp: asyncio.BaseTransport | None = None) -> None:
        raise NotImplementedError

    async def _dial(self, host: str, port: int, fp: bytes) -> PeerLink:
        raise NotImplementedError

    def _on_stream(self, proto: MeshProtocol, stream: QuicByteStream) -> None:
        raise NotImplementedError

    async def _accept_auth(self, proto: MeshProtocol, stream: QuicByteStream,
                           reader: Any) -> None:
        raise NotImplementedError
