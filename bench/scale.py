"""Scale benchmark: N real ``mesh-llm`` processes (fake backend, loopback), every node joining
the first node's token, default timers; the table of issue 15.

Reported per N: seconds from the last node's banner until every node sees every other
(membership) and until all agree on one plan; after one more node joins, until all N+1 agree;
idle CPU % and RSS per node (psutil, over ``--idle-s``), idle QUIC datagrams and bytes per node
per second and gossip frames per node per second (the transport's counters, ``transport`` in
``/mesh/status``), measured ``--settle-s`` after the mesh agreed; after ``kill -9`` of a
worker, until all survivors agree on a plan without it; after ``kill -9`` of the host, until
all survivors agree on a new plan, until the new host answers ``/health`` 200, and until a
chat request sent every 50 ms to a survivor's API is answered again (with the statuses of the
requests meanwhile: 503 with a reason is expected, 502 or no answer is not).

``--harness 200`` runs the in-process variant instead (``meshcore_testing.run_mesh``: fake
backend, memory transport, one process): time to one plan, after a join, after the host's
clean stop (wall-clock seconds; the memory transport has no heartbeat of its own).

Usage: ``flock /tmp/bench.lock .venv/bin/python bench/scale.py --nodes 10,20 [--idle-s 20]``
(the machine is shared: hold the lock, run nothing else meanwhile).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
from meshcore_testing import HealthPoller
from meshcore_testing.pytest_plugin import MeshProcess, spawn_mesh_process, wait_for_banner

FAKE = ["--backend", "fake", "--model", "fake-model", "--port", "0"]
POLL_S = 0.5


def launch(home: Path, args: list[str]) -> MeshProcess:
    """Start one node without waiting for its banner (many start at once)."""
    return spawn_mesh_process([*FAKE, *args], home,
                              env={"MESH_LLM_OPTIONS": "{}", "MESH_LLM_THREADS": "1"})


def wait_banner(node: MeshProcess, timeout: float = 180) -> None:
    try:
        wait_for_banner(node, timeout)
    except AssertionError as exc:
        raise SystemExit(str(exc)[-3000:]) from None


class Mesh:
    """The running nodes and a pool of HTTP clients polling them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.nodes: list[MeshProcess] = []
        self.pool = ThreadPoolExecutor(16)
        self.http = httpx.Client(timeout=5)

    def start(self, count: int) -> float:
        """Start ``count`` nodes (the first one alone if none runs); when the last banner
        appeared (monotonic)."""
        if not self.nodes:
            first = launch(self.root / "n0", ["--max-vram", "24"])
            wait_banner(first)
            self.nodes.append(first)
            count -= 1
        token = self.nodes[0].token or ""
        new = [launch(self.root / f"n{len(self.nodes) + i}", ["--max-vram", "8", "--join", token])
               for i in range(count)]
        list(self.pool.map(wait_banner, new))
        self.nodes.extend(new)
        return time.monotonic()

    def alive(self) -> list[MeshProcess]:
        return [n for n in self.nodes if n.proc.poll() is None]

    def _status(self, node: MeshProcess) -> dict[str, Any] | None:
        try:
            r = self.http.get(f"http://127.0.0.1:{node.api_port}/mesh/status")
            return r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def statuses(self) -> list[dict[str, Any] | None]:
        return list(self.pool.map(self._status, self.alive()))

    def wait(self, what: str, test: Callable[[list[dict[str, Any]]], bool], since: float,
             timeout: float) -> float | None:
        """Seconds from ``since`` until ``test`` holds for all live nodes' statuses."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.statuses()
            if all(s is not None for s in got) and test([s for s in got if s is not None]):
                return time.monotonic() - since
            time.sleep(POLL_S)
        print(f"  {what}: not within {timeout:.0f} s", file=sys.stderr)
        return None

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(node.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(10)
        self.http.close()
        self.pool.shutdown()


def full(n: int) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda sts: len(sts) == n and all(len(s["peers"]) == n - 1 for s in sts)


def plan_key(status: dict[str, Any]) -> str:
    plan = status["plan"]
    return json.dumps([plan.get("state"), plan.get("host_id"), plan.get("model"),
                       sorted(p.get("peer_id", "") for p in plan.get("participants", []))])


def agreed(n: int, host_not: str | None = None) -> Callable[[list[dict[str, Any]]], bool]:
    """All ``n`` nodes see each other and hold one plan with a host (not ``host_not``)."""
    def test(sts: list[dict[str, Any]]) -> bool:
        if not full(n)(sts) or len({plan_key(s) for s in sts}) != 1:
            return False
        host = sts[0]["plan"].get("host_id")
        return bool(host) and host != host_not
    return test


def idle(mesh: Mesh, seconds: float) -> dict[str, float]:
    """Per node averages over ``seconds`` of an idle mesh."""
    procs = [psutil.Process(n.proc.pid) for n in mesh.alive()]
    before = [p.cpu_times() for p in procs]
    t_before = [s["transport"] for s in mesh.statuses() if s is not None]
    t0 = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    after = [p.cpu_times() for p in procs]
    t_after = [s["transport"] for s in mesh.statuses() if s is not None]
    cpu = [100 * (a.user + a.system - b.user - b.system) / elapsed
           for a, b in zip(after, before, strict=True)]
    n = len(procs)

    def rate(key: str) -> float:
        total = sum(a[key] - b[key] for a, b in zip(t_after, t_before, strict=True))
        return float(total) / n / elapsed

    frames = sum(sum(a["frames_out"].values()) - sum(b["frames_out"].values())
                 for a, b in zip(t_after, t_before, strict=True)) / n / elapsed
    announces = sum(a["frames_out"].get("ANNOUNCE", 0) - b["frames_out"].get("ANNOUNCE", 0)
                    for a, b in zip(t_after, t_before, strict=True)) / elapsed
    return {"cpu_pct": statistics.mean(cpu), "cpu_max_pct": max(cpu),
            "rss_mb": statistics.mean(p.memory_info().rss for p in procs) / 2**20,
            "datagrams_out_s": rate("datagrams_out"), "datagrams_in_s": rate("datagrams_in"),
            "bytes_out_s": rate("bytes_out"), "frames_out_s": frames,
            "announce_frames_s_mesh": announces}


def run_processes(n: int, idle_s: float, settle_s: float, timeout: float,
                  keep: str | None = None) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        tmp = tempfile.mkdtemp(prefix="mesh-scale-", dir=keep) if keep else stack.enter_context(
            tempfile.TemporaryDirectory(prefix="mesh-scale-"))
        mesh = Mesh(Path(tmp))
        row: dict[str, Any] = {"nodes": n}
        try:
            last = mesh.start(n)
            row["membership_s"] = mesh.wait("membership", full(n), last, timeout)
            row["plan_s"] = mesh.wait("one plan", agreed(n), last, timeout)
            time.sleep(settle_s)  # first RTT samples of a busy start settle
            row.update(idle(mesh, idle_s))
            last = mesh.start(1)
            row["join_plan_s"] = mesh.wait("one plan after a join", agreed(n + 1), last, timeout)
            sts = [s for s in mesh.statuses() if s is not None]
            host = sts[0]["plan"]["host_id"]
            worker = next(m for m, s in zip(mesh.alive(), sts, strict=True) if s["id"] != host)
            time.sleep(3)
            worker.kill()
            row["worker_kill_plan_s"] = mesh.wait("one plan after a worker's kill -9",
                                                  agreed(n), time.monotonic(), timeout)
            sts = [s for s in mesh.statuses() if s is not None]
            by_id = {s["id"]: m for m, s in zip(mesh.alive(), sts, strict=True)}
            time.sleep(3)
            asker = next(m for i, m in by_id.items() if i != host)
            with HealthPoller(f"http://127.0.0.1:{asker.api_port}/v1/chat/completions",
                              json=CHAT) as chats:
                time.sleep(1)
                by_id[host].kill()
                killed = time.monotonic()
                row.update(host_kill_row(mesh, by_id, host, killed, n, timeout))
                deadline = time.monotonic() + timeout
                while first_ok(chats, killed) is None and time.monotonic() < deadline:
                    time.sleep(0.1)
            answered = first_ok(chats, killed)
            row["host_kill_answer_s"] = None if answered is None else answered - killed
            after = [code for sent, _, code in chats.answers if sent >= killed]
            row["host_kill_codes"] = dict(sorted(Counter(after).items()))
        finally:
            mesh.stop()
        return row


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}  # a user's request


def first_ok(chats: HealthPoller, since: float) -> float | None:
    """When the first request sent after ``since`` was answered 200 (None: none yet)."""
    return next((done for sent, done, code in list(chats.answers)
                 if sent >= since and code == 200), None)


def host_kill_row(mesh: Mesh, by_id: dict[str, MeshProcess], host: str, killed: float, n: int,
                  timeout: float) -> dict[str, Any]:
    """Seconds from the host's kill -9 until all survivors agree on a new plan, and until the
    new host answers ``/health`` 200."""
    row: dict[str, Any] = {"host_kill_health_s": None}
    row["host_kill_plan_s"] = mesh.wait("a new plan after the host's kill -9",
                                        agreed(n - 1, host_not=host), killed, timeout)
    if row["host_kill_plan_s"] is None:
        return row
    new = by_id[mesh.statuses()[0]["plan"]["host_id"]]  # type: ignore[index]
    while time.monotonic() - killed < timeout:
        with contextlib.suppress(httpx.HTTPError):
            if mesh.http.get(f"http://127.0.0.1:{new.api_port}/health").status_code == 200:
                row["host_kill_health_s"] = time.monotonic() - killed
                break
        time.sleep(0.1)
    return row


async def run_harness(n: int, timeout: float) -> dict[str, Any]:
    """``n`` nodes in this process on the memory transport (wall-clock seconds)."""
    from meshcore_testing import run_mesh

    def agreed_in(nodes: list[Any], host_not: str | None) -> bool:
        keys = {(x.plan.host_id, x.plan.state) for x in nodes}
        return len(keys) == 1 and all(len(x.state.view().others) == len(nodes) - 1
                                      for x in nodes) and nodes[0].plan.host_id not in (
                                          None, host_not)

    async def until(nodes: Callable[[], list[Any]], host_not: str | None = None) -> float | None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if agreed_in(nodes(), host_not):
                return time.monotonic() - t0
            await asyncio.sleep(0.1)
        return None

    row: dict[str, Any] = {"nodes": n}
    with tempfile.TemporaryDirectory(prefix="mesh-harness-") as tmp:
        async with run_mesh(Path(tmp)) as mesh:
            t0 = time.monotonic()
            await mesh.add(24)
            for _ in range(n - 1):
                await mesh.add(8)
            row["start_s"] = time.monotonic() - t0
            row["plan_s"] = await until(lambda: list(mesh.nodes))
            await mesh.add(8)
            row["join_plan_s"] = await until(lambda: list(mesh.nodes))
            host = next(x for x in mesh.nodes if x.id == mesh.nodes[0].plan.host_id)
            await mesh.remove(host)
            row["host_leave_plan_s"] = await until(lambda: list(mesh.nodes), host.id)
            proc = psutil.Process()
            row["rss_mb_process"] = proc.memory_info().rss / 2**20
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="10,20", help="comma-separated mesh sizes")
    ap.add_argument("--idle-s", type=float, default=20.0, help="idle measurement window")
    ap.add_argument("--settle-s", type=float, default=30.0,
                    help="wait after the mesh agreed before the idle window")
    ap.add_argument("--timeout", type=float, default=300.0, help="per-phase limit in seconds")
    ap.add_argument("--keep", metavar="DIR",
                    help="keep every node's home (logs) in a new folder under DIR")
    ap.add_argument("--harness", type=int, default=0,
                    help="run N in-process nodes (memory transport) instead")
    args = ap.parse_args()
    if args.harness:
        print(json.dumps(asyncio.run(run_harness(args.harness, args.timeout))))
        return
    for n in (int(x) for x in args.nodes.split(",")):
        row = run_processes(n, args.idle_s, args.settle_s, args.timeout, args.keep)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                          for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
