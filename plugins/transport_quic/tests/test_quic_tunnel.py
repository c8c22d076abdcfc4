"""Tunnels carry bytes intact: 200 MB each way over 16 concurrent streams, fast path and QUIC."""

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

TOTAL = int(os.environ.get("MESH_TUNNEL_TEST_MB", "200")) * 1024 * 1024
STREAMS = int(os.environ.get("MESH_TUNNEL_TEST_STREAMS", "16"))
BLOCK = os.urandom(1024 * 1024 + 7)  # odd size: chunk edges never line up with the block


async def pump_one(stream: ByteStream, size: int, seed: int) -> tuple[str, str]:
    sent, got = hashlib.sha256(), hashlib.sha256()

    async def writer() -> None:
        offset, left = seed * 4099, size
        while left:
            start = offset % len(BLOCK)
            chunk = BLOCK[start:start + min(left, 256 * 1024)]
            await stream.send(chunk)
            sent.update(chunk)
            offset += len(chunk)
            left -= len(chunk)
        await stream.send_eof()

    async def reader() -> None:
        received = 0
        with contextlib.suppress(anyio.EndOfStream):
            while True:
                chunk = await stream.receive(1024 * 1024)
                got.update(chunk)
                received += len(chunk)
        assert received == size, f"stream {seed}: {received} of {size} bytes came back"

    async with anyio.create_task_group() as tg:
        tg.start_soon(writer)
        tg.start_soon(reader)
    await stream.aclose()
    return sent.hexdigest(), got.hexdigest()


async def carry(a: Any, b: Any, tg: Any) -> None:
    b.services["echo"] = ("127.0.0.1", await tg.start(echo_server))
    results: list[tuple[str, str]] = []

    async def one(i: int) -> None:
        stream = await a.transport.connect(b.id, "echo")
        results.append(await pump_one(stream, TOTAL // STREAMS, i))

    async with anyio.create_task_group() as inner:
        for i in range(STREAMS):
            inner.start_soon(one, i)
    assert len(results) == STREAMS
    for sent, got in results:
        assert sent == got, "a tunnel corrupted bytes (sha256 differs)"


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "quic-fallback"])
async def test_tunnel_carries_bulk_both_ways_intact(quic_mesh: Any, fast: bool) -> None:
    a = await quic_mesh.add(quic_fast_path=fast)
    b = await quic_mesh.add(quic_fast_path=fast)
    want = "TCP+AES-GCM" if fast else "QUIC"
    await wait_for(lambda: a.transport.link(b.id) == want, 10, f"{want} link")
    await carry(a, b, quic_mesh.tg)
    assert a.transport.link(b.id) == want  # no silent fallback happened
