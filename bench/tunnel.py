"""Tunnel benchmark: bulk MB/s and request/response round trip over raw TCP, the TCP+AES-GCM fast
path and the QUIC fallback, measured in one run, with the ratios.

Four processes on loopback, like the real thing: S runs the services (a sink that counts bytes
and answers the count, an echo), B is the worker node (its fast-path server and inbound
tunnels lead to S), A is the host node (``node.forward_port``: the local port llama-server
dials), and this process is the client (blocking sockets, like llama-server's C++ client).
Raw TCP goes client -> S; tunnels go client -> A -> B -> S. Plain-TCP rows without crypto:
one relay hop in B (the anyio stream relay, and the callback splice), and the callback splice
in A and in B (the fast path's two hops, minus the records).
Besides the 64-byte echo, each path carries one generated token's llama.cpp rpc traffic as
bench/rpc_trace.py saw it (nine commands, each sent in three pieces as llama.cpp does, then a
reply of ``--reply`` bytes in two): the per-token time a path adds, without the compute.
``--gap-us`` spaces the commands as llama.cpp does (it sent them 14-29 us apart on the H200;
busy-waited, repeatable: one column per gap); ``--idle-us`` makes the worker "compute" that
long before it replies and the client as long again after each token (both asleep), so the
relays go idle between bursts as in a real split instead of staying hot. The ``token``
service's tunnels poll as ``rpc`` tunnels do (adapter.hot_window: only with 8 CPUs or more,
or ``MESH_LLM_HOT_US`` set; ``MESH_LLM_HOT_US=0`` measures the relays asleep).
Usage: ``.venv/bin/python bench/tunnel.py [--mb 200] [--rounds 2000] [--repeat 3]
[--loop uvloop|asyncio] [--reply BYTES ...] [--gap-us US ...] [--idle-us US]
[--paths NAME,...]`` (``--mb 0`` skips bulk); every path is measured ``--repeat`` times,
interleaved, and the medians are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import ByteStream

CHUNK = 256 * 1024
DEFAULT_LOOP = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
PING = b"x" * 64
GET_TENSOR = 8
# One generated token of a CPU split of SmolLM2-135M as bench/rpc_trace.py saw it: seven
# SET_TENSOR (inputs, positions, masks; sizes with their 9-byte header), GRAPH_RECOMPUTE,
# then GET_TENSOR, whose reply (the logits) the client waits for.
TOKEN = ((6, 2618), (6, 2618), (6, 318), (6, 322), (6, 322), (6, 826), (6, 318), (16, 13),
         (GET_TENSOR, 321))


# ---------------------------------------------------------------- child processes

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


async def _until_stdin_closes() -> None:
    await anyio.to_thread.run_sync(sys.stdin.read)


async def _rpc(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """llama.cpp's rpc-server as the wire sees it: ``u8 cmd | u64 size | payload``; GET_TENSOR
    is answered ``u64 size`` then the payload, two writes (the size asked for is the first 8
    bytes of its payload, the microseconds to "compute" first, asleep, the next 8); other
    commands get no reply."""
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while True:
            head = await reader.readexactly(9)
            payload = await reader.readexactly(int.from_bytes(head[1:], "little"))
            if head[0] == GET_TENSOR:
                size = int.from_bytes(payload[:8], "little")
                if compute_us := int.from_bytes(payload[8:16], "little"):
                    time.sleep(compute_us / 1e6)  # blocking on purpose: a precise idle time
                writer.write(size.to_bytes(8, "little"))
                writer.write(bytes(size))
    writer.close()


async def serve_services(_: dict[str, Any]) -> dict[str, Any]:
    sink = await asyncio.start_server(_sink, "127.0.0.1", 0)
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    rpc = await asyncio.start_server(_rpc, "127.0.0.1", 0)
    print(json.dumps({"sink": sink.sockets[0].getsockname()[1],
                      "echo": echo.sockets[0].getsockname()[1],
                      "token": rpc.sockets[0].getsockname()[1]}), flush=True)
    await _until_stdin_closes()
    return {}


def _token_is_rpc() -> None:
    """The token service's tunnels poll as rpc tunnels do (a node serves ``rpc`` only to its
    plan's host, so the benchmark's service has another name)."""
    from meshcore_transport_quic import adapter

    adapter.HOT_SERVICES = adapter.HOT_SERVICES | {"token"}


async def serve_worker(args: dict[str, Any]) -> dict[str, Any]:
    """Node B (with and without the fast path) and the plain relay hops, all towards S."""
    from meshcore_transport_quic.splice import serve_forward

    from meshcore.node import Node

    _token_is_rpc()
    home, services = Path(args["home"]), args["services"]
    loop = asyncio.get_running_loop()
    out: dict[str, Any] = {"relay": {}, "splice": {}, "tokens": {}}
    async with anyio.create_task_group() as tg:
        for name, port in services.items():
            async def opener(port: int = port) -> ByteStream:
                return await anyio.connect_tcp("127.0.0.1", port)

            async def raw(factory: Callable[[], asyncio.Protocol], port: int = port) -> Any:
                return (await loop.create_connection(factory, "127.0.0.1", port))[0]

            out["relay"][name] = await tg.start(serve_forward, opener)
            out["splice"][name] = await tg.start(
                functools.partial(serve_forward, open_raw=raw), opener)
        for kind in ("fast", "quic"):
            node = Node(_config(home, f"b-{kind}", (), kind == "fast"))
            await tg.start(node.run)
            node.services.update({k: ("127.0.0.1", v) for k, v in services.items()})
            out["tokens"][kind] = node.transport.invite_token()
        print(json.dumps(out), flush=True)
        await _until_stdin_closes()
        tg.cancel_scope.cancel()
    return {}


async def serve_host(args: dict[str, Any]) -> dict[str, Any]:
    """Node A joined to each B; prints its forward ports (what llama-server would dial)."""
    from meshcore_transport_quic.splice import serve_forward

    from meshcore.node import Node

    _token_is_rpc()
    home, tokens = Path(args["home"]), args["tokens"]
    loop = asyncio.get_running_loop()
    out: dict[str, dict[str, int]] = {"splice2": {}}
    async with anyio.create_task_group() as tg:
        # the fast path's two relay hops without crypto: A's splice -> B's splice -> S
        for name, port in args["splice"].items():
            async def opener(port: int = port) -> ByteStream:
                return await anyio.connect_tcp("127.0.0.1", port)

            async def raw(factory: Callable[[], asyncio.Protocol], port: int = port) -> Any:
                return (await loop.create_connection(factory, "127.0.0.1", port))[0]

            out["splice2"][name] = await tg.start(
                functools.partial(serve_forward, open_raw=raw), opener)
        for kind in ("fast", "quic"):
            node = Node(_config(home, f"a-{kind}", (tokens[kind],), kind == "fast"))
            await tg.start(node.run)
            peer, want = f"b-{kind}", "TCP+AES-GCM" if kind == "fast" else "QUIC"
            with anyio.fail_after(20):
                while node.transport.link(peer) != want:
                    await anyio.sleep(0.05)
            out[kind] = {s: await node.forward_port(peer, s) for s in ("sink", "echo", "token")}
        print(json.dumps(out), flush=True)
        await _until_stdin_closes()
        tg.cancel_scope.cancel()
    return {}


ROLES = {"services": serve_services, "worker": serve_worker, "host": serve_host}


def child(role: str, args: dict[str, Any], loop: str
          ) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    proc = subprocess.Popen([sys.executable, __file__, "--loop", loop, "--role", role,
                             json.dumps(args)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"the {role} process failed to start (exit {proc.wait()})")
    return proc, json.loads(line)


# ---------------------------------------------------------------- measurements (client)

def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def bulk(port: int, size: int) -> float:
    """MB/s to send ``size`` bytes and get the sink's byte count back."""
    block = os.urandom(CHUNK)
    with _connect(port) as sock:
        start = time.perf_counter()
        left = size
        while left:
            sock.sendall(block[:min(left, CHUNK)])
            left -= min(left, CHUNK)
        sock.shutdown(socket.SHUT_WR)
        got = b""
        while len(got) < 8 and (chunk := sock.recv(8)):
            got += chunk
        elapsed = time.perf_counter() - start
    assert int.from_bytes(got[:8], "big") == size, "the sink did not get every byte"
    return size / elapsed / 1e6


def rtt(port: int, rounds: int) -> float:
    """Median microseconds for a 64-byte request and its echo."""
    samples = []
    with _connect(port) as sock:
        for _ in range(rounds):
            start = time.perf_counter()
            sock.sendall(PING)
            got = 0
            while got < len(PING):
                got += len(sock.recv(65536))
            samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples[rounds // 10:])


def _busy_wait(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def token_rtt(port: int, rounds: int, reply: int, gap_us: float = 0.0,
              idle_us: int = 0) -> float:
    """Median microseconds of one token's rpc traffic (TOKEN), sent piece by piece as
    llama.cpp's client does (command byte, size, payload: three sends; ``gap_us`` between
    commands), until the reply of ``reply`` bytes is in, less the worker's ``idle_us`` of
    "compute"; the client then sleeps ``idle_us`` (the host's compute) before the next."""
    commands = []
    for cmd, size in TOKEN:
        payload = bytearray(size - 9)
        if cmd == GET_TENSOR:
            payload[:8] = reply.to_bytes(8, "little")
            payload[8:16] = idle_us.to_bytes(8, "little")
        commands.append((bytes([cmd]), (size - 9).to_bytes(8, "little"), bytes(payload)))
    want, gap = 8 + reply, gap_us / 1e6
    samples = []
    with _connect(port) as sock:
        for _ in range(rounds):
            start = time.perf_counter()
            for i, pieces in enumerate(commands):
                if gap and i:
                    _busy_wait(gap)
                for piece in pieces:
                    sock.sendall(piece)
            got = 0
            while got < want:
                got += len(sock.recv(want - got))
            samples.append((time.perf_counter() - start) * 1e6 - idle_us)
            if idle_us:
                time.sleep(idle_us / 1e6)
    return statistics.median(samples[rounds // 10:])


def main(size_mb: int, rounds: int, loop: str, repeat: int, replies: list[int],
         only: list[str], gaps: list[float], idle_us: int) -> None:
    procs: list[subprocess.Popen[str]] = []
    with tempfile.TemporaryDirectory() as home:
        try:
            proc, services = child("services", {}, "asyncio")  # the same baseline for both loops
            procs.append(proc)
            proc, worker = child("worker", {"home": home, "services": services}, loop)
            procs.append(proc)
            proc, host = child("host", {"home": home, "tokens": worker["tokens"],
                                        "splice": worker["splice"]}, loop)
            procs.append(proc)
            paths = {"raw TCP": services, "TCP + stream relay": worker["relay"],
                     "TCP + splice relay": worker["splice"],
                     "TCP + 2 splice relays": host["splice2"],
                     "fast path (TCP+AES-GCM)": host["fast"], "QUIC fallback": host["quic"]}
            if only:
                paths = {k: v for k, v in paths.items() if k == "raw TCP" or k in only}
            samples: dict[str, list[list[float]]] = {name: [] for name in paths}
            for _ in range(repeat):  # interleaved, so a noisy moment hits every path alike
                for name, ports in paths.items():
                    samples[name].append(
                        [bulk(ports["sink"], size_mb * 10**6) if size_mb else 0.0,
                         rtt(ports["echo"], rounds),
                         *(token_rtt(ports["token"], rounds // 4, r, g, idle_us)
                           for r in replies for g in gaps)])
            results = {name: [statistics.median(col) for col in zip(*runs, strict=True)]
                       for name, runs in samples.items()}
        finally:
            for proc in reversed(procs):
                assert proc.stdin is not None
                proc.stdin.close()
                proc.wait(20)
    report(results, size_mb, rounds, loop, repeat, replies, gaps, idle_us)


def report(results: dict[str, list[float]], size_mb: int, rounds: int, loop: str,
           repeat: int, replies: list[int], gaps: list[float], idle_us: int) -> None:
    base_bulk, base_rtt, *base_tokens = results["raw TCP"]
    base_bulk = base_bulk or 1.0
    print(f"tunnel benchmark: {size_mb} MB bulk, {rounds} x 64-byte round trips, "
          f"{rounds // 4} x one token's rpc traffic ({len(TOKEN)} commands, replies of "
          f"{', '.join(map(str, replies))} B, commands {', '.join(f'{g:g}' for g in gaps)} us "
          f"apart, {idle_us} us idle on each side), loopback, {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.2f}, {loop} event loop, median of {repeat} interleaved runs")
    print(f"{'path':24} {'bulk MB/s':>10} {'x raw':>7} {'RTT us':>8} {'added us':>9}"
          + "".join(f" {f'token {r} B gap {g:g}':>19} {'added':>6}"
                    for r in replies for g in gaps))
    for name, (mbps, us, *tokens) in results.items():
        print(f"{name:24} {mbps:10.1f} {mbps / base_bulk:7.2f} {us:8.0f} {us - base_rtt:9.0f}"
              + "".join(f" {t:17.0f}us {t - b:6.0f}"
                        for t, b in zip(tokens, base_tokens, strict=True)))
    fast_bulk, fast_rtt, *_ = results["fast path (TCP+AES-GCM)"]
    print(f"targets: fast path >= 0.5x raw bulk: {fast_bulk / base_bulk >= 0.5} "
          f"({fast_bulk / base_bulk:.2f}x); <= 100 us added RTT: {fast_rtt - base_rtt <= 100} "
          f"({fast_rtt - base_rtt:.0f} us)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="bulk size in MB (default 200)")
    parser.add_argument("--rounds", type=int, default=2000, help="round trips (default 2000)")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default=DEFAULT_LOOP,
                        help="event loop of the node processes (default: uvloop when "
                             "installed, as the node runner does)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="interleaved runs of every path; medians are shown (default 3)")
    parser.add_argument("--reply", type=int, action="append",
                        help="bytes of a token's GET_TENSOR reply (repeatable; default 16384 "
                             "and 196608: an 8B model's activations, SmolLM2's logits)")
    parser.add_argument("--gap-us", type=float, action="append",
                        help="microseconds between a token's commands, busy-waited "
                             "(repeatable: one column each; default 0)")
    parser.add_argument("--idle-us", type=int, default=0,
                        help="the worker's compute before its reply and the client's after "
                             "it, asleep, in microseconds (default 0: back to back)")
    parser.add_argument("--paths", help="comma-separated names of the paths to measure "
                                        "(default: all; raw TCP is always measured)")
    parser.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    parser.add_argument("args", nargs="?", default="{}", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.role:
        anyio.run(ROLES[ns.role], json.loads(ns.args),
                  backend_options={"use_uvloop": ns.loop == "uvloop"})
    else:
        main(ns.mb, ns.rounds, ns.loop, ns.repeat, ns.reply or [16384, 196608],
             ns.paths.split(",") if ns.paths else [], ns.gap_us or [0.0], ns.idle_us)
