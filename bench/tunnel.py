"""Tunnel benchmark: bulk MB/s and request/response round trip over raw TCP, the TLS-TCP fast
path and the QUIC fallback, measured in one run, with the ratios.

Two processes on loopback, like two machines: this one runs node A (the client side), a child
runs node B with an echo and a sink service. Raw TCP goes straight to B's services; the
tunnels go A -> B -> service. Usage: ``.venv/bin/python bench/tunnel.py [--mb 200]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import ByteStream

CHUNK = 256 * 1024
PING = b"x" * 64


# ---------------------------------------------------------------- services (child side)

async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    total = 0
    while chunk := await reader.read(1024 * 1024):
        total += len(chunk)
    writer.write(total.to_bytes(8, "big"))
    await writer.drain()
    writer.close()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while chunk := await reader.read(65536):
        writer.write(chunk)
        await writer.drain()
    writer.close()


def _config(home: Path, node_id: str, joins: tuple[str, ...], fast: bool) -> Any:
    from meshcore.config import NodeConfig

    return NodeConfig(model="fake-model", joins=joins, transport="quic", backend="fake",
                      api_port=0, node_id=node_id, state_dir=home / node_id,
                      options={"quic_fast_path": fast, "quic_addresses": ["127.0.0.1"]})


async def serve_child(home: Path) -> None:
    """Node B (twice: with and without the fast path) plus echo and sink; prints JSON."""
    from meshcore.node import Node

    sink = await asyncio.start_server(_sink, "127.0.0.1", 0)
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    ports = {"sink": sink.sockets[0].getsockname()[1], "echo": echo.sockets[0].getsockname()[1]}
    async with anyio.create_task_group() as tg:
        from meshcore.relay import serve_forward

        for name in ("sink", "echo"):  # the relay hop alone: plain TCP through meshcore.relay
            async def opener(port: int = ports[name]) -> ByteStream:
                return await anyio.connect_tcp("127.0.0.1", port)

            ports[f"relay-{name}"] = await tg.start(serve_forward, opener)
        tokens = {}
        for fast in (True, False):
            node = Node(_config(home, f"b-{'fast' if fast else 'quic'}", (), fast))
            await tg.start(node.run)
            node.services.update({k: ("127.0.0.1", v) for k, v in ports.items()})
            tokens["fast" if fast else "quic"] = node.transport.invite_token()
        print(json.dumps({"ports": ports, "tokens": tokens}), flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)  # until the parent closes our stdin
        tg.cancel_scope.cancel()


# ---------------------------------------------------------------- measurements (parent side)

async def bulk(stream: ByteStream, size: int) -> float:
    """MB/s to send ``size`` bytes and get the sink's byte count back."""
    block = os.urandom(CHUNK)
    start = time.perf_counter()
    left = size
    while left:
        await stream.send(block[:min(left, CHUNK)])
        left -= min(left, CHUNK)
    await stream.send_eof()
    got = b""
    while len(got) < 8:
        got += await stream.receive()
    elapsed = time.perf_counter() - start
    assert int.from_bytes(got[:8], "big") == size, "the sink did not get every byte"
    await stream.aclose()
    return size / elapsed / 1e6


async def rtt(stream: ByteStream, rounds: int) -> float:
    """Median microseconds for a 64-byte request and its echo."""
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        await stream.send(PING)
        got = b""
        while len(got) < len(PING):
            got += await stream.receive()
        samples.append((time.perf_counter() - start) * 1e6)
    await stream.aclose()
    return statistics.median(samples[rounds // 10:])


async def measure(opener: Any, size: int, rounds: int) -> tuple[float, float]:
    return await bulk(await opener("sink"), size), await rtt(await opener("echo"), rounds)


async def main(size_mb: int, rounds: int) -> None:
    from meshcore.node import Node

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        child = subprocess.Popen([sys.executable, __file__, "--serve", str(home)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None and child.stdin is not None
            info = json.loads(await anyio.to_thread.run_sync(child.stdout.readline))
            results: dict[str, tuple[float, float]] = {}

            async def raw(service: str) -> ByteStream:
                return await anyio.connect_tcp("127.0.0.1", info["ports"][service])

            async def relayed(service: str) -> ByteStream:
                return await anyio.connect_tcp("127.0.0.1", info["ports"][f"relay-{service}"])

            results["raw TCP"] = await measure(raw, size_mb * 10**6, rounds)
            results["TCP + relay hop"] = await measure(relayed, size_mb * 10**6, rounds)
            async with anyio.create_task_group() as tg:
                for kind, label in (("fast", "fast path (TLS-TCP)"), ("quic", "QUIC fallback")):
                    node = Node(_config(home, f"a-{kind}", (info["tokens"][kind],),
                                        kind == "fast"))
                    await tg.start(node.run)
                    peer = f"b-{kind}"
                    want = "TLS-TCP" if kind == "fast" else "QUIC"
                    with anyio.fail_after(20):
                        while node.transport.link(peer) != want:
                            await anyio.sleep(0.05)

                    async def tunnel(service: str, node: Any = node, peer: str = peer
                                     ) -> ByteStream:
                        return await node.transport.connect(peer, service)

                    results[label] = await measure(tunnel, size_mb * 10**6, rounds)
                    node.stop()
        finally:
            if child.stdin is not None:
                child.stdin.close()
            child.wait(20)
    report(results, size_mb, rounds)


def report(results: dict[str, tuple[float, float]], size_mb: int, rounds: int) -> None:
    base_bulk, base_rtt = results["raw TCP"]
    print(f"tunnel benchmark: {size_mb} MB bulk, {rounds} x 64-byte round trips, loopback, "
          f"{os.cpu_count()} CPUs")
    print(f"{'path':22} {'bulk MB/s':>10} {'x raw':>7} {'RTT us':>8} {'added us':>9}")
    for name, (mbps, us) in results.items():
        print(f"{name:22} {mbps:10.1f} {mbps / base_bulk:7.2f} {us:8.0f} {us - base_rtt:9.0f}")
    fast_bulk, fast_rtt = results["fast path (TLS-TCP)"]
    print(f"targets: fast path >= 0.5x raw bulk: {fast_bulk / base_bulk >= 0.5} "
          f"({fast_bulk / base_bulk:.2f}x); <= 100 us added RTT: {fast_rtt - base_rtt <= 100} "
          f"({fast_rtt - base_rtt:.0f} us)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="bulk size in MB (default 200)")
    parser.add_argument("--rounds", type=int, default=2000, help="round trips (default 2000)")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        anyio.run(serve_child, args.serve)
    else:
        anyio.run(main, args.mb, args.rounds)
