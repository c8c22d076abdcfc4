"""Benchmark: how long a solo node takes from the command to serving, against raw llama-server.

Run: ``.venv/bin/python bench/start.py [--runs N] [--model M] [--bin-dir DIR] [--threads N]``.
One warm-up node first (it also fills the page cache with the model, for both sides) gives
the llama-server command line the node runs; then, taking turns, a fresh node (its own
MESH_LLM_HOME, ``--speculation off``) and a raw llama-server with exactly that command line
are started and timed until their ``/health`` answers 200 (polled every 20 ms). Every log
line of each node is printed with its time since the command, so the start splits into
Python's start and imports (up to the first line), the plan and llama-server's start, and
llama-server's load. Medians and the ratio come last. Nothing here is asserted by the test
suite; the numbers go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx
from solo import free_port, take_turns, wait_ok

POLL_S = 0.02


def start_node(args: argparse.Namespace, log: bool = True) -> tuple[float, list[str]]:
    """A fresh node's seconds to serving, and its llama-server's command line."""
    home, port = tempfile.mkdtemp(prefix="bench-start-"), free_port()
    cmd = [sys.executable, "-m", "meshcore_cli", "--model", args.model, "--port", str(port),
           "--speculation", "off", *(["--bin-dir", args.bin_dir] if args.bin_dir else [])]
    env = {**os.environ, "MESH_LLM_HOME": home, "MESH_LLM_THREADS": str(args.threads)}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    lines: list[tuple[float, str]] = []
    threading.Thread(target=lambda: lines.extend((time.monotonic() - start, line.rstrip())
                                                 for line in proc.stderr or ()),
                     daemon=True).start()
    try:
        wait_ok(f"http://127.0.0.1:{port}/health", proc, 300, every=POLL_S)
        took = time.monotonic() - start
        status = httpx.get(f"http://127.0.0.1:{port}/mesh/status", timeout=5).json()
        argv = list(status["backend"]["llama_server"]["argv"])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        shutil.rmtree(home, ignore_errors=True)
    if log:
        print(f"node serving after {took:.3f} s; its log, seconds after the command:")
        for at, line in lines:
            print(f"  {at:6.3f}  {line[:150]}")
    return took, argv


def start_raw(argv: list[str]) -> float:
    """Raw llama-server's seconds to serving with ``argv`` on a free port."""
    argv = list(argv)
    port = free_port()
    argv[argv.index("--port") + 1] = str(port)
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ok(f"http://127.0.0.1:{port}/health", proc, 300, every=POLL_S)
        took = time.monotonic() - start
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"raw llama-server serving after {took:.3f} s")
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--model", default="SmolLM2-135M", help="what --model the node gets")
    ap.add_argument("--bin-dir", help="llama.cpp binaries (default: mesh-llm's own build)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    _, argv = start_node(args, log=False)  # warm-up: the command line, the page cache
    print(f"llama-server command line: {' '.join(argv[1:])}")
    took = take_turns({"mesh": lambda: start_node(args)[0], "raw": lambda: start_raw(argv)},
                      args.runs)
    mesh, raw = statistics.median(took["mesh"]), statistics.median(took["raw"])
    each = {side: ", ".join(f"{x:.2f}" for x in took[side]) for side in took}
    print(f"serving after, median of {args.runs}: node {mesh:.3f} s, raw llama-server "
          f"{raw:.3f} s, ratio {mesh / raw:.2f} (node {each['mesh']}; raw {each['raw']})")


if __name__ == "__main__":
    main()
