"""An idle mesh stays quiet: a few PINGs per node per round (not one per peer), no
re-announcement of RTT noise, and a quiet peer is TCP-probed only once a PING went unanswered."""

from __future__ import annotations

import asyncio
import socket
import time
from types import SimpleNamespace
from typing import Any, cast

import anyio
import pytest
from meshcore_transport_quic.fastlinks import FastLinks
from meshcore_transport_quic.fastpath import FastPathError
from meshcore_transport_quic.frames import Kind
from meshcore_transport_quic.links import (
    RTT_HOLD_ROUNDS,
    RTT_QUIET_S,
    PeerLink,
    rtt_table_changed,
    rtt_update_due,
)
from meshcore_transport_quic.membership import Membership
from meshcore_transport_quic.probes import PROBES_PER_ROUND, pick_probes, probes_per_round
from meshcore_transport_quic.quicstream import CountingTransport, Traffic
from meshcore_transport_quic.state import ERR_TIMEOUT, send
from quic_helpers import QuicMesh, wait_for


def test_round_robin_reaches_every_peer_in_turn_plus_the_urgent_ones() -> None:
    peers = [f"p{i:02d}" for i in range(10)]
    seen: list[str] = []
    cursor = 0
    for _ in range(4):  # ceil(10 / 3) rounds
        chosen, cursor = pick_probes(peers, cursor, 3, urgent={"p09"})
        assert len(chosen) <= 4 and "p09" in chosen
        seen += chosen
    assert set(seen) == set(peers)
    assert pick_probes([], 5, 3, {"x"}) == ([], 0)
    assert pick_probes(["a"], 7, 3, set()) == (["a"], 0)  # fewer peers than probes


def test_probes_per_round_is_constant_until_the_silence_limit_needs_more() -> None:
    assert probes_per_round(9, 2.0, 60.0) == PROBES_PER_ROUND
    assert probes_per_round(30, 2.0, 60.0) == PROBES_PER_ROUND
    assert probes_per_round(49, 2.0, 60.0) == 5
    # 1,000 peers: each still pinged at least every 20 s (a third of the 60 s limit)
    count = probes_per_round(1000, 2.0, 60.0)
    assert 1000 / count * 2.0 <= 20.0
    assert probes_per_round(5, 0.5, 1.0) == 5  # short test timers: every peer every round


def test_rtt_noise_within_a_band_and_departures_are_not_announced() -> None:
    old = {"a": 1.0, "b": 35.0}
    assert not rtt_table_changed(old, {"a": 4.0, "b": 38.0})  # loopback jitter: same band
    assert not rtt_table_changed(old, {"a": 14.0})  # b gone; a past the edge, within hysteresis
    assert rtt_table_changed(old, {"a": 15.5, "b": 35.0})  # a crossed into the next band
    assert not rtt_table_changed(old, {"a": 1.0, "b": 27.0})  # b under its band, by < 5 ms
    assert rtt_table_changed(old, {"a": 1.0, "b": 24.0})  # b fell a band, past the hysteresis
    assert rtt_table_changed(old, {"a": 1.0, "b": 35.0, "c": 3.0})  # c measured: the host
    # needs it before the election pulls c in


def test_a_band_change_is_announced_once_it_held_and_rarely_by_a_non_host() -> None:
    old, moved, joined = {"a": 1.0}, {"a": 25.0}, {"a": 1.0, "c": 3.0}
    assert rtt_update_due(old, joined, 0, True, 0.0)  # the host, a new peer: at once
    assert not rtt_update_due(old, {"a": 2.0}, 0, True, 99.0)  # no material change
    assert not rtt_update_due(old, moved, RTT_HOLD_ROUNDS - 1, True, 99.0)  # not held yet
    assert rtt_update_due(old, moved, RTT_HOLD_ROUNDS, True, 0.0)  # the host: once held
    for table in (moved, joined):  # any other node: held, and not within RTT_QUIET_S
        assert not rtt_update_due(old, table, 0, False, RTT_QUIET_S)
        assert not rtt_update_due(old, table, RTT_HOLD_ROUNDS, False, RTT_QUIET_S - 1)
        assert rtt_update_due(old, table, RTT_HOLD_ROUNDS, False, RTT_QUIET_S)


def test_an_inflated_first_rtt_is_forgotten_with_the_next_good_sample() -> None:
    link = PeerLink("p", b"f" * 32, "boot", cast(Any, None), True, [("127.0.0.1", 1)])
    assert link.sample_rtt(700.0) == 700.0  # a busy start
    assert link.sample_rtt(1.0) == 1.0  # not 560: it would cross bands for a minute
    assert link.sample_rtt(51.0) == pytest.approx(11.0)  # one slow answer moves it 20 %


@pytest.mark.anyio
async def test_a_pong_counts_only_as_the_echo_of_a_ping_this_node_sent() -> None:
    from meshcore_transport_quic.frames import Frame
    from meshcore_transport_quic.gossip import Gossip
    from meshcore_transport_quic.state import Mesh

    from meshcore.state import MeshState, Peer

    node = SimpleNamespace(id="me", state=MeshState(Peer("me", vram=1)))
    node.state.upsert(Peer("p", vram=1))
    proto = SimpleNamespace(traffic=Traffic(), terminated=None, peer_id="p")
    link = PeerLink("p", b"f" * 32, "boot", cast(Any, proto), True, [("127.0.0.1", 1)])
    gossip = Gossip(Mesh(cast(Any, node), FastLinks(False)), accept=cast(Any, None),
                    dial=cast(Any, None))
    sent = time.monotonic() - 0.2  # a real PING, 200 ms ago
    link.pings.append(sent)
    await gossip._handle_frame(link, Frame(Kind.PONG, {"t": time.monotonic() - 1e-4}))
    assert link.rtt_ms is None  # a made-up time (0.1 ms: "I am next door") is ignored
    await gossip._handle_frame(link, Frame(Kind.PONG, {"t": sent}))
    assert link.rtt_ms is not None and link.rtt_ms >= 200
    await gossip._handle_frame(link, Frame(Kind.PONG, {"t": sent}))  # replayed: ignored
    assert link.rtt_samples == 1


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.anyio
async def test_a_quiet_peer_is_tcp_probed_only_after_an_unanswered_ping() -> None:
    now = time.monotonic()
    closed: list[tuple[int, str]] = []
    proto = SimpleNamespace(last_rx=now - 10, peer_addr=("127.0.0.1", 1), terminated=None,
                            close=lambda code, why: closed.append((code, why)))
    link = PeerLink("p", b"f" * 32, "boot", cast(Any, proto), True, [("127.0.0.1", 1)],
                    fast_port=closed_port(), fast_ok=True)  # its port refuses: "gone"
    told: list[str] = []
    mesh = SimpleNamespace(dead_after_s=60.0, suspect_after_s=1.5,
                           spawn=lambda proto, what, func, *args: told.append(what))
    members = Membership(cast(Any, mesh), cast(Any, None))
    members.overlay = cast(Any, SimpleNamespace(tell_gone=lambda peer_id: told.append(peer_id)))
    await members._judge(link, now)  # silent 10 s, never pinged: no verdict
    assert closed == [] and not link.gone
    link.probe_at = now - 1  # pinged 1 s ago: not yet suspected
    await members._judge(link, now)
    assert closed == [] and not link.gone
    proto.last_rx = now - 0.5  # it answered after that PING
    await members._judge(link, now)
    assert closed == [] and link.probe_at is None
    proto.last_rx, link.probe_at = now - 3, now - 2  # pinged 2 s ago, nothing since, and
    # its port refuses
    await members._judge(link, now)
    assert closed == [(ERR_TIMEOUT, "process gone")] and link.gone
    assert told == ["p"]  # the others are told (GONE) and check it at once
    closed.clear()
    link.gone, link.fast_ok = False, False  # its fast path probe once timed out (a busy
    await members._judge(link, now)  # start): a refusal now still means nothing listens
    assert closed and link.gone
    closed.clear()
    link.gone, link.refuses_alive = False, True  # its port refused while it was alive
    await members._judge(link, now)
    assert closed == [] and not link.gone


@pytest.mark.anyio
async def test_a_datagram_sent_after_its_socket_closed_is_dropped_not_raised() -> None:
    """aioquic's timer can fire after a dial's UDP socket closed; asyncio raises on a closed
    unconnected datagram socket (an error inside the event loop's callback), so the count
    wrapper drops the datagram as the network would."""
    loop = asyncio.get_running_loop()
    inner, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol,
                                                   local_addr=("127.0.0.1", 0))
    traffic = Traffic()
    counted = CountingTransport(cast(asyncio.DatagramTransport, inner), traffic)
    counted.sendto(b"x", ("127.0.0.1", 9))
    assert traffic.datagrams_out == 1
    counted.close()
    await anyio.sleep(0)
    counted.sendto(b"x", ("127.0.0.1", 9))  # raised AttributeError inside asyncio before
    assert traffic.datagrams_out == 1


def refusal() -> FastPathError:
    exc = FastPathError("cannot reach it: refused")
    exc.__cause__ = ConnectionRefusedError(111, "Connection refused")
    return exc


def test_only_a_first_contact_refusal_marks_a_port_that_refuses_while_alive(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal at the first probe of a new link: a firewall that rejects TCP, so the port
    says nothing about the process. A refusal after a probe timed out (50 processes starting
    on 2 cores) is no first contact: membership checks the peer. Taking it for a firewall's
    once kept a dead host in a node's view for 60 s (bench/scale.py, 50 nodes)."""
    monkeypatch.setenv("MESH_LLM_RELAY_PROCESS", "0")
    fast = FastLinks(True)
    checked: list[str] = []
    fast.on_refused = lambda link: checked.append(link.id)

    def new_link() -> PeerLink:
        return PeerLink("p", b"f" * 32, "boot", cast(Any, SimpleNamespace(peer_addr=None)),
                        True, [("127.0.0.1", 1)], fast_port=1, fast_key=b"k" * 32)

    first = new_link()
    fast.failed(first, "refused", refusal())
    assert first.refuses_alive and checked == []
    timed_out = new_link()
    fast.failed(timed_out, "timed out", FastPathError("cannot reach it: TimeoutError()"))
    assert not timed_out.refuses_alive and timed_out.fast_ok is False
    timed_out.fast_retry_at = 0.0
    assert fast.usable(timed_out) and timed_out.fast_ok is None  # tried again
    fast.failed(timed_out, "refused", refusal())
    assert not timed_out.refuses_alive and checked == ["p"]


@pytest.mark.anyio
@pytest.mark.parametrize("port", ["refuses while alive", "none"])
async def test_a_reported_peer_whose_port_cannot_be_tested_goes_on_an_unanswered_ping(
        port: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another node reports p gone; this node cannot test p's port (it refused while p was
    alive, or p has no fast path): p's unanswered PING confirms the report. Before, only
    the 60 s silence limit dropped it. A refused tunnel (this node's own evidence) still
    needs the port check, and a peer that answers is kept."""
    async def no_send(*args: Any) -> None:
        return None

    monkeypatch.setattr("meshcore_transport_quic.membership.send", no_send)
    closed: list[str] = []

    def setup() -> tuple[Membership, PeerLink]:
        proto = SimpleNamespace(last_rx=time.monotonic() - 1, peer_addr=("127.0.0.1", 1),
                                terminated=None, close=lambda code, why: closed.append(why))
        link = PeerLink("p", b"f" * 32, "boot", cast(Any, proto), True, [("127.0.0.1", 1)])
        if port == "refuses while alive":
            link.fast_port, link.refuses_alive = closed_port(), True
        mesh = SimpleNamespace(suspect_after_s=0.05, links={"p": link})
        return Membership(cast(Any, mesh), cast(Any, None)), link

    members, link = setup()
    await members._confirm_gone(link, "was reported gone by q", tell=False)
    assert link.gone and closed == ["process gone"] and not link.checking
    closed.clear()
    members, link = setup()
    await members._confirm_gone(link, "refused a tunnel", tell=True)
    assert not link.gone and closed == []
    members, link = setup()

    async def answered(*args: Any) -> None:
        link.proto.last_rx = time.monotonic() + 1  # anything received counts as an answer

    monkeypatch.setattr("meshcore_transport_quic.membership.send", answered)
    await members._confirm_gone(link, "was reported gone by q", tell=False)
    assert not link.gone and closed == []


@pytest.mark.anyio
async def test_an_idle_mesh_pings_a_few_peers_per_round_not_every_peer(
        quic_mesh: QuicMesh) -> None:
    timers: dict[str, Any] = {"quic_heartbeat_s": 0.1, "quic_dead_after_s": 60.0}
    nodes = [await quic_mesh.add(**timers) for _ in range(9)]
    await wait_for(lambda: all(len(n.view().others) == 8 for n in nodes), 30, "a full mesh")
    await wait_for(lambda: all(link.rtt_samples >= 3 for n in nodes
                               for link in n.transport.links.values()), 30, "every RTT measured")
    await anyio.sleep(1.0)
    before = [n.transport.status() for n in nodes]
    await anyio.sleep(2.0)
    after = [n.transport.status() for n in nodes]
    for node, b, a in zip(nodes, before, after, strict=True):
        rounds = a["heartbeat_rounds"] - b["heartbeat_rounds"]
        pings = a["frames_out"].get("PING", 0) - b["frames_out"].get("PING", 0)
        assert rounds > 0
        # the 3 in turn plus the host (8 per round when every peer was pinged)
        assert pings <= (PROBES_PER_ROUND + 1) * rounds, (node.id, pings, rounds)
    # ANNOUNCEs are not counted here: nine nodes on one event loop measure RTTs of 3-20 ms
    # (the loop's lag, not the network), real noise across bands; the band rule is tested
    # above and measured on real processes by bench/scale.py (benchmarks.md, "Scale").


@pytest.mark.anyio
async def test_a_false_gone_report_costs_a_check_not_the_peer(quic_mesh: QuicMesh) -> None:
    """b tells a that c's process is gone (GONE) while c is alive: a checks c itself (a PING
    over QUIC) and keeps it; only a check of its own drops a peer."""
    timers: dict[str, Any] = {"quic_heartbeat_s": 30.0, "quic_dead_after_s": 60.0}
    a, b, c = [await quic_mesh.add(**timers) for _ in range(3)]
    await wait_for(lambda: all(len(n.view().others) == 2 for n in (a, b, c)), 30, "3 nodes")
    link = a.transport.links[c.id]
    pongs = link.rtt_samples
    await send(b.transport.links[a.id], Kind.GONE, {"id": c.id})
    await wait_for(lambda: link.rtt_samples > pongs, 10, "a to PING c on b's report")
    await anyio.sleep(a.transport.mesh.suspect_after_s + 0.5)
    assert a.transport.links.get(c.id) is link and not link.gone and not link.checking
    assert c.id in {p.id for p in a.view().others}


@pytest.mark.anyio
async def test_a_live_peer_answers_a_cut_and_keeps_its_port_as_evidence(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A cut tunnel (Membership.cut) starts the same check as a refused one, but a peer that
    answers it (alive: its rpc-server died and its node reset the tunnel, say) keeps its
    port as evidence for a later death; only a refusal answered by a live peer marks the
    port as one that refuses while the peer lives."""
    async def answered(*args: Any) -> None:
        link.proto.last_rx = time.monotonic() + 1

    monkeypatch.setattr("meshcore_transport_quic.membership.send", answered)
    closed: list[str] = []
    spawned: list[Any] = []  # the checks the membership started (coroutines)
    for how, refuses_after in (("cut", False), ("refused", True)):
        proto = SimpleNamespace(last_rx=time.monotonic() - 1, peer_addr=("127.0.0.1", 1),
                                terminated=None, close=lambda code, why: closed.append(why))
        link = PeerLink("p", b"f" * 32, "boot", cast(Any, proto), True, [("127.0.0.1", 1)])
        link.fast_port = closed_port()
        mesh = SimpleNamespace(suspect_after_s=0.05, links={"p": link},
                               spawn=lambda proto, what, fn, *args: spawned.append(fn(*args)))
        members = Membership(cast(Any, mesh), cast(Any, None))
        if how == "cut":
            members.cut("p")
        else:
            members.refused(link)
        assert link.checking and len(spawned) == 1
        await spawned.pop()
        assert not link.gone and not link.checking and closed == []
        assert link.refuses_alive is refuses_after, how
