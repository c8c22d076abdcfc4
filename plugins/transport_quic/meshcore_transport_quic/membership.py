"""The membership part of the QUIC transport: adopt peers, watch, reconnect, heal, leave.

:class:`Membership` makes a link of every connection the handshake authenticates (dialed
through ``dial``, accepted through ``accept``), watches it, redials a lost peer, heals the
mesh by redialing removed ones, sends the heartbeat and the leave.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
from aioquic.quic.connection import QuicConnection
from anyio.streams.buffered import BufferedByteReceiveStream

from meshcore_transport_quic.frames import Kind
from meshcore_transport_quic.gossip import accept_record
from meshcore_transport_quic.handshake import Authenticated, Handshake
from meshcore_transport_quic.links import (
    PeerLink,
    host_port,
    merge_addrs,
    rtt_table_changed,
    rtt_update_due,
)
from meshcore_transport_quic.probes import pick_probes, probes_per_round
from meshcore_transport_quic.quicstream import MeshProtocol, QuicByteStream

if TYPE_CHECKING:
    from meshcore_transport_quic.overlay import Overlay
from meshcore_transport_quic.state import (
    AUTH_TIMEOUT,
    ERR_AUTH,
    ERR_DUPLICATE,
    ERR_LEAVING,
    ERR_TIMEOUT,
    HANDSHAKE_TIMEOUT,
    LEAVING,
    DialError,
    JoinRefused,
    Mesh,
    log,
    send,
)

HEAL_MAX_S = 60.0  # longest wait between redials of a removed peer
HEAL_FOR_S = 24 * 3600.0  # give a removed peer up after a day
PROBE_S = 1.0  # how long the liveness check waits for the peer's TCP port
RTT_WARMUP_SAMPLES = 3  # a new link is pinged every round until it has this many RTT samples


async def port_refuses(host: str, port: int) -> bool:
    """Whether a TCP connect to ``host:port`` is refused (nothing listens there any more)."""
    transport: asyncio.BaseTransport | None = None
    try:  # asyncio's: anyio's connect_tcp folds a refusal into a generic OSError
        with anyio.fail_after(PROBE_S):
            transport, _ = await asyncio.get_running_loop().create_connection(
                asyncio.Protocol, host, port)
    except ConnectionRefusedError:
        return True
    except (OSError, TimeoutError):
        return False
    finally:  # also when cancelled (the node stops): no socket left open
        if transport is not None:
            transport.close()
    return False


async def process_gone(link: PeerLink) -> bool:
    """Whether a silent peer's process is gone: its fast-path TCP port refuses a connection.

    A node that is only busy (loading a model, a blocked event loop, a stopped process) still
    has its kernel accept the connection, and one behind a cut link does not answer at all:
    both wait for ``dead_after_s``. A dead process's port is refused at once, so a crashed
    host is dropped (and a new one elected) in seconds. Peers without a fast path (disabled)
    listen on no TCP port, and one whose port refused a connection while it was alive sits
    behind a firewall that rejects TCP: neither is judged this way. A fast path that failed
    otherwise (a probe that timed out while 50 processes started on 2 cores) does not
    exclude the check: a refusal still means nothing listens."""
    if not port_testable(link):
        return False
    assert link.fast_port is not None
    return await port_refuses(link.host, link.fast_port)


def port_testable(link: PeerLink) -> bool:
    """Whether a refused connect to ``link``'s fast-path port means its process is gone."""
    return bool(link.fast_port) and not link.refuses_alive


@dataclass
class Departed:
    """A removed peer that is still redialed: where it was, and when to try next."""

    fp: bytes
    addrs: list[tuple[str, int]]  # not the dead link itself: it holds the closed connection
    since: float
    next_try: float
    backoff: float


class Membership:
    """The peer links of one :class:`.state.Mesh`, from adoption to removal."""

    def __init__(self, mesh: Mesh, handshake: Handshake) -> None:
        self.mesh = mesh
        self.handshake = handshake
        self.boots: dict[str, str] = {}  # peer id -> the boot id it last authenticated with
        # Peers removed after a lost connection (not a clean leave): redialed with backoff so
        # the mesh heals when the path returns, whichever side started it.
        self.departed: dict[str, Departed] = {}
        self._published_rtt: dict[str, float] = {}
        self._rtt_published_at = 0.0
        self._rtt_held = 0  # rounds the table has differed materially from the published one
        self._cursor = 0  # where the next heartbeat round's turn starts (pick_probes)
        self.rounds = 0  # heartbeat rounds done (status, tests)
        # whether a peer id was hinted to this node (set by the transport: gossip's hints)
        self.was_hinted: Callable[[str], bool] = lambda peer_id: False
        self.overlay: Overlay | None = None  # set by the transport (records, departures)

    # ------------------------------------------------------------------ connections

    def server_protocol(self, quic: QuicConnection, stream_handler: Any = None) -> MeshProtocol:
        """The QuicServer's ``create_protocol``: a connection that must authenticate in time."""
        proto = self.handshake.protocol(quic)
        if not proto.refused:  # a refused one is gone with its first datagram
            self.mesh.spawn(proto, "an inbound connection", self._serve_connection, proto)
        return proto

    async def _serve_connection(self, proto: MeshProtocol) -> None:
        """Watch an inbound connection: it must authenticate in time, then it is a link."""
        with anyio.move_on_after(AUTH_TIMEOUT + HANDSHAKE_TIMEOUT):
            await proto.ready.wait()
        if not proto.ready.is_set():
            if proto.terminated is None:
                log.warning("closing a connection from %s: no mesh handshake in time",
                            proto.peer_addr)
                proto.close(ERR_AUTH, "no mesh handshake in time")
            return
        link = self.mesh.links.get(proto.peer_id or "")
        if link is not None and link.proto is proto:
            await self.watch(link)

    async def dial(self, host: str, port: int, fp: bytes) -> PeerLink:
        """Connect to the node pinned by ``fp`` at ``host``; its link, watched."""
        dialing = self.mesh.dialing_fps
        dialing[fp] += 1
        try:
            peer, udp = await self.handshake.dial(host, port, fp)
        finally:
            dialing[fp] -= 1
            if dialing[fp] <= 0:
                del dialing[fp]
        link = self.adopt(peer)
        self.mesh.spawn(peer.proto, "watching the connection", self.watch, link, udp)
        return link

    async def accept(self, proto: MeshProtocol, stream: QuicByteStream,
                     reader: BufferedByteReceiveStream) -> None:
        """Authenticate an inbound AUTH stream; adopt the peer when it passes."""
        peer = await self.handshake.accept(proto, stream, reader)
        if peer is not None:
            self.adopt(peer)

    def adopt(self, peer: Authenticated) -> PeerLink:
        """Make ``peer`` this node's link to it (of two simultaneous connections, the one
        dialed by the larger id survives)."""
        mesh, proto, peer_id = self.mesh, peer.proto, peer.peer_id
        # a member already in the view (a partner dialed from its record) needs no spreading
        known = self.overlay is not None and mesh.node.state.view().get(peer_id) is not None
        old = mesh.links.get(peer_id)
        if old is not None and old.proto is not proto and old.proto.terminated is None:
            old_dialer = mesh.node.id if old.dialed else peer_id
            new_dialer = mesh.node.id if peer.dialed else peer_id
            if old.boot == peer.boot and old_dialer != new_dialer and old_dialer > new_dialer:
                proto.close(ERR_DUPLICATE, "duplicate connection")
                return old
            old.proto.close(ERR_DUPLICATE, "replaced by a newer connection")
        port = peer.info.port
        advertised = [(a, port) for a in peer.info.addrs]
        seen = [(proto.peer_addr[0], port)] if proto.peer_addr and port else []
        if peer.dialed and proto.peer_addr:
            seen.insert(0, proto.peer_addr)
        link = PeerLink(peer_id, peer.fp, peer.boot, proto, peer.dialed,
                        merge_addrs(seen, advertised))
        mesh.fast.adopt(link, peer.info.fast)
        mesh.bindings[peer_id] = peer.fp
        if self.boots.get(peer_id, peer.boot) != peer.boot:
            mesh.node.state.remove(peer_id)  # restarted: its announcement counter restarted too
        self.boots[peer_id] = peer.boot
        mesh.links[peer_id] = link
        mesh.lost.pop(peer_id, None)
        self.departed.pop(peer_id, None)
        proto.peer_id = peer_id
        proto.ready.set()
        accept_record(mesh.node.state, link, peer.info.peer)
        if peer.info.env is not None and self.overlay is not None:
            self.overlay.on_record(link, peer.info.env, direct=True)
        log.info("peer %s connected (%s, %s)", peer_id, host_port(*link.addrs[0]),
                 "dialed" if peer.dialed else "accepted")
        mesh.spawn(proto, "setting up the link", self._after_connect, link,
                   not (known or self.was_hinted(peer_id)))
        return link

    async def _after_connect(self, link: PeerLink, spread: bool) -> None:
        """Probe the new link's fast path; ``spread``: also tell the peer about every other
        link, and every other link about the peer. Only where the peer was not hinted to
        this node: the node a joiner enters through (or a reconnection) tells everyone, and
        the connections the joiner then makes with the others, each already known to both
        ends, tell nobody again. Re-spreading on every connection cost O(N^3) PEERS frames
        to form a mesh: 50 processes on 2 cores took 23 s to see each other. Nor where the
        peer is in the view already (a partner the overlay dialed from its record)."""
        links = self.mesh.links
        if spread:
            others = [x.hint() for x in links.values() if x.id != link.id]
            if others:
                await send(link, Kind.PEERS, {"peers": others})
            # the others dial it only while they lack partners (a mesh of K + 1 or fewer);
            # beyond that its record reaches them by gossip and the hint would cost O(N)
            if self.overlay is None or len(others) < self.overlay.partners:
                for other in list(links.values()):
                    if other.id != link.id:
                        await send(other, Kind.PEERS, {"peers": [link.hint()]})
            if self.overlay is not None:  # the members it holds no link to: by record
                await self.overlay.send_records(link)
        elif self.overlay is not None and link.dialed:  # a partner: repair what either lacks
            await self.overlay.send_summary(link, True)
        await self.mesh.fast.check(link)

    # ------------------------------------------------------------------ losing and healing

    async def watch(self, link: PeerLink, udp: asyncio.BaseTransport | None = None) -> None:
        """Wait for the link's connection to end; then forget it, or reconnect."""
        mesh = self.mesh
        await link.proto.wait_closed()
        if udp is not None:
            await anyio.sleep(0.05)  # let the close datagram leave
            link.proto.stop_timer()
            udp.close()
            mesh.client_udp.discard(udp)
        if mesh.links.get(link.id) is not link:
            return
        del mesh.links[link.id]
        mesh.fast.forget(link.id)
        code, reason = link.proto.terminated or (0, "")
        if link.left or code == ERR_LEAVING:
            log.info("peer %s left the mesh", link.id)
            mesh.node.state.remove(link.id)
            if self.overlay is not None:
                if link.left:
                    self.overlay.forget(link.id)  # its LEAVE frame told the mesh already
                else:
                    self.overlay.left(link.id)  # it was lost: the close code alone says it
            return
        if link.gone:  # nothing to reconnect to: re-elect now; redialed in case it restarts
            log.warning("peer %s removed: its process is gone; redialing it in the background",
                        link.id)
            self._depart(link, proven=True)
            return
        await self._reconnect(link, reason)

    async def _reconnect(self, link: PeerLink, reason: str) -> None:
        mesh = self.mesh
        deadline = time.monotonic() + mesh.reconnect_s
        mesh.lost[link.id] = deadline
        log.warning("lost the connection to %s (%s); reconnecting for up to %.0f s",
                    link.id, reason or "closed", mesh.reconnect_s)
        while time.monotonic() < deadline and link.id not in mesh.links:
            for host, port in link.addrs:
                if link.id in mesh.links or link.id in mesh.dialing:
                    break
                mesh.dialing.add(link.id)
                try:
                    with anyio.move_on_after(max(0.1, deadline - time.monotonic())):
                        await self.dial(host, port, link.fp)
                except (DialError, JoinRefused, OSError) as exc:
                    log.debug("reconnect to %s at %s failed: %s", link.id, host, exc)
                finally:
                    mesh.dialing.discard(link.id)
            await anyio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        if link.id not in mesh.links and mesh.lost.get(link.id) == deadline:
            del mesh.lost[link.id]
            log.warning("peer %s removed: no connection for %.0f s; redialing it in the "
                        "background", link.id, mesh.reconnect_s)
            self._depart(link)

    def _depart(self, link: PeerLink, *, proven: bool = False) -> None:
        """Remove a lost peer from the view and keep redialing it (:meth:`heal_loop`).
        Members not linked to it learn it from this node: at once where its process is
        gone (``proven``: told already by :meth:`_drop_gone`), else only if no other link
        has heard from it lately (:meth:`.overlay.Overlay.lost`)."""
        mesh = self.mesh
        mesh.node.state.remove(link.id)
        if self.overlay is not None:
            if proven:
                self.overlay.tell_gone(link.id)
            else:
                self.overlay.lost(link.id)
            self.overlay.forget(link.id)
        now = time.monotonic()
        self.departed[link.id] = Departed(link.fp, list(link.addrs), now, now + mesh.heal_s,
                                          mesh.heal_s)

    def refused(self, link: PeerLink) -> None:
        """A tunnel to ``link``'s peer was refused although its port was reached before: evidence
        that its process is gone (every node's API goes to the host, so a dead host is felt
        at the first request). Confirmed before the drop (:meth:`_confirm_gone`)."""
        self._confirm(link, "refused a tunnel", tell=True, refusal=True)

    def cut(self, peer_id: str) -> None:
        """An open fast-path tunnel to or from ``peer_id`` was cut (reset, or its TCP end came
        without the sealed EOF), as the tunnels of a peer whose process died are, at that
        moment: check it now rather than when the next tunnel is refused. Confirmed before
        the drop (:meth:`_confirm_gone`: a live peer answers the PING)."""
        link = self.mesh.links.get(peer_id)
        if link is not None:
            self._confirm(link, "cut a tunnel", tell=True)

    def suspect(self, peer_id: str, by: str) -> None:
        """Peer ``by`` found ``peer_id``'s process gone (a GONE frame): check it here too, at
        once, instead of waiting for its turn in the heartbeat (with 50 nodes, every ~20 s).
        Only this node's own check drops it, so a false report costs a PING and a connect
        (where this node cannot test the port, the PING alone: SWIM's suspicion confirmed)."""
        link = self.mesh.links.get(peer_id)
        if link is not None:
            self._confirm(link, f"was reported gone by {by}", tell=False)

    def _confirm(self, link: PeerLink, why: str, tell: bool, refusal: bool = False) -> None:
        if not (link.gone or link.checking):
            link.checking = True
            self.mesh.spawn(link.proto, "checking a peer", self._confirm_gone, link, why, tell,
                            refusal)

    async def _confirm_gone(self, link: PeerLink, why: str, tell: bool,
                            refusal: bool = False) -> None:
        """Drop ``link`` if a PING over QUIC goes unanswered for ``suspect_after_s`` and its
        port refuses connections (a live peer whose TCP port alone broke answers the PING
        and keeps its link, its tunnels on QUIC). A peer reported gone by another node
        (``tell`` False) whose port this node cannot test (no fast path, or one refused
        while the peer was alive) is dropped on the unanswered PING alone: the report is the
        evidence, as it is for the nodes not linked to it. Else only the 60 s silence limit
        would drop it, and a dead host would keep such a node's requests waiting. A peer that
        answers after a ``refusal`` has a port that refuses while it lives (never evidence
        again); one that answers after a cut (its rpc-server died, say) keeps its port."""
        try:
            sent = await self._ping(link)
            await anyio.sleep(self.mesh.suspect_after_s)
            if link.proto.last_rx >= sent:  # alive: a refusal means its port refuses anyway
                link.refuses_alive = link.refuses_alive or refusal
            elif self.mesh.links.get(link.id) is not link or link.gone:
                pass
            elif await process_gone(link):
                self._drop_gone(link, f"{why}, left a PING unanswered and its port refuses "
                                      "connections", tell)
            elif not tell and not port_testable(link):
                self._drop_gone(link, f"{why} and left a PING unanswered for "
                                      f"{self.mesh.suspect_after_s:.1f} s", tell)
        finally:
            link.checking = False

    def _drop_gone(self, link: PeerLink, why: str, tell: bool = True) -> None:
        """Drop a peer whose process is gone; ``tell``: this node found out by itself, so
        the others are told (GONE) and check it at once."""
        log.warning("peer %s %s (the process is gone): dropping its connection", link.id, why)
        link.gone = True
        link.proto.close(ERR_TIMEOUT, "process gone")
        if tell and self.overlay is not None:
            self.overlay.tell_gone(link.id)

    async def heal_loop(self) -> None:
        """Redial removed peers (backoff from ``quic_heal_s`` up to HEAL_MAX_S, for up to
        HEAL_FOR_S): without it a node cut off longer than the reconnect window stays out
        for good unless it is alone and has a token (e.g. the node that started the mesh)."""
        mesh = self.mesh
        while True:
            await anyio.sleep(min(1.0, mesh.heal_s))
            now = time.monotonic()
            for peer_id, gone in list(self.departed.items()):
                if peer_id in mesh.links or now - gone.since > HEAL_FOR_S:
                    self.departed.pop(peer_id, None)
                    continue
                if now < gone.next_try or peer_id in mesh.dialing or peer_id in mesh.lost:
                    continue
                gone.backoff = min(HEAL_MAX_S, gone.backoff * 2)
                gone.next_try = now + gone.backoff
                mesh.dialing.add(peer_id)
                try:
                    await self._redial(peer_id, gone)
                finally:
                    mesh.dialing.discard(peer_id)

    async def _redial(self, peer_id: str, gone: Departed) -> None:
        for host, port in gone.addrs[:4]:
            try:
                with anyio.move_on_after(HANDSHAKE_TIMEOUT + 1):
                    await self.dial(host, port, gone.fp)
            except (DialError, JoinRefused, OSError) as exc:
                log.debug("redial of %s at %s failed: %s", peer_id, host, exc)
            if peer_id in self.mesh.links:
                log.info("peer %s is reachable again", peer_id)
                self.departed.pop(peer_id, None)
                return

    # ------------------------------------------------------------------ liveness and leaving

    async def heartbeat_loop(self) -> None:
        """Each ``heartbeat_s``: judge every link's silence (no I/O unless it is suspected),
        then PING the few peers :func:`.probes.pick_probes` chooses (O(1) per node per round,
        not one per peer), then announce the RTT table if it changed materially."""
        mesh = self.mesh
        while True:
            await anyio.sleep(mesh.heartbeat_s)
            async with anyio.create_task_group() as tg:  # TCP probes run side by side
                for link in list(mesh.links.values()):
                    tg.start_soon(self._judge, link, time.monotonic())
            ids = sorted(mesh.links)
            count = probes_per_round(len(ids), mesh.heartbeat_s, mesh.dead_after_s)
            chosen, self._cursor = pick_probes(ids, self._cursor, count, self._urgent())
            for peer_id in chosen:
                probed = mesh.links.get(peer_id)
                if probed is None or probed.proto.terminated is not None:
                    continue
                await self._ping(probed)
            self.rounds += 1
            self._publish_rtt()

    @staticmethod
    async def _ping(link: PeerLink) -> float:
        """PING ``link``'s peer; returns when it was sent. Each PING carries its own send
        time (a round's start would count the round's earlier sends into a later PING's
        RTT); the oldest unanswered one starts the suspicion (``probe_at``)."""
        sent = time.monotonic()
        if link.probe_at is None:
            link.probe_at = sent  # an unanswered one keeps its first time
        link.pings.append(sent)
        await send(link, Kind.PING, {"t": sent})
        return sent

    async def _judge(self, link: PeerLink, now: float) -> None:
        """Drop ``link`` if its peer counts as gone: silent for ``dead_after_s``, or a PING
        unanswered for ``suspect_after_s`` while its fast-path port refuses connections (the
        process is gone: removed at once, no reconnect window). A busy or frozen peer's
        kernel still accepts the connect, and a quiet peer that was not pinged is never
        TCP-probed."""
        last_rx = link.proto.last_rx
        if link.probe_at is not None and last_rx > link.probe_at:
            link.probe_at = None  # anything received since the PING is an answer
        if link.gone or link.checking:
            return
        silent = now - last_rx
        if silent > self.mesh.dead_after_s:
            log.warning("peer %s silent for %.1f s: dropping its connection", link.id, silent)
            link.proto.close(ERR_TIMEOUT, "heartbeat timeout")
            return
        unanswered = now - link.probe_at if link.probe_at is not None else 0.0
        if unanswered > self.mesh.suspect_after_s and await process_gone(link) \
                and link.proto.terminated is None:
            self._drop_gone(link, f"left a PING unanswered for {unanswered:.1f} s and its port "
                                  f"{link.fast_port} refuses connections")

    def _urgent(self) -> set[str]:
        """Peers pinged every round whatever their turn: suspected (an unanswered PING), not
        yet measured a few times (a new link's first samples are often inflated by a busy
        start; in turn, the next would come only rounds later), and those this node's plan
        depends on: the host (every node's API goes there, so all notice its loss within
        seconds; it answers O(N) PINGs, the others O(1)) and, on the host, its workers."""
        mesh = self.mesh
        urgent = {k for k, v in mesh.links.items()
                  if v.probe_at is not None or v.rtt_samples < RTT_WARMUP_SAMPLES}
        plan = mesh.node.plan
        if plan.host_id == mesh.node.id:
            urgent.update(p.peer_id for p in plan.participants)
        elif plan.host_id is not None:
            urgent.add(plan.host_id)
        return urgent

    def _publish_rtt(self) -> None:
        mesh = self.mesh
        table = {k: round(v.rtt_ms, 2) for k, v in mesh.links.items() if v.rtt_ms is not None}
        held = self._rtt_held + 1 if rtt_table_changed(self._published_rtt, table) else 0
        self._rtt_held = held
        now = time.monotonic()
        if rtt_update_due(self._published_rtt, table, held,
                          mesh.node.plan.host_id == mesh.node.id, now - self._rtt_published_at):
            self._published_rtt, self._rtt_published_at, self._rtt_held = table, now, 0
            mesh.node.announce(rtt_ms=table)

    async def leave(self) -> None:
        """Tell every peer this node leaves, and close the connections with LEAVING."""
        links = list(self.mesh.links.values())
        for link in links:
            await send(link, Kind.LEAVE, {})
        for link in links:
            with contextlib.suppress(Exception):  # best effort: the socket may be gone
                link.proto.close(ERR_LEAVING, LEAVING)
        if links:
            await anyio.sleep(0.05)  # let the close datagrams leave
