"""Fault tests across network namespaces: two hosts on a veth pair, the link cut and restored.

A fake-backend node runs in each namespace; the token carries the veth address. ``ip link set
down`` cuts the path: after the heartbeat silence and the reconnect window each side removes
the other and re-elects alone; ``ip link set up``: the removed peers are redialed (and a
lone joiner dials its token again) and the mesh is whole, even when the node cut off is the
one that started the mesh and has no token. Timers are shortened with ``MESH_LLM_OPTIONS``
(docs/testing.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from meshcore_testing.pytest_plugin import API_LINE, JOIN_LINE
from netns import Namespace, netns_unavailable, veth_pair
from test_client import quic_missing

FAST = {"quic_dead_after_s": 3, "quic_reconnect_s": 3, "quic_heal_s": 1}
FAKE = ("--backend", "fake", "--model", "fake-model")


@pytest.fixture(scope="module", autouse=True)
def _needs_netns() -> None:
    if missing := quic_missing() or netns_unavailable():
        pytest.skip(missing)


@dataclass
class NsNode:
    """A mesh-llm process inside a namespace, once its banner is printed."""

    ns: Namespace
    proc: subprocess.Popen[bytes]
    log_path: Path
    api_port: int = 0
    token: str = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict[str, Any] | None:
        return self.ns.get_json(f"http://127.0.0.1:{self.api_port}/mesh/status")

    def wait(self, predicate: Callable[[dict[str, Any]], bool], what: str,
             timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"mesh-llm exited:\n{self.log()}"
            last = self.status()
            if last is not None and predicate(last):
                return last
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what}; last status {last}\n{self.log()}")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def ns_node(tmp_path: Path) -> Iterator[Callable[..., NsNode]]:
    """``ns_node(ns, *args, name=...)``: start ``mesh-llm ARGS --port 0`` inside ``ns`` (its
    state dir named ``name``, default the namespace's); all killed at teardown, before the
    namespaces go."""
    started: list[NsNode] = []

    def start(ns: Namespace, *args: str, name: str = "") -> NsNode:
        home = tmp_path / (name or ns.name)
        home.mkdir(exist_ok=True)
        env = {**os.environ, "MESH_LLM_HOME": str(home), "PYTHONUNBUFFERED": "1",
               "MESH_LLM_OPTIONS": json.dumps(FAST)}
        log_path = home / "mesh-llm.log"
        argv = [sys.executable, "-m", "meshcore_cli", *args, "--port", "0"]
        with log_path.open("wb") as log:
            proc = subprocess.Popen(ns.exec_argv(argv), env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        node = NsNode(ns, proc, log_path)
        started.append(node)
        deadline = time.monotonic() + 120
        while not (api := API_LINE.search(node.log())):
            assert proc.poll() is None and time.monotonic() < deadline, \
                f"no banner from mesh-llm in {ns.name}:\n{node.log()}"
            time.sleep(0.05)
        node.api_port = int(api.group(2))
        if join := JOIN_LINE.search(node.log()):
            node.token = join.group(1)
        return node

    try:
        yield start
    finally:
        for node in started:
            node.kill()


def peers(status: dict[str, Any]) -> set[str]:
    return {p["id"] for p in status["peers"]}


def test_cut_veth_removes_peer_and_restored_link_rejoins(
        ns_node: Callable[..., NsNode]) -> None:
    from meshcore_transport_quic.token import decode_token

    with veth_pair() as (ns_a, ns_b):
        a = ns_node(ns_a, *FAKE, "--max-vram", "8")
        assert decode_token(a.token).addresses[0] == ns_a.address, a.log()
        b = ns_node(ns_b, *FAKE, "--max-vram", "4", "--join", a.token)
        a_id = a.wait(lambda s: True, "a's status")["id"]
        b_id = b.wait(lambda s: s["plan"]["host_id"] == a_id, "b to join a across the veth")["id"]
        status = a.wait(lambda s: peers(s) == {b_id}, "a to see b")
        peer_b = status["peers"][0]
        assert any(addr.startswith(f"{ns_b.address}:") for addr in peer_b["addresses"]), peer_b

        ns_a.link(up=False)
        a.wait(lambda s: not s["peers"] and s["plan"]["host_id"] == a_id,
               "a to remove b after the reconnect window")
        status_b = b.wait(lambda s: not s["peers"] and s["plan"]["host_id"] == b_id,
                          "b to remove a and elect itself")
        assert status_b["plan"]["state"] == "SOLO" and status_b["is_host"]
        assert "removed: no connection" in a.log() + b.log()

        ns_a.link(up=True)
        a.wait(lambda s: peers(s) == {b_id}, "a and b to meet again once the link is up")
        b.wait(lambda s: peers(s) == {a_id} and s["plan"]["host_id"] == a_id
               and not s["is_host"], "b to rejoin and elect a (more VRAM) again")
        assert "Traceback" not in a.log() + b.log()


def test_cut_origin_node_is_redialed_by_the_others_when_the_link_returns(
        ns_node: Callable[..., NsNode]) -> None:
    """A started the mesh (no token); B and C joined it from the other namespace. Cut off
    past the reconnect window, A is alone and B and C still have each other, so no one is
    left to dial a token: only the background redial of removed peers heals the mesh."""
    with veth_pair("10.78.0") as (ns_a, ns_b):
        a = ns_node(ns_a, *FAKE, "--max-vram", "8")
        b = ns_node(ns_b, *FAKE, "--max-vram", "4", "--join", a.token, name="b")
        c = ns_node(ns_b, *FAKE, "--max-vram", "2", "--join", a.token, name="c")
        a_id = a.wait(lambda s: len(s["peers"]) == 2, "a to see b and c")["id"]
        b_id = b.wait(lambda s: len(s["peers"]) == 2, "b to see a and c")["id"]
        c_id = c.wait(lambda s: len(s["peers"]) == 2, "c to see a and b")["id"]

        ns_a.link(up=False)
        a.wait(lambda s: not s["peers"], "a to remove b and c")
        b.wait(lambda s: peers(s) == {c_id} and s["plan"]["host_id"] == b_id,
               "b to remove a and host for c")
        c.wait(lambda s: peers(s) == {b_id}, "c to remove a")

        ns_a.link(up=True)
        a.wait(lambda s: peers(s) == {b_id, c_id}, "a to meet b and c again")
        for node, others in ((b, {a_id, c_id}), (c, {a_id, b_id})):
            node.wait(lambda s, o=others: peers(s) == o and s["plan"]["host_id"] == a_id,
                      "the whole mesh back, electing a (most VRAM) again")
        logs = a.log() + b.log() + c.log()
        assert "reachable again" in logs
        assert "Traceback" not in logs
