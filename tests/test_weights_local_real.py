"""Issue 6, "weights stay local": bytes through the rpc tunnel while the host loads a split.

The host counts what each forward carries (``meshcore.relay.Tally``, shown in
``/mesh/status`` under ``tunnels``) and its llama.cpp backend reports
``load_tunneled_bytes``: bytes sent to workers between llama-server's start and its first
healthy ``/health``. SmolLM2 cannot show the point (only its ``token_embd`` is over
llama.cpp's 10 MiB hash threshold), so the real tests generate a random-weight llama whose
every weight matrix is over it: F16, 2304 wide with as many KV heads as heads (q, k, v, o
and the FFN are each 2304 x 2304 x 2 bytes), 4 layers so that B's 0.33 share is a whole
block plus the output layer on a CPU host, and a 4096-token vocabulary (336 MB in all).
A B that has the file seeds its rpc-server's hash cache and almost nothing crosses; a B
started without it gets its whole shard through the tunnel.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from anyio.abc import ByteStream, SocketAttribute
from meshcore_testing.pytest_plugin import MeshProcess
from meshcore_transport_quic.splice import serve_forward
from test_client import mesh_status, wait_status
from test_split_real import backend_missing

from meshcore.relay import Tally

ENV = {"MESH_LLM_THREADS": "1"}
BENCH = Path(__file__).resolve().parent.parent / "bench"
# n_layer, d_model, d_ff, n_head, n_kv_head, vocab, ctx, rope base (bench/gpu_model.Shape)
SHAPE = (4, 2304, 2304, 36, 36, 4096, 512, 10000.0)


# ---------------------------------------------------------------- the counter itself (fast)


@pytest.mark.anyio
@pytest.mark.parametrize("raw", [False, True], ids=["streams", "splice"])
async def test_forward_tallies_bytes_each_way(raw: bool) -> None:
    """Both relay paths count every byte: the upload as sent, the answer as received."""
    up, down = 1_000_003, 12_345

    async def answer(stream: ByteStream) -> None:
        async with stream:
            got = 0
            async for chunk in stream:
                got += len(chunk)
            await stream.send(b"x" * down if got == up else b"short")

    async def open_raw(factory: Callable[[], asyncio.Protocol]) -> asyncio.Transport:
        transport, _ = await asyncio.get_running_loop().create_connection(
            factory, "127.0.0.1", target)
        return transport

    async def open_remote() -> ByteStream:
        return await anyio.connect_tcp("127.0.0.1", target)

    def upload(port: int) -> bytes:
        import socket

        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(b"u" * up)
            conn.shutdown(socket.SHUT_WR)
            parts = []
            while chunk := conn.recv(65536):
                parts.append(chunk)
            return b"".join(parts)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    target = listener.extra(SocketAttribute.local_port)
    tally = Tally()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, answer)
            port = await tg.start(functools.partial(
                serve_forward, open_raw=open_raw if raw else None, tally=tally), open_remote)
            assert len(await anyio.to_thread.run_sync(upload, port)) == down
            tg.cancel_scope.cancel()
    finally:
        await listener.aclose()
    assert (tally.sent, tally.received, tally.connections) == (up, down, 1)


@pytest.mark.anyio
async def test_node_status_lists_tunnel_bytes(mesh_harness: Any) -> None:
    """``node.status()["tunnels"]`` shows each forward's bytes to and from its peer."""
    from meshcore.state import Serving

    async with mesh_harness() as mesh:
        host = await mesh.add(8, split=True)
        worker = await mesh.add(4)
        await mesh.wait_for(lambda: host.view().get(worker.id) is not None
                            and host.view().get(worker.id).serving is Serving.RPC,
                            what="the worker's rpc service")
        port = await host.forward_port(worker.id, "rpc")
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(b"ping through the mesh")  # the fake rpc service echoes
            with anyio.fail_after(10):
                assert await stream.receive() == b"ping through the mesh"
        await mesh.wait_for(lambda: host.tunnels[(worker.id, "rpc")].received == 21,
                            what="the echo to be counted")
        tunnels = [t for t in host.status()["tunnels"] if t["service"] == "rpc"]
        assert tunnels == [{"peer": worker.id, "service": "rpc", "port": port,
                            "link": host.transport.link(worker.id),
                            "bytes_to_peer": 21, "bytes_from_peer": 21, "connections": 1}]
        assert tunnels[0]["link"] == "memory"  # the test kit's transport names its path


# ---------------------------------------------------------------- real llama.cpp


@pytest.fixture(scope="session")
def big_tensor_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight llama GGUF (bench/gpu_model.py) whose weight matrices are all over
    the 10 MiB hash threshold; written once per session."""
    if missing := backend_missing():
        pytest.skip(missing)
    from meshcore_backend_llamacpp.models import smollm2_path

    spec = importlib.util.spec_from_file_location("gpu_model", BENCH / "gpu_model.py")
    assert spec is not None and spec.loader is not None
    gpu_model = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_model", gpu_model)
    spec.loader.exec_module(gpu_model)
    gpu_model.SHAPES["weights-local-test"] = gpu_model.Shape(*SHAPE)
    out = tmp_path_factory.mktemp("weights-local")
    tokenizer = out / "tokenizer.json.gz"
    gpu_model.export_tokenizer(smollm2_path(), tokenizer)
    model = out / "random-llama-2304x4-f16.gguf"
    gpu_model.write_model(model, tokenizer, "weights-local-test", "f16")
    return model


def worker_shard(model: Path, argv: list[str], n_layer: int) -> tuple[int, int]:
    """(all, hashed) weight bytes llama-server puts on its one rpc device on a CPU host: the
    last ``-ngl`` of the n_layer + 1 blocks (the output layer being the last)."""
    from meshcore_backend_llamacpp.hashcache import HASH_THRESHOLD, tensor_spans

    ngl = min(int(argv[argv.index("-ngl") + 1]), n_layer + 1)
    first = n_layer + 1 - ngl
    total = hashed = 0
    for span in tensor_spans(model):
        block = re.match(r"blk\.(\d+)\.", span.name)
        on_worker = int(block[1]) >= first if block else span.name.startswith("output")
        if on_worker:
            total += span.size
            hashed += span.size if span.size > HASH_THRESHOLD else 0
    return total, hashed


def split_load(mesh_process: Callable[..., MeshProcess], model: Path, *, seeded: bool
               ) -> tuple[int, int, dict[str, Any]]:
    """Start A (--split) and B (with the model file or without); returns (bytes tunneled to
    B during A's load, B's shard, A's status) once A's split answers a completion."""
    a = mesh_process("--model", str(model), "--max-vram", "8", "--split", "--no-draft",
                     env=ENV, timeout=240)
    assert a.token, a.log()
    b_model = ("--model", str(model)) if seeded else ()
    b = mesh_process(*b_model, "--max-vram", "4", "--join", a.token, "--no-draft", env=ENV,
                     timeout=240)
    status = wait_status(a, lambda s: s["plan"]["state"] == "SPLIT" and s["backend"]["rpc"]
                         and s["backend"].get("load_tunneled_bytes") is not None,
                         "A's split llama-server to load", 240)
    reply = httpx.post(f"{a.url}/completions", json={"prompt": "The capital of France is",
                       "max_tokens": 4, "temperature": 0}, timeout=120)
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"], reply.text
    b_status = mesh_status(b)
    assert b_status["me"]["serving"] == "rpc", b_status
    assert (b_status["backend"].get("seeded_bytes") is not None) == seeded, b_status["backend"]
    backend = status["backend"]
    shard, hashed = worker_shard(model, backend["llama_server"]["argv"], backend["n_layer"])
    print(f"\n{'seeded' if seeded else 'unseeded'}: B's shard {shard / 1e6:.1f} MB "
          f"({hashed / 1e6:.1f} MB in tensors over 10 MiB); "
          f"{backend['load_tunneled_bytes'] / 1e6:.2f} MB tunneled during load = "
          f"{backend['load_tunneled_bytes'] / shard:.1%} of the shard")
    assert hashed > 0.99 * shard, "the test model must be made of hashable tensors"
    (tunnel,) = [t for t in status["tunnels"] if t["service"] == "rpc"]
    assert tunnel["peer"] == b_status["id"]
    assert tunnel["bytes_to_peer"] >= backend["load_tunneled_bytes"]
    return int(backend["load_tunneled_bytes"]), shard, status


@pytest.mark.real
def test_seeded_worker_gets_under_10_percent_of_its_shard(
        mesh_process: Callable[..., MeshProcess], big_tensor_model: Path) -> None:
    """Acceptance: with the cache pre-seeded, load tunnels under 10% of the worker's shard."""
    tunneled, shard, _ = split_load(mesh_process, big_tensor_model, seeded=True)
    assert 0 < tunneled < 0.10 * shard, (tunneled, shard)


@pytest.mark.real
def test_worker_without_the_file_gets_its_whole_shard(
        mesh_process: Callable[..., MeshProcess], big_tensor_model: Path) -> None:
    """The contrast: no local copy, no seeding, the shard crosses (the counter works)."""
    tunneled, shard, _ = split_load(mesh_process, big_tensor_model, seeded=False)
    assert tunneled > 0.5 * shard, (tunneled, shard)
