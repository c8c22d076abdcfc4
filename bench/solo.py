"""Benchmark: a solo mesh node's API against the very same llama-server reached directly.

Run: ``.venv/bin/python bench/solo.py [--runs N] [--tokens N] [--threads N] [--no-draft]``. Starts
``mesh-llm --model SmolLM2-135M`` (fresh MESH_LLM_HOME), then a second, raw llama-server with
exactly the mesh's llama-server command line (read from /mesh/status) on another port. Both
get the same streamed chat requests, alternately; the script prints client-side generation
speed (tok/s after the first token) and time to first token for each, and their ratios
(targets: >= 0.98 tok/s, <= 5 ms added TTFT). A third server, llama-server with llama.cpp's
own defaults (only ``-m``, ``--port`` and ``-t``), checks that the mesh's default is not slower
than what a user of plain llama.cpp gets. Nothing here is asserted by the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import httpx
import psutil

PROMPT = [{"role": "system", "content": "You are a helpful assistant."},
          {"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    """Whether something accepts TCP connections on loopback ``port``."""
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_ok(url: str, proc: subprocess.Popen[Any], timeout: float = 180,
            every: float = 0.2) -> None:
    """Poll ``url`` every ``every`` seconds until it answers 200. One client for all polls:
    ``httpx.get`` builds an SSL context each call (~10-25 ms of CPU on the 2-core VM, taken
    from the load being timed)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"process exited with {proc.returncode} before {url} answered")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(url).status_code == 200:
                    return
            time.sleep(every)
    raise SystemExit(f"{url} not ready after {timeout} s")


@contextlib.contextmanager
def mesh_node(threads: int, extra: list[str]) -> Iterator[tuple[str, list[str], int]]:
    """Yields the node's API base URL, its llama-server argv and mesh-llm's pid."""
    home = tempfile.mkdtemp(prefix="bench-solo-")
    env = {**os.environ, "MESH_LLM_HOME": home, "MESH_LLM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "meshcore_cli", "--model", "SmolLM2-135M",
                             "--port", "0", *extra], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        port = None
        for line in proc.stderr:
            if m := re.search(r"API\s+http://[\d.]+:(\d+)/v1", line):
                port = int(m[1])
                break
        if port is None:
            raise SystemExit("mesh-llm printed no banner")
        base = f"http://127.0.0.1:{port}"
        wait_ok(f"{base}/health", proc)
        argv = httpx.get(f"{base}/mesh/status").json()["backend"]["llama_server"]["argv"]
        yield base, argv, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def raw_server(argv: list[str]) -> Iterator[str]:
    port = free_port()
    argv = list(argv)
    argv[argv.index("--port") + 1] = str(port)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ok(f"{base}/health", proc)
        yield base
    finally:
        proc.terminate()
        proc.wait(30)


Run = tuple[float, float, float]
T = TypeVar("T")


def one_run(client: httpx.Client, base: str, tokens: int) -> Run:
    """(time to first token in s, tok/s after the first token, llama-server's own tok/s) of
    one streamed request.

    Retried once when the server closed an idle keep-alive connection just as it was reused
    (uvicorn drops them after 5 s), as the openai client would."""
    try:
        return _one_run(client, base, tokens)
    except httpx.RemoteProtocolError:
        return _one_run(client, base, tokens)


def _one_run(client: httpx.Client, base: str, tokens: int) -> Run:
    body = {"messages": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    start = time.perf_counter()
    first = last = 0.0
    count, server_tps = 0, 0.0
    with client.stream("POST", f"{base}/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data: ") and '"content":"' in line:
                last = time.perf_counter()
                if count == 0:
                    first = last
                count += 1
            elif line.startswith("data: ") and '"predicted_per_second"' in line:
                server_tps = json.loads(line[6:])["timings"]["predicted_per_second"]
    if count < 2:
        raise SystemExit(f"{base} streamed {count} tokens")
    return first - start, (count - 1) / (last - first), server_tps


def take_turns(sides: dict[str, Callable[[], T]], runs: int) -> dict[str, list[T]]:
    """``runs`` calls of each of ``sides`` (name -> one measured request), the sides taking
    turns; the order turns by one side each round, because a machine's speed drifts within
    a comparison (an H200 split's raw side fell 7 % in one) and a side always measured last
    would be measured slower."""
    results: dict[str, list[T]] = {name: [] for name in sides}
    names = list(sides)
    for i in range(runs):
        for name in names[i % len(names):] + names[:i % len(names)]:
            results[name].append(sides[name]())
    return results


def alternate(client: httpx.Client, bases: dict[str, str], runs: int,
              tokens: int) -> dict[str, list[Run]]:
    """:func:`take_turns` of one streamed request to each of ``bases`` (name -> API root)."""
    return take_turns({name: functools.partial(one_run, client, base, tokens)
                       for name, base in bases.items()}, runs)


def wait_for(predicate: Callable[[], bool], what: str, timeout: float,
             every: float = 0.1) -> None:
    """Poll ``predicate`` (HTTP errors and missing status keys count as False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, KeyError, TypeError):
            if predicate():
                return
        time.sleep(every)
    raise SystemExit(f"timed out waiting for {what}")


def serves_split(status: dict[str, Any]) -> bool:
    """A host's ``/mesh/status``: its split llama-server is the one answering (not a solo
    server handed over while the split loads, see docs/backend.md)."""
    return status["plan"]["state"] == "SPLIT" and status["backend"]["serving_current_plan"] is True


def medians(results: dict[str, list[Run]]) -> dict[str, tuple[float, ...]]:
    """Per side, the medians of (TTFT s, client tok/s, llama-server's own tok/s)."""
    return {k: tuple(statistics.median(r[i] for r in v) for i in range(3))
            for k, v in results.items()}


def print_medians(med: dict[str, tuple[float, ...]], runs: int) -> None:
    """The raw and mesh lines, the tok/s ratio and the added TTFT."""
    for name in ("raw", "mesh"):
        ttft, tps, server = med[name]
        print(f"{name:5} tok/s {tps:7.1f}   TTFT {ttft * 1000:7.1f} ms   llama-server's own "
              f"tok/s {server:7.1f}   (median of {runs})")
    print(f"ratio mesh/raw tok/s: {med['mesh'][1] / med['raw'][1]:.3f}")
    print(f"added TTFT: {(med['mesh'][0] - med['raw'][0]) * 1000:+.1f} ms")


def cpu_bench_args(doc: str) -> argparse.Namespace:
    """The options every CPU bench script takes (solo.py, split.py)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-draft", action="store_true", help="pass --no-draft to mesh-llm")
    ap.add_argument("--draft", help="pass --draft MODEL to mesh-llm (speculative decoding)")
    ap.add_argument("--no-defaults", action="store_true",
                    help="solo.py: skip the comparison with llama.cpp's default settings")
    ap.add_argument("--seed-restart", action="store_true",
                    help="split.py: only time a worker's cache seeding on restart, with and "
                         "without the per-file index")
    return ap.parse_args()


def main() -> None:
    args = cpu_bench_args(__doc__ or "")
    extra = ["--no-draft"] if args.no_draft else ["--draft", args.draft] if args.draft else []
    with mesh_node(args.threads, extra) as (mesh, argv, pid), raw_server(argv) as raw, \
            httpx.Client(timeout=300) as client:
        mesh_proc = psutil.Process(pid)
        print("llama-server:", " ".join(argv[1:]))
        for base in (mesh, raw):  # warm-up
            one_run(client, base, 16)
        cpu = 0.0  # mesh-llm's CPU during the mesh's requests

        def on_mesh() -> Run:
            nonlocal cpu
            before = sum(mesh_proc.cpu_times()[:2])
            run = one_run(client, mesh, args.tokens)
            cpu += sum(mesh_proc.cpu_times()[:2]) - before
            return run

        results = take_turns({"raw": functools.partial(one_run, client, raw, args.tokens),
                              "mesh": on_mesh}, args.runs)
        print_medians(medians(results), args.runs)
        print(f"mesh-llm CPU per proxied token: {cpu * 1000 / (args.runs * args.tokens):.2f} ms")
        if not args.no_defaults:
            compare_with_defaults(client, mesh, argv, args)


def defaults_argv(argv: list[str], threads: int) -> list[str]:
    """llama-server as a plain llama.cpp user starts it: the mesh's binary and model, a
    port and the thread count, every other setting llama.cpp's own default."""
    return [argv[0], "-m", argv[argv.index("-m") + 1], "--port", "0", "-t", str(threads)]


def compare_with_defaults(client: httpx.Client, mesh: str, argv: list[str],
                          args: argparse.Namespace) -> None:
    """The mesh's default against llama-server with llama.cpp's defaults, alternately (the
    other raw server is stopped first, so two servers share the cores, not three)."""
    plain = defaults_argv(argv, args.threads)
    print("llama.cpp defaults:", " ".join(plain[1:]))
    with raw_server(plain) as base:
        one_run(client, base, 16)
        results = alternate(client, {"defaults": base, "mesh": mesh}, args.runs, args.tokens)
    med = medians(results)
    for name in ("defaults", "mesh"):
        ttft, tps, _ = med[name]
        print(f"{name:8} tok/s {tps:7.1f}   TTFT {ttft * 1000:7.1f} ms   (median of {args.runs})")
    print(f"ratio mesh/llama.cpp defaults tok/s: {med['mesh'][1] / med['defaults'][1]:.3f}")


if __name__ == "__main__":
    main()
