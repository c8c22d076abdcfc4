"""Members without connections: signed records passed on by gossip, links only where needed.

A node keeps a QUIC connection (a link) to a few peers, not to every member:

- up to ``quic_partners`` (K, default 8) gossip partners, taken at random among the members;
- where data flows: every node to the plan's host (its API and tunnels go there, and every
  node notices a dead host at once), the host to every node with VRAM while its plan needs
  workers (it measures their RTT for the election and tunnels to them), and any peer a tunnel
  is opened to (dialed on demand, :meth:`Overlay.link_to`).

A mesh of K + 1 nodes or fewer is therefore still a full mesh. Beyond that, what a member
knows of the others comes by gossip over the links:

- **Records.** Every node signs its announcement (:mod:`.records`). A record newer than the
  one held (a higher (boot time, ``seq``)) is checked, applied and passed on, in batches every
  0.1 s, to every link but the ones it came from (at most 2K of them): a flood over the
  partner graph, each node sending each change at most once per link. A joiner gets every
  record from the node it enters through (RECORDS), so it learns the whole mesh with one
  connection. A new partner link starts with a SUMMARY exchange and every 10 s a node
  compares a DIGEST with a random link: what the flood missed is repaired.
- **Departures.** A node that finds a member gone (its process is, it left, or its
  connection stayed lost past the reconnect window: then only if none of 3 other links
  heard from it lately, SWIM's indirect probe) tells its links GONE with the member's boot
  and ``seq``; every node passes each report on once. A node linked to that member
  checks it itself (a PING and a connect, as before); one that is not removes it. Every
  removal keeps a tombstone, so an older copy of its record does not bring it back. A
  member that hears it is reported gone while alive refutes: it announces again with a
  higher ``seq``, which brings it back everywhere (SWIM's incarnation).

Why: a full mesh of 50 processes on 2 cores spent its first ~12 s on 1,225 QUIC handshakes
(docs/transport.md, "Scaling past one room"); with K = 8 a node holds ~K to 2K links
(about 400 connections mesh-wide at 50 nodes).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import anyio

from meshcore.plan import PlanState
from meshcore.state import Peer
from meshcore_transport_quic.frames import Kind
from meshcore_transport_quic.links import PeerLink, parse_address
from meshcore_transport_quic.records import Record, RecordError, open_record, peek, seal_record
from meshcore_transport_quic.state import Mesh, log, send

PARTNERS = 8  # gossip partners a node links to (quic_partners)
TOMB_S = 3600.0  # a removed member's record is not taken back from gossip for this long
MAX_TOMBS = 4096  # tombstones kept (the oldest expire first beyond this)
SEEN_S = 120.0  # a GONE report is passed on once within this long
RECORDS_PER_FRAME = 64  # a joiner's RECORDS frames carry at most this many records
DIALS_PER_ROUND = 2  # new partners dialed per maintenance round
REFUTE_EVERY_S = 1.0  # a node refutes reports of its own death at most this often
RELAY_TICK_S = 0.1  # new records are passed on in batches this often
RECORDS_BYTES = 128 * 1024  # ...and RECORDS frames at most about this many bytes of records
SYNC_EVERY_S = 10.0  # a node compares its digest with one random link this often
MAX_MEMBERS = 65536  # a SUMMARY is read up to this many entries
PROBE_ASK = 3  # links asked whether they hear a peer this node lost
PROBE_WAIT_S = 2.0  # ...answers awaited this long
HEARD_S = 15.0  # "heard from lately": anything received from it within this long

DialAddrs = Callable[[str, bytes, list[tuple[str, int]]], Awaitable[None]]
Check = Callable[[str, str], None]  # (peer id, reported by): a linked peer reported gone
Apply = Callable[[Peer, Callable[[], bool]], None]  # a record, and whether it is still current


class Overlay:
    """The records this node holds and passes on, and which links it keeps."""

    def __init__(self, mesh: Mesh, *, dial_addrs: DialAddrs, check: Check, apply: Apply,
                 partners: int = PARTNERS) -> None:
        self.mesh = mesh
        self.dial_addrs = dial_addrs
        self.check = check
        self.apply = apply
        self.partners = max(1, partners)
        self.fanout = 2 * self.partners  # a new record goes to at most this many links
        self.records: dict[str, Record] = {}  # member id -> its newest checked record
        # member id -> (version, boot, until): removed here; that record is not taken back
        self.tombs: dict[str, tuple[tuple[int, int], str, float]] = {}
        self.seen: dict[tuple[str, str, int], float] = {}  # GONE reports passed on
        self.heard: dict[tuple[str, int, int], set[str]] = {}  # record -> links it came from
        self.pending: dict[str, tuple[tuple[str, int, int], dict[str, Any]]] = {}  # to pass on
        self.started = int(time.time() * 1000)  # this boot's time: orders this node's records
        self._mine: Record | None = None
        self._refuted_at = 0.0
        self.probes: dict[str, anyio.Event] = {}  # lost peer -> set when another hears it
        self._needed: tuple[object, int, frozenset[str]] | None = None  # plan, generation

    # ------------------------------------------------------------------ records

    def mine(self) -> Record:
        """This node's current record, signed (once per announcement)."""
        me = self.mesh.node.state.me
        if self._mine is None or self._mine.peer != me:
            self._mine = seal_record(self.mesh.ident, self.mesh.boot, self.started, me)
        return self._mine

    def on_record(self, via: PeerLink | None, env: Any, *, direct: bool = False) -> None:
        """An envelope from ``via``: check, keep and pass on a newer record; ``direct``: its
        author sent it (a HELLO or ANNOUNCE, applied by the caller), else apply it here."""
        mesh = self.mesh
        try:
            peer_id, _, version = peek(env)
            if peer_id == mesh.node.id:
                return
            held = self.records.get(peer_id)
            if held is not None and held.version >= version:
                if via is not None and (senders := self.heard.get((peer_id, *version))):
                    senders.add(via.id)  # it has this one: not sent to it again
                return
            if not direct and self._tombed(peer_id, version):
                return
            record = open_record(env, mesh.bindings)
        except RecordError as exc:
            log.warning("rejected a record from %s: %s", via.id if via else "?", exc)
            return
        if direct and via is not None and record.id != via.id:
            log.warning("rejected an announcement for %s sent by %s: a node may only announce "
                        "itself", record.id, via.id)
            return
        if (held is not None and held.fp != record.fp
                and mesh.bindings.get(peer_id) != record.fp):
            log.warning("rejected a record of %s from %s: signed by another certificate than "
                        "the one held", peer_id, via.id if via else "?")
            return
        self.tombs.pop(peer_id, None)
        self.records[peer_id] = record
        if not direct:
            if held is not None and held.boot != record.boot:
                mesh.node.state.remove(peer_id)  # restarted: its seq counts from 0 again
            self.apply(record.peer, lambda: self.records.get(peer_id) is record)
        key = (peer_id, *record.version)
        self.heard[key] = {peer_id} | ({via.id} if via is not None else set())
        if (older := self.pending.get(peer_id)) is not None:
            self.heard.pop(older[0], None)  # replaced before it was passed on
        self.pending[peer_id] = (key, dict(record.env))

    async def relay_loop(self) -> None:
        """Every RELAY_TICK_S, pass the records that arrived meanwhile on: to every link that
        has not sent them here (at most ``fanout``, 2K, at random), all of a link's in one
        RECORDS frame. A node with more links than 2K is a hub (the host, or the seed every
        node joined through); every node has about K partners that pass a record on to all
        of theirs, so a hub need not send it to everyone. Ticks start at a random phase: of
        two linked nodes that got a record at about the same time, the later one has heard
        it from the earlier one and does not send it back. Batching matters while a mesh
        forms: 50 processes joining at once change ~150 records within seconds, and a frame
        per record and link (each a QUIC stream) saturated 2 cores."""
        await anyio.sleep(random.uniform(0, RELAY_TICK_S))
        while True:
            await anyio.sleep(RELAY_TICK_S)
            if not self.pending:
                continue
            pending, self.pending = self.pending, {}
            links = list(self.mesh.links)
            batches: dict[str, list[dict[str, Any]]] = {}
            for key, env in pending.values():
                heard = self.heard.pop(key, set())
                targets = [k for k in links if k not in heard]
                if len(targets) > self.fanout:
                    targets = random.sample(targets, self.fanout)
                for target in targets:
                    batches.setdefault(target, []).append(env)
            for target, envs in batches.items():
                if (link := self.mesh.links.get(target)) is not None:
                    self.mesh.spawn(None, "passing records on", self._send_records, link, envs)

    def on_records(self, via: PeerLink, envs: Any) -> None:
        """A RECORDS frame (what the node this one joined through knows)."""
        if not isinstance(envs, list):
            log.warning("rejected a RECORDS frame from %s: 'envs' is not a list", via.id)
            return
        for env in envs[:RECORDS_PER_FRAME]:
            self.on_record(via, env)

    async def send_records(self, link: PeerLink) -> None:
        """Every member's record this node holds (its own too) to a peer that just joined
        through it (or came back)."""
        members = {p.id for p in self.mesh.node.state.view().peers}
        await self._send_records(link, [dict(self.mine().env)] + [
            dict(r.env) for k, r in self.records.items() if k != link.id and k in members])

    async def _send_records(self, link: PeerLink, envs: list[dict[str, Any]]) -> None:
        """RECORDS frames of at most RECORDS_PER_FRAME records and about RECORDS_BYTES bytes
        (a frame is capped at 256 KiB)."""
        batch: list[dict[str, Any]] = []
        size = 0
        for env in envs:
            bytes_ = sum(len(str(v)) for v in env.values()) + 24
            if batch and (len(batch) >= RECORDS_PER_FRAME or size + bytes_ > RECORDS_BYTES):
                await send(link, Kind.RECORDS, {"envs": batch})
                batch, size = [], 0
            batch.append(env)
            size += bytes_
        if batch:
            await send(link, Kind.RECORDS, {"envs": batch})

    def summary(self) -> dict[str, list[int]]:
        """Which record of each member in this node's view it holds: id -> (boot time, seq)."""
        me = self.mesh.node.id
        have = {me: [self.started, self.mesh.node.state.me.seq]}
        for peer in self.mesh.node.state.view().peers:
            if peer.id != me and (record := self.records.get(peer.id)) is not None:
                have[peer.id] = list(record.version)
        return have

    def digest(self) -> str:
        text = json.dumps(sorted(self.summary().items()), separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    async def send_summary(self, link: PeerLink, reply: bool) -> None:
        """What this node holds, to ``link``: it answers with the records it holds newer
        (and, if ``reply``, with its own SUMMARY when this node holds some it lacks)."""
        await send(link, Kind.SUMMARY, {"have": self.summary(), "reply": reply})

    def on_summary(self, via: PeerLink, body: dict[str, Any]) -> None:
        """A peer's SUMMARY: send it the records it lacks; ask for the ones this node lacks."""
        have = body.get("have")
        if not isinstance(have, dict):
            log.warning("rejected a SUMMARY frame from %s: 'have' is not an object", via.id)
            return
        theirs: dict[str, tuple[int, int]] = {}
        for key, value in list(have.items())[:MAX_MEMBERS]:
            if (isinstance(value, list) and len(value) == 2
                    and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
                theirs[key] = (value[0], value[1])
        mine = self.summary()
        me = self.mesh.node.id
        newer = [dict(self.mine().env) if k == me else dict(self.records[k].env)
                 for k, v in mine.items() if theirs.get(k, (-1, -1)) < tuple(v)]
        lacking = any(tuple(mine.get(k, (-1, -1))) < v and k != me
                      and not self._tombed(k, v) for k, v in theirs.items())
        if newer:
            self.mesh.spawn(None, "sending records", self._send_records, via, newer)
        for key, version in theirs.items():  # it holds a member removed here: tell it why
            if self._tombed(key, version):
                body = {"id": key, "boot": self.tombs[key][1], "seq": version[1], "left": False}
                self.mesh.spawn(None, "telling a peer a member is gone", send, via, Kind.GONE,
                                body)
        if lacking and body.get("reply") is True:
            self.mesh.spawn(None, "sending a summary", self.send_summary, via, False)

    def _tombed(self, peer_id: str, version: tuple[int, int]) -> bool:
        tomb = self.tombs.get(peer_id)
        return tomb is not None and version <= tomb[0] and tomb[2] > time.monotonic()

    def forget(self, peer_id: str) -> None:
        """``peer_id`` was removed from this node's view (gone, left, or unreachable past the
        reconnect window): drop its record and keep a tombstone, so that neither a copy still
        in flight, nor a record held back by the rate limit, nor a peer's SUMMARY brings that
        record back; a newer one (a refutation, a restart) does."""
        record = self.records.pop(peer_id, None)
        if record is None:
            return
        now = time.monotonic()
        if len(self.tombs) >= MAX_TOMBS:
            self.tombs = {k: t for k, t in self.tombs.items() if t[2] > now}
            while len(self.tombs) >= MAX_TOMBS:
                del self.tombs[min(self.tombs, key=lambda k: self.tombs[k][2])]
        self.tombs[peer_id] = (record.version, record.boot, now + TOMB_S)

    def on_digest(self, via: PeerLink, body: dict[str, Any]) -> None:
        if body.get("d") != self.digest():
            self.mesh.spawn(None, "sending a summary", self.send_summary, via, True)

    async def _send_all(self, kind: Kind, body: dict[str, Any], skip: Iterable[str]) -> None:
        skipped = set(skip)
        for link in list(self.mesh.links.values()):
            if link.id not in skipped:
                await send(link, kind, body)

    # ------------------------------------------------------------------ departures

    def tell_gone(self, peer_id: str, *, left: bool = False) -> None:
        """This node found ``peer_id`` gone (or it left): tell every link, once."""
        self._pass_gone(None, peer_id, *self._version_of(peer_id), left)

    def left(self, peer_id: str) -> None:
        """``peer_id`` left the mesh (its LEAVE frame, or its connection's LEAVING close code
        when the frame was lost): tell every link, then drop its record."""
        self.tell_gone(peer_id, left=True)
        self.forget(peer_id)

    def _version_of(self, peer_id: str) -> tuple[str, int]:
        known = self.records.get(peer_id)
        peer = self.mesh.node.state.view().get(peer_id)
        boot = known.boot if known is not None else ""
        seq = known.seq if known is not None else (peer.seq if peer is not None else 0)
        return boot, seq

    def lost(self, peer_id: str) -> None:
        """``peer_id`` was removed here without direct evidence (its connection stayed lost
        past the reconnect window): tell the mesh only if none of PROBE_ASK other links has
        heard from it lately (SWIM's indirect probe: a path that broke between two nodes is
        not a death). Call before :meth:`forget`."""
        boot, seq = self._version_of(peer_id)
        self.mesh.spawn(None, "asking whether a lost peer is alive", self._report_lost,
                        peer_id, boot, seq)

    async def _report_lost(self, peer_id: str, boot: str, seq: int) -> None:
        if await self.heard_by_others(peer_id):
            log.info("peer %s is unreachable from here but others hear it: not reported "
                     "gone", peer_id)
            return
        self._pass_gone(None, peer_id, boot, seq, False)

    async def heard_by_others(self, peer_id: str) -> bool:
        """Ask up to PROBE_ASK random links whether they heard from ``peer_id`` within
        HEARD_S; True as soon as one says so, False after PROBE_WAIT_S without."""
        asked = [k for k in self.mesh.links if k != peer_id]
        if not asked:
            return False
        event = self.probes.setdefault(peer_id, anyio.Event())
        try:
            for other in random.sample(asked, min(PROBE_ASK, len(asked))):
                if (link := self.mesh.links.get(other)) is not None:
                    await send(link, Kind.PROBE, {"id": peer_id})
            with anyio.move_on_after(PROBE_WAIT_S):
                await event.wait()
            return event.is_set()
        finally:
            if self.probes.get(peer_id) is event:
                del self.probes[peer_id]

    def on_probe(self, via: PeerLink, body: dict[str, Any]) -> None:
        peer_id = body.get("id")
        if not isinstance(peer_id, str):
            return
        link = self.mesh.links.get(peer_id)
        alive = link is not None and time.monotonic() - link.proto.last_rx < HEARD_S
        self.mesh.spawn(None, "answering a probe", send, via, Kind.PROBED,
                        {"id": peer_id, "alive": alive})

    def on_probed(self, via: PeerLink, body: dict[str, Any]) -> None:
        peer_id = body.get("id")
        if isinstance(peer_id, str) and body.get("alive") is True \
                and (event := self.probes.get(peer_id)) is not None:
            event.set()

    def _pass_gone(self, via: PeerLink | None, peer_id: str, boot: str, seq: int,
                   left: bool) -> bool:
        now = time.monotonic()
        key = (peer_id, boot, seq)
        if key in self.seen:
            return False
        if len(self.seen) > 4096:
            self.seen = {k: t for k, t in self.seen.items() if now - t < SEEN_S}
        self.seen[key] = now
        body = {"id": peer_id, "boot": boot, "seq": seq, "left": left}
        skip = {peer_id} | ({via.id} if via is not None else set())
        self.mesh.spawn(None, "telling the mesh a peer is gone", self._send_all, Kind.GONE,
                        body, skip)
        return True

    def on_gone(self, via: PeerLink, body: dict[str, Any]) -> None:
        """A GONE report: refute it if it is about this node, else pass it on once; check a
        linked member, remove one that is not (if the report is about the record held)."""
        mesh, state = self.mesh, self.mesh.node.state
        peer_id, boot, seq = body.get("id"), body.get("boot", ""), body.get("seq", -1)
        if not isinstance(peer_id, str) or peer_id == via.id or not isinstance(boot, str) \
                or isinstance(seq, bool) or not isinstance(seq, int):
            return
        if peer_id == mesh.node.id:
            now = time.monotonic()
            if boot in ("", mesh.boot) and now - self._refuted_at > REFUTE_EVERY_S:
                self._refuted_at = now
                log.info("peer %s reports this node gone; announcing again", via.id)
                state.update_me()  # a higher seq: brought back everywhere
            return
        if not boot:  # an old-style report, not passed on: only a linked peer is checked
            self.check(peer_id, via.id)
            return
        if not self._pass_gone(via, peer_id, boot, seq, bool(body.get("left"))):
            return
        if peer_id in mesh.links or peer_id in mesh.lost:
            self.check(peer_id, via.id)  # linked: judged by this node's own check
            return
        held = self.records.get(peer_id)
        if held is not None and held.boot == boot and held.seq <= seq:
            self.forget(peer_id)
            if state.remove(peer_id):
                log.info("peer %s removed: %s reports it %s", peer_id, via.id,
                         "left" if body.get("left") else "gone")

    # ------------------------------------------------------------------ which links to keep

    def needed(self) -> frozenset[str]:
        """The peers data flows to: the plan's host, and on the host, while its plan needs
        workers, every node with VRAM. Kept until the plan or the view changes: a PEERS
        frame asks once per hint, up to 256 times."""
        node = self.mesh.node
        plan, me, generation = node.plan, node.id, node.state.generation
        cached = self._needed
        if cached is not None and cached[0] is plan and cached[1] == generation:
            return cached[2]
        if plan.host_id is None or (plan.host_id == me and plan.state is PlanState.SOLO):
            found: frozenset[str] = frozenset()
        elif plan.host_id != me:
            found = frozenset({plan.host_id})
        else:
            found = frozenset(p.id for p in node.state.view().peers
                              if p.id != me and not p.is_client and p.vram > 0)
        self._needed = (plan, generation, found)
        return found

    def wants(self, peer_id: str, pending: int = 0) -> bool:
        """Whether to dial ``peer_id`` (hinted): needed, or this node lacks partners."""
        return peer_id in self.needed() or len(self.mesh.links) + pending < self.partners

    def _dialable(self, peer_id: str) -> tuple[bytes, list[tuple[str, int]]] | None:
        record = self.records.get(peer_id)
        peer = self.mesh.node.state.view().get(peer_id)
        if record is None or peer is None:
            return None
        addrs = [a for a in map(parse_address, peer.addresses) if a is not None]
        return (record.fp, addrs[:4]) if addrs else None

    async def maintain_loop(self) -> None:
        """Each round: dial the needed peers that are not linked, and new partners while
        this node has fewer than K links; every SYNC_EVERY_S, compare digests with a random
        link (anti-entropy: repairs a record that missed this node, e.g. one a hub did not
        send to it while it had no partners yet; an agreeing pair costs one ~60-byte
        frame)."""
        mesh = self.mesh
        synced = time.monotonic()
        while True:
            await anyio.sleep(mesh.heartbeat_s / 2)
            if time.monotonic() - synced > SYNC_EVERY_S and mesh.links:
                synced = time.monotonic()
                link = random.choice(list(mesh.links.values()))
                mesh.spawn(None, "comparing digests", send, link, Kind.DIGEST,
                           {"d": self.digest()})
            busy = mesh.dialing | set(mesh.lost)
            for peer_id in sorted(self.needed() - set(mesh.links) - busy):
                self._dial(peer_id)
            short = self.partners - len(mesh.links) - len(mesh.dialing)
            if short > 0:
                ids = [p.id for p in mesh.node.state.view().others
                       if p.id not in mesh.links and p.id not in busy]
                for peer_id in random.sample(ids, min(len(ids), short, DIALS_PER_ROUND)):
                    self._dial(peer_id)

    def _dial(self, peer_id: str) -> None:
        where = self._dialable(peer_id)
        if where is not None:
            self.mesh.spawn(None, f"linking {peer_id}", self.dial_addrs, peer_id, *where)

    async def link_to(self, peer_id: str, timeout: float) -> PeerLink | None:
        """The link to ``peer_id``, dialed now if there is none (a tunnel to a member this
        node holds no connection to); None when it cannot be reached within ``timeout``."""
        mesh = self.mesh
        if (link := mesh.links.get(peer_id)) is not None:
            return link
        if peer_id in mesh.lost:  # its link broke: reconnecting already, or gone (a dead
            return None  # host's refused tunnel must give a 503 now, not after a dial)
        where = self._dialable(peer_id)
        if where is None:
            return None
        with anyio.move_on_after(timeout):
            await self.dial_addrs(peer_id, *where)
            while peer_id not in mesh.links and peer_id in mesh.dialing:
                await anyio.sleep(0.02)
        return mesh.links.get(peer_id)
