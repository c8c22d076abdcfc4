"""Benchmark: a split over an emulated WAN, raw llama.cpp RPC against the mesh, and solo.

Run: ``.venv/bin/python bench/wan.py [--rtts 5,20,50] [--tokens 96] [--runs 2] [--modes
off,draft,ngram]``. Host and worker
are put "far apart" with the userspace impairment relay (``meshcore_testing.impair``; this
kernel has no netem), which delays every byte by RTT/2 in each direction:

- raw: llama-server ``--rpc`` -> a TCP delay line (:func:`delay_relay`) -> a raw
  ``ggml-rpc-server``, with exactly the mesh host's llama-server command line (read from
  ``/mesh/status``);
- mesh: node A ``--split``, node B joining through a UDP relay in front of A's QUIC port; A's
  rpc tunnel to B is the fast path (sealed TCP, the default) through a TCP delay line like
  raw's (B offers it with ``quic_fast_port_advertised``), or with ``--tunnel quic`` QUIC
  through the UDP relay (both nodes without the fast path);
- solo: one llama-server with the whole model, no network.

Each at 0 ms (loaded there, then the relays' delay is changed in place) and at every RTT, with
a prose prompt and a code edit (rename a variable: the reply is mostly the code it was given,
where speculation can pay), and each speculation mode: off (``--speculation off``), with the
draft (``--draft SmolLM2-135M``) and llama.cpp's draft-free n-gram lookup (the mesh's default
for split plans, ``commands.NGRAM``). Raw runs exactly the mesh host's argv of each mode,
beside the mesh: the two take turns, request by request, at every RTT. Prints tok/s after the
first token, TTFT, split/solo, draft acceptance (llama-server's ``draft_n_accepted /
draft_n``), for raw the delay line's chunks per generated token (both directions), and
round trips per token, ``(1/tok/s - 1/tok/s at 0 ms) / RTT``. Nothing here is asserted by the
test suite; keep runs short (~10 minutes on a 2-core VM).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from meshcore_backend_llamacpp import commands
from meshcore_testing.impair import Impairment, Relay, start_relay
from solo import free_port, serves_split, take_turns, wait_for, wait_ok
from split import Node

PROSE = "Write a story about a lighthouse keeper who finds a message in a bottle."
# A code edit: the reply is mostly the code it was given, as in real editing requests, where
# n-gram lookup (the default for split plans) can draft from the prompt.
CODE = ("Rename the variable `handle` to `f` in this code. Output the whole code.\n\n"
        "def parse_config(path):\n    settings = {}\n    with open(path) as handle:\n"
        "        for line in handle:\n            line = line.strip()\n"
        "            if not line or line.startswith(\"#\"):\n                continue\n"
        "            key, value = line.split(\"=\", 1)\n"
        "            settings[key.strip()] = value.strip()\n    return settings\n\n\n"
        "def save_config(path, settings):\n    with open(path, \"w\") as handle:\n"
        "        for key, value in settings.items():\n"
        "            handle.write(key + \" = \" + value + \"\\n\")\n")
PROMPTS = {"prose": PROSE, "code": CODE}
NGRAM = list(commands.NGRAM)  # what the mesh host runs for a split plan by default
# the mesh's switches for each mode; raw runs exactly the mesh host's argv of the same mode
MESH_MODES = {"off": ["--speculation", "off"], "draft": ["--draft", "SmolLM2-135M"],
              "ngram": []}


@dataclass
class Sample:
    ttft: float
    tps: float
    drafted: int
    accepted: int
    chunks: int = 0  # relay chunks (both directions) during the request


def stream(client: httpx.Client, base: str, prompt: str, tokens: int) -> Sample:
    """One streamed chat request: TTFT, tok/s after the first token, draft counts. Retried
    once when a kept-alive connection was closed just as it was reused (llama-server closes
    it after every streamed response), as an OpenAI client would."""
    try:
        return _stream(client, base, prompt, tokens)
    except httpx.RemoteProtocolError:
        return _stream(client, base, prompt, tokens)


def _stream(client: httpx.Client, base: str, prompt: str, tokens: int) -> Sample:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
            "temperature": 0, "stream": True, "ignore_eos": True}
    start = time.perf_counter()
    first = last = 0.0
    count, timings = 0, dict[str, Any]()
    with client.stream("POST", f"{base}/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            timings = event.get("timings") or timings
            delta = (event.get("choices") or [{}])[0].get("delta") or {}
            if delta.get("content"):
                last = time.perf_counter()
                first = first or last
                count += 1
    if count < 2:
        raise SystemExit(f"{base} streamed {count} tokens")
    # a speculative step streams several tokens at once: count the server's tokens
    n = int(timings.get("predicted_n", count))
    return Sample(first - start, (n - 1) / max(last - first, 1e-6),
                  int(timings.get("draft_n", 0)), int(timings.get("draft_n_accepted", 0)))


def measure(client: httpx.Client, base: str, args: argparse.Namespace,
            relay: Relay | None = None) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = {}
    for name, prompt in PROMPTS.items():
        stream(client, base, prompt, 4)  # warm-up (prompt cache, connections)
        out[name] = [counted(client, base, prompt, args.tokens, relay)
                     for _ in range(args.runs)]
    return out


def counted(client: httpx.Client, base: str, prompt: str, tokens: int,
            relay: Relay | None) -> Sample:
    """``stream``, with the relay's chunks during the request when a relay is given."""
    before = relay.forwarded if relay else 0
    sample = stream(client, base, prompt, tokens)
    sample.chunks = relay.forwarded - before if relay else 0
    return sample


def measure_pair(client: httpx.Client, a: Node, raw: str, relay: Relay,
                 args: argparse.Namespace) -> tuple[dict[str, list[Sample]],
                                                    dict[str, list[Sample]]]:
    """The mesh (A's API) and raw ``--rpc`` taking turns, the order turning each run (the
    machine's speed drifts over minutes), so both sides see the same moments. A mesh
    request that fails because A re-applied its plan meanwhile (an RTT change moves the
    election's RTT band) is made again once A serves."""
    mesh: dict[str, list[Sample]] = {}
    plain: dict[str, list[Sample]] = {}

    def on_mesh(prompt: str, tokens: int) -> Sample:
        for attempt in (1, 2):
            ready(a)
            try:
                return stream(client, a.base, prompt, tokens)
            except httpx.HTTPStatusError as exc:
                print(f"mesh answered {exc.response.status_code}: {exc.response.text[:300]}; "
                      f"plan {a.status()['plan']}", flush=True)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    for name, prompt in PROMPTS.items():
        on_mesh(prompt, 4)  # warm-up (prompt cache, connections)
        stream(client, raw, prompt, 4)
        got = take_turns({"mesh": functools.partial(on_mesh, prompt, args.tokens),
                          "raw": functools.partial(counted, client, raw, prompt, args.tokens,
                                                   relay)}, args.runs)
        mesh[name], plain[name] = got["mesh"], got["raw"]
    return mesh, plain


async def _delay_pipe(relay: Relay, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
    """One direction of a TCP delay line: every chunk is due ``delay_ms`` after it was read
    and reading never waits for delivery, so a burst of chunks pays the delay once, as on a
    real link. (meshcore_testing.impair's TCP relay reads the next chunk only after delivering
    the last, so a message written in k pieces pays k delays: ~3 per token for llama.cpp RPC.)"""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

    async def deliver() -> None:
        while (item := await queue.get()) is not None:
            await asyncio.sleep(max(0.0, item[0] - loop.time()))
            relay.forwarded += 1
            writer.write(item[1])
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    delivering = asyncio.ensure_future(deliver())
    try:
        while data := await reader.read(65536):
            queue.put_nowait((loop.time() + relay.impairment.delay_ms / 1000, data))
    except OSError:
        pass
    finally:
        queue.put_nowait(None)
        with contextlib.suppress(OSError, RuntimeError):
            await delivering


@contextlib.contextmanager
def delay_relay(target_port: int) -> Iterator[Relay]:
    """A loopback TCP delay line to ``target_port`` in a background thread; change
    ``relay.impairment`` to change the delay."""
    relay = Relay("tcp", ("127.0.0.1", target_port), Impairment())
    loop = asyncio.new_event_loop()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        t_reader, t_writer = await asyncio.open_connection(*relay.target)
        try:
            await asyncio.gather(_delay_pipe(relay, reader, t_writer),
                                 _delay_pipe(relay, t_reader, writer))
        finally:
            for w in (writer, t_writer):
                w.close()

    srv = loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0))
    relay.port = srv.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield relay
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def server(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@contextlib.contextmanager
def llama(argv: list[str]) -> Iterator[str]:
    port = free_port()
    argv = list(argv)
    argv[argv.index("--port") + 1] = str(port)
    proc = server(argv)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ok(f"{base}/health", proc, 300)
        yield base
    finally:
        proc.terminate()
        proc.wait(30)


@contextlib.contextmanager
def rpc_server(bin_dir: Path) -> Iterator[int]:
    port = free_port()
    proc = server([str(bin_dir / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(port),
                   "-t", "1"])
    try:
        time.sleep(1.0)
        yield port
    finally:
        proc.terminate()
        proc.wait(30)


@contextlib.contextmanager
def options(opts: dict[str, Any]) -> Iterator[None]:
    """MESH_LLM_OPTIONS for the nodes started inside the block."""
    old = os.environ.get("MESH_LLM_OPTIONS")
    os.environ["MESH_LLM_OPTIONS"] = json.dumps(opts)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MESH_LLM_OPTIONS", None)
        else:
            os.environ["MESH_LLM_OPTIONS"] = old


@contextlib.contextmanager
def mesh(extra: list[str], tunnel: str) -> Iterator[tuple[Node, list[Relay]]]:
    """A (``--split``) and B joined through a UDP relay to A's QUIC port, split loaded.
    ``tunnel`` "quic": both nodes without the fast path, so the rpc tunnel is QUIC through
    the UDP relay; "fast" (the default path): B listens on a chosen port and offers A a TCP
    delay line to it instead (``quic_fast_port_advertised``), so A's rpc tunnel to B, the
    sealed TCP fast path, crosses the same kind of delay line as raw ``--rpc``."""
    from meshcore_transport_quic.token import JoinToken, decode_token

    with contextlib.ExitStack() as stack:
        fast = tunnel == "fast"
        with options({"quic_fast_path": fast}):
            a = Node(["--split", "--max-vram", "8", *extra], 1)
        stack.callback(a.stop)
        t = decode_token(a.token)
        relays = [stack.enter_context(start_relay("udp", ("127.0.0.1", t.port), Impairment(),
                                                  seed=1))]
        token = str(JoinToken(t.fingerprint, t.secret, relays[0].port, ("127.0.0.1",)).encode())
        b_args, b_opts = ["--max-vram", "4", "--join", token, *extra], {"quic_fast_path": fast}
        if fast:
            port = free_port()
            relays.append(stack.enter_context(delay_relay(port)))
            b_args += ["--bind-port", str(port)]
            b_opts["quic_fast_port_advertised"] = relays[1].port
        with options(b_opts):
            b = Node(b_args, 1)
        stack.callback(b.stop)
        ready(a)
        yield a, relays


def ready(a: Node) -> None:
    wait_for(lambda: serves_split(a.status())
             and httpx.get(f"{a.base}/health").status_code == 200, "A's split to serve", 300)


def row(label: str, samples: dict[str, list[Sample]], solo: dict[str, float],
        tokens: int) -> str:
    cells = []
    for name in PROMPTS:
        s = samples[name]
        tps = statistics.median(x.tps for x in s)
        ttft = statistics.median(x.ttft for x in s) * 1000
        drafted = sum(x.drafted for x in s)
        acc = f" acc {100 * sum(x.accepted for x in s) / drafted:3.0f}%" if drafted else ""
        rt = (f" chunks/tok {statistics.median(x.chunks for x in s) / tokens:4.1f}"
              if s[0].chunks else "")
        ratio = f" ({tps / solo[name]:.2f}x solo)" if solo else ""
        cells.append(f"{name} {tps:6.1f} tok/s{ratio} TTFT {ttft:6.0f} ms{acc}{rt}")
    return f"{label:28} " + " | ".join(cells)


def speeds(samples: dict[str, list[Sample]]) -> dict[str, float]:
    return {k: statistics.median(x.tps for x in v) for k, v in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rtts", default="5,20,50", help="round-trip times in ms, comma-separated")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--model", help="a GGUF file instead of SmolLM2-135M (e.g. the GPU "
                                    "bench's 8B shape, bench/gpu_model.py)")
    ap.add_argument("--modes", default="off,draft,ngram",
                    help="speculation modes, comma-separated (off is always run)")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--tunnel", choices=("fast", "quic"), default="fast",
                    help="the mesh's rpc tunnel: the sealed TCP fast path (the default path) "
                         "through a TCP delay line like raw's, or QUIC through the UDP relay")
    args = ap.parse_args()
    args.modes = {"off", *args.modes.split(",")}
    rtts = [0.0] + [float(x) for x in args.rtts.split(",")]
    modes: dict[str, list[str]] = {}
    mesh_rows: dict[tuple[str, float], dict[str, list[Sample]]] = {}
    raw_rows: dict[tuple[str, float], dict[str, list[Sample]]] = {}
    with httpx.Client(timeout=600) as client:
        for mode, extra in MESH_MODES.items():
            if mode not in args.modes:
                continue
            if args.model:  # the last --model wins (split.Node gives SmolLM2-135M first)
                extra = [*extra, "--model", args.model]
            with mesh(extra, args.tunnel) as (a, relays):
                argv = modes[mode] = a.status()["backend"]["llama_server"]["argv"]
                links = {t["link"] for t in a.status()["tunnels"] if t["service"] == "rpc"}
                print(f"mesh, {mode}: rpc tunnel over {', '.join(sorted(links))}; "
                      f"speculation {a.status()['backend'].get('speculation')}", flush=True)
                # raw beside it, with exactly the mesh host's argv: both measured in turns
                with rpc_server(Path(argv[0]).parent) as rpc_port, \
                        delay_relay(rpc_port) as raw_relay:
                    argv = list(argv)
                    argv[argv.index("--rpc") + 1] = f"127.0.0.1:{raw_relay.port}"
                    with llama(argv) as raw:
                        for rtt in rtts:
                            for relay in (*relays, raw_relay):
                                relay.impairment = Impairment(delay_ms=rtt / 2)
                            key = (mode, rtt)
                            mesh_rows[key], raw_rows[key] = measure_pair(
                                client, a, raw, raw_relay, args)
                            for label, rows in (("mesh", mesh_rows), ("raw", raw_rows)):
                                print(row(f"{label}, {mode}, RTT {rtt:g}", rows[key], {},
                                          args.tokens), flush=True)
        off = modes["off"]
        solo_argv = [off[0], "-m", off[off.index("-m") + 1], "--host", "127.0.0.1", "--port",
                     "0", "-t", "1", "-ngl", "99"]
        solo_extra: dict[str, list[str]] = {"off": [], "ngram": NGRAM}
        if "draft" in modes:
            draft = modes["draft"]
            at = draft.index("-md")
            solo_extra["draft"] = draft[at:at + 6]
        solo: dict[str, dict[str, float]] = {}
        for mode, extra in solo_extra.items():
            if mode not in modes:
                continue
            with llama(solo_argv + extra) as base:
                samples = measure(client, base, args)
            solo[mode] = speeds(samples)
            print(row(f"solo, {mode}", samples, {}, args.tokens), flush=True)
    solo_off = solo["off"]
    for rtt in rtts:
        print(f"--- RTT {rtt:g} ms (split / solo without speculation)")
        for mode in modes:
            print(row(f"raw --rpc, {mode}", raw_rows[(mode, rtt)], solo_off, args.tokens))
            print(row(f"mesh, {mode}", mesh_rows[(mode, rtt)], solo_off, args.tokens))
        for mode in modes:
            m, r = speeds(mesh_rows[(mode, rtt)]), speeds(raw_rows[(mode, rtt)])
            print(f"mesh/raw {mode}: " + ", ".join(f"{k} {m[k] / r[k]:.2f}" for k in PROMPTS))
        if rtt:
            for label, rows in (("raw", raw_rows), ("mesh", mesh_rows)):
                now, zero = speeds(rows[("off", rtt)]), speeds(rows[("off", 0.0)])
                print(f"{label} round trips per token: " + ", ".join(
                    f"{k} {(1 / now[k] - 1 / zero[k]) * 1000 / rtt:.2f}" for k in PROMPTS))
        one = speeds(raw_rows[("off", rtt)])
        for mode in modes:
            m = speeds(mesh_rows[(mode, rtt)])
            print(f"mesh {mode} / raw one token at a time: "
                  + ", ".join(f"{k} {m[k] / one[k]:.2f}" for k in PROMPTS))

if __name__ == "__main__":
    main()
