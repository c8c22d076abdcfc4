"""The stream part of the QUIC transport: inbound streams, gossip frames, hints and tunnels.

:class:`Gossip` gets every stream a peer opens. An AUTH stream goes to ``accept`` (the
handshake, then membership); other streams wait for the connection to be a link. Hinted
peers are dialed through ``dial``.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
from anyio.streams.buffered import BufferedByteReceiveStream

from meshcore.state import MeshState, Peer
from meshcore_transport_quic.frames import Frame, FrameError, Kind, StreamType
from meshcore_transport_quic.links import PeerLink, host_port, parse_hint
from meshcore_transport_quic.quicstream import MeshProtocol, QuicByteStream
from meshcore_transport_quic.state import (
    AUTH_TIMEOUT,
    Dial,
    DialError,
    JoinRefused,
    Mesh,
    log,
    send,
)
from meshcore_transport_quic.wire import read_frame, staple

if TYPE_CHECKING:
    from meshcore_transport_quic.overlay import Overlay

HINT_DELAY = 1.5  # the larger id waits this long for the smaller one to dial
MAX_HINTED = 256  # hinted peers waiting to be dialed; more hints are dropped
HINT_DIALS = 8  # hinted peers dialed at once
ANNOUNCE_EVERY_S = 0.5  # a peer's announcements are applied at most this often (the latest)

Accept = Callable[[MeshProtocol, QuicByteStream, BufferedByteReceiveStream], Awaitable[None]]
Suspect = Callable[[str, str], None]  # (peer id, reported by): check whether it is gone


def checked_record(link: PeerLink, data: Any) -> Peer | None:
    """A peer's announcement of itself, checked; None (logged) for a bad one or any other's."""
    try:
        peer = Peer.from_dict(data)
    except (ValueError, TypeError) as exc:
        log.warning("rejected an announcement from %s: %s", link.id, exc)
        return None
    if peer.id != link.id:
        log.warning("rejected an announcement for %s sent by %s: a node may only announce "
                    "itself", peer.id, link.id)
        return None
    return dataclasses.replace(peer, rtt_ms=None)


def accept_record(state: MeshState, link: PeerLink, data: Any) -> None:
    """Take a peer's announcement of itself into the mesh state (any other is refused)."""
    if (peer := checked_record(link, data)) is not None:
        state.upsert(peer)


class Gossip:
    """Handles every stream a peer opens: gossip frames, hints and inbound tunnels."""

    def __init__(self, mesh: Mesh, *, accept: Accept, dial: Dial,
                 suspect: Suspect | None = None) -> None:
        self.mesh = mesh
        self.accept = accept  # authenticates an AUTH stream and adopts its peer
        self.dial = dial
        self.suspect = suspect  # a GONE frame: membership checks the named peer itself
        self.hinted: set[str] = set()  # hinted peers waiting for (or in) a dial
        self.hint_slots = anyio.Semaphore(HINT_DIALS)
        self.announced_at: dict[str, float] = {}  # peer id -> when its record was applied
        self.held: dict[str, tuple[Callable[[], bool], Peer]] = {}  # latest, held back
        self.overlay: Overlay | None = None  # set by the transport (records, departures)

    def on_stream(self, proto: MeshProtocol, stream: QuicByteStream) -> None:
        self.mesh.spawn(proto, "a stream", self._handle_stream, proto, stream)

    def fast_lookup(self, peer_id: str, service: str) -> tuple[str, int] | None:
        """Where a fast-path tunnel from ``peer_id`` goes (the worker end of rpc tunnels)."""
        if peer_id not in self.mesh.links:
            return None
        return self.mesh.node.service_address(service, peer_id)

    async def _handle_stream(self, proto: MeshProtocol, stream: QuicByteStream) -> None:
        reader = BufferedByteReceiveStream(stream)
        try:
            kind = (await reader.receive_exactly(1))[0]
        except (anyio.IncompleteRead, anyio.BrokenResourceError):
            await stream.aclose()
            return
        if kind == StreamType.AUTH and not proto.ready.is_set():
            await self.accept(proto, stream, reader)
            return
        if proto.guard is not None:  # an inbound connection not yet authenticated
            proto.guard(proto, f"opened a stream of type {kind} before the handshake")
            await stream.aclose()
            return
        with anyio.move_on_after(AUTH_TIMEOUT):
            await proto.ready.wait()
        link = self.mesh.links.get(proto.peer_id or "")
        if link is None or link.proto is not proto:
            await stream.aclose()
            return
        if kind == StreamType.TUNNEL:
            await self._tunnel_inbound(link, stream, reader)
        elif kind == StreamType.GOSSIP:
            try:
                with anyio.fail_after(10):
                    frame = await read_frame(reader)
            except (FrameError, TimeoutError, anyio.BrokenResourceError) as exc:
                log.warning("rejected a frame from %s: %s", link.id, exc)
                return
            finally:
                await stream.aclose()
            await self._handle_frame(link, frame)
        else:
            log.warning("peer %s opened a stream of unknown type %d; ignored", link.id, kind)
            await stream.aclose()

    async def _tunnel_inbound(self, link: PeerLink, stream: QuicByteStream,
                              reader: BufferedByteReceiveStream) -> None:
        try:
            size = (await reader.receive_exactly(1))[0]
            service = (await reader.receive_exactly(size)).decode("ascii", "replace")
        except (anyio.IncompleteRead, anyio.BrokenResourceError):
            await stream.aclose()
            return
        await self.mesh.node.serve_inbound(service, staple(reader, stream), peer_id=link.id)

    async def _handle_frame(self, link: PeerLink, frame: Frame) -> None:
        body, state = frame.body, self.mesh.node.state
        if frame.kind is Kind.ANNOUNCE:
            self._on_announce(link, body)
        elif frame.kind is Kind.PING:
            await send(link, Kind.PONG, {"t": body.get("t")})
        elif frame.kind is Kind.PONG:
            sent = body.get("t")
            # only the echo of a PING this node sent counts: a made-up time would set the
            # RTT at once (a lower sample is taken as is) and make a peer look near
            if isinstance(sent, float) and sent in link.pings:
                link.pings.remove(sent)
                ms = (time.monotonic() - sent) * 1000
                if 0 <= ms < 60_000:
                    state.set_rtt(link.id, link.sample_rtt(ms))
        elif frame.kind is Kind.PEERS:
            hints = body.get("peers")
            if not isinstance(hints, list):
                log.warning("rejected a PEERS frame from %s: 'peers' is not a list", link.id)
                return
            hints = hints[:256]
            random.shuffle(hints)  # a joiner dials a few: not always the oldest members
            for hint in hints:
                self._on_hint(link, hint)
        elif frame.kind is Kind.LEAVE:
            link.left = True
            state.remove(link.id)
            if self.overlay is not None:
                self.overlay.left(link.id)
        elif frame.kind is Kind.GONE:
            if self.overlay is not None:
                self.overlay.on_gone(link, body)
            elif isinstance(gone := body.get("id"), str) and gone != link.id and self.suspect:
                self.suspect(gone, link.id)
        elif frame.kind is Kind.RECORD and self.overlay is not None:
            self.overlay.on_record(link, body.get("env"))
        elif frame.kind is Kind.RECORDS and self.overlay is not None:
            self.overlay.on_records(link, body.get("envs"))
        elif frame.kind is Kind.SUMMARY and self.overlay is not None:
            self.overlay.on_summary(link, body)
        elif frame.kind is Kind.DIGEST and self.overlay is not None:
            self.overlay.on_digest(link, body)
        elif frame.kind is Kind.PROBE and self.overlay is not None:
            self.overlay.on_probe(link, body)
        elif frame.kind is Kind.PROBED and self.overlay is not None:
            self.overlay.on_probed(link, body)
        else:
            log.warning("peer %s sent an unexpected %s frame; ignored", link.id, frame.kind.name)

    def _on_announce(self, link: PeerLink, body: dict[str, Any]) -> None:
        if (peer := checked_record(link, body.get("peer"))) is None:
            return
        self.apply(peer, lambda: self.mesh.links.get(peer.id) is link)
        if "env" in body and self.overlay is not None:
            self.overlay.on_record(link, body["env"], direct=True)

    def apply(self, peer: Peer, current: Callable[[], bool]) -> None:
        """Apply a peer's announcement, at most one per ANNOUNCE_EVERY_S per peer: a faster
        one is held back and replaced by any later one, so a chatty peer costs a bounded rate
        of state changes (each may re-plan) and its latest record still arrives (if it is
        still ``current`` then: not from a link that is gone or a record since replaced)."""
        peer_id = peer.id
        if peer_id in self.held:
            self.held[peer_id] = (current, peer)
            return
        wait = self.announced_at.get(peer_id, -ANNOUNCE_EVERY_S) + ANNOUNCE_EVERY_S
        wait -= time.monotonic()
        if wait <= 0:
            self.announced_at[peer_id] = time.monotonic()
            self.mesh.node.state.upsert(peer)
            return
        self.held[peer_id] = (current, peer)
        self.mesh.spawn(None, "applying an announcement", self._apply_held, peer_id, wait)

    async def _apply_held(self, peer_id: str, wait: float) -> None:
        try:
            await anyio.sleep(wait)
        finally:
            current, peer = self.held.pop(peer_id)
        self.announced_at[peer_id] = time.monotonic()
        if current():
            self.mesh.node.state.upsert(peer)

    def _on_hint(self, via: PeerLink, data: Any) -> None:
        parsed = parse_hint(data)
        if parsed is None:
            log.warning("ignored a malformed peer hint from %s", via.id)
            return
        peer_id, fp, addrs = parsed
        mesh = self.mesh
        if (peer_id == mesh.node.id or peer_id in mesh.links or peer_id in mesh.dialing
                or peer_id in self.hinted or fp in mesh.dialing_fps):
            return
        if mesh.bindings.get(peer_id, fp) != fp:
            log.warning("ignored a hint from %s: %s has another certificate", via.id, peer_id)
            return
        if self.overlay is not None and not self.overlay.wants(
                peer_id, len(self.hinted) + len(mesh.dialing)):
            return  # enough links: the peer's record comes by gossip (overlay.py)
        if len(self.hinted) >= MAX_HINTED:
            log.warning("ignored a hint from %s: %d hinted peers are waiting to be dialed "
                        "already", via.id, len(self.hinted))
            return
        self.hinted.add(peer_id)
        mesh.spawn(None, f"dialing hinted peer {peer_id}", self._dial_hint, peer_id, fp,
                   addrs[:4])

    async def _dial_hint(self, peer_id: str, fp: bytes, addrs: list[tuple[str, int]]) -> None:
        """Dial a hinted peer; at most HINT_DIALS at once, so a member flooding hints costs
        a bounded number of sockets (each dial holds one UDP socket)."""
        try:
            if self.mesh.node.id > peer_id:
                await anyio.sleep(HINT_DELAY)  # the smaller id dials first; avoid duplicates
            async with self.hint_slots:
                await self.dial_addrs(peer_id, fp, addrs)
        finally:
            self.hinted.discard(peer_id)

    async def dial_addrs(self, peer_id: str, fp: bytes, addrs: list[tuple[str, int]]) -> None:
        """Dial ``peer_id`` at the first of ``addrs`` that answers (none if it is linked or
        being dialed already); logged, not raised, when none does."""
        mesh = self.mesh
        for host, port in addrs:
            if peer_id in mesh.links or peer_id in mesh.dialing or fp in mesh.dialing_fps:
                return
            mesh.dialing.add(peer_id)
            try:
                await self.dial(host, port, fp)
                return
            except (DialError, JoinRefused, OSError) as exc:
                log.debug("dialing %s at %s failed: %s", peer_id, host, exc)
            finally:
                mesh.dialing.discard(peer_id)
        log.warning("could not reach peer %s at %s", peer_id,
                    ", ".join(host_port(*a) for a in addrs))
