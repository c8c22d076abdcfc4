"""QuicTransport: the mesh over aioquic: join, authenticate, gossip, liveness and tunnels.

One QUIC connection per peer pair carries control frames and, as a fallback, tunnels; tunnels
prefer the direct TCP fast path, AES-GCM records (:mod:`.fastlinks`). Timings can be set in
``NodeConfig.options``: ``quic_heartbeat_s`` (1), ``quic_dead_after_s`` (5),
``quic_reconnect_s`` (10), ``quic_heal_s`` (5, first redial of a removed peer),
``quic_fast_path`` (True), ``quic_addresses`` (advertised IPs),
``quic_max_datagram`` (1350; loopback peers use 16 KiB). The parts: :mod:`.base` (state),
:mod:`.handshake` (dial/accept/authenticate), :mod:`.gossip` (streams, frames, hints), and
the composed :class:`.fastlinks.FastLinks` (``self.fast``: the fast path's keys, server, and
which links use it).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from pathlib import Path

import anyio
from aioquic.asyncio.server import QuicServer
from anyio.abc import ByteStream, TaskStatus

from meshcore.relay import Tally
from meshcore_transport_quic.auth import PeerInfo
from meshcore_transport_quic.base import (
    ERR_DUPLICATE,
    ERR_LEAVING,
    ERR_TIMEOUT,
    HANDSHAKE_TIMEOUT,
    LEAVING,
    Departed,
    DialError,
    JoinRefused,
    log,
)
from meshcore_transport_quic.frames import Kind, StreamType
from meshcore_transport_quic.gossip import Gossip
from meshcore_transport_quic.handshake import Handshakes
from meshcore_transport_quic.identity import load_identity, load_mesh_secret
from meshcore_transport_quic.links import (
    PeerLink,
    host_port,
    merge_addrs,
    rtt_table_changed,
)
from meshcore_transport_quic.quicstream import MeshProtocol
from meshcore_transport_quic.token import JoinToken, decode_token
from meshcore_transport_quic.wire import (
    quic_config,
    udp_socket,
)

HEAL_MAX_S = 60.0  # longest wait between redials of a removed peer
HEAL_FOR_S = 24 * 3600.0  # give a removed peer up after a day


class QuicTransport(Handshakes, Gossip):
    """The default transport (entry point ``quic``)."""

    # ------------------------------------------------------------------ Transport API

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        cfg = self.node.config
        tokens = [decode_token(t) for t in cfg.joins]
        self.identity = load_identity(cfg.state_dir, self.node.id)
        self.secret = tokens[0].secret if tokens else load_mesh_secret(cfg.state_dir)
        if any(t.secret != self.secret for t in tokens):
            log.warning("the --join tokens carry different mesh secrets; using the first one's")
        sock, self.v6 = self._bind(cfg.bind_port, cfg.state_dir / "quic-port")
        self.port = sock.getsockname()[1]
        loop = asyncio.get_running_loop()
        server_cfg = quic_config(self.identity, client=False, datagram=self.datagram)
        udp, _ = await loop.create_datagram_endpoint(
            lambda: QuicServer(configuration=server_cfg, create_protocol=self._server_protocol),
            sock=sock)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await self.fast.start(tg, self.port, self._fast_lookup)
                addrs = self._my_addresses()
                self.node.state.update_me(addresses=tuple(host_port(a, self.port) for a in addrs))
                log.info("QUIC on UDP %s, fast path on TCP %s, addresses %s", self.port,
                         self.fast.port, ", ".join(addrs))
                try:
                    # A refusal ends the node before its banner; an unreachable mesh is
                    # retried in the background while the node runs.
                    joined = not tokens or await self._join_round(tokens)
                    task_status.started()
                    tg.start_soon(self._heartbeat_loop)
                    tg.start_soon(self._heal_loop)
                    if not joined:
                        await self._join(tokens)
                    await self._rejoin_when_alone(tokens)
                finally:
                    with anyio.CancelScope(shield=True):
                        await self._leave()
        finally:
            for transport in [udp, *self._client_udp]:
                transport.close()

    @staticmethod
    def _bind(port: int, saved: Path) -> tuple[socket.socket, bool]:
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

    def invite_token(self) -> str | None:
        if self.identity is None or self.port is None:
            return None
        return JoinToken(self.identity.fingerprint, self.secret, self.port,
                         tuple(self._my_addresses())).encode()

    async def announce(self) -> None:
        body = {"peer": self.node.state.me.to_dict()}
        for link in list(self.links.values()):
            await self._send(link, Kind.ANNOUNCE, body)

    async def connect(self, peer_id: str, service: str) -> ByteStream:
        link = self.links.get(peer_id)
        if link is None:
            raise ConnectionError(f"peer {peer_id} is not connected")
        fast = await self.fast.connect(link, service)
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
        link = self.links.get(peer_id)
        return link is not None and await self.fast.take(link, service, conn, tally)

    def link(self, peer_id: str) -> str:
        link = self.links.get(peer_id)
        if link is None:
            return "QUIC (reconnecting)" if peer_id in self.lost else "none"
        return self.fast.label(link)

    # ------------------------------------------------------------------ membership

    def _adopt(self, proto: MeshProtocol, peer_id: str, fp: bytes, boot: str,
               info: PeerInfo, *, dialed: bool) -> PeerLink:
        old = self.links.get(peer_id)
        if old is not None and old.proto is not proto and old.proto.terminated is None:
            old_dialer = self.node.id if old.dialed else peer_id
            new_dialer = self.node.id if dialed else peer_id
            if old.boot == boot and old_dialer != new_dialer and old_dialer > new_dialer:
                proto.close(ERR_DUPLICATE, "duplicate connection")
                return old
            old.proto.close(ERR_DUPLICATE, "replaced by a newer connection")
        port = info.port
        advertised = [(a, port) for a in info.addrs]
        seen = [(proto.peer_addr[0], port)] if proto.peer_addr and port else []
        if dialed and proto.peer_addr:
            seen.insert(0, proto.peer_addr)
        link = PeerLink(peer_id, fp, boot, proto, dialed, merge_addrs(seen, advertised))
        self.fast.adopt(link, info.fast)
        self.bindings[peer_id] = fp
        if self.boots.get(peer_id, boot) != boot:
            self.node.state.remove(peer_id)  # restarted: its announcement counter restarted too
        self.boots[peer_id] = boot
        self.links[peer_id] = link
        self.lost.pop(peer_id, None)
        self.departed.pop(peer_id, None)
        proto.peer_id = peer_id
        proto.ready.set()
        self._accept_record(link, info.peer)
        log.info("peer %s connected (%s, %s)", peer_id, host_port(*link.addrs[0]),
                 "dialed" if dialed else "accepted")
        self._spawn(proto, "setting up the link", self._after_connect, link)
        return link

    async def _after_connect(self, link: PeerLink) -> None:
        others = [x.hint() for x in self.links.values() if x.id != link.id]
        if others:
            await self._send(link, Kind.PEERS, {"peers": others})
        for other in list(self.links.values()):
            if other.id != link.id:
                await self._send(other, Kind.PEERS, {"peers": [link.hint()]})
        await self.fast.check(link)

    async def _watch(self, link: PeerLink, udp: asyncio.BaseTransport | None = None) -> None:
        await link.proto.wait_closed()
        if udp is not None:
            await anyio.sleep(0.05)  # let the close datagram leave
            link.proto.stop_timer()
            udp.close()
            self._client_udp.discard(udp)
        if self.links.get(link.id) is not link:
            return
        del self.links[link.id]
        self.fast.forget(link.id)
        code, reason = link.proto.terminated or (0, "")
        if link.left or code == ERR_LEAVING:
            log.info("peer %s left the mesh", link.id)
            self.node.state.remove(link.id)
            return
        await self._reconnect(link, reason)

    async def _reconnect(self, link: PeerLink, reason: str) -> None:
        deadline = time.monotonic() + self.reconnect_s
        self.lost[link.id] = deadline
        log.warning("lost the connection to %s (%s); reconnecting for up to %.0f s",
                    link.id, reason or "closed", self.reconnect_s)
        while time.monotonic() < deadline and link.id not in self.links:
            for host, port in link.addrs:
                if link.id in self.links or link.id in self.dialing:
                    break
                self.dialing.add(link.id)
                try:
                    with anyio.move_on_after(max(0.1, deadline - time.monotonic())):
                        await self._dial(host, port, link.fp)
                except (DialError, JoinRefused, OSError) as exc:
                    log.debug("reconnect to %s at %s failed: %s", link.id, host, exc)
                finally:
                    self.dialing.discard(link.id)
            await anyio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        if link.id not in self.links and self.lost.get(link.id) == deadline:
            del self.lost[link.id]
            log.warning("peer %s removed: no connection for %.0f s; redialing it in the "
                        "background", link.id, self.reconnect_s)
            self.node.state.remove(link.id)
            now = time.monotonic()
            self.departed[link.id] = Departed(link.fp, list(link.addrs), now,
                                              now + self.heal_s, self.heal_s)

    async def _heal_loop(self) -> None:
        """Redial removed peers (backoff from ``quic_heal_s`` up to HEAL_MAX_S, for up to
        HEAL_FOR_S): without it a node cut off longer than the reconnect window stays out
        for good unless it is alone and has a token (e.g. the node that started the mesh)."""
        while True:
            await anyio.sleep(min(1.0, self.heal_s))
            now = time.monotonic()
            for peer_id, gone in list(self.departed.items()):
                if peer_id in self.links or now - gone.since > HEAL_FOR_S:
                    self.departed.pop(peer_id, None)
                    continue
                if now < gone.next_try or peer_id in self.dialing or peer_id in self.lost:
                    continue
                gone.backoff = min(HEAL_MAX_S, gone.backoff * 2)
                gone.next_try = now + gone.backoff
                self.dialing.add(peer_id)
                try:
                    for host, port in gone.addrs[:4]:
                        try:
                            with anyio.move_on_after(HANDSHAKE_TIMEOUT + 1):
                                await self._dial(host, port, gone.fp)
                        except (DialError, JoinRefused, OSError) as exc:
                            log.debug("redial of %s at %s failed: %s", peer_id, host, exc)
                        if peer_id in self.links:
                            log.info("peer %s is reachable again", peer_id)
                            self.departed.pop(peer_id, None)
                            break
                finally:
                    self.dialing.discard(peer_id)

    # ------------------------------------------------------------------ join, liveness, leave

    async def _join_round(self, tokens: list[JoinToken]) -> bool:
        """Dial every token address in turn until one node lets us in. True when joined;
        raises JoinRefused when every address answered with a refusal."""
        refused: dict[str, list[str]] = {}
        unreachable: list[str] = []
        for token in tokens:
            for host, port in token.endpoints:
                if self.links:
                    return True
                try:
                    await self._dial(host, port, token.fingerprint)
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

    async def _join(self, tokens: list[JoinToken]) -> None:
        while not await self._join_round(tokens):
            await anyio.sleep(2)

    async def _rejoin_when_alone(self, tokens: list[JoinToken]) -> None:
        """A joiner whose every peer was removed (e.g. a cut link, longer than the reconnect
        window) dials its tokens again every 2 s, so the mesh heals when the path returns."""
        while True:
            await anyio.sleep(2)
            if tokens and not self.links and not self.lost and not self.dialing:
                try:
                    await self._join_round(tokens)
                except JoinRefused as exc:
                    log.warning("rejoining failed: %s", exc)

    async def _heartbeat_loop(self) -> None:
        while True:
            await anyio.sleep(self.heartbeat_s)
            now = time.monotonic()
            for link in list(self.links.values()):
                silent = now - link.proto.last_rx
                if silent > self.dead_after_s:
                    log.warning("peer %s silent for %.1f s: dropping its connection",
                                link.id, silent)
                    link.proto.close(ERR_TIMEOUT, "heartbeat timeout")
                    continue
                await self._send(link, Kind.PING, {"t": now})
            self._publish_rtt()

    def _publish_rtt(self) -> None:
        table = {k: round(v.rtt_ms, 2) for k, v in self.links.items() if v.rtt_ms is not None}
        if rtt_table_changed(self._published_rtt, table):
            self._published_rtt = table
            self.node.announce(rtt_ms=table)

    async def _leave(self) -> None:
        links = list(self.links.values())
        for link in links:
            await self._send(link, Kind.LEAVE, {})
        for link in links:
            with contextlib.suppress(Exception):  # best effort: the socket may be gone
                link.proto.close(ERR_LEAVING, LEAVING)
        if links:
            await anyio.sleep(0.05)  # let the close datagrams leave


__all__ = ["DialError", "JoinRefused", "QuicTransport"]
