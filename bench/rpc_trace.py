"""Where a split's per-token time goes: a counting relay in front of a ggml-rpc-server.

The relay forwards bytes unchanged (TCP, one thread per direction, blocking sockets, like
llama.cpp's own client) and parses llama.cpp b11434's RPC framing on the way (facts from
ggml/src/ggml-rpc/ggml-rpc.cpp):

- a command: ``u8 cmd | u64 size (little-endian) | size bytes``; the first one is HELLO;
- commands with a reply (the client waits for it): HELLO, ALLOC_BUFFER, GET_ALIGNMENT,
  GET_MAX_SIZE, BUFFER_GET_BASE, SET_TENSOR_HASH, GET_TENSOR, COPY_TENSOR,
  GET_DEVICE_MEMORY, GET_ALLOC_SIZE, DEVICE_COUNT; the reply is ``u64 size | size bytes``,
  in command order;
- the rest have none (SET_TENSOR, GRAPH_COMPUTE, GRAPH_RECOMPUTE, INIT_TENSOR, ...);
- on TCP every piece is its own ``send()`` (cmd byte, size, payload; a reply's size, then
  its payload), with TCP_NODELAY.

``python bench/rpc_trace.py [--tokens 64] [--ngl 16] [--threads 1]`` runs a raw split on this
machine: ``ggml-rpc-server``, this relay, and ``llama-server --rpc <relay>`` (SmolLM2-135M and
the cached llama.cpp build, as the tests find them; ``--model``, ``--bin-dir`` to override).
It reports, per generated token (a request of 1 + N tokens minus one of 1 token, both with
the same prompt and no prompt cache, divided by N): round trips by command, commands without a
reply, bytes each way, the reads each way (how many pieces the bytes came in), the time the
client waited for each reply at the relay; the command sequence of one token; and the
one-way latency the relay itself adds (a 64-byte ping-pong through it against raw TCP).
``bench/gpu.py`` uses :func:`trace_split` the same way on the GPU. Nothing here is asserted by
the test suite.

The mesh path is traced by the nodes themselves (``MESH_LLM_SPLICE_TRACE``: every splice end
notes when each chunk reached it, meshcore_transport_quic.splice.TracedEnd); :func:`mesh_trace`
lines up the host's and the worker's notes (both nodes on one machine share the monotonic
clock) into turns, a turn being the commands llama-server sends and the reply it waits for
(one per generated token), and :func:`turn_stats` gives where a turn's time goes: the host's
commands, the crossing to the worker, the worker's compute, the crossing back, the host's
compute. The raw trace's turns come from this relay's own log, the same way.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import contextlib
import itertools
import json
import os
import socket
import statistics
import struct
import subprocess
import threading
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from solo import listening, wait_ok
from tunnel import rtt

NAMES = ("ALLOC_BUFFER", "GET_ALIGNMENT", "GET_MAX_SIZE", "BUFFER_GET_BASE", "FREE_BUFFER",
         "BUFFER_CLEAR", "SET_TENSOR", "SET_TENSOR_HASH", "GET_TENSOR", "COPY_TENSOR",
         "GRAPH_COMPUTE", "GET_DEVICE_MEMORY", "INIT_TENSOR", "GET_ALLOC_SIZE", "HELLO",
         "DEVICE_COUNT", "GRAPH_RECOMPUTE", "MEMSET_TENSOR")  # enum rpc_cmd, from 0
REPLIED = frozenset({"HELLO", "DEVICE_COUNT", "ALLOC_BUFFER", "GET_ALLOC_SIZE", "GET_ALIGNMENT",
                     "GET_MAX_SIZE", "BUFFER_GET_BASE", "SET_TENSOR_HASH", "GET_TENSOR",
                     "COPY_TENSOR", "GET_DEVICE_MEMORY"})
_U64 = struct.Struct("<Q")


@dataclass
class Counts:
    """What crossed the relay: per command (count, request bytes, reply bytes, nanoseconds
    the client waited for replies), bytes and reads each way."""

    commands: collections.Counter[str] = field(default_factory=collections.Counter)
    request_bytes: collections.Counter[str] = field(default_factory=collections.Counter)
    reply_bytes: collections.Counter[str] = field(default_factory=collections.Counter)
    wait_ns: collections.Counter[str] = field(default_factory=collections.Counter)
    to_server: int = 0
    to_client: int = 0
    reads_to_server: int = 0
    reads_to_client: int = 0

    def copy(self) -> Counts:
        return Counts(collections.Counter(self.commands), collections.Counter(self.request_bytes),
                      collections.Counter(self.reply_bytes), collections.Counter(self.wait_ns),
                      self.to_server, self.to_client, self.reads_to_server,
                      self.reads_to_client)

    def minus(self, other: Counts) -> Counts:
        def sub(a: collections.Counter[str], b: collections.Counter[str]
                ) -> collections.Counter[str]:
            out = collections.Counter(a)
            out.subtract(b)
            return out

        return Counts(sub(self.commands, other.commands),
                      sub(self.request_bytes, other.request_bytes),
                      sub(self.reply_bytes, other.reply_bytes), sub(self.wait_ns, other.wait_ns),
                      self.to_server - other.to_server, self.to_client - other.to_client,
                      self.reads_to_server - other.reads_to_server,
                      self.reads_to_client - other.reads_to_client)


class Framing:
    """Incremental parser of one direction: fixed-size headers, then payloads skipped by
    count (a weight upload of gigabytes is never copied)."""

    def __init__(self, header: int) -> None:
        self.header_size = header
        self.head = bytearray()
        self.left = 0  # payload bytes still to skip
        self.in_payload = False

    def feed(self, data: memoryview) -> Iterator[tuple[bytes, int, bool]]:
        """Yields (header, payload size, complete) when a header completes (complete False)
        and when its payload ends (complete True)."""
        pos, end = 0, len(data)
        while pos < end:
            if not self.in_payload:
                take = min(self.header_size - len(self.head), end - pos)
                self.head += data[pos:pos + take]
                pos += take
                if len(self.head) < self.header_size:
                    return
                (self.left,) = _U64.unpack_from(self.head, self.header_size - 8)
                self.in_payload = True
                yield bytes(self.head), self.left, False
            take = min(self.left, end - pos)
            self.left -= take
            pos += take
            if self.left == 0:
                yield bytes(self.head), 0, True
                self.head.clear()
                self.in_payload = False


class TraceRelay:
    """A loopback TCP relay to ``target`` that counts llama.cpp RPC traffic (threads)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.counts = Counts()
        self.lock = threading.Lock()
        self.events: list[tuple[float, str, str, int]] | None = None  # (t, dir, cmd, size)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def snapshot(self) -> Counts:
        with self.lock:
            return self.counts.copy()

    def record(self, on: bool) -> None:
        """Start (or stop) logging each command and reply with its time."""
        with self.lock:
            self.events = [] if on else self.events

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            waiting: collections.deque[tuple[str, float]] = collections.deque()
            threading.Thread(target=self._requests, args=(client, server, waiting),
                             daemon=True).start()
            threading.Thread(target=self._replies, args=(server, client, waiting),
                             daemon=True).start()

    def _log(self, direction: str, cmd: str, size: int) -> None:
        if self.events is not None and len(self.events) < 200_000:
            self.events.append((time.perf_counter(), direction, cmd, size))

    def _requests(self, src: socket.socket, dst: socket.socket,
                  waiting: collections.deque[tuple[str, float]]) -> None:
        framing, buf = Framing(9), bytearray(1 << 20)
        view = memoryview(buf)
        with contextlib.suppress(OSError):
            while n := src.recv_into(buf):
                with self.lock:  # parsed before it is sent: the reply cannot come first
                    c = self.counts
                    c.to_server += n
                    c.reads_to_server += 1
                    for head, size, complete in framing.feed(view[:n]):
                        cmd = NAMES[head[0]] if head[0] < len(NAMES) else f"cmd{head[0]}"
                        if not complete:
                            c.commands[cmd] += 1
                            c.request_bytes[cmd] += 9 + size
                            self._log(">", cmd, 9 + size)
                        elif cmd in REPLIED:
                            waiting.append((cmd, time.perf_counter()))
                dst.sendall(view[:n])
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _replies(self, src: socket.socket, dst: socket.socket,
                 waiting: collections.deque[tuple[str, float]]) -> None:
        framing, buf = Framing(8), bytearray(1 << 20)
        view = memoryview(buf)
        with contextlib.suppress(OSError):
            while n := src.recv_into(buf):
                dst.sendall(view[:n])
                with self.lock:
                    c = self.counts
                    c.to_client += n
                    c.reads_to_client += 1
                    for _, size, complete in framing.feed(view[:n]):
                        if not complete:
                            cmd, sent = waiting[0] if waiting else ("?", time.perf_counter())
                            c.reply_bytes[cmd] += 8 + size
                            self._log("<", cmd, 8 + size)
                        elif waiting:
                            cmd, sent = waiting.popleft()
                            c.wait_ns[cmd] += int((time.perf_counter() - sent) * 1e9)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()


# ---------------------------------------------------------------- measurements

def _post(base: str, body: dict[str, Any]) -> dict[str, Any]:
    import httpx

    resp = httpx.post(f"{base}/completion", json=body, timeout=600)
    resp.raise_for_status()
    data: dict[str, Any] = resp.json()
    return data


PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def per_token(relay: TraceRelay, base: str, tokens: int) -> dict[str, Any]:
    """Round trips, commands and bytes per generated token, by difference of a 1-token and
    a (1 + tokens)-token request with the same prompt and no prompt cache."""
    body = {"prompt": PROMPT, "temperature": 0, "ignore_eos": True, "cache_prompt": False}
    _post(base, {**body, "n_predict": 4})  # warm-up
    s0 = relay.snapshot()
    _post(base, {**body, "n_predict": 1})
    s1 = relay.snapshot()
    relay.record(True)
    long = _post(base, {**body, "n_predict": 1 + tokens})
    s2 = relay.snapshot()
    events = relay.events or []
    relay.record(False)
    gen = s2.minus(s1).minus(s1.minus(s0))
    n = float(tokens)
    cmds = {k: round(v / n, 2) for k, v in sorted(gen.commands.items()) if v}
    return {
        "tokens": tokens,
        "round_trips": round(sum(v for k, v in gen.commands.items() if k in REPLIED) / n, 2),
        "without_reply": round(sum(v for k, v in gen.commands.items()
                                   if k not in REPLIED) / n, 2),
        "commands": cmds,
        "request_bytes": {k: round(gen.request_bytes[k] / n) for k in cmds},
        "reply_bytes": {k: round(gen.reply_bytes[k] / n) for k in cmds if k in REPLIED},
        "reply_wait_ms": {k: round(gen.wait_ns[k] / max(gen.commands[k], 1) / 1e6, 3)
                          for k in cmds if k in REPLIED},
        "bytes_to_server": round(gen.to_server / n), "bytes_to_client": round(gen.to_client / n),
        "reads_to_server": round(gen.reads_to_server / n, 2),
        "reads_to_client": round(gen.reads_to_client / n, 2),
        "server_ms_per_token": long.get("timings", {}).get("predicted_per_token_ms"),
        "one_token": one_token(events),
        "turns": turn_stats(turns([(int(t * 1e9), d == ">", size)
                                   for t, d, _, size in events])),
    }


# ------------------------------------------------------------------ turns, raw and mesh

@dataclass
class Turn:
    """One request and its reply as one observer saw them (monotonic ns)."""

    c_first: int
    c_last: int
    c_bytes: int
    r_first: int = 0
    r_last: int = 0
    r_bytes: int = 0


def turns(events: Sequence[tuple[int, bool, int]]) -> list[Turn]:
    """Group (ns, is a command, bytes) events into turns: a run of commands, then the reply's
    chunks; a command after a reply starts the next turn."""
    out: list[Turn] = []
    for t, command, size in sorted(events):
        last = out[-1] if out else None
        if command:
            if last is None or last.r_bytes:
                out.append(Turn(t, t, size))
            else:
                last.c_last, last.c_bytes = t, last.c_bytes + size
        elif last is not None:
            if not last.r_bytes:
                last.r_first = t
            last.r_last, last.r_bytes = t, last.r_bytes + size
    return [x for x in out if x.r_bytes]


def _pct(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    if not values:
        return {}
    p10, p90 = values[len(values) // 10], values[min(len(values) - 1, len(values) * 9 // 10)]
    return {"p10": round(p10, 1), "median": round(statistics.median(values), 1),
            "p90": round(p90, 1)}


GAP = 10  # a turn followed by a pause this many times the median turn ends a request


def turn_stats(host: list[Turn], worker: list[Turn] | None = None) -> dict[str, Any]:
    """Where a generated token's turn goes, in microseconds (p10 / median / p90), over the
    turns whose reply has the most common size (one per generated token): ``send`` (the
    host's commands, first to last), ``wait`` (last command to the reply's first chunk, as
    the host's observer saw it), ``receive`` (the reply's chunks), ``host`` (the reply's last
    chunk to the next turn's first command: the host's compute), ``token`` (first command to
    the next first command). With the worker's observer (the mesh's far end): ``forward``
    (the last command's crossing), ``worker`` (its compute: last command in to first reply
    chunk out), ``back`` (the reply's last chunk crossing)."""
    sizes = collections.Counter(x.r_bytes for x in host)
    if not sizes:
        return {"turns": 0}
    size = sizes.most_common(1)[0][0]
    keys = ("send", "wait", "receive", "host", "token", "forward", "worker", "back")
    got: dict[str, list[float]] = {k: [] for k in keys}
    starts = [w.c_last for w in worker] if worker else []
    pairs = [(a, b) for a, b in itertools.pairwise(host) if a.r_bytes == size]
    if not pairs:
        return {"turns": 0}
    usual = statistics.median(b.c_first - a.c_first for a, b in pairs)
    for this, after in pairs:
        if after.c_first - this.c_first > GAP * usual:
            continue
        got["send"].append((this.c_last - this.c_first) / 1e3)
        got["wait"].append((this.r_first - this.c_last) / 1e3)
        got["receive"].append((this.r_last - this.r_first) / 1e3)
        got["host"].append((after.c_first - this.r_last) / 1e3)
        got["token"].append((after.c_first - this.c_first) / 1e3)
        if worker:  # the worker's turn: its last command came between ours and our reply
            i = bisect.bisect_left(starts, this.c_last)
            if i < len(worker) and worker[i].c_last < this.r_first and worker[i].r_bytes == size:
                w = worker[i]
                got["forward"].append((w.c_last - this.c_last) / 1e3)
                got["worker"].append((w.r_first - w.c_last) / 1e3)
                got["back"].append((this.r_last - w.r_last) / 1e3)
    return {"turns": len(got["token"]), "reply_bytes": size,
            **{k: _pct(v) for k, v in got.items() if v}}


def _notes(path: Path) -> list[tuple[int, int]]:
    values = array("q")
    values.frombytes(path.read_bytes()[: path.stat().st_size // 16 * 16])
    return list(zip(values[::2], values[1::2], strict=True))


def mesh_trace(directory: Path) -> dict[str, Any]:
    """Turn statistics of the busiest tunnel traced under ``directory`` (the split's rpc
    connection): the host's end (``dial``: llama-server's commands in, the worker's replies
    in) and the worker's (``accept``: the commands in, the rpc-server's replies in)."""
    ends: dict[tuple[str, str], dict[str, list[tuple[int, int]]]] = {}
    for path in directory.glob("*.trace"):
        side, pid, n, role = path.stem.split("-")
        ends.setdefault((side, f"{pid}-{n}"), {})[role] = _notes(path)

    def busiest(side: str) -> list[Turn]:
        mine = [v for (s, _), v in ends.items() if s == side]
        if not mine:
            return []
        best = max(mine, key=lambda v: sum(n for part in v.values() for _, n in part))
        commands = best.get("local" if side == "dial" else "tunnel", [])
        replies = best.get("tunnel" if side == "dial" else "local", [])
        return turns([(t, True, n) for t, n in commands] + [(t, False, n) for t, n in replies])

    return turn_stats(busiest("dial"), busiest("accept") or None)


def turns_report(name: str, stats: dict[str, Any]) -> None:
    parts = [f"{k} {v['median']:.0f}" for k, v in stats.items() if isinstance(v, dict)]
    print(f"  {name}: {stats.get('turns', 0)} turns, median us: {', '.join(parts)}")


def one_token(events: Sequence[tuple[float, str, str, int]]) -> list[str]:
    """The commands of one token late in the request: from one GRAPH_COMPUTE (or RECOMPUTE)
    to the next, each with its size and the microseconds since the one before."""
    starts = [i for i, (_, d, cmd, _) in enumerate(events)
              if d == ">" and cmd.startswith("GRAPH_")]
    if len(starts) < 3:
        return []
    a, b = starts[-3], starts[-2]
    out, prev = [], events[a][0]
    for t, d, cmd, size in events[a:b]:
        out.append(f"{d}{cmd} {size} B +{(t - prev) * 1e6:.0f} us")
        prev = t
    return out


def _echo(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn, contextlib.suppress(OSError):
        while data := conn.recv(65536):
            conn.sendall(data)


def relay_latency(rounds: int = 2000, repeat: int = 3) -> dict[str, float]:
    """The one-way latency this relay adds: half the extra of a ping-pong through it, against
    raw TCP to the same echo server (interleaved, medians)."""
    raw: list[float] = []
    relayed: list[float] = []
    for _ in range(repeat):
        for out in (raw, relayed):
            listener = socket.create_server(("127.0.0.1", 0))
            threading.Thread(target=_echo, args=(listener,), daemon=True).start()
            port = listener.getsockname()[1]
            relay = TraceRelay(("127.0.0.1", port)) if out is relayed else None
            out.append(rtt(relay.port if relay else port, rounds))
            listener.close()
            if relay:
                relay.close()
    r, t = statistics.median(raw), statistics.median(relayed)
    return {"raw_rtt_us": round(r, 1), "relayed_rtt_us": round(t, 1),
            "one_way_added_us": round((t - r) / 2, 1)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def trace_split(argv: Sequence[str], rpc_server: Path, *, tokens: int, threads: int,
                host_env: dict[str, str] | None = None, worker_env: dict[str, str] | None = None,
                logs: Path | None = None) -> dict[str, Any]:
    """A raw split traced: ``rpc_server`` on a free port, the relay in front of it, and
    llama-server ``argv`` (its ``--port`` and ``--rpc`` replaced) through the relay."""
    rpc_port, port = _free_port(), _free_port()
    out = (logs / "trace-rpc-server.log").open("w") if logs else subprocess.DEVNULL
    err = (logs / "trace-llama-server.log").open("w") if logs else subprocess.DEVNULL
    rpc = subprocess.Popen([str(rpc_server), "-H", "127.0.0.1", "-p", str(rpc_port),
                            "-t", str(threads)], env=worker_env, stdout=out,
                           stderr=subprocess.STDOUT)
    relay: TraceRelay | None = None
    server: subprocess.Popen[Any] | None = None
    try:
        deadline = time.monotonic() + 60
        while not listening(rpc_port):
            if time.monotonic() > deadline or rpc.poll() is not None:
                raise SystemExit("the traced ggml-rpc-server did not start")
            time.sleep(0.05)
        relay = TraceRelay(("127.0.0.1", rpc_port))
        argv = list(argv)
        argv[argv.index("--port") + 1] = str(port)
        argv[argv.index("--rpc") + 1] = f"127.0.0.1:{relay.port}"
        start = time.monotonic()
        server = subprocess.Popen(argv, env=host_env, stdout=err, stderr=subprocess.STDOUT)
        wait_ok(f"http://127.0.0.1:{port}/health", server, 300)
        load = relay.snapshot()
        result = {"argv": argv[1:], "load_s": round(time.monotonic() - start, 1),
                  "load": {"bytes_to_server": load.to_server,
                           "round_trips": sum(v for k, v in load.commands.items()
                                              if k in REPLIED),
                           "commands": dict(load.commands)}}
        result["per_token"] = per_token(relay, f"http://127.0.0.1:{port}", tokens)
        return result
    finally:
        for proc in (server, rpc):
            if proc is not None:
                proc.terminate()
                proc.wait(30)
        if relay is not None:
            relay.close()


def report(result: dict[str, Any]) -> None:
    tok = result["per_token"]
    print(f"llama-server {' '.join(result['argv'])}")
    print(f"load: {result['load_s']} s, {result['load']['bytes_to_server'] / 1e6:.1f} MB to "
          f"the rpc-server, {result['load']['round_trips']} round trips")
    print(f"per generated token ({tok['tokens']} tokens; llama-server's own "
          f"{tok['server_ms_per_token']} ms/token):")
    print(f"  round trips {tok['round_trips']}, commands without a reply "
          f"{tok['without_reply']}")
    print(f"  {'command':18} {'per token':>9} {'request B':>10} {'reply B':>9} "
          f"{'wait ms':>8}")
    for cmd, count in tok["commands"].items():
        print(f"  {cmd:18} {count:9.2f} {tok['request_bytes'][cmd]:10} "
              f"{tok['reply_bytes'].get(cmd, ''):>9} {tok['reply_wait_ms'].get(cmd, ''):>8}")
    print(f"  bytes to the rpc-server {tok['bytes_to_server']} in {tok['reads_to_server']} "
          f"reads; back {tok['bytes_to_client']} in {tok['reads_to_client']} reads")
    print("  one token, as the relay saw it:")
    for line in tok["one_token"]:
        print(f"    {line}")
    if tok.get("turns"):
        turns_report("turns at this relay", tok["turns"])
    lat = result.get("relay_latency")
    if lat:
        print(f"this relay adds {lat['one_way_added_us']} us one way (ping-pong "
              f"{lat['relayed_rtt_us']} us through it, {lat['raw_rtt_us']} us raw)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ngl", type=int, default=16,
                    help="layers offloaded to the rpc-server (a CPU split, as the mesh's "
                         "CPU host does it; default 16 of SmolLM2's 31)")
    ap.add_argument("--model", type=Path, help="GGUF (default: SmolLM2-135M, as the tests)")
    ap.add_argument("--bin-dir", type=Path, help="llama.cpp build (default: the cached one)")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args()
    from meshcore_backend_llamacpp.binaries import locate
    from meshcore_backend_llamacpp.models import smollm2_path

    bins = locate(args.bin_dir)
    model = args.model or smollm2_path(download=False)
    argv = [str(bins.llama_server), "-m", str(model), "--host", "127.0.0.1", "--port", "0",
            "-ngl", str(args.ngl), "-t", str(args.threads), "--rpc", "x", "--tensor-split", "1"]
    result = trace_split(argv, bins.rpc_server, tokens=args.tokens, threads=args.threads)
    result["relay_latency"] = relay_latency()
    result["machine"] = {"cpus": os.cpu_count(), "load": os.getloadavg()[0]}
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
