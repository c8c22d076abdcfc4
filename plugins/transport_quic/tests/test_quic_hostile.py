"""Hostile input that used to stop a node: decoders that raised outside their error type, and
handlers that met decoded-but-hostile values. Unit, fuzz, in-process and real-process tests."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import ssl
import sys
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest
from aioquic.asyncio.client import connect
from aioquic.quic.configuration import QuicConfiguration
from hypothesis import given, settings
from hypothesis import strategies as st
from meshcore_transport_quic.auth import AuthError, check_hello, check_welcome
from meshcore_transport_quic.frames import (
    HEADER,
    FrameError,
    Kind,
    StreamType,
    decode_frame,
    encode_frame,
)
from meshcore_transport_quic.token import decode_token
from meshcore_transport_quic.wire import ALPN
from quic_helpers import QuicMesh, wait_for
from test_quic_mesh import ids, send_raw
from test_quic_processes import Proc, poll, spawn

from meshcore.state import Peer

__all__ = ["spawn"]  # the fixture, imported for the real-process tests below

HUGE_INT = "9" * 5000  # Python's json refuses it with a bare ValueError (4,300-digit limit)


def raw_frame(kind: Kind, payload: str) -> bytes:
    data = payload.encode()
    return HEADER.pack(1, kind, len(data)) + data


# ---------------------------------------------------------------- decoders are total


@pytest.mark.parametrize("payload", [
    f'{{"id": {HUGE_INT}}}', '{"vram": 1e400}', '{"t": NaN}', '{"t": -Infinity}',
    '{"seq": 99999999999999999999999}', "[" * 100_000,
])
def test_hostile_json_is_a_frame_error(payload: str) -> None:
    with pytest.raises(FrameError):
        decode_frame(raw_frame(Kind.HELLO, payload))


def test_bounded_json_still_decodes_real_values() -> None:
    body = {"seq": 2**62, "t": 1234.5, "vram": 80 * 2**30, "neg": -7}
    assert decode_frame(encode_frame(Kind.ANNOUNCE, body)).body == body


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)
hello_keys = st.sampled_from(["id", "boot", "nonce", "cert", "sig", "mac", "info"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(hello_keys, json_values, max_size=7) | st.dictionaries(
    hello_keys, st.text(max_size=80), max_size=7))
def test_check_hello_raises_only_auth_errors(body: dict[str, Any]) -> None:
    with pytest.raises(AuthError):
        check_hello(body, b"s" * 32, b"f" * 32, b"n" * 16)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["id", "boot", "mac", "info"]), json_values, max_size=4))
def test_check_welcome_raises_only_auth_errors(body: dict[str, Any]) -> None:
    with pytest.raises(AuthError):
        check_welcome(body, b"s" * 32, b"c" * 32)


def test_a_non_ascii_mac_is_refused_not_a_type_error() -> None:
    body = {"id": "x", "boot": "b", "nonce": "00" * 16, "challenge": "6e" * 16, "cert": "AAAA",
            "sig": "00", "mac": "\u00e9" * 64}
    with pytest.raises(AuthError, match="mac"):
        check_hello(body, b"s" * 32, b"f" * 32, b"n" * 16)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["id", "vram", "model", "model_bytes", "seq", "role",
                                        "addresses", "extra", "version", "split", "draft"]),
                       json_values, max_size=8))
def test_peer_records_are_accepted_in_range_or_refused_with_value_error(
        data: dict[str, Any]) -> None:
    try:
        peer = Peer.from_dict({"id": "n1", **data})
    except ValueError:
        return
    assert 0 <= peer.vram <= 2**62 and 0 <= peer.model_bytes <= 2**62


# ---------------------------------------------------------------- a member's hostile gossip


@pytest.mark.anyio
async def test_a_members_hostile_gossip_never_stops_the_node(
        quic_mesh: QuicMesh, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    a = await quic_mesh.add()
    b = await quic_mesh.add()
    await wait_for(lambda: ids(a) == {a.id, b.id}, 10, "a and b linked")
    gossip = bytes([StreamType.GOSSIP])
    me = b.state.me.to_dict()
    for kind, payload in [
        (Kind.PEERS, '{"peers": {"not": "a list"}}'),
        (Kind.PEERS, '{"peers": 7}'),
        (Kind.PONG, '{"t": ' + "9" * 400 + "}"),
        (Kind.ANNOUNCE, '{"peer": {"id": "x", "vram": ' + HUGE_INT + "}}"),
        (Kind.ANNOUNCE, json.dumps({"peer": {**me, "seq": 10**6}})[:-2]
         + ', "vram": 1e400, "model_bytes": 1e309}}'),
        (Kind.ANNOUNCE, json.dumps({"peer": {**me, "seq": 10**6, "vram": 10**18 * 9}})),
        (Kind.ANNOUNCE, json.dumps({"peer": {**me, "seq": 10**6, "id": "\u00e9" * 300}})),
    ]:
        await send_raw(b, a.id, gossip + raw_frame(kind, payload))
    await wait_for(lambda: sum("rejected" in r.getMessage() for r in caplog.records) >= 6, 10,
                   "every hostile frame rejected and logged")
    # the member stays connected, gossip still flows, and the plan still holds
    b.state.update_me(extra={**b.state.me.extra, "after": "hostile"})
    await wait_for(lambda: (a.view().get(b.id) or b.state.me).extra.get("after") == "hostile",
                   10, "gossip after the hostile frames")
    assert a.transport.links[b.id].proto.terminated is None
    assert a.view().get(b.id) == dataclasses.replace(b.state.me, rtt_ms=a.view().get(b.id).rtt_ms)
    await wait_for(lambda: a.plan.host_id == b.plan.host_id is not None, 10, "one plan")


# ---------------------------------------------------------------- an outsider, real processes


async def hostile_hello(port: int, payload: bytes) -> str:
    """Open a QUIC connection to a node (no token: any certificate is accepted by the client)
    and send ``payload`` on an AUTH stream; returns how the node answered."""
    cfg = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE)
    with anyio.fail_after(15):
        async with connect("127.0.0.1", port, configuration=cfg) as client:
            reader, writer = await client.create_stream()
            writer.write(bytes([StreamType.AUTH]) + payload)
            try:
                answer = await asyncio.wait_for(reader.read(), 8)
            except (TimeoutError, ConnectionError):
                answer = b""
            finally:
                writer.close()
            return answer.decode("latin-1")


def hello_frame(**fields: Any) -> bytes:
    body = {"id": "outsider", "boot": "b", "nonce": "00" * 16, "cert": "AAAA", "sig": "00",
            "mac": "00" * 32, **fields}
    return encode_frame(Kind.HELLO, body)


OUTSIDER_PAYLOADS = {
    "a 5,000-digit integer": raw_frame(Kind.HELLO, '{"id": "x", "boot": ' + HUGE_INT + "}"),
    "a non-ASCII mac": hello_frame(mac="\u00e9" * 64),
    "a bad port in the info": hello_frame(info={"port": "x"}),
    "an infinite number": raw_frame(Kind.HELLO, '{"id": "x", "boot": 1e400}'),
    "NaN": raw_frame(Kind.HELLO, '{"id": NaN}'),
    "deep nesting": raw_frame(Kind.HELLO, "[" * 50_000),
    "a list instead of an object": raw_frame(Kind.HELLO, "[1, 2]"),
    "garbage bytes": b"\x01\x01\x00\x00\x00\x05hello\xff",
}


@pytest.mark.skipif(sys.platform != "linux", reason="real processes on loopback")
def test_an_outsiders_hostile_hello_never_stops_a_real_node(spawn: Callable[..., Proc]) -> None:
    a = spawn("a")
    b = spawn("b", "--join", a.token)
    b_id = b.node_id()
    poll(lambda: b_id in a.peers(), 20, "b to join a")
    port = decode_token(a.token).port
    for what, payload in OUTSIDER_PAYLOADS.items():
        anyio.run(hostile_hello, port, payload)
        assert a.popen.poll() is None, f"the node exited after {what}:\n{a.log}"
        r = httpx.get(f"http://127.0.0.1:{a.api_port}/health", timeout=5)
        assert r.status_code in (200, 503), (what, r.text)
    assert "Traceback" not in a.log, a.log
    assert a.log.count("refused a node") >= len(OUTSIDER_PAYLOADS) - 1, a.log
    # the member is still there, and a newcomer still gets in
    assert b_id in a.peers()
    c = spawn("c", "--join", a.token)
    c_id = c.node_id()
    poll(lambda: {b_id, c_id} <= a.peers(), 20, "a newcomer to join after the attacks")
