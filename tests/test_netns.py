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

    def start(ns: Namespace, *args: str, name: str = "",
              options: dict[str, Any] | None = None) -> NsNode:
        home = tmp_path / (name or ns.name)
        home.mkdir(exist_ok=True)
        env = {**os.environ, "MESH_LLM_HOME": str(home), "PYTHONUNBUFFERED": "1",
               "MESH_LLM_OPTIONS": json.dumps(FAST if options is None else options),
               "MESH_LLM_THREADS": "1"}
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


CUT_S = float(os.environ.get("MESH_LLM_TEST_CUT_S", "7"))  # the 3 s, and then some


def test_a_cut_during_a_split_keeps_llama_server_and_answers_every_request(
        ns_node: Callable[..., NsNode]) -> None:
    """Issue 14: the link between a split's host and worker is cut for 7 s (default timers;
    the issue asks for 3 s): the QUIC connection is not dropped (silence, not death: with the
    old 5 s limit it was), the split's tunnel is a
    TCP fast-path connection that outlives the cut, so llama-server keeps its pid (before, the
    tunnel died, llama-server aborted and was restarted) and every request is answered."""
    from meshcore_backend_llamacpp.build import cached_bin_dir

    if cached_bin_dir() is None:
        pytest.skip("llama.cpp binaries are not built")
    real = ("--model", "SmolLM2-135M")
    with veth_pair("10.78.0") as (ns_a, ns_b):
        a = ns_node(ns_a, *real, "--max-vram", "8", "--split", options={})
        b = ns_node(ns_b, *real, "--max-vram", "4", "--join", a.token, options={})
        status = a.wait(lambda s: s["plan"]["state"] == "SPLIT"
                        and s["backend"]["serving_current_plan"], "a's split server", 240)
        pid = status["backend"]["llama_server"]["pid"]
        b_id = status["plan"]["participants"][0]["peer_id"]
        assert {p["id"]: p["link"] for p in status["peers"]}[b_id] == "TCP+AES-GCM", status

        def ask() -> tuple[int, str]:
            body = json.dumps({"prompt": "The capital of France is", "max_tokens": 8,
                               "temperature": 0})
            argv = ns_a.exec_argv(["curl", "-s", "-m", "60", "-w", "\n%{http_code}", "-H",
                                   "content-type: application/json", "-d", body,
                                   f"http://127.0.0.1:{a.api_port}/v1/completions"])
            done = subprocess.run(argv, capture_output=True, text=True, timeout=90)
            text, _, code = done.stdout.rpartition("\n")
            return (int(code) if code.isdigit() else 0), text

        answers: list[tuple[int, str]] = []
        stop = time.monotonic() + CUT_S + 9

        def keep_asking() -> None:
            while time.monotonic() < stop:
                answers.append(ask())

        import threading

        asker = threading.Thread(target=keep_asking)
        asker.start()
        time.sleep(2)
        ns_a.link(up=False)
        time.sleep(CUT_S)
        ns_a.link(up=True)
        asker.join(120)
        assert len(answers) >= 2 and all(code == 200 for code, _ in answers), answers
        after = a.wait(lambda s: True, "a's status")
        assert after["backend"]["llama_server"]["pid"] == pid, after["backend"]
        assert after["backend"]["restarts"] == 0 and b_id in peers(after)
        assert ask()[0] == 200
        assert "Traceback" not in a.log() + b.log()
