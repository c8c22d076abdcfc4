"""QuicTransport: the mesh over aioquic: join, authenticate, gossip, liveness and tunnels.

One QUIC connection per linked peer pair (a few partners and where data flows, not every
member: :mod:`.overlay`) carries control frames and, as a fallback, tunnels; tunnels
prefer the direct TCP fast path, AES-GCM records (:mod:`.fastlinks`). Timings can be set in
``NodeConfig.options``: ``quic_heartbeat_s`` (2), ``quic_dead_after_s`` (60),
``quic_suspect_after_s`` (1.5: a PING unanswered this long, and the peer's TCP port refuses
connections: its process is gone, it goes at once),
``quic_reconnect_s`` (10), ``quic_heal_s`` (5, first redial of a removed peer),
``quic_fast_path`` (True), ``quic_fast_port_advertised`` (the TCP port offered to peers
instead of the listening one: a forwarded port), ``quic_addresses`` (advertised IPs),
``quic_max_datagram`` (1350; loopback peers use 16 KiB), ``quic_partners`` (8: gossip
partners a node links to besides the peers data flows to, :mod:`.overlay`).

The transport composes parts around one shared :class:`.state.Mesh` (options, identity,
links, bindings, dials): :class:`.handshake.Handshake` (dial/accept/authenticate),
:class:`.membership.Membership` (adopt, watch, reconnect, heal, heartbeat, leave),
:class:`.gossip.Gossip` (streams, frames, hints, inbound tunnels), :class:`.join.Join` (the
``--join`` tokens) and :class:`.fastlinks.FastLinks` (``mesh.fast``: the fast path's keys,
server, and which links use it). Each gets what it calls as a constructor argument.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from pathlib import Path
from typing import Any

import anyio
from aioquic.asyncio.server import QuicServer
from anyio.abc import ByteStream, TaskStatus

from meshcore.components import NodeHandle
from meshcore.relay import Tally
from meshcore_transport_quic.fastlinks import FastLinks
from meshcore_transport_quic.frames import Kind, StreamType
from meshcore_transport_quic.gossip import Gossip
from meshcore_transport_quic.handshake import Handshake
from meshcore_transport_quic.identity import Identity, load_identity, load_mesh_secret
from meshcore_transport_quic.join import JOIN_TIMEOUT_S, Join, JoinTimeout
from meshcore_transport_quic.links import PeerLink, host_port
from meshcore_transport_quic.membership import Departed, Membership
from meshcore_transport_quic.overlay import PARTNERS, Overlay
from meshcore_transport_quic.quicstream import MeshProtocol, QuicByteStream
from meshcore_transport_quic.state import DialError, JoinRefused, Mesh, log, send
from meshcore_transport_quic.token import JoinToken, decode_token
from meshcore_transport_quic.wire import quic_config, udp_socket

LINK_TIMEOUT_S = 5.0  # a tunnel to a member this node holds no link to waits this long for one


def bind_udp(port: int, saved: Path) -> tuple[socket.socket, bool]:
    """Bind the UDP port; with ``--bind-port 0`` reuse last run's port when free, so a
    restarted node keeps its token valid and its peers' reconnects find it."""
    if port == 0:
        try:
            return udp_socket(int(saved.read_text()))
        except (OSError, ValueError):
            pass
    try:
        sock, v6 = udp_socket(port)
    except OSError as exc:
        raise OSError(f"--bind-port {port}: cannot bind UDP ({exc.strerror or exc}); "
                      "pick another port, or 0 for any") from exc
    with contextlib.suppress(OSError):
        saved.write_text(f"{sock.getsockname()[1]}\n")
    return sock, v6


class QuicTransport:
    """The default transport (entry point ``quic``)."""

    def __init__(self, node: NodeHandle) -> None:
        self.mesh = Mesh.from_node(node)
        self.handshake = Handshake(self.mesh, on_stream=self._on_stream)
        self.members = Membership(self.mesh, self.handshake)
        self.mesh.fast.on_refused = self.members.refused
        self.mesh.fast.on_cut = self.members.cut
        self.members.was_hinted = lambda peer_id: peer_id in self.gossip.hinted
        self.gossip = Gossip(self.mesh, accept=self.members.accept, dial=self.members.dial,
                             suspect=self.members.suspect)
        self.overlay = Overlay(self.mesh, dial_addrs=self.gossip.dial_addrs,
                               check=self.members.suspect, apply=self.gossip.apply,
                               partners=int(node.config.options.get("quic_partners", PARTNERS)))
        self.gossip.overlay = self.members.overlay = self.overlay
        self.handshake.record = lambda: dict(self.overlay.mine().env)

    def _on_stream(self, proto: MeshProtocol, stream: QuicByteStream) -> None:
        """Where every connection hands the streams its peer opens: to the gossip part. The
        one edge wired late, as the parts form a cycle: gossip dials hinted peers through
        membership, membership authenticates through the handshake, and the handshake's
        connections deliver their streams to gossip."""
        self.gossip.on_stream(proto, stream)

    # ------------------------------------------------------------------ shared state, read-only

    @property
    def node(self) -> NodeHandle:
        return self.mesh.node

    @property
    def links(self) -> dict[str, PeerLink]:
        return self.mesh.links

    @property
    def lost(self) -> dict[str, float]:
        return self.mesh.lost

    @property
    def departed(self) -> dict[str, Departed]:
        return self.members.departed

    @property
    def fast(self) -> FastLinks:
        return self.mesh.fast

    @property
    def port(self) -> int | None:
        return self.mesh.port

    @property
    def identity(self) -> Identity | None:
        return self.mesh.identity

    # ------------------------------------------------------------------ Transport API

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        mesh = self.mesh
        cfg = mesh.node.config
        tokens = [decode_token(t) for t in cfg.joins]
        mesh.identity = load_identity(cfg.state_dir, mesh.node.id)
        mesh.secret = tokens[0].secret if tokens else load_mesh_secret(cfg.state_dir)
        if any(t.secret != mesh.secret for t in tokens):
            log.warning("the --join tokens carry different mesh secrets; using the first one's")
        sock, mesh.v6 = bind_udp(cfg.bind_port, cfg.state_dir / "quic-port")
        mesh.port = port = sock.getsockname()[1]
        server_cfg = quic_config(mesh.identity, client=False, datagram=mesh.datagram)
        udp, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: QuicServer(configuration=server_cfg,
                               create_protocol=self.members.server_protocol),
            sock=sock)
        try:
            async with anyio.create_task_group() as tg:
                mesh.task_group = tg
                await mesh.fast.start(tg, port, self.gossip.fast_lookup)
                addrs = mesh.my_addresses()
                mesh.node.state.update_me(addresses=tuple(host_port(a, port) for a in addrs))
                log.info("QUIC on UDP %s, fast path on TCP %s, addresses %s", port,
                         mesh.fast.port, ", ".join(addrs))
                try:
                    await self._serve(Join(mesh, tokens, self.members.dial), task_status)
                finally:
                    with anyio.CancelScope(shield=True):
                        await self.members.leave()
        finally:
            for transport in [udp, *mesh.client_udp]:
                transport.close()

    async def _serve(self, join: Join, task_status: TaskStatus[None]) -> None:
        # A refusal ends the node before its banner; an unreachable mesh is retried in the
        # background while the node runs.
        started = time.monotonic()
        joined = not join.tokens or await join.round()
        task_status.started()
        self.mesh.tg.start_soon(self.members.heartbeat_loop)
        self.mesh.tg.start_soon(self.members.heal_loop)
        self.mesh.tg.start_soon(self.overlay.maintain_loop)
        self.mesh.tg.start_soon(self.overlay.relay_loop)
        if not joined:
            timeout = float(self.mesh.node.config.options.get("join_timeout_s", JOIN_TIMEOUT_S))
            await join.until_joined(timeout, started)
        await join.rejoin_when_alone()

    def invite_token(self) -> str | None:
        mesh = self.mesh
        if mesh.identity is None or mesh.port is None:
            return None
        return JoinToken(mesh.identity.fingerprint, mesh.secret, mesh.port,
                         tuple(mesh.my_addresses())).encode()

    async def announce(self) -> None:
        """To every link; a hub (more links than the overlay's fan-out, 2K: the host, or the
        seed everyone joined through) sends it to 2K of them at random and the partners pass
        it on (a host that announced each join's RTT to all N - 1 links sent O(N^2) frames
        while a mesh formed)."""
        body = {"peer": self.mesh.node.state.me.to_dict(), "env": dict(self.overlay.mine().env)}
        links = list(self.mesh.links.values())
        if len(links) > self.overlay.fanout:
            links = random.sample(links, self.overlay.fanout)
        for link in links:
            await send(link, Kind.ANNOUNCE, body)

    async def connect(self, peer_id: str, service: str) -> ByteStream:
        link = await self.overlay.link_to(peer_id, LINK_TIMEOUT_S)
        if link is None:
            raise ConnectionError(f"peer {peer_id} is not connected")
        fast = await self.mesh.fast.connect(link, service)
        if fast is not None:
            return fast
        stream = link.proto.open_stream()
        name = service.encode("ascii")
        await stream.send(bytes([StreamType.TUNNEL, len(name)]) + name)
        return stream

    async def take_connection(self, peer_id: str, service: str, conn: socket.socket, *,
                              tally: Tally | None = None) -> bool:
        """Relay a local connection (one of ``node.forward_port``'s) to ``service`` on
        ``peer_id`` by splicing it to a fast-path tunnel in Protocol callbacks (no anyio
        streams, ~2x the bulk speed); False when the peer is reached over QUIC only (the
        core then relays it through ``connect``)."""
        link = await self.overlay.link_to(peer_id, LINK_TIMEOUT_S)
        return link is not None and await self.mesh.fast.take(link, service, conn, tally)

    def status(self) -> dict[str, Any]:
        """Counters for ``/mesh/status`` (``transport``): links, and what every connection
        sent and received since start (datagrams, bytes, gossip frames by kind)."""
        mesh = self.mesh
        return {"timers": {"dead_after_s": mesh.dead_after_s, "reconnect_s": mesh.reconnect_s},
                "links": len(mesh.links), "members": len(mesh.node.state.view().peers) - 1,
                "partners": self.overlay.partners, "reconnecting": len(mesh.lost),
                "departed": len(self.members.departed), "heartbeat_rounds": self.members.rounds,
                **mesh.traffic.to_dict()}

    def link(self, peer_id: str) -> str:
        link = self.mesh.links.get(peer_id)
        if link is None:
            return "QUIC (reconnecting)" if peer_id in self.mesh.lost else "none"
        return self.mesh.fast.label(link)


__all__ = ["DialError", "JoinRefused", "JoinTimeout", "QuicTransport"]
