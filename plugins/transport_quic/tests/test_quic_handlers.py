"""The gossip handlers fed decoded-but-hostile frames (hypothesis), and this node's address
list read without a file descriptor per handshake."""

from __future__ import annotations

import math
import socket
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from meshcore_election_vram import elect
from meshcore_transport_quic import state as quic_state
from meshcore_transport_quic.fastlinks import FastLinks
from meshcore_transport_quic.frames import Frame, FrameError, Kind, decode_frame, encode_frame
from meshcore_transport_quic.gossip import MAX_HINTED, Gossip
from meshcore_transport_quic.links import PeerLink
from meshcore_transport_quic.quicstream import Traffic
from meshcore_transport_quic.state import DialError, Mesh

from meshcore.plan import ElectionRequest
from meshcore.state import MeshState, Peer

GB = 2**30
ME, SENDER = "me", "member"


class Sent:
    """A QUIC stream that records what the handler sends back (PONGs)."""

    def __init__(self, log: list[bytes]) -> None:
        self.log = log

    async def send(self, data: bytes) -> None:
        self.log.append(bytes(data))

    async def aclose(self) -> None:
        pass


class Proto:
    """The little of a MeshProtocol the frame handlers touch."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.peer_id, self.peer_addr, self.terminated = SENDER, ("127.0.0.1", 1), None
        self.traffic = Traffic()

    def open_stream(self, *, unidirectional: bool = False) -> Sent:
        return Sent(self.sent)

    def close(self, code: int = 0, reason: str = "") -> None:
        self.terminated = (code, reason)


class Node:
    """The little of a NodeHandle the frame handlers touch."""

    def __init__(self) -> None:
        self.id = ME
        self.state = MeshState(Peer(ME, vram=8 * GB, model="m", model_bytes=GB))


async def refuse_dial(host: str, port: int, fp: bytes) -> Any:
    raise DialError(f"{host}:{port}: test")


async def handle(frames: list[Frame]) -> tuple[Gossip, Node, PeerLink]:
    node = Node()
    mesh = Mesh(node, FastLinks(False))  # type: ignore[arg-type]
    gossip = Gossip(mesh, accept=accept_nothing, dial=refuse_dial)
    link = PeerLink(SENDER, b"f" * 32, "boot", Proto(), False,  # type: ignore[arg-type]
                    [("127.0.0.1", 1)])
    mesh.links[SENDER] = link
    async with anyio.create_task_group() as tg:
        mesh.task_group = tg
        for frame in frames:
            await gossip._handle_frame(link, frame)
        await anyio.sleep(0)
        tg.cancel_scope.cancel()  # held announcements and hinted dials: enough seen
    return gossip, node, link


async def accept_nothing(*args: Any) -> None:
    raise AssertionError("no AUTH stream here")


# ---------------------------------------------------------------- strategies

extreme_ints = st.sampled_from([0, -1, 1, 2**31, 2**53 + 1, 2**62, 2**63 - 1, -(2**63) + 1])
numbers = st.integers(-(2**63) + 1, 2**63 - 1) | extreme_ints | st.floats(
    allow_nan=False, allow_infinity=False) | st.sampled_from([1e308, -1e308, 5e-324])
texts = st.text(max_size=70) | st.sampled_from(["", "\u00e9" * 200, "x" * 5000, "::1", ME])
scalars = st.none() | st.booleans() | numbers | texts
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    texts, inner, max_size=3), max_leaves=8)

peer_fields = {"vram": numbers, "model_bytes": numbers, "seq": numbers, "rtt_ms": numbers,
               "role": st.sampled_from(["host", "worker", "client", "x"]) | values,
               "serving": values, "model": values, "addresses": values, "extra": values}
hostile_peer = st.fixed_dictionaries({"id": st.sampled_from([SENDER, SENDER, ME]) | texts},
                                     optional=peer_fields)
hint = st.fixed_dictionaries({"id": texts, "fp": st.just("ab" * 32) | texts,
                              "addrs": st.lists(st.tuples(texts, numbers), max_size=3) | values})
bodies = st.one_of(
    st.tuples(st.just(Kind.ANNOUNCE), st.fixed_dictionaries({"peer": hostile_peer | values})),
    st.tuples(st.just(Kind.PEERS), st.fixed_dictionaries({"peers": st.lists(
        hint | values, max_size=6) | values})),
    st.tuples(st.sampled_from([Kind.PING, Kind.PONG]), st.fixed_dictionaries({"t": values})),
    st.tuples(st.sampled_from([Kind.HELLO, Kind.WELCOME, Kind.CHALLENGE]),
              st.dictionaries(texts, values, max_size=3)),
)


def decoded(kind: Kind, body: dict[str, Any]) -> Frame:
    """What a peer's frame is after the wire: the decoder's bounds already applied."""
    try:
        return decode_frame(encode_frame(kind, body))
    except (FrameError, ValueError):
        assume(False)
        raise


def finite_record(peer: Peer) -> bool:
    return (0 <= peer.vram <= 2**62 and 0 <= peer.model_bytes <= 2**62
            and (peer.rtt_ms is None or math.isfinite(peer.rtt_ms)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(bodies, min_size=1, max_size=5))
def test_gossip_handlers_survive_hostile_values(frames: list[tuple[Kind, dict[str, Any]]]
                                                ) -> None:
    gossip, node, link = anyio.run(handle, [decoded(k, b) for k, b in frames])
    view = node.state.view()
    # a member changes its own record at most: this node's stays, nobody else appears
    assert view.me == node.state.me and view.me.id == ME and view.me.vram == 8 * GB
    assert {p.id for p in view.peers} <= {ME, SENDER}
    assert all(finite_record(p) for p in view.peers), view.peers
    assert link.rtt_ms is None or (math.isfinite(link.rtt_ms) and link.rtt_ms >= 0)
    assert len(gossip.hinted) <= MAX_HINTED and set(gossip.held) <= {SENDER}
    assert link.proto.terminated is None  # handled, never a crash that costs the link
    elect(view, ElectionRequest())  # and the election takes whatever was accepted


# ---------------------------------------------------------------- addresses, no fd per handshake


def test_addresses_are_read_once_and_kept_when_reading_fails(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    reads: list[bool] = []

    def fake_local_addresses(ipv6: bool) -> list[str]:
        reads.append(ipv6)
        if len(reads) > 1:
            raise OSError(24, "Too many open files")
        return ["192.0.2.7", "127.0.0.1"]

    monkeypatch.setattr(quic_state, "local_addresses", fake_local_addresses)
    mesh = Mesh(Node(), FastLinks(False))  # type: ignore[arg-type]
    for _ in range(100):  # a hundred handshakes: one read
        assert mesh.my_addresses() == ["192.0.2.7", "127.0.0.1"]
    assert len(reads) == 1
    assert mesh._addresses is not None
    read_at, value = mesh._addresses
    mesh._addresses = (read_at - quic_state.ADDRESS_TTL_S - 1, value)  # stale: read again
    assert mesh.my_addresses() == ["192.0.2.7", "127.0.0.1"]  # the refresh fails: last value
    assert len(reads) == 2 and "Too many open files" in caplog.text


def test_local_addresses_reads_this_machine() -> None:
    from meshcore_transport_quic.links import local_addresses

    found = local_addresses(socket.has_ipv6)
    assert found and found[-1] in ("127.0.0.1", "::1")

