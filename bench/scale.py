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

``--harness 50,100,200`` runs the in-process variant instead (``meshcore_testing.run_mesh``:
fake backend, memory transport in swim mode, one process, wall-clock seconds): time to one
plan and until no node has updates left to gossip, idle SWIM messages and bytes per node per
second (over ``--idle-s``), time to one plan after a join, and after a kill (no goodbye) of a
worker and then of the host: until every survivor dropped it and until all agree on one plan.
``--instant`` uses the instant hub instead (no failure detector: the host leaves cleanly).
``--sim 200,500,1000`` runs the SWIM core alone in simulated time
(``meshcore_testing.swim.Simulation``, default timers, ``--latency-ms`` one way, ``--loss``,
``--seeds`` runs per size): idle traffic, and how long a join, a record change and a kill take
to reach every member.

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
            "announce_frames_s_mesh": announces,
            "links_mean": statistics.mean(t["links"] for t in t_after),
            "links_max": max(t["links"] for t in t_after),
            "connections_mesh": sum(t["links"] for t in t_after) / 2}


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


def harness_agreed(nodes: list[Any], host_not: str | None = None) -> bool:
    """Every node sees every other and all hold one plan with a host (not ``host_not``)."""
    keys = {(x.plan.host_id, x.plan.state, x.plan.participants) for x in nodes}
    return len(keys) == 1 and all(len(x.state.view().others) == len(nodes) - 1
                                  for x in nodes) and nodes[0].plan.host_id not in (None, host_not)


async def harness_until(test: Callable[[], bool], since: float, timeout: float) -> float | None:
    """Seconds from ``since`` until ``test()`` holds (polled every 50 ms)."""
    while time.monotonic() - since < timeout:
        if test():
            return time.monotonic() - since
        await asyncio.sleep(0.05)
    return None


async def harness_idle(mesh: Any, seconds: float) -> dict[str, Any]:
    """SWIM messages and bytes sent per node per second over ``seconds`` of an idle mesh."""
    def totals() -> tuple[int, int, Counter[str]]:
        traffic = [mesh.hub.traffic[x.id] for x in mesh.nodes]
        kinds: Counter[str] = Counter()
        for t in traffic:
            kinds.update(t.kinds_out)
        return (sum(t.messages_out for t in traffic), sum(t.bytes_out for t in traffic), kinds)

    before, t0 = totals(), time.monotonic()
    await asyncio.sleep(seconds)
    after, elapsed = totals(), time.monotonic() - t0
    n = len(mesh.nodes)
    return {"idle_msgs_node_s": (after[0] - before[0]) / n / elapsed,
            "idle_bytes_node_s": (after[1] - before[1]) / n / elapsed,
            "idle_kinds_node_s": {k: round((after[2][k] - before[2][k]) / n / elapsed, 3)
                                  for k in sorted(after[2])}}


async def harness_kill(mesh: Any, victim: Any, timeout: float,
                       host_not: str | None) -> tuple[float | None, float | None]:
    """``kill`` (no goodbye) ``victim``: seconds until every survivor dropped it, and until
    all agree on one plan (without it as host when ``host_not``)."""
    killed = time.monotonic()
    await mesh.kill(victim)
    gone = await harness_until(lambda: all(x.state.view().get(victim.id) is None
                                           for x in mesh.nodes), killed, timeout)
    plan = await harness_until(lambda: harness_agreed(list(mesh.nodes), host_not), killed,
                               timeout)
    return gone, plan


async def run_harness(n: int, timeout: float, *, swim: bool = True,
                      idle_s: float = 10.0) -> dict[str, Any]:
    """``n`` nodes in this process on the memory transport (wall-clock seconds). Swim mode
    (default): membership by SWIM gossip with its default timers; a worker and then the host
    are killed without a goodbye. ``swim=False``: the instant hub, the host leaves cleanly."""
    from meshcore_testing import run_mesh

    row: dict[str, Any] = {"nodes": n, "mode": "swim" if swim else "instant"}
    with tempfile.TemporaryDirectory(prefix="mesh-harness-") as tmp:
        async with run_mesh(Path(tmp), swim=swim) as mesh:
            t0 = time.monotonic()
            await mesh.add(24, node_id="host0")
            for i in range(n - 1):
                await mesh.add(8, node_id=f"n{i:04d}")
            row["start_s"] = time.monotonic() - t0
            started = time.monotonic()
            row["plan_s"] = await harness_until(lambda: harness_agreed(mesh.nodes), started,
                                                timeout)
            if swim:  # the start's updates finish their retransmissions first
                row["drained_s"] = await harness_until(lambda: all(
                    m.swim is None or m.swim.queued == 0 for m in mesh.hub.members.values()),
                    started, timeout)
                await asyncio.sleep(1)
                row.update(await harness_idle(mesh, idle_s))
            joined = time.monotonic()
            await mesh.add(8, node_id="joiner")
            row["join_plan_s"] = await harness_until(lambda: harness_agreed(mesh.nodes),
                                                     joined, timeout)
            host = next(x for x in mesh.nodes if x.id == mesh.nodes[0].plan.host_id)
            if swim:
                worker = next(x for x in mesh.nodes if x is not host and x.id != "joiner")
                await asyncio.sleep(3)
                row["worker_kill_gone_s"], row["worker_kill_plan_s"] = await harness_kill(
                    mesh, worker, timeout, None)
                await asyncio.sleep(3)
                row["host_kill_gone_s"], row["host_kill_plan_s"] = await harness_kill(
                    mesh, host, timeout, host.id)
            else:
                left = time.monotonic()
                await mesh.remove(host)
                row["host_leave_plan_s"] = await harness_until(
                    lambda: harness_agreed(mesh.nodes, host.id), left, timeout)
            row["rss_mb_process"] = psutil.Process().memory_info().rss / 2**20
    return row


def sim_record(member_id: str) -> dict[str, Any]:
    """A node's announcement as the memory transport gossips it (a Peer record)."""
    from meshcore.state import Peer

    return Peer(id=member_id, vram=8 * 2**30, model="SmolLM2-135M-Instruct-Q8_0",
                model_bytes=145 * 2**20, version="0.1.0", seq=5,
                extra={"caps": ["host", "rpc_worker", "uses_workers"],
                       "device": "cuda"}).to_dict()


def run_simulation(n: int, *, seed: int = 1, loss: float = 0.0, idle_s: float = 30.0,
                   timeout: float = 120.0, latency_s: float = 0.001) -> dict[str, Any]:
    """``n`` SWIM members with the default timers in simulated time (``latency_s`` one way,
    plus up to as much jitter): idle traffic, a join, a record change (an announcement) and a
    kill, each timed until every live member knows it; false suspicions and deaths."""
    from meshcore_testing.swim import MemberEvent, Simulation, Status

    wall = time.monotonic()
    suspected: list[float] = []
    wrong = Counter[str]()

    def seen(now: float, observer: str, event: MemberEvent) -> None:
        if event.member == "victim" and event.status is Status.SUSPECT:
            suspected.append(now)
        elif event.member != "victim" and event.status is not Status.ALIVE:
            wrong[event.status.value] += 1

    sim = Simulation(seed=seed, loss=loss, latency_s=latency_s, jitter_s=latency_s,
                     on_event=seen)
    ids = [f"{i:012x}" for i in range(n - 1)] + ["victim"]
    sim.preform(ids, {i: sim_record(i) for i in ids})
    sim.run_for(10)
    before = {i: (t.messages_out, t.bytes_out) for i, t in sim.traffic.items()}
    sim.run_for(idle_s)
    row: dict[str, Any] = {"nodes": n, "loss": loss,
                           "idle_msgs_node_s": sum(sim.traffic[i].messages_out - before[i][0]
                                                   for i in ids) / n / idle_s,
                           "idle_bytes_node_s": sum(sim.traffic[i].bytes_out - before[i][1]
                                                    for i in ids) / n / idle_s}
    members = sim.members
    sim.add("joiner", sim_record("joiner"))
    row["join_all_know_s"] = sim.run_until_true(lambda: all(
        members[i].status_of("joiner") is Status.ALIVE for i in ids), timeout)
    row["join_view_complete_s"] = sim.run_until_true(
        lambda: members["joiner"].live_count() == n + 1, timeout)
    sim.run_for(10)
    changed = {**sim_record(ids[0]), "serving": "ready"}
    sim.announce(ids[0], changed)
    row["change_all_know_s"] = sim.run_until_true(lambda: all(
        members[i].members[ids[0]].record == changed for i in [*ids, "joiner"]), timeout)
    sim.run_for(10)
    live = [i for i in [*ids, "joiner"] if i != "victim"]
    sent = {i: sim.traffic[i].messages_out for i in live}
    sim.kill("victim")
    killed = sim.now
    row["kill_all_dead_s"] = sim.run_until_true(lambda: all(
        members[i].status_of("victim") is Status.DEAD for i in live), timeout)
    row["kill_first_suspect_s"] = min(suspected) - killed if suspected else None
    row["kill_msgs_node_s"] = (sum(sim.traffic[i].messages_out - sent[i] for i in live)
                               / len(live) / max(sim.now - killed, 1e-9))
    row["false_suspect_events"] = wrong["suspect"]
    row["false_dead_events"] = wrong["dead"]
    row["seed"] = seed
    row["suspicion_timeout_s"] = sim.config.suspicion_s(n)
    row["retransmits"] = sim.config.retransmits(n)
    row["wall_s"] = time.monotonic() - wall
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
    ap.add_argument("--harness", default="",
                    help="comma-separated sizes: in-process nodes (memory transport) instead")
    ap.add_argument("--instant", action="store_true",
                    help="with --harness: the instant memory hub (no SWIM, no kills)")
    ap.add_argument("--sim", default="",
                    help="comma-separated sizes: the SWIM simulator in simulated time instead")
    ap.add_argument("--loss", type=float, default=0.0, help="with --sim: message loss rate")
    ap.add_argument("--latency-ms", type=float, default=1.0,
                    help="with --sim: one-way latency (plus up to as much jitter)")
    ap.add_argument("--seeds", type=int, default=1, help="with --sim: runs per size")
    args = ap.parse_args()
    if args.harness or args.sim:
        for n in (int(x) for x in args.harness.split(",") if x):
            row = asyncio.run(run_harness(n, args.timeout, swim=not args.instant,
                                          idle_s=args.idle_s))
            print(json.dumps(rounded(row)), flush=True)
        for n in (int(x) for x in args.sim.split(",") if x):
            for seed in range(1, args.seeds + 1):
                row = run_simulation(n, seed=seed, loss=args.loss,
                                     latency_s=args.latency_ms / 1000)
                print(json.dumps(rounded(row)), flush=True)
        return
    for n in (int(x) for x in args.nodes.split(",")):
        row = run_processes(n, args.idle_s, args.settle_s, args.timeout, args.keep)
        print(json.dumps(rounded(row)), flush=True)


def rounded(row: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}


if __name__ == "__main__":
    main()
