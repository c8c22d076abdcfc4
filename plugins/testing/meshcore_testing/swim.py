"""SWIM membership, sans-IO: a failure detector and gossip dissemination for many members.

The protocol (SWIM: Das, Gupta and Motivala, 2002; suspicion scaled with log N and the
"buddy" refutation after Lifeguard). Every ``period_s`` (1 s) a member PINGs one peer, taken
in turn from a shuffled list of the members it knows (shuffled again after each pass, a
newcomer inserted at a random place ahead: SWIM's order, so each member is probed by each
other once per pass). No ACK within ``ping_timeout_s`` (0.3 s): PING-REQ to ``indirect_k``
(3) other alive members, each of which PINGs the target and relays its ACK. Still no ACK at
the end of the period: the target becomes SUSPECT, gossiped. A suspect that does not refute
within ``max(suspicion_min_periods, suspicion_mult x log10(N)) x period_s`` (3 and 2: 3 s up
to 31 members, 4.6 s at 200, 6 s at 1,000) is declared DEAD, gossiped. A member that hears
that it is suspected (or declared dead) refutes by raising its incarnation and gossiping
ALIVE; a message to a member that is suspect or dead in the sender's view carries that update
first, so it hears it soon. Precedence, per member: ALIVE(i) replaces any state of a lower
incarnation (so a member wrongly declared dead comes back by refuting); SUSPECT(i) replaces
ALIVE(j <= i) and SUSPECT(j < i); DEAD(i) replaces ALIVE or SUSPECT of j <= i; a SUSPECT of an
unknown member is ignored; a stale SUSPECT or DEAD about a member known ALIVE with a higher
incarnation makes the receiver gossip what it knows (so a lone wrong DEAD is corrected).

Dissemination. Updates (an ALIVE carries the member's record, an opaque JSON-safe mapping:
the node's announcement; a new record is an ALIVE of the next incarnation) ride on every PING,
ACK and PING-REQ, at most ``max_piggyback`` (8) and ``max_message_bytes`` (1,400: one
datagram) per message, the least-sent first. While it holds updates a member also pushes
them to ``gossip_fanout`` (3) random members, at once if it has not pushed in the last
``gossip_interval_s`` (0.2 s), else at the end of it: at most 15 pushes a second. Each member
sends each update ``ceil(retransmit_mult x ln(N + 1))`` times (3: 8 at 10 members, 16 at 200,
21 at 1,000; a member then misses an update with probability ~exp(-that)), then drops it; a
newer update about the same member replaces it. Joins: the newcomer sends JOIN (its ALIVE) to
a member (the next of its seeds every ``join_timeout_s`` until one answers; a member still
joining does not answer), which answers once with its whole state (SYNC, not re-gossiped by
the newcomer) and gossips the newcomer like any update; the newcomer gossips its own ALIVE
too. A member PINGed by a stranger (whose ALIVE missed it) asks it WHO, answered by its ALIVE.
A clean leave is a DEAD about oneself pushed to ``gossip_fanout`` members. Optional
Anti-entropy: every ``sync_interval_s`` (10 s) a member with nothing left to gossip sends one
random member a DIGEST of its view (a 64-bit XOR of its entries' hashes: id, incarnation, dead
or not); one that differs, from a member with nothing left to gossip either, is answered by a
full state exchange (SYNC-REQ, SYNC), which repairs a lost update or a join that crossed one
still in flight; a newcomer also makes one such exchange ``resync_after_s`` (3 s) after its
join. An idle mesh's views agree, so this costs one ~60-byte message per member per 10 s.
Idle cost per member: one PING and, on average, one ACK a period, ~45 bytes each.

Nothing here does I/O or reads a clock: :class:`SwimMember` takes ``now`` and messages and
returns an :class:`Output` (messages to send, membership events); with a seeded
``random.Random`` it is deterministic. :class:`Simulation` runs many members in simulated
time (a discrete-event loop); ``MemoryHub(swim=True)`` (fakes.py) runs them on the wall
clock, one task per node.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Any

_COMPACT = (",", ":")


class Status(StrEnum):
    """What a member believes about another."""

    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"


class Kind(StrEnum):
    """Message kinds."""

    PING = "ping"
    ACK = "ack"
    PING_REQ = "ping-req"  # ``target``: whom to probe for the sender
    GOSSIP = "gossip"  # updates only, no answer
    JOIN = "join"  # the newcomer's ALIVE; answered by SYNC
    SYNC = "sync"  # the sender's whole state
    SYNC_REQ = "sync-req"  # anti-entropy: the sender's whole state, answered by SYNC
    WHO = "who"  # "I do not know you": answered by a GOSSIP of the sender's ALIVE
    DIGEST = "digest"  # anti-entropy: a hash of the sender's view; a differing one: SYNC_REQ


@dataclass(frozen=True)
class Update:
    """One fact about one member, as gossiped."""

    member: str
    status: Status
    incarnation: int
    record: Mapping[str, Any] | None = None  # ALIVE: the member's announcement

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"m": self.member, "s": self.status.value, "i": self.incarnation}
        if self.record is not None:
            data["r"] = dict(self.record)
        return data

    @cached_property
    def size(self) -> int:
        """Bytes of its compact JSON encoding."""
        return len(json.dumps(self.to_dict(), separators=_COMPACT))


@dataclass(frozen=True)
class Message:
    """What one member sends another."""

    kind: Kind
    sender: str
    seq: int = 0  # PING, ACK, PING-REQ: the probe's sequence number (the prober's)
    target: str = ""  # PING-REQ: whom to probe; DIGEST: the hash (hex)
    updates: tuple[Update, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"k": self.kind.value, "f": self.sender, "n": self.seq, "t": self.target,
                "u": [u.to_dict() for u in self.updates]}

    @cached_property
    def size(self) -> int:
        """Bytes of its compact JSON encoding (the same as ``len(json.dumps(to_dict()))``)."""
        head: dict[str, Any] = {"k": self.kind.value, "f": self.sender, "n": self.seq,
                                "t": self.target, "u": []}
        body = sum(u.size for u in self.updates) + max(0, len(self.updates) - 1)
        return len(json.dumps(head, separators=_COMPACT)) + body


@dataclass(frozen=True)
class MemberEvent:
    """A change of this member's view: ALIVE (joined, came back, refuted a suspicion or
    changed its record), SUSPECT or DEAD."""

    member: str
    status: Status
    incarnation: int
    record: Mapping[str, Any] | None


@dataclass
class Output:
    """What a step produced: ``sends`` as (recipient, message), and membership events."""

    sends: list[tuple[str, Message]] = field(default_factory=list)
    events: list[MemberEvent] = field(default_factory=list)

    def extend(self, other: Output) -> None:
        self.sends.extend(other.sends)
        self.events.extend(other.events)


@dataclass(frozen=True)
class SwimConfig:
    """The protocol's parameters (see the module docstring); every member uses the same."""

    period_s: float = 1.0
    ping_timeout_s: float = 0.3
    indirect_k: int = 3
    suspicion_min_periods: float = 3.0
    suspicion_mult: float = 2.0
    retransmit_mult: float = 3.0
    max_piggyback: int = 8
    max_message_bytes: int = 1400
    gossip_interval_s: float = 0.2
    gossip_fanout: int = 3
    join_timeout_s: float = 1.0
    sync_interval_s: float | None = 10.0
    resync_after_s: float | None = 3.0

    def suspicion_s(self, members: int) -> float:
        """Seconds a suspect has to refute before it is declared dead."""
        scaled = self.suspicion_mult * math.log10(max(members, 1))
        return max(self.suspicion_min_periods, scaled) * self.period_s

    def retransmits(self, members: int) -> int:
        """How many times each member sends each update: with R sends by each of N members
        to random others, a given member misses an update with probability ~exp(-R)."""
        return max(1, math.ceil(self.retransmit_mult * math.log(members + 1)))


@dataclass
class Member:
    """One entry of a member's view."""

    id: str
    status: Status
    incarnation: int
    record: Mapping[str, Any] | None
    since: float  # when this entry last changed


@dataclass
class _Probe:
    target: str
    seq: int
    started: float
    indirect_sent: bool = False
    acked: bool = False


@dataclass
class _Queued:
    update: Update
    order: int
    transmits: int = 0


class SwimMember:
    """One member's protocol state. Call :meth:`tick` at :meth:`next_deadline` (earlier is
    harmless), :meth:`receive` for each message, and carry out each :class:`Output`."""

    def __init__(self, member_id: str, record: Mapping[str, Any], *, now: float,
                 config: SwimConfig | None = None, rng: random.Random | None = None) -> None:
        self.id = member_id
        self.config = config or SwimConfig()
        self.rng = rng or random.Random(member_id)
        self.incarnation = 0
        self.record: Mapping[str, Any] = dict(record)
        self.members: dict[str, Member] = {}
        self.digest = 0  # XOR of each entry's hash: equal views, equal digests
        self._put(Member(member_id, Status.ALIVE, 0, self.record, now))
        self.left = False
        self._live = _IdSet()  # the others not believed dead
        self._queue: dict[str, _Queued] = {}
        self._order = 0
        self._seq = 0
        self._probe: _Probe | None = None
        self._next_probe = now + self.rng.uniform(0, self.config.period_s)
        self._probe_list: list[str] = []
        self._probe_index = 0
        self._suspicions: dict[str, float] = {}
        self._relays: dict[int, tuple[str, int, float]] = {}  # my seq -> origin, its seq, until
        self._next_gossip = now
        sync = self.config.sync_interval_s
        self._next_sync = math.inf if sync is None else now + self.rng.uniform(0, sync)
        self._resync_at = math.inf
        self._join: tuple[list[str], int, float] | None = None  # seeds, index, retry at
        self._asked: dict[str, float] = {}  # strangers asked WHO, and when

    # ---------------------------------------------------------------- public

    def join(self, seeds: Sequence[str], now: float) -> Output:
        """Ask the first of ``seeds`` (existing members) for the membership; the next one is
        tried every ``join_timeout_s`` until a SYNC arrives. No seed: a mesh of one."""
        seeds = [s for s in seeds if s != self.id]
        out = Output()
        if seeds:
            self._join = (seeds, 0, now + self.config.join_timeout_s)
            out.sends.append((seeds[0], self._message(Kind.JOIN, updates=(self._me(),))))
        return out

    def announce(self, record: Mapping[str, Any], now: float) -> Output:
        """A new record of this member: the next incarnation's ALIVE, gossiped."""
        self.record = dict(record)
        self.incarnation += 1
        self._set_self(now)
        return Output()

    def leave(self, now: float) -> Output:
        """Say goodbye: a DEAD about oneself to a few members; then ignore everything."""
        self.left = True
        bye = Update(self.id, Status.DEAD, self.incarnation)
        out = Output()
        for target in self._sample(self._live_others(), self.config.gossip_fanout):
            out.sends.append((target, self._message(Kind.GOSSIP, updates=(bye,))))
        return out

    def receive(self, message: Message, now: float) -> Output:
        """Handle one message."""
        out = Output()
        if self.left:
            return out
        full_state = message.kind in (Kind.SYNC, Kind.SYNC_REQ)
        for update in message.updates:
            # a whole state spreads nothing new: only corrections of what was known
            self._apply(update, now, out, gossip=not full_state or update.member in self.members)
        handler = self._handlers().get(message.kind)
        if handler is not None:
            handler(message, now, out)
        if message.kind in (Kind.PING, Kind.PING_REQ, Kind.ACK, Kind.GOSSIP):
            self._ask_stranger(message.sender, now, out)
        return out

    def tick(self, now: float) -> Output:
        """Run every timer that is due."""
        out = Output()
        if self.left:
            return out
        self._tick_join(now, out)
        self._tick_probe(now, out)
        self._tick_suspicions(now, out)
        self._tick_gossip(now, out)
        self._tick_sync(now, out)
        self._relays = {k: v for k, v in self._relays.items() if v[2] > now}
        self._asked = {k: v for k, v in self._asked.items() if v > now}
        return out

    def next_deadline(self) -> float:
        """When :meth:`tick` has something to do next."""
        if self.left:
            return math.inf
        times = [self._next_probe, self._next_sync, self._resync_at]
        if (probe := self._probe) is not None and not probe.acked:
            if not probe.indirect_sent:
                times.append(probe.started + self.config.ping_timeout_s)
            times.append(probe.started + self.config.period_s)
        if self._suspicions:
            times.append(min(self._suspicions.values()))
        if self._queue:
            times.append(self._next_gossip)
        if self._join is not None:
            times.append(self._join[2])
        return min(times)

    def status_of(self, member_id: str) -> Status | None:
        """This member's belief about ``member_id`` (None: never heard of it)."""
        entry = self.members.get(member_id)
        return None if entry is None else entry.status

    def live_count(self) -> int:
        """Members not believed dead, this one included (the N of the formulas)."""
        return len(self._live) + 1

    @property
    def joining(self) -> bool:
        """True until the answer to :meth:`join` arrived."""
        return self._join is not None

    @property
    def queued(self) -> int:
        """Updates waiting to be gossiped."""
        return len(self._queue)

    # ---------------------------------------------------------------- applying updates

    def _apply(self, update: Update, now: float, out: Output, *, gossip: bool = True) -> bool:
        """Apply ``update`` if it takes precedence; True when the view changed."""
        if update.member == self.id:
            if update.status is not Status.ALIVE and update.incarnation >= self.incarnation:
                self.incarnation = update.incarnation + 1  # refute
                self._set_self(now)
            return False
        known = self.members.get(update.member)
        if not _overrides(update, known):
            if (known is not None and known.status is Status.ALIVE
                    and update.incarnation < known.incarnation
                    and update.status is not Status.ALIVE and update.member not in self._queue):
                self._enqueue(Update(known.id, known.status, known.incarnation, known.record))
            return False
        was = None if known is None else known.status
        record = update.record if update.record is not None else (
            None if known is None else known.record)
        self._put(Member(update.member, update.status, update.incarnation, record, now))
        if update.status is Status.DEAD:
            self._live.discard(update.member)
        else:
            self._live.add(update.member)
        if gossip:
            self._enqueue(update)
        self._on_change(update, was, known, now, out)
        return True

    def _on_change(self, update: Update, was: Status | None, known: Member | None, now: float,
                   out: Output) -> None:
        member, status = update.member, update.status
        entry = self.members[member]
        if status is not Status.SUSPECT:
            self._suspicions.pop(member, None)
        if status is Status.ALIVE:
            if was in (None, Status.DEAD):
                self._insert_probe_target(member)
            out.events.append(MemberEvent(member, status, update.incarnation, entry.record))
        elif status is Status.SUSPECT:
            self._suspicions[member] = now + self.config.suspicion_s(self.live_count())
            out.events.append(MemberEvent(member, status, update.incarnation, entry.record))
        elif was is not None and was is not Status.DEAD:
            out.events.append(MemberEvent(member, status, update.incarnation, entry.record))

    def _set_self(self, now: float) -> None:
        self._put(Member(self.id, Status.ALIVE, self.incarnation, self.record, now))
        self._enqueue(self._me())

    def _put(self, entry: Member) -> None:
        if (old := self.members.get(entry.id)) is not None:
            self.digest ^= _entry_hash(old)
        self.members[entry.id] = entry
        self.digest ^= _entry_hash(entry)

    def _me(self) -> Update:
        return Update(self.id, Status.ALIVE, self.incarnation, self.record)

    def _enqueue(self, update: Update) -> None:
        self._order += 1
        self._queue[update.member] = _Queued(update, self._order)

    def _suspect(self, member_id: str, now: float, out: Output) -> None:
        entry = self.members.get(member_id)
        if entry is not None and entry.status is Status.ALIVE:
            self._apply(Update(member_id, Status.SUSPECT, entry.incarnation), now, out)

    # ---------------------------------------------------------------- messages

    def _handlers(self) -> dict[Kind, Callable[[Message, float, Output], None]]:
        return {Kind.PING: self._on_ping, Kind.ACK: self._on_ack,
                Kind.PING_REQ: self._on_ping_req, Kind.JOIN: self._on_join,
                Kind.SYNC: self._on_sync, Kind.SYNC_REQ: self._on_sync_req,
                Kind.WHO: self._on_who, Kind.DIGEST: self._on_digest}

    def _on_ping(self, message: Message, now: float, out: Output) -> None:
        out.sends.append((message.sender, self._message(Kind.ACK, message.seq, to=message.sender)))

    def _on_ack(self, message: Message, now: float, out: Output) -> None:
        probe = self._probe
        if probe is not None and message.seq == probe.seq:
            probe.acked = True
        elif (relay := self._relays.pop(message.seq, None)) is not None:
            origin, seq, _ = relay
            out.sends.append((origin, self._message(Kind.ACK, seq, to=origin)))

    def _on_ping_req(self, message: Message, now: float, out: Output) -> None:
        self._seq += 1
        self._relays[self._seq] = (message.sender, message.seq, now + self.config.period_s)
        target = message.target
        out.sends.append((target, self._message(Kind.PING, self._seq, to=target)))

    def _on_join(self, message: Message, now: float, out: Output) -> None:
        if self._join is None:  # a member still joining knows too little: the next is asked
            out.sends.append((message.sender, self._full_state(Kind.SYNC)))

    def _on_sync(self, message: Message, now: float, out: Output) -> None:
        if self._join is not None:
            self._join = None
            self._enqueue(self._me())  # in case the seed could not spread it
            if self.config.resync_after_s is not None:  # what was in flight while we joined
                self._resync_at = now + self.config.resync_after_s

    def _on_digest(self, message: Message, now: float, out: Output) -> None:
        """Views differ while neither of us has updates left to spread: a real divergence
        (a lost update, a join that crossed one in flight), repaired by a full exchange."""
        if message.target != f"{self.digest:016x}" and not self._queue:
            out.sends.append((message.sender, self._full_state(Kind.SYNC_REQ)))

    def _on_who(self, message: Message, now: float, out: Output) -> None:
        out.sends.append((message.sender, self._message(Kind.GOSSIP, updates=(self._me(),))))

    def _ask_stranger(self, sender: str, now: float, out: Output) -> None:
        """A member that probes us but that we never heard of (its ALIVE missed us, e.g.
        gossiped while we joined) is asked for it, at most once a period."""
        if sender in self.members or now < self._asked.get(sender, -math.inf):
            return
        self._asked[sender] = now + self.config.period_s
        out.sends.append((sender, Message(Kind.WHO, self.id)))

    def _on_sync_req(self, message: Message, now: float, out: Output) -> None:
        out.sends.append((message.sender, self._full_state(Kind.SYNC)))

    def _full_state(self, kind: Kind) -> Message:
        state = tuple(Update(m.id, m.status, m.incarnation, m.record)
                      for m in self.members.values())
        return Message(kind, self.id, updates=state)

    def _message(self, kind: Kind, seq: int = 0, *, to: str = "", target: str = "",
                 updates: tuple[Update, ...] | None = None) -> Message:
        """A message with piggybacked updates (``updates`` given: exactly those)."""
        return Message(kind, self.id, seq, target,
                       self._piggyback(to) if updates is None else updates)

    def _piggyback(self, to: str) -> tuple[Update, ...]:
        """Updates for a message to ``to``: what makes ``to`` refute first (its own suspicion
        or death in this view), then the least-sent queued ones, within the bounds."""
        chosen: list[Update] = []
        room = self.config.max_message_bytes - 64  # the envelope
        entry = self.members.get(to)
        if entry is not None and entry.status is not Status.ALIVE:
            chosen.append(Update(to, entry.status, entry.incarnation))
            room -= chosen[0].size
        limit = self.config.retransmits(self.live_count())
        for queued in sorted(self._queue.values(), key=lambda q: (q.transmits, -q.order)):
            if len(chosen) >= self.config.max_piggyback:
                break
            update = queued.update
            if update.size > room or (chosen and update.member == to and entry is not None
                                      and entry.status is not Status.ALIVE):
                continue
            chosen.append(update)
            room -= update.size + 1
            queued.transmits += 1
            if queued.transmits >= limit:
                del self._queue[update.member]
        return tuple(chosen)

    # ---------------------------------------------------------------- timers

    def _tick_join(self, now: float, out: Output) -> None:
        if self._join is None or now < self._join[2]:
            return
        seeds, index, _ = self._join
        index = (index + 1) % len(seeds)
        self._join = (seeds, index, now + self.config.join_timeout_s)
        out.sends.append((seeds[index], self._message(Kind.JOIN, updates=(self._me(),))))

    def _tick_probe(self, now: float, out: Output) -> None:
        probe, cfg = self._probe, self.config
        if probe is not None:
            if not probe.acked and not probe.indirect_sent and now >= probe.started + \
                    cfg.ping_timeout_s:
                probe.indirect_sent = True
                self._ping_req(probe, out)
            if now >= probe.started + cfg.period_s:
                self._probe = None
                if not probe.acked:
                    self._suspect(probe.target, now, out)
        if self._probe is None and now >= self._next_probe:
            self._next_probe = now + cfg.period_s
            target = self._next_target()
            if target is not None:
                self._seq += 1
                self._probe = _Probe(target, self._seq, now)
                out.sends.append((target, self._message(Kind.PING, self._seq, to=target)))

    def _ping_req(self, probe: _Probe, out: Output) -> None:
        others = self._live_others()
        picked: list[str] = []
        for helper in self._sample(others, min(len(others), 3 * self.config.indirect_k + 1)):
            if helper != probe.target and self.members[helper].status is Status.ALIVE:
                picked.append(helper)
        for helper in picked[:self.config.indirect_k]:
            out.sends.append((helper, self._message(Kind.PING_REQ, probe.seq, to=helper,
                                                    target=probe.target)))

    def _tick_suspicions(self, now: float, out: Output) -> None:
        for member_id, deadline in list(self._suspicions.items()):
            entry = self.members.get(member_id)
            if now < deadline or entry is None:
                continue
            del self._suspicions[member_id]
            if entry.status is Status.SUSPECT:
                self._apply(Update(member_id, Status.DEAD, entry.incarnation), now, out)

    def _tick_gossip(self, now: float, out: Output) -> None:
        if not self._queue or now < self._next_gossip:
            return
        self._next_gossip = now + self.config.gossip_interval_s
        for target in self._sample(self._live_others(), self.config.gossip_fanout):
            updates = self._piggyback(target)
            if updates:
                out.sends.append((target, self._message(Kind.GOSSIP, updates=updates)))

    def _tick_sync(self, now: float, out: Output) -> None:
        if now >= self._resync_at:
            self._resync_at = math.inf
            for target in self._sample(self._live_others(), 1):
                out.sends.append((target, self._full_state(Kind.SYNC_REQ)))
        if now < self._next_sync:
            return
        self._next_sync = now + (self.config.sync_interval_s or math.inf)
        if self._queue:  # still spreading: the views differ for now anyway
            return
        for target in self._sample(self._live_others(), 1):
            out.sends.append((target, Message(Kind.DIGEST, self.id, target=f"{self.digest:016x}")))

    # ---------------------------------------------------------------- choosing peers

    def _live_others(self) -> list[str]:
        return self._live.items

    def _sample(self, population: list[str], k: int) -> list[str]:
        return self.rng.sample(population, min(k, len(population)))

    def _next_target(self) -> str | None:
        """The next member in SWIM's order: a shuffled list walked round-robin."""
        for _ in range(2):
            while self._probe_index < len(self._probe_list):
                member_id = self._probe_list[self._probe_index]
                self._probe_index += 1
                if self.status_of(member_id) not in (None, Status.DEAD):
                    return member_id
            self._probe_list = list(self._live_others())
            self.rng.shuffle(self._probe_list)
            self._probe_index = 0
        return None

    def _insert_probe_target(self, member_id: str) -> None:
        """A newcomer goes to a random place among those not yet probed in this pass."""
        at = self.rng.randint(self._probe_index, len(self._probe_list))
        self._probe_list.insert(at, member_id)


def _entry_hash(entry: Member) -> int:
    """64 bits of an entry's identity for the view digest (alive and suspect count alike)."""
    live = "dead" if entry.status is Status.DEAD else "live"
    data = f"{entry.id}\0{entry.incarnation}\0{live}".encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class _IdSet:
    """A set of ids that can be sampled in O(k): a list plus each id's index."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self._index: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.items)

    def add(self, item: str) -> None:
        if item not in self._index:
            self._index[item] = len(self.items)
            self.items.append(item)

    def discard(self, item: str) -> None:
        at = self._index.pop(item, None)
        if at is None:
            return
        last = self.items.pop()
        if at < len(self.items):
            self.items[at] = last
            self._index[last] = at


def _overrides(update: Update, known: Member | None) -> bool:
    """SWIM's precedence rules, with a dead member revivable by a higher incarnation."""
    if known is None:
        return update.status is not Status.SUSPECT  # a suspicion of a stranger means nothing
    if update.status is Status.ALIVE:
        return update.incarnation > known.incarnation
    if update.status is Status.SUSPECT:
        if known.status is Status.ALIVE:
            return update.incarnation >= known.incarnation
        return known.status is Status.SUSPECT and update.incarnation > known.incarnation
    return known.status is not Status.DEAD and update.incarnation >= known.incarnation


# -------------------------------------------------------------------- simulation


@dataclass
class Traffic:
    """Messages and bytes one member sent and received, by kind."""

    messages_out: int = 0
    bytes_out: int = 0
    messages_in: int = 0
    bytes_in: int = 0
    kinds_out: Counter[str] = field(default_factory=Counter)

    def sent(self, message: Message) -> None:
        self.messages_out += 1
        self.bytes_out += message.size
        self.kinds_out[message.kind.value] += 1

    def received(self, message: Message) -> None:
        self.messages_in += 1
        self.bytes_in += message.size

    def to_dict(self) -> dict[str, Any]:
        return {"messages_out": self.messages_out, "bytes_out": self.bytes_out,
                "messages_in": self.messages_in, "bytes_in": self.bytes_in,
                "kinds_out": dict(sorted(self.kinds_out.items()))}


Drop = Callable[[str, str, Message], bool]  # (sender, recipient, message) -> lose it


class Simulation:
    """Many :class:`SwimMember`s in simulated time: a discrete-event loop with a one-way
    latency of ``latency_s`` plus up to ``jitter_s``, a ``loss`` rate and a ``drop`` hook
    (return True to lose a message). A killed member neither sends nor receives.
    ``on_event(time, observer, event)`` sees every membership event."""

    def __init__(self, config: SwimConfig | None = None, *, seed: int = 0,
                 latency_s: float = 0.001, jitter_s: float = 0.001, loss: float = 0.0,
                 drop: Drop | None = None,
                 on_event: Callable[[float, str, MemberEvent], None] | None = None) -> None:
        self.config = config or SwimConfig()
        self.seed = seed
        self.latency_s, self.jitter_s, self.loss = latency_s, jitter_s, loss
        self.drop = drop
        self.on_event = on_event
        self.now = 0.0
        self.members: dict[str, SwimMember] = {}
        self.killed: set[str] = set()
        self.traffic: dict[str, Traffic] = {}
        self._rng = random.Random(f"net:{seed}")
        self._heap: list[tuple[float, int, str, Message | None]] = []
        self._counter = 0
        self._scheduled: dict[str, float] = {}

    # ---------------------------------------------------------------- membership changes

    def add(self, member_id: str, record: Mapping[str, Any] | None = None, *,
            seeds: Sequence[str] | None = None) -> SwimMember:
        """A new member joining through ``seeds`` (default: up to 3 random live members, the
        first asked first)."""
        member = self._new(member_id, record)
        live = [m for m in self.live() if m != member_id]
        if seeds is None:
            seeds = self._rng.sample(live, min(3, len(live)))
        self._run_step(member_id, member.join(seeds, self.now))
        return member

    def preform(self, ids: Iterable[str],
                records: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """Members that already know each other (as after their joins settled), their probe
        timers at random phases: the steady state, without simulating N joins. ``records``:
        each member's record (default ``{"id": ID}``)."""
        members = [self._new(i, None if records is None else records.get(i)) for i in ids]
        state = tuple(Update(m.id, Status.ALIVE, 0, m.record) for m in members)
        for member in members:
            member.receive(Message(Kind.SYNC, "preform", updates=state), self.now)
            self._reschedule(member.id)

    def kill(self, member_id: str) -> None:
        """Stop ``member_id`` without a goodbye (kill -9)."""
        self.killed.add(member_id)

    def leave(self, member_id: str) -> None:
        """A clean leave: the goodbye is sent, then the member is gone."""
        self._run_step(member_id, self.members[member_id].leave(self.now))
        self.killed.add(member_id)

    def announce(self, member_id: str, record: Mapping[str, Any]) -> None:
        """A new record of ``member_id``, gossiped."""
        self._run_step(member_id, self.members[member_id].announce(record, self.now))

    def live(self) -> list[str]:
        return [m for m in self.members if m not in self.killed]

    # ---------------------------------------------------------------- running

    def run_until(self, until: float) -> None:
        """Process every event up to simulated time ``until``."""
        while self._heap and self._heap[0][0] <= until:
            when, _, member_id, message = heapq.heappop(self._heap)
            self.now = max(self.now, when)
            if member_id in self.killed:
                continue
            member = self.members[member_id]
            if message is not None:
                self.traffic[member_id].received(message)
                self._run_step(member_id, member.receive(message, self.now))
            elif self._scheduled.get(member_id) == when:
                del self._scheduled[member_id]
                self._run_step(member_id, member.tick(self.now))
        self.now = max(self.now, until)

    def run_for(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    def run_until_true(self, predicate: Callable[[], bool], timeout: float,
                       step: float = 0.01) -> float | None:
        """Seconds of simulated time until ``predicate`` holds (checked every ``step``);
        None if not within ``timeout``."""
        start = self.now
        while not predicate():
            if self.now - start >= timeout:
                return None
            self.run_for(step)
        return self.now - start

    # ---------------------------------------------------------------- internals

    def _new(self, member_id: str, record: Mapping[str, Any] | None) -> SwimMember:
        member = SwimMember(member_id, record if record is not None else {"id": member_id},
                            now=self.now, config=self.config,
                            rng=random.Random(f"{self.seed}:{member_id}"))
        self.members[member_id] = member
        self.traffic[member_id] = Traffic()
        return member

    def _run_step(self, member_id: str, out: Output) -> None:
        for event in out.events:
            if self.on_event is not None:
                self.on_event(self.now, member_id, event)
        for recipient, message in out.sends:
            self._send(member_id, recipient, message)
        self._reschedule(member_id)

    def _send(self, sender: str, recipient: str, message: Message) -> None:
        self.traffic[sender].sent(message)
        if recipient in self.killed or recipient not in self.members:
            return
        if (self.loss and self._rng.random() < self.loss) or (
                self.drop is not None and self.drop(sender, recipient, message)):
            return
        delay = self.latency_s + self._rng.uniform(0, self.jitter_s)
        self._push(self.now + delay, recipient, message)

    def _reschedule(self, member_id: str) -> None:
        if member_id in self.killed:
            return
        deadline = max(self.members[member_id].next_deadline(), self.now)
        if deadline < self._scheduled.get(member_id, math.inf):
            self._scheduled[member_id] = deadline
            self._push(deadline, member_id, None)

    def _push(self, when: float, member_id: str, message: Message | None) -> None:
        self._counter += 1
        heapq.heappush(self._heap, (when, self._counter, member_id, message))
