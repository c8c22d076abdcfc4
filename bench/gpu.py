"""Benchmark on a GPU box: raw llama.cpp against mesh-llm, solo and split over two GPUs, one run.

Run on a machine with NVIDIA GPUs, nvcc and cmake (see docs/gpu.md):
``python bench/gpu.py --out OUT [--work .gpu] [--runs 5] [--tokens 256] [--budget 560]``.
Phases, each skipped when the budget left is too small for it:

1. build: ``python -m meshcore_backend_llamacpp.build`` with ``MESH_LLM_CACHE=WORK/cache`` (the
   product's own CUDA build, reused when present; the sdist is taken from WORK/sdist).
2. model: a random-weight Llama-3-8B-shaped Q8_0 GGUF (bench/gpu_model.py), reused when present.
3. solo (GPU0): a ``mesh-llm --model M`` node, then a raw llama-server with the node's exact
   command line; load time (start to /health 200), then alternating streamed requests:
   tok/s after the first token and time to first token, medians, ratio mesh/raw.
4. split (GPU0 + GPU1; both on GPU0 with ``--same-gpu``): node A ``--split`` on GPU0, node B
   ``--join`` on GPU1, so llama.cpp's rpc traffic crosses the mesh tunnel (TCP+AES-GCM fast
   path); then a raw ``ggml-rpc-server`` on GPU1 and a raw llama-server with A's command line,
   ``--rpc`` straight at it. Load time (B's start to A serving the split; raw: start to
   /health), tok/s through the mesh API, through the mesh host's llama-server directly (the
   tunnel without the API proxy) and raw, ratios; then the raw split through
   bench/rpc_trace.py's counting relay (round trips and bytes per generated token).
   ``--mesh-trace``: the nodes note every chunk at both tunnel ends (``MESH_LLM_SPLICE_TRACE``)
   and the run reports where a token's turn goes on the mesh path (the crossings, the
   worker's and the host's compute), beside the raw trace's turns.

Prints a table last; writes results.json, the run's log and every process log (logs.tar.gz)
under OUT. Nothing here is asserted by the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
from meshcore_testing import HealthPoller

sys.path.insert(0, str(Path(__file__).parent))
from rpc_trace import mesh_trace, relay_latency, trace_split, turns_report
from rpc_trace import report as trace_report
from solo import (
    alternate,
    free_port,
    listening,
    medians,
    one_run,
    serves_split,
    wait_for,
    wait_ok,
)

STARTED = time.monotonic()
RESULTS: dict[str, Any] = {}
LOGS: list[Path] = []


def say(msg: str) -> None:
    print(f"[gpu {time.monotonic() - STARTED:6.1f}s] {msg}", flush=True)


def sh(cmd: str) -> str:
    out = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    return (out.stdout + out.stderr).strip()


def save(out: Path) -> None:
    (out / "results.json").write_text(json.dumps(RESULTS, indent=2))


def info() -> int:
    """Record card, driver, toolkit and CPU; returns the GPU count."""
    gpus = sh("nvidia-smi --query-gpu=index,name,driver_version,memory.total "
              "--format=csv,noheader").splitlines()
    RESULTS["machine"] = {"gpus": gpus, "nvcc": sh("nvcc --version | tail -2"),
                          "cpus": os.cpu_count(), "python": sys.version.split()[0]}
    say(f"GPUs: {gpus}")
    return len([g for g in gpus if g.strip()[:1].isdigit()])


def build(work: Path, out: Path) -> Path:
    """The product's CUDA build of llama.cpp (cached under WORK/cache); returns its bin dir."""
    cache = work / "cache"
    (cache / "sdist").mkdir(parents=True, exist_ok=True)
    for sdist in (work / "sdist").glob("*.tar.gz"):
        if not (cache / "sdist" / sdist.name).exists():
            shutil.copy2(sdist, cache / "sdist" / sdist.name)
    env = {**os.environ, "MESH_LLM_CACHE": str(cache), "MESH_LLM_CUDA": "1"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "meshcore_backend_llamacpp.build"], env=env,
                          capture_output=True, text=True)
    RESULTS["build_s"] = round(time.monotonic() - start, 1)
    for log in cache.glob("llama.cpp/*/build.log"):
        LOGS.append(log)
    if proc.returncode != 0:
        (out / "build_err.txt").write_text(proc.stdout + proc.stderr)
        raise SystemExit(f"build failed:\n{proc.stderr[-3000:]}")
    bin_dir = Path(proc.stdout.strip().splitlines()[-1])
    say(f"llama.cpp CUDA build: {bin_dir} ({RESULTS['build_s']} s)")
    return bin_dir


def model(work: Path, shape: str, qtype: str) -> Path:
    from gpu_model import write_model

    path = work / "models" / f"random-{shape}-{qtype}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        tmp = path.with_suffix(".part")
        write_model(tmp, work / "tokenizer.json.gz", shape, qtype)
        tmp.rename(path)
        say(f"wrote {path.name} in {time.monotonic() - start:.0f} s")
    RESULTS["model"] = {"file": path.name, "bytes": path.stat().st_size, "shape": shape,
                        "type": qtype}
    return path


class Proc:
    """A child process whose stdout+stderr go to a log file that comes back in logs.tar.gz."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logs: Path) -> None:
        self.log = logs / f"{name}.log"
        LOGS.append(self.log)
        self.fh = self.log.open("w")
        self.proc = subprocess.Popen(argv, env=env, stdout=self.fh, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.fh.close()


class Node(Proc):
    """A ``mesh-llm`` process with its own MESH_LLM_HOME, on the GPUs ``gpus`` names."""

    def __init__(self, name: str, args: list[str], gpus: str, logs: Path, common: list[str],
                 threads: int, extra_env: dict[str, str] | None = None) -> None:
        home = self.home = Path(tempfile.mkdtemp(prefix=f"gpu-{name}-", dir=logs))
        env = {**os.environ, "MESH_LLM_HOME": str(home), "CUDA_VISIBLE_DEVICES": gpus,
               "MESH_LLM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        super().__init__(name, [sys.executable, "-m", "meshcore_cli", "--port", "0", *common,
                                *args], env, logs)
        self.base, self.token = "", ""
        deadline = time.monotonic() + 120
        while not (self.base and self.token) and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise SystemExit(f"{name} exited {self.proc.returncode}: {self.log.read_text()}")
            text = self.log.read_text()
            for line in text.splitlines():
                if "API" in line and "http://" in line and "/v1" in line:
                    port = line.split("http://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1]
                    self.base = f"http://127.0.0.1:{port}"
                if "join with: mesh-llm --join " in line:
                    self.token = line.split("--join ", 1)[1].split()[0]
            time.sleep(0.1)
        if not self.base:
            self.stop()
            raise SystemExit(f"{name} printed no banner; see {self.log}")

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(f"{self.base}/mesh/status", timeout=10).json()
        return data

    def argv(self) -> list[str]:
        argv: list[str] = self.status()["backend"]["llama_server"]["argv"]
        return argv

    def evidence(self, lines: int = 40) -> dict[str, Any]:
        """What tells why this node is not where the bench waited for it: its status (or
        why there is none) and the last lines of its log and its children's logs."""
        out: dict[str, Any] = {}
        try:
            out["status"] = self.status()
        except (httpx.HTTPError, ValueError) as exc:
            out["status"] = f"unavailable: {exc!r}"
        for log in [self.log, *sorted(self.home.glob("logs/*.log"))]:
            with contextlib.suppress(OSError):
                out[log.name] = log.read_text(errors="replace").splitlines()[-lines:]
        return out


class Timeline:
    """When each step of the split's load was first seen, in seconds since ``start``: the
    bench polls both nodes' status every 50 ms while it waits for the split."""

    def __init__(self, start: float, a_id: str) -> None:
        self.start, self.a_id = start, a_id
        self.seen: dict[str, float] = {}

    def note(self, what: str) -> None:
        self.seen.setdefault(what, round(time.monotonic() - self.start, 2))

    def look(self, statuses: dict[str, dict[str, Any]]) -> None:
        """Note what ``statuses`` (node name -> its /mesh/status) show for the first time."""
        for name, st in statuses.items():
            plan, back = st["plan"], st["backend"]
            self.note(f"{name} plan {plan['state']}" + (
                f", host {'A' if plan['host_id'] == self.a_id else 'B'}" if plan["host_id"]
                else ""))
            if back.get("seeding"):
                self.note(f"{name} seeding {back['seeding']}")
            if back.get("rpc_server"):  # it starts while the cache is seeded, then is offered
                self.note(f"{name} rpc-server started")
                if back["rpc_server"].get("port"):
                    self.note(f"{name} rpc-server offered")
            if st["me"]["extra"].get("rpc_loaded"):
                self.note(f"{name} says its llama-server holds the workers' layers")
            server = back.get("llama_server")
            if server:
                self.note(f"{name} llama-server pid {server['pid']}")


def with_port(argv: list[str], port: int, rpc: str | None = None) -> list[str]:
    argv = list(argv)
    argv[argv.index("--port") + 1] = str(port)
    if rpc is not None:
        argv[argv.index("--rpc") + 1] = rpc
    return argv


@contextlib.contextmanager
def stopping(*procs: Proc) -> Iterator[None]:
    try:
        yield
    finally:
        for p in reversed(procs):
            p.stop()


def compare(bases: dict[str, str], runs: int, tokens: int) -> dict[str, Any]:
    """Alternating streamed requests (solo.alternate: the order turns each round); medians
    of (TTFT s, client tok/s, server tok/s)."""
    with httpx.Client(timeout=300) as client:
        for base in bases.values():  # warm-up
            one_run(client, base, 16)
        results = alternate(client, bases, runs, tokens)
    med = medians(results)
    return {"runs": runs, "tokens": tokens, "median": med,
            "samples": {k: [list(r) for r in v] for k, v in results.items()},
            "ratio_tps": med["mesh"][1] / med["raw"][1],
            "added_ttft_ms": (med["mesh"][0] - med["raw"][0]) * 1000}


def gpu_memory() -> list[str]:
    return sh("nvidia-smi --query-gpu=index,memory.used --format=csv,noheader").splitlines()


def solo(bin_dir: Path, path: Path, logs: Path, args: argparse.Namespace) -> None:
    common = ["--model", str(path), "--bin-dir", str(bin_dir), "--speculation", "off"]
    start = time.monotonic()
    node = Node("solo-mesh", [], "0", logs, common, args.threads)
    with stopping(node):
        wait_ok(f"{node.base}/health", node.proc, timeout=150)
        mesh_load = time.monotonic() - start
        argv = node.argv()
        say(f"solo mesh node serving after {mesh_load:.1f} s: {' '.join(argv[1:])}")
        port = free_port()
        start = time.monotonic()
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0"}
        raw = Proc("solo-raw-llama-server", with_port(argv, port), env, logs)
        with stopping(raw):
            wait_ok(f"http://127.0.0.1:{port}/health", raw.proc, timeout=300)
            raw_load = time.monotonic() - start
            say(f"solo raw llama-server serving after {raw_load:.1f} s")
            res = compare({"raw": f"http://127.0.0.1:{port}", "mesh": node.base},
                          args.runs, args.tokens)
    res.update(argv=argv, load_s={"mesh": mesh_load, "raw": raw_load},
               ratio_load=mesh_load / raw_load)
    RESULTS["solo"] = res


def split(bin_dir: Path, path: Path, logs: Path, args: argparse.Namespace) -> None:
    """A on GPU0 with --split, B joins on GPU1. The election picks the host (equal cards: the
    larger node id), so the raw side mirrors whichever GPU the mesh's host got."""
    common = ["--model", str(path), "--bin-dir", str(bin_dir), "--speculation", "off"]
    traced: dict[str, str] = {}
    if args.mesh_trace:
        args.trace_dir = Path(tempfile.mkdtemp(prefix="splice-trace-", dir=logs))
        traced = {"MESH_LLM_SPLICE_TRACE": str(args.trace_dir)}
    a = Node("split-A", ["--split"], "0", logs, common, args.threads, traced)
    with stopping(a):
        wait_ok(f"{a.base}/health", a.proc, timeout=150)
        say("split: A serves solo; starting B on GPU1")
        a_id = a.status()["id"]
        start = time.monotonic()
        probes = HealthPoller(f"{a.base}/health", every=0.1, timeout=5)  # A's API meanwhile
        b_gpu = "0" if args.same_gpu else "1"
        timeline = Timeline(start, a_id)
        b = Node("split-B", ["--join", a.token], b_gpu, logs, common, args.threads, traced)
        timeline.note("B printed its banner")
        with stopping(b), probes:
            gpu_of = {id(a): "0", id(b): b_gpu}
            nodes = {"A": a, "B": b}

            def statuses() -> dict[str, dict[str, Any]]:
                return {name: n.status() for name, n in nodes.items()}

            def host(st: dict[str, dict[str, Any]]) -> str | None:
                plan = st["A"]["plan"]
                if plan["state"] != "SPLIT":
                    return None
                return next(name for name, s in st.items() if s["id"] == plan["host_id"])

            def serving() -> bool:
                st = statuses()  # one status call per node and poll: the bench's own load
                with contextlib.suppress(KeyError, TypeError):
                    timeline.look(st)
                name = host(st)
                return name is not None and serves_split(st[name]) and httpx.get(
                    f"{nodes[name].base}/health", timeout=10).status_code == 200

            try:
                wait_for(serving, "the mesh to serve the split", 240, every=0.05)
            except SystemExit:  # a machine is gone by the next call: keep why, in results
                RESULTS["split_failure"] = {n.log.stem: n.evidence() for n in (a, b)}
                raise
            mesh_load = time.monotonic() - start
            timeline.note("served")
            probes.stop()
            say("the split's load, seconds after B started: " + "; ".join(
                f"{t:.2f} {what}" for what, t in timeline.seen.items()))
            say(f"A's /health while B joined and the split loaded: {probes.summary()}")
            name = host(statuses())
            assert name is not None
            h = nodes[name]
            worker = b if h is a else a
            # The worker seeds the rest of the model (the host's layers) once the host has
            # loaded: gigabytes read, hashed and written. Let it end before the raw load and
            # the comparison, so neither runs beside it; how long it took is kept.
            rest = time.monotonic()
            wait_for(lambda: worker.status()["backend"].get("seeding") is None,
                     "the worker's background seeding to end", 300, every=0.2)
            rest_s = time.monotonic() - rest
            say(f"the worker's background seeding ended {rest_s:.1f} s after the split served")
            status_h, status_w = h.status(), worker.status()
            node_logs = {n.log.stem: n.evidence(lines=60) for n in (a, b)}  # the load's steps
            argv = status_h["backend"]["llama_server"]["argv"]
            say(f"split mesh serving after {mesh_load:.1f} s, host on GPU{gpu_of[id(h)]}: "
                f"{' '.join(argv[1:])}")
            mem_mesh = gpu_memory()
            res = raw_split(argv, bin_dir, logs, args, h.base,
                            (gpu_of[id(h)], gpu_of[id(worker)]),
                            {"host": h.proc.pid, "worker": worker.proc.pid})
    res["load_s"]["mesh"] = mesh_load
    res.update(argv=argv, worker_rest_seed_s=rest_s, mesh_timeline=timeline.seen,
               node_logs=node_logs,
               ratio_load=mesh_load / res["load_s"]["raw"],
               host_gpu=gpu_of[id(h)], effective_shares=status_h["backend"].get(
                   "effective_shares"), worker_seeded_bytes=status_w["backend"].get(
                   "seeded_bytes"), gpu_memory_mesh_only=mem_mesh,
               a_health_during_join=probes.counts())
    RESULTS["split"] = res


def _role(proc: psutil.Process) -> str:
    line = " ".join(proc.cmdline())
    for marker, role in (("relayproc", "relay process"), ("llama-server", "llama-server"),
                         ("rpc-server", "rpc-server"), ("meshcore_cli", "node")):
        if marker in line:
            return role
    return "other"


def cpu_seconds(roots: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system) each process tree has used so far, by ``<root> <role>``
    (the node, its relay process, llama-server, rpc-server, other children)."""
    out: dict[str, float] = {}
    for root_name, pid in roots.items():
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    times, key = proc.cpu_times(), f"{root_name} {_role(proc)}"
                    out[key] = out.get(key, 0.0) + times.user + times.system
    return out


def raw_split(argv: list[str], bin_dir: Path, logs: Path, args: argparse.Namespace,
              mesh_base: str, gpus: tuple[str, str],
              mesh_roots: dict[str, int] | None = None) -> dict[str, Any]:
    """Raw ggml-rpc-server on the worker's GPU + raw llama-server on the host's GPU with
    ``argv``, ``--rpc`` straight at it; then compare with the mesh host's API and with the
    mesh host's own llama-server (its port in ``argv``: the tunnel without the API proxy).
    Then the same raw split once more through bench/rpc_trace.py's counting relay: round
    trips, commands and bytes per generated token."""
    host_gpu, worker_gpu = gpus
    rpc_port, port = free_port(), free_port()
    start = time.monotonic()
    rpc = Proc("split-raw-rpc-server", [str(bin_dir / "ggml-rpc-server"), "-H", "127.0.0.1",
                                        "-p", str(rpc_port), "-t", str(args.threads)],
               {**os.environ, "CUDA_VISIBLE_DEVICES": worker_gpu}, logs)
    with stopping(rpc):
        wait_for(lambda: listening(rpc_port), "the raw rpc-server", 60, every=0.05)
        rpc_up = time.monotonic() - start
        server = Proc("split-raw-llama-server", with_port(argv, port, f"127.0.0.1:{rpc_port}"),
                      {**os.environ, "CUDA_VISIBLE_DEVICES": host_gpu}, logs)
        with stopping(server):
            wait_ok(f"http://127.0.0.1:{port}/health", server.proc, timeout=300)
            raw_load = time.monotonic() - start
            say(f"split raw serving after {raw_load:.1f} s (its rpc-server listened after "
                f"{rpc_up:.2f} s)")
            mem = gpu_memory()
            direct = f"http://127.0.0.1:{argv[argv.index('--port') + 1]}"
            roots = {**(mesh_roots or {}), "raw": server.proc.pid, "raw-rpc": rpc.proc.pid}
            before = cpu_seconds(roots)
            res = compare({"raw": f"http://127.0.0.1:{port}", "mesh": mesh_base,
                           "direct": direct}, args.runs, args.tokens)
            after = cpu_seconds(roots)
    # CPU per generated token while the comparison ran: the mesh's processes served the API
    # and the direct requests (twice the raw side's tokens), the warm-ups aside
    tokens = args.runs * args.tokens
    res["cpu_ms_per_token"] = {
        key: round((after[key] - before.get(key, 0.0)) * 1000
                   / (tokens if key.startswith("raw") else 2 * tokens), 3) for key in after}
    say("CPU per token during the comparison: " + ", ".join(
        f"{k} {v:.2f} ms" for k, v in sorted(res["cpu_ms_per_token"].items())))
    res.update(load_s={"raw": raw_load}, raw_rpc_server_s=rpc_up, gpu_memory_both=mem)
    res["ratio_tps_direct"] = res["median"]["direct"][1] / res["median"]["raw"][1]
    say(f"split tok/s raw {res['median']['raw'][1]:.1f}, mesh API {res['median']['mesh'][1]:.1f}"
        f", mesh llama-server direct {res['median']['direct'][1]:.1f}")
    if args.mesh_trace:
        time.sleep(1.5)  # the ends write their notes once a second
        res["mesh_trace"] = mesh_trace(args.trace_dir)
        turns_report("mesh turns (host and worker ends)", res["mesh_trace"])
    if not args.trace:
        return res
    try:
        res["trace"] = trace_split(argv, bin_dir / "ggml-rpc-server", tokens=64,
                                   threads=args.threads, logs=logs,
                                   host_env={**os.environ, "CUDA_VISIBLE_DEVICES": host_gpu},
                                   worker_env={**os.environ,
                                               "CUDA_VISIBLE_DEVICES": worker_gpu})
        res["trace"]["relay_latency"] = relay_latency()
        trace_report(res["trace"])
    except (SystemExit, Exception) as exc:
        res["trace"] = {"failed": str(exc)}
        say(f"trace failed: {exc}")
    return res


def table() -> None:
    print("\n== GPU benchmark (one run) ==")
    print("machine:", json.dumps(RESULTS.get("machine")))
    print("model:", json.dumps(RESULTS.get("model")), " build_s:", RESULTS.get("build_s"))
    for phase in ("solo", "split"):
        r = RESULTS.get(phase)
        if not r:
            print(f"{phase}: not run ({RESULTS.get(phase + '_skipped', 'skipped')})")
            continue
        for name in ("raw", "mesh"):
            ttft, tps, server = r["median"][name]
            print(f"{phase:5} {name:4} tok/s {tps:7.1f}  TTFT {ttft * 1000:7.1f} ms  server "
                  f"tok/s {server:7.1f}  load {r['load_s'][name]:6.1f} s")
        if "direct" in r["median"]:
            ttft, tps, server = r["median"]["direct"]
            print(f"{phase:5} mesh llama-server direct (no API proxy) tok/s {tps:7.1f}  TTFT "
                  f"{ttft * 1000:7.1f} ms  ratio to raw {r['ratio_tps_direct']:.3f}")
        print(f"{phase:5} ratio mesh/raw tok/s {r['ratio_tps']:.3f}  added TTFT "
              f"{r['added_ttft_ms']:+.1f} ms  load ratio {r['ratio_load']:.2f}  "
              f"(median of {r['runs']}, {r['tokens']} tokens)")
        if r.get("mesh_trace"):
            turns_report("mesh turns", r["mesh_trace"])
        if r.get("trace", {}).get("per_token", {}).get("turns"):
            turns_report("raw turns (trace relay)", r["trace"]["per_token"]["turns"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path(".gpu"))
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--type", default="q8_0", choices=("q8_0", "f16"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--budget", type=float, default=560, help="seconds this run may take")
    ap.add_argument("--phases", default="solo,split")
    ap.add_argument("--bin-dir", type=Path, help="skip the build: use these llama.cpp binaries")
    ap.add_argument("--model", type=Path, help="skip the random model: use this GGUF")
    ap.add_argument("--gpus", type=int, help="override the GPU count (CPU smoke tests)")
    ap.add_argument("--no-trace", dest="trace", action="store_false",
                    help="skip the raw split through bench/rpc_trace.py's counting relay")
    ap.add_argument("--mesh-trace", action="store_true",
                    help="the nodes note every tunnel chunk; report where a token's turn goes")
    ap.add_argument("--same-gpu", action="store_true",
                    help="split with both nodes (and both raw processes) on GPU 0, for a "
                         "machine with one GPU")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work.resolve()
    logs = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    phases = args.phases.split(",")
    try:
        gpus = info() if args.gpus is None else args.gpus
        bin_dir = args.bin_dir or build(work, args.out)
        path = args.model or model(work, args.shape, args.type)
        save(args.out)
        for phase, need, fn in (("solo", 90, solo), ("split", 120, split)):
            left = args.budget - (time.monotonic() - STARTED)
            if phase not in phases:
                continue
            if phase == "split" and gpus < 2 and not args.same_gpu:
                RESULTS["split_skipped"] = f"needs 2 GPUs, found {gpus}"
            elif left < need:
                RESULTS[f"{phase}_skipped"] = f"only {left:.0f} s of the budget left"
            else:
                try:
                    fn(bin_dir, path, logs, args)
                except (SystemExit, Exception) as exc:
                    RESULTS[f"{phase}_skipped"] = f"failed: {exc}"
                    say(f"{phase} failed: {exc}")
            save(args.out)
    finally:
        save(args.out)
        with tarfile.open(args.out / "logs.tar.gz", "w:gz") as tar:
            for log in LOGS:
                if log.exists():
                    tar.add(log, arcname=log.name if "build" not in log.name else "build.log")
            for home_log in logs.glob("gpu-*/logs/*"):
                tar.add(home_log, arcname=f"{home_log.parent.parent.name}/{home_log.name}")
        # the nodes' homes hold their rpc caches (the whole model again, per worker): what
        # is worth keeping is in logs.tar.gz and results.json
        shutil.rmtree(logs, ignore_errors=True)
        table()


if __name__ == "__main__":
    main()
