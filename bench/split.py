"""Benchmark: a two-node mesh split against raw llama.cpp RPC with the very same split.

Run: ``.venv/bin/python bench/split.py [--runs N] [--tokens N] [--threads N] [--no-draft]``.
Starts node A (``--split --max-vram 8``) and node B (``--max-vram 4 --join``), both with
SmolLM2-135M, waits for the split (B's rpc-server reached through the mesh tunnel), then
starts a raw ``ggml-rpc-server`` and a raw llama-server with exactly A's llama-server command
line, only ``--rpc`` pointing straight at the raw rpc-server. Both get the same streamed
requests, alternately; prints tok/s and TTFT of each and the ratio (target >= 0.90 on
loopback). Also prints the bytes llama-server sends to the worker's rpc-server while loading
that split, through a counting relay, with the worker's hash cache empty and seeded the way
B seeds it. ``--seed-restart`` instead times a worker's seeding on restart with and without the
per-file hash index (hashcache.py). Nothing here is asserted by the test suite.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from solo import (
    alternate,
    cpu_bench_args,
    free_port,
    medians,
    one_run,
    print_medians,
    serves_split,
    wait_for,
    wait_ok,
)

MODEL = "SmolLM2-135M"


class Node:
    """A ``mesh-llm`` process with its own home; ``base`` is its API root."""

    def __init__(self, args: list[str], threads: int) -> None:
        home = self.home = tempfile.mkdtemp(prefix="bench-split-")
        env = {**os.environ, "MESH_LLM_HOME": home, "MESH_LLM_THREADS": str(threads)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshcore_cli", "--model", MODEL, "--port", "0", *args],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.base, self.token = "", ""
        assert self.proc.stderr is not None
        seen: list[str] = []
        for line in self.proc.stderr:
            seen.append(line)
            if m := re.search(r"API\s+http://[\d.]+:(\d+)/v1", line):
                self.base = f"http://127.0.0.1:{m[1]}"
            if m := re.search(r"join with: mesh-llm --join (\S+)", line):
                self.token = m[1]
                break
        if not self.base:
            raise SystemExit(f"mesh-llm {' '.join(args)} printed no banner:\n"
                             + "".join(seen[-20:]))
        # keep reading: a full pipe would block the node at its next log line
        self.log = seen
        threading.Thread(target=lambda: seen.extend(self.proc.stderr or ()), daemon=True).start()

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(f"{self.base}/mesh/status", timeout=10).json()
        return data

    def stop(self) -> None:
        """Stop the node and remove its home (a worker's holds its rpc cache)."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        shutil.rmtree(self.home, ignore_errors=True)


@contextlib.contextmanager
def mesh_split(threads: int, extra: list[str]) -> Iterator[tuple[Node, Node]]:
    """Yields A and B once A's split llama-server answers."""
    a = Node(["--split", "--max-vram", "8", *extra], threads)
    b: Node | None = None
    try:
        b = Node(["--max-vram", "4", "--join", a.token, *extra], threads)
        wait_for(lambda: serves_split(a.status())
                 and httpx.get(f"{a.base}/health").status_code == 200, "A's split to load", 240)
        yield a, b
    finally:
        for node in (b, a):
            if node is not None:
                node.stop()


@contextlib.contextmanager
def raw_split(argv: list[str], bin_dir: Path, threads: int) -> Iterator[str]:
    """A raw rpc-server and a raw llama-server with ``argv``, ``--rpc`` pointing straight at it."""
    rpc_port, port = free_port(), free_port()
    rpc = subprocess.Popen([str(bin_dir / "ggml-rpc-server"), "-H", "127.0.0.1", "-p",
                            str(rpc_port), "-t", str(threads)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    argv = list(argv)
    argv[argv.index("--port") + 1] = str(port)
    argv[argv.index("--rpc") + 1] = f"127.0.0.1:{rpc_port}"
    time.sleep(1.0)
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ok(f"{base}/health", server)
        yield base
    finally:
        for proc in (server, rpc):
            proc.terminate()
            proc.wait(30)


def _pump(src: socket.socket, dst: socket.socket, counter: list[int]) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(1 << 20):
            counter[0] += len(data)
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def counting_relay(target: int) -> tuple[int, list[int]]:
    """A loopback relay to port ``target`` (daemon threads); returns its port and a counter of
    the bytes sent towards the target."""
    listener = socket.create_server(("127.0.0.1", 0))
    counter = [0]

    def serve() -> None:
        while True:
            client, _ = listener.accept()
            upstream = socket.create_connection(("127.0.0.1", target))
            threading.Thread(target=_pump, args=(client, upstream, counter), daemon=True).start()
            threading.Thread(target=_pump, args=(upstream, client, [0]), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1], counter


def load_bytes(argv: list[str], bin_dir: Path, model: Path, *, seeded: bool) -> int:
    """Bytes llama-server sends to one rpc-server (-c) while loading ``argv``'s split, with
    the worker's hash cache empty or seeded from the model file (what B does)."""
    from meshcore_backend_llamacpp.hashcache import seed_cache

    cache = Path(tempfile.mkdtemp(prefix="bench-split-cache-"))
    if seeded:
        seed_cache(model, cache / "rpc")
    rpc_port, port = free_port(), free_port()
    rpc = subprocess.Popen([str(bin_dir / "ggml-rpc-server"), "-H", "127.0.0.1", "-p",
                            str(rpc_port), "-t", "1", "-c"],
                           env={**os.environ, "LLAMA_CACHE": str(cache)},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    relay_port, counter = counting_relay(rpc_port)
    argv = list(argv)
    argv[argv.index("--port") + 1] = str(port)
    argv[argv.index("--rpc") + 1] = f"127.0.0.1:{relay_port}"
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ok(f"http://127.0.0.1:{port}/health", server)
        return counter[0]
    finally:
        for proc in (server, rpc):
            proc.terminate()
            proc.wait(30)
        shutil.rmtree(cache, ignore_errors=True)


def write_layers(path: Path, layers: int, mib: int) -> None:
    """A GGUF of ``layers`` random float32 matrices of ``mib`` MiB each (blk.N.attn_q.weight),
    every one over the hash threshold; enough for hashcache, not for llama.cpp."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, "llama")
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_q.weight",
                          rng.standard_normal(mib * 1024 * 256).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def seed_restart(layers: int = 24, mib: int = 32) -> None:
    """Time what a worker does before its rpc-server starts (``seed_tensors`` of its half of
    the layers), first start and then restarts before the background pass finished, with the
    per-file index and without it (deleted before the restart)."""
    from meshcore_backend_llamacpp import hashcache

    tmp = Path(tempfile.mkdtemp(prefix="bench-seed-"))
    model, cache = tmp / "layers.gguf", tmp / "rpc"
    write_layers(model, layers, mib)
    names = hashcache.tensors_of_layers(model, set(range(layers // 2, layers)), layers)
    size = sum(s.size for s in hashcache.large_tensors(model) if s.name in names)
    print(f"worker's half: {len(names)} tensors, {size / 1e6:.0f} MB (page cache warm)")

    def timed(label: str) -> None:
        started = time.perf_counter()
        hashcache.prune_foreign(cache)
        written, _ = hashcache.seed_tensors(model, cache, names)
        print(f"{label:34} {time.perf_counter() - started:7.3f} s  ({written / 1e6:.0f} MB "
              f"written)")

    timed("first start")
    for run in range(3):
        hashcache.index_path(cache).unlink()
        timed(f"restart without the index ({run + 1})")
    for run in range(3):
        timed(f"restart with the index ({run + 1})")
    shutil.rmtree(tmp)


def main() -> None:
    args = cpu_bench_args(__doc__ or "")
    if args.seed_restart:
        seed_restart()
        return
    extra = ["--no-draft"] if args.no_draft else ["--draft", args.draft] if args.draft else []
    with mesh_split(args.threads, extra) as (a, b):
        status_a, status_b = a.status(), b.status()
        argv = status_a["backend"]["llama_server"]["argv"]
        bin_dir = Path(argv[0]).parent
        print("llama-server:", " ".join(argv[1:]))
        print("plan:", [(p["peer_id"], p["share"], p["rpc"])
                        for p in status_a["plan"]["participants"]],
              "effective:", status_a["backend"]["effective_shares"])
        print(f"B seeded its rpc hash cache with "
              f"{(status_b['backend'].get('seeded_bytes') or 0) / 1e6:.1f} MB")
        model = Path(argv[argv.index("-m") + 1])
        for seeded in (False, True):
            sent = load_bytes(argv, bin_dir, model, seeded=seeded)
            print(f"load through one rpc entry, cache {'seeded' if seeded else 'empty '}: "
                  f"{sent / 1e6:6.1f} MB sent to the rpc-server")
        with raw_split(argv, bin_dir, args.threads) as raw, httpx.Client(timeout=300) as client:
            for base in (a.base, raw):  # warm-up
                one_run(client, base, 16)
            results = alternate(client, {"raw": raw, "mesh": a.base}, args.runs, args.tokens)
    print_medians(medians(results), args.runs)


if __name__ == "__main__":
    main()
