"""MESH_LLM_SPLICE_TRACE: every splice end of a fast-path tunnel notes when each chunk reached it
(bench/gpu.py lines up the host's and the worker's notes hop by hop); unset, the ends are the
plain ones."""

from __future__ import annotations

import functools
import os
from array import array
from pathlib import Path

import anyio
import pytest
from meshcore_transport_quic.fastpath import open_fast_raw
from meshcore_transport_quic.fastserver import FastPathServer
from meshcore_transport_quic.splice import TRACE_ENV, SpliceEnd, TracedEnd, new_end, serve_forward
from quic_helpers import echo_server

pytestmark = pytest.mark.anyio
KEY = os.urandom(32)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def notes(path: Path) -> list[tuple[int, int]]:
    values = array("q")
    values.frombytes(path.read_bytes())
    return list(zip(values[::2], values[1::2], strict=True))


async def test_without_the_variable_an_end_is_a_plain_one(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.delenv(TRACE_ENV, raising=False)
    assert type(new_end(None, "dial")) is SpliceEnd


async def no_stream() -> object:
    raise AssertionError("the fast path should have taken the connection")


async def test_both_ends_of_a_tunnel_note_each_chunk_in_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TRACE_ENV, str(tmp_path))
    messages = [b"a" * 100, b"b" * 3000, b"c" * 20]
    async with anyio.create_task_group() as tg:
        echo = await tg.start(echo_server)
        server = FastPathServer({KEY: "peer"}, lambda peer, name: ("127.0.0.1", echo))
        port = await tg.start(server.serve, 0)
        opener = functools.partial(open_fast_raw, "127.0.0.1", port, KEY, "rpc")
        forward = await tg.start(functools.partial(serve_forward, no_stream,
                                                   open_raw=opener))
        async with await anyio.connect_tcp("127.0.0.1", forward) as client:
            for message in messages:  # one at a time: each crosses and comes back
                await client.send(message)
                got = b""
                while len(got) < len(message):
                    got += await client.receive()
                assert got == message
        with anyio.fail_after(5):
            while len(list(tmp_path.glob("*.trace"))) < 4:  # written as the ends close
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()
    files = {p.name.split("-")[0] + "-" + p.name.rsplit("-", 1)[1]: p
             for p in tmp_path.glob("*.trace")}
    assert sorted(files) == ["accept-local.trace", "accept-tunnel.trace",
                             "dial-local.trace", "dial-tunnel.trace"]
    seen = {name: notes(path) for name, path in files.items()}
    for name, chunks in seen.items():  # every end got every byte, noted in time order
        assert sum(n for _, n in chunks) == sum(map(len, messages)), name
        assert [t for t, _ in chunks] == sorted(t for t, _ in chunks), name
    # One clock for both ends: a message reaches the host's end from the client, then the
    # worker's from the tunnel, the echo, and the host's end from the tunnel, in that order.
    hops = ["dial-local.trace", "accept-tunnel.trace", "accept-local.trace", "dial-tunnel.trace"]
    first = [seen[name][0][0] for name in hops]
    assert first == sorted(first)
    assert isinstance(new_end(None, "dial"), TracedEnd)
