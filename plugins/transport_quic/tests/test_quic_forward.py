"""The host end of tunnels (node.forward_port): on the fast path the callback splice
(transport.take_connection) carries bytes intact with half-close; over QUIC the core's stream
relay does."""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Any

import anyio
import pytest
from anyio.abc import ByteStream
from quic_helpers import echo_server, wait_for

pytestmark = pytest.mark.anyio

EACH = 8 * 1024 * 1024 + 13
BLOCK = os.urandom(1024 * 1024 + 7)


async def echo_through(port: int, seed: int) -> None:
    stream: ByteStream = await anyio.connect_tcp("127.0.0.1", port)
    sent, got = hashlib.sha256(), hashlib.sha256()
    received = 0

    async def writer() -> None:
        offset, left = seed * 4099, EACH
        while left:
            start = offset % len(BLOCK)
            chunk = BLOCK[start:start + min(left, 200_000)]
            await stream.send(chunk)
            sent.update(chunk)
            offset, left = offset + len(chunk), left - len(chunk)
        await stream.send_eof()  # half-close: the echo must still come back in full

    async def reader() -> None:
        nonlocal received
        with contextlib.suppress(anyio.EndOfStream):
            while True:
                chunk = await stream.receive(1024 * 1024)
                got.update(chunk)
                received += len(chunk)

    async with stream, anyio.create_task_group() as tg:
        tg.start_soon(writer)
        tg.start_soon(reader)
    assert received == EACH, f"connection {seed}: {received} of {EACH} bytes came back"
    assert sent.hexdigest() == got.hexdigest(), "the tunnel corrupted bytes"


@pytest.mark.parametrize(("fast", "process"), [(True, "0"), (True, "1"), (False, "1")],
                         ids=["fast-path", "fast-path-relay-process", "quic-fallback"])
async def test_forward_port_carries_bytes_intact(quic_mesh: Any, fast: bool, process: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_LLM_RELAY_PROCESS", process)
    a = await quic_mesh.add(quic_fast_path=fast)
    b = await quic_mesh.add(quic_fast_path=fast)
    want = "TCP+AES-GCM" if fast else "QUIC"
    await wait_for(lambda: a.transport.link(b.id) == want, 10, f"{want} link")
    b.services["echo"] = ("127.0.0.1", await quic_mesh.tg.start(echo_server))
    taken: list[bool] = []
    take = a.transport.take_connection

    async def counting(*args: Any, **kwargs: Any) -> bool:
        took = await take(*args, **kwargs)
        taken.append(took)
        return took

    monkeypatch.setattr(a.transport, "take_connection", counting)
    port = await a.forward_port(b.id, "echo")
    async with anyio.create_task_group() as tg:
        for i in range(4):
            tg.start_soon(echo_through, port, i)
    assert len(taken) == 4
    assert all(taken) == fast and any(taken) == fast, "wrong relay path was used"
    assert a.transport.link(b.id) == want
    relay = a.transport.fast.relay
    assert (relay is not None and relay.taken) == (4 if fast and process == "1" else False)
    # the byte counts come back from the relay process too (every 0.1 s, and at the end)
    await wait_for(lambda: [(t["bytes_to_peer"], t["bytes_from_peer"], t["connections"])
                            for t in a.tunnel_status() if t["service"] == "echo"]
                   == [(4 * EACH, 4 * EACH, 4)], 5, "the tunnel's byte counts")
