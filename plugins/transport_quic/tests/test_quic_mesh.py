"""In-process QUIC meshes: full mesh by gossip, refusals, impersonation, hostile input."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from meshcore_transport_quic.frames import HEADER, MAX_FRAME, Kind, StreamType, encode_frame
from meshcore_transport_quic.token import decode_token
from meshcore_transport_quic.transport import JoinRefused
from quic_helpers import FAST_TIMERS, QuicMesh, echo_server, wait_for

from meshcore.state import Serving

pytestmark = pytest.mark.anyio


def ids(node: Any) -> set[str]:
    return {p.id for p in node.view().peers}


def leaf_errors(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in leaf_errors(sub)]
    return [exc]


async def expect_refused(tmp_path: Path, token: str, node_id: str = "intruder") -> str:
    """Run a node joining with ``token``; it must stop with JoinRefused. Returns the message."""
    from meshcore.config import NodeConfig
    from meshcore.node import Node

    cfg = NodeConfig(model="fake-model", joins=(token,), transport="quic", backend="fake",
                     api_port=0, settle_s=0.05, node_id=node_id,
                     state_dir=tmp_path / "intruder-home", options=dict(FAST_TIMERS))
    node = Node(cfg)
    with pytest.raises(BaseException) as caught:
        with anyio.fail_after(20):
            await node.run()
    refused = [e for e in leaf_errors(caught.value) if isinstance(e, JoinRefused)]
    assert refused, f"expected JoinRefused, got {caught.value!r}"
    return str(refused[0])


async def test_three_nodes_form_a_full_mesh_and_a_clean_leave_is_seen(quic_mesh: QuicMesh
                                                                        ) -> None:
    a = await quic_mesh.add()
    b = await quic_mesh.add()
    c = await quic_mesh.add(joins=(b.transport.invite_token(),))  # learns a through gossip
    nodes = (a, b, c)
    everyone = {a.id, b.id, c.id}
    await wait_for(lambda: all(ids(n) == everyone for n in nodes), 10, "3-node full mesh")
    await wait_for(lambda: all(n.transport.link(p.id) == "TCP+AES-GCM" for n in nodes
                               for p in n.view().others), 10, "direct fast-path links")
    assert all(p.addresses for n in nodes for p in n.view().others), "gossip carries addresses"
    await wait_for(lambda: all(p.rtt_ms is not None for p in a.view().others), 10, "RTT")
    host = next(n for n in nodes if n.id == a.plan.host_id)  # the host's table is announced
    await wait_for(lambda: set(host.state.me.extra.get("rtt_ms", {})) == everyone - {host.id},
                   10, "published RTT table")
    status = a.status()
    assert {p["link"] for p in status["peers"]} == {"TCP+AES-GCM"}

    b.state.update_me(extra={**b.state.me.extra, "marker": 42})
    await wait_for(lambda: all((n.view().get(b.id) or b.state.me).extra.get("marker") == 42
                               for n in (a, c)), 10, "announcement of a change")

    c.stop()
    await wait_for(lambda: ids(a) == ids(b) == {a.id, b.id}, 10, "the leaver removed")
    assert c.id not in a.transport.lost, "a clean leave must not wait for the reconnect window"


async def test_wrong_secret_is_refused_with_a_reason(quic_mesh: QuicMesh, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    a = await quic_mesh.add()
    token = decode_token(a.transport.invite_token())
    forged = dataclasses.replace(token, secret=os.urandom(32)).encode()
    message = await expect_refused(tmp_path, forged)
    assert "mesh secret proof failed" in message
    assert "intruder" not in ids(a)
    assert any("refused a node" in r.getMessage() and "mesh secret" in r.getMessage()
               for r in caplog.records)


async def test_wrong_fingerprint_is_refused_with_a_reason(quic_mesh: QuicMesh,
                                                          tmp_path: Path) -> None:
    a = await quic_mesh.add()
    token = decode_token(a.transport.invite_token())
    forged = dataclasses.replace(token, fingerprint=os.urandom(32)).encode()
    message = await expect_refused(tmp_path, forged)
    assert "presented certificate" in message and "another node" in message
    assert "intruder" not in ids(a)


async def test_a_node_id_cannot_be_taken_over_by_another_certificate(
        quic_mesh: QuicMesh, tmp_path: Path) -> None:
    a = await quic_mesh.add()
    b = await quic_mesh.add()
    await wait_for(lambda: ids(a) == {a.id, b.id}, 10, "a and b linked")
    message = await expect_refused(tmp_path, a.transport.invite_token(), node_id=b.id)
    assert "already belongs to another certificate" in message
    assert a.transport.links[b.id].fp == b.transport.identity.fingerprint


async def send_raw(node: Any, peer_id: str, data: bytes) -> None:
    stream = node.transport.links[peer_id].proto.open_stream(unidirectional=True)
    await stream.send(data)
    await stream.aclose()


async def test_hostile_input_leaves_the_node_running_and_connected(
        quic_mesh: QuicMesh, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    a = await quic_mesh.add()
    b = await quic_mesh.add()
    await wait_for(lambda: ids(a) == {a.id, b.id} and a.transport.link(b.id) == "TCP+AES-GCM", 10,
                   "a and b linked")
    # garbage datagrams at the QUIC port, including ones shaped like a QUIC Initial
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for size in (1, 7, 50, 1200, 1350, 1500):
            for first in (b"\x00", b"\xc0", b"\xff", os.urandom(1)):
                sock.sendto(first + os.urandom(size - 1), ("127.0.0.1", a.transport.port))
    gossip = bytes([StreamType.GOSSIP])
    await send_raw(b, a.id, gossip + HEADER.pack(1, Kind.ANNOUNCE, MAX_FRAME + 1) + b"{}")
    await send_raw(b, a.id, gossip + HEADER.pack(1, Kind.ANNOUNCE, 100) + b'{"peer"')
    await send_raw(b, a.id, gossip + HEADER.pack(1, Kind.ANNOUNCE, 3) + b"\xff\xfe{")
    await send_raw(b, a.id, gossip + HEADER.pack(7, Kind.PING, 2) + b"{}")
    await send_raw(b, a.id, bytes([99]) + b"unknown stream type")
    impostor = dataclasses.replace(b.state.me, id="impostor", seq=99).to_dict()
    await send_raw(b, a.id, gossip + encode_frame(Kind.ANNOUNCE, {"peer": impostor}))
    overwrite = dataclasses.replace(a.state.me, vram=1, seq=999).to_dict()
    await send_raw(b, a.id, gossip + encode_frame(Kind.ANNOUNCE, {"peer": overwrite}))
    await send_raw(b, a.id, gossip + encode_frame(Kind.ANNOUNCE, {"peer": {"id": b.id,
                                                                           "vram": -5}}))
    await wait_for(lambda: sum("rejected" in r.getMessage() for r in caplog.records) >= 6, 10,
                   "every bad frame rejected and logged")
    assert "impostor" not in ids(a)
    assert a.state.me.vram > 1
    # still connected, and gossip still flows both ways
    b.state.update_me(extra={**b.state.me.extra, "after": "garbage"})
    await wait_for(lambda: (a.view().get(b.id) or b.state.me).extra.get("after") == "garbage",
                   10, "gossip after garbage")
    assert a.transport.links[b.id].proto.terminated is None
    await anyio.sleep(FAST_TIMERS["quic_dead_after_s"] * 1.5)
    assert ids(a) == {a.id, b.id} and ids(b) == {a.id, b.id}


async def test_the_core_harness_runs_quic_nodes_and_streams_through_them(mesh_harness: Any
                                                                         ) -> None:
    async with mesh_harness(transport="quic") as mesh:
        nodes = [await mesh.add(v) for v in (4, 12, 8)]
        host = nodes[1]
        await mesh.wait_for(lambda: all(len(n.view().peers) == 3 for n in nodes), what="peers")
        await mesh.wait_for(lambda: {n.plan.host_id for n in nodes} == {host.id},
                            what="everyone elects the 12 GB node")
        await mesh.wait_for(lambda: all((n.view().get(host.id) or host.state.me).serving
                                        is Serving.READY for n in nodes), what="host ready")
        body = {"messages": [{"role": "user", "content": "one two three"}], "stream": True}
        async with httpx.AsyncClient() as client:
            url = f"http://127.0.0.1:{nodes[0].api_port}/v1/chat/completions"
            async with client.stream("POST", url, json=body) as r:
                assert r.status_code == 200
                events = [line async for line in r.aiter_lines() if line.startswith("data:")]
        assert events[-1] == "data: [DONE]"
        words = "".join(json.loads(e[5:])["choices"][0]["delta"].get("content", "")
                        for e in events[:-1])
        assert words == " one two three"
        assert nodes[0].transport.link(host.id) == "TCP+AES-GCM"


async def test_an_unreachable_fast_path_falls_back_to_quic(quic_mesh: QuicMesh) -> None:
    a = await quic_mesh.add()
    b = await quic_mesh.add()
    await wait_for(lambda: a.transport.link(b.id) == "TCP+AES-GCM", 10, "fast link")
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    a.transport.links[b.id].fast_port = dead_port
    b.services["echo"] = ("127.0.0.1", await quic_mesh.tg.start(echo_server))
    stream = await a.transport.connect(b.id, "echo")
    await stream.send(b"over quic")
    assert await stream.receive() == b"over quic"
    await stream.aclose()
    assert a.transport.link(b.id) == "QUIC"
    assert "cannot reach" in a.transport.links[b.id].fast_why
    link = a.transport.links[b.id]  # refused, but b answers its PING: not taken for dead
    await anyio.sleep(a.transport.mesh.suspect_after_s + 1.0)
    assert a.transport.links.get(b.id) is link and not link.gone
