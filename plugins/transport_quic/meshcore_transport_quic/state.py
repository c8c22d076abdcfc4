"""The state the QUIC transport's parts share: one Mesh object, the close codes and the errors.

:class:`Mesh` is plain data (the options' timers, this node's identity and ports, the live
links and what is being dialed) plus the few helpers every part needs (``spawn``, this node's
addresses). The parts (:mod:`.handshake`, :mod:`.gossip`, :mod:`.membership`, :mod:`.join`)
each get the one Mesh of their transport and keep their own private state themselves.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVarTuple, Unpack

import anyio
from anyio.abc import TaskGroup

from meshcore.components import NodeHandle
from meshcore_transport_quic.fastlinks import FastLinks
from meshcore_transport_quic.frames import FrameError, Kind
from meshcore_transport_quic.identity import Identity
from meshcore_transport_quic.links import PeerLink, local_addresses
from meshcore_transport_quic.quicstream import MeshProtocol, Traffic
from meshcore_transport_quic.wire import DEFAULT_DATAGRAM, send_gossip

log = logging.getLogger("meshcore.transport.quic")
Ts = TypeVarTuple("Ts")

ERR_AUTH, ERR_DUPLICATE, ERR_TIMEOUT, ERR_LEAVING = 0x101, 0x102, 0x103, 0x104
ERR_PROTOCOL = 0x105
LEAVING = "node leaving the mesh"
AUTH_TIMEOUT = 5.0
HANDSHAKE_TIMEOUT = 3.0
ADDRESS_TTL_S = 30.0


class DialError(ConnectionError):
    """Nobody answered (or the handshake timed out): worth retrying."""


class JoinRefused(ConnectionError):
    """The node answered and refused us (or is not the pinned node): retrying will not help."""


Dial = Callable[[str, int, bytes], Awaitable[PeerLink]]  # (host, port, pinned fp) -> new link


@dataclass(eq=False)
class Mesh:
    """What the parts of one transport share. ``run`` fills in the identity, secret and ports;
    the parts add and remove links, bindings and dials."""

    node: NodeHandle
    fast: FastLinks  # the TCP fast path (keys, server, which links use it)
    heartbeat_s: float = 2.0  # a PING (and an RTT sample) per peer this often
    dead_after_s: float = 60.0  # a silent peer is dropped after this long (busy is not dead)
    suspect_after_s: float = 1.5  # a PING unanswered this long: is its TCP port refused?
    reconnect_s: float = 10.0
    heal_s: float = 5.0
    datagram: int = DEFAULT_DATAGRAM
    advertise: list[str] | None = None  # quic_addresses: advertised instead of the interfaces
    boot: str = field(default_factory=lambda: secrets.token_hex(8))
    identity: Identity | None = None
    secret: bytes = b""
    port: int | None = None
    v6: bool = True
    links: dict[str, PeerLink] = field(default_factory=dict)
    bindings: dict[str, bytes] = field(default_factory=dict)  # node id -> certificate fp
    lost: dict[str, float] = field(default_factory=dict)  # peer id -> reconnect deadline
    dialing: set[str] = field(default_factory=set)
    # certificates being dialed now: a join dials by fingerprint before it knows the id, and
    # a hint for that node arriving meanwhile (over another link) must not dial it twice
    dialing_fps: Counter[bytes] = field(default_factory=Counter)  # fingerprint -> dials
    client_udp: set[asyncio.BaseTransport] = field(default_factory=set)  # dialed sockets
    task_group: TaskGroup | None = None
    traffic: Traffic = field(default_factory=Traffic)  # every connection's datagrams, frames
    _addresses: tuple[float, list[str]] | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_node(cls, node: NodeHandle) -> Mesh:
        """The state of a new transport, its timers read from ``NodeConfig.options``."""
        opts = node.config.options
        advertised = opts.get("quic_fast_port_advertised")
        return cls(node, FastLinks(bool(opts.get("quic_fast_path", True)),
                                   int(advertised) if advertised else None),
                   heartbeat_s=float(opts.get("quic_heartbeat_s", 2.0)),
                   dead_after_s=float(opts.get("quic_dead_after_s", 60.0)),
                   suspect_after_s=float(opts.get("quic_suspect_after_s", 1.5)),
                   reconnect_s=float(opts.get("quic_reconnect_s", 10.0)),
                   heal_s=float(opts.get("quic_heal_s", 5.0)),
                   datagram=int(opts.get("quic_max_datagram", DEFAULT_DATAGRAM)),
                   advertise=opts.get("quic_addresses"))

    @property
    def ident(self) -> Identity:
        """This node's identity (loaded by ``run`` before any connection is made)."""
        assert self.identity is not None
        return self.identity

    @property
    def tg(self) -> TaskGroup:
        assert self.task_group is not None
        return self.task_group

    def my_addresses(self) -> list[str]:
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

    def spawn(self, proto: MeshProtocol | None, what: str,
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


async def send(link: PeerLink, kind: Kind, body: dict[str, Any]) -> None:
    """One gossip frame to a peer; a connection that is gone is only logged (at debug)."""
    try:
        await send_gossip(link.proto, kind, body)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, FrameError) as exc:
        log.debug("could not send %s to %s: %s", kind.name, link.id, exc)
