"""Liveness with the default timers, real ``mesh-llm`` processes (fake backend).

A busy node is not a dead one: a peer whose process is frozen (SIGSTOP: its event loop runs
nothing, as under a model load on a saturated CPU) for longer than the old 5 s limit stays a
member; a peer whose process is gone (SIGKILL) is dropped once its TCP port refuses a
connection, long before the 60 s silence limit. The split under CPU load is in
test_split_real.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from meshcore_testing import HealthPoller
from meshcore_testing.pytest_plugin import MeshProcess, start_mesh_process
from test_client import mesh_status, quic_missing, wait_status

pytestmark = pytest.mark.skipif(quic_missing() is not None, reason=str(quic_missing()))

FAKE = ("--backend", "fake", "--model", "fake-model")
FROZEN_S = 12.0  # over twice the old 5 s silence limit, well under the new 60 s one


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Callable[..., MeshProcess]]:
    started: list[MeshProcess] = []

    def start(name: str, *args: str, options: dict[str, float] | None = None) -> MeshProcess:
        # default liveness timers: MESH_LLM_OPTIONS must not shorten them here
        env = {"MESH_LLM_OPTIONS": json.dumps(options or {}), "MESH_LLM_THREADS": "1"}
        proc = start_mesh_process([*FAKE, *args], tmp_path / name, env=env)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            with contextlib.suppress(Exception):
                os.kill(proc.proc.pid, signal.SIGCONT)
                proc.stop(signal.SIGTERM, timeout=10)
            proc.kill()


def peers(proc: MeshProcess) -> set[str]:
    return {p["id"] for p in mesh_status(proc)["peers"]}


def test_a_frozen_peer_stays_and_a_dead_one_goes(node: Callable[..., MeshProcess]) -> None:
    a = node("a", "--max-vram", "8")
    assert a.token
    b = node("b", "--max-vram", "4", "--join", a.token)
    b_id = mesh_status(b)["id"]
    wait_status(a, lambda s: b_id in {p["id"] for p in s["peers"]}, "a to see b")

    os.kill(b.proc.pid, signal.SIGSTOP)
    try:
        until = time.monotonic() + FROZEN_S
        while time.monotonic() < until:
            assert b_id in peers(a), f"a dropped the frozen b:\n{a.log()}"
            time.sleep(0.5)
    finally:
        os.kill(b.proc.pid, signal.SIGCONT)
    time.sleep(3)  # b catches up on its backlog
    assert b_id in peers(a) and "dropping" not in a.log(), a.log()

    b.kill()
    # 30 s is half the silence limit: only the refused-port check can drop b in time
    wait_status(a, lambda s: b_id not in {p["id"] for p in s["peers"]}, "a to drop the dead b",
                30)
    assert "refuses connections (the process is gone)" in a.log(), a.log()


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def test_a_dead_host_is_replaced_without_the_reconnect_window(
        node: Callable[..., MeshProcess]) -> None:
    """The host is SIGKILLed while c sends requests through it: c's open tunnel to the host
    is cut (or, if none was open, its next one is refused), c confirms (an unanswered PING,
    the port refused), drops and removes
    it at once (no 10 s reconnect window) and tells the others (GONE). b, which sends
    nothing and whose heartbeat is slowed to one round in 30 s here, checks a on that report
    rather than in its own turn. The mesh re-elects b, and no request gets a 502 meanwhile:
    each failed one is a retryable 503 with a reason."""
    a = node("a", "--max-vram", "8")
    assert a.token
    b = node("b", "--max-vram", "4", "--join", a.token, options={"quic_heartbeat_s": 30})
    c = node("c", "--max-vram", "2", "--join", a.token)
    a_id, b_id = mesh_status(a)["id"], mesh_status(b)["id"]
    for proc in (b, c):
        wait_status(proc, lambda s: s["plan"]["host_id"] == a_id and len(s["peers"]) == 2,
                    "the mesh of three with a as the host")
    with HealthPoller(f"{c.url}/chat/completions", json=CHAT) as poller:
        time.sleep(1)
        assert poller.codes and set(poller.codes) == {200}, poller.codes
        a.kill()
        # 30 s: under the 60 s silence limit, and well under the old 10 s reconnect window
        # plus the election only if the window is really skipped on two loaded cores
        for proc in (b, c):
            wait_status(proc, lambda s: s["plan"]["host_id"] == b_id
                        and s["me"]["serving"] != "starting", "b to be the new host", 30)
        served = len(poller.codes)
        deadline = time.monotonic() + 30
        while poller.codes[-1] != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
    assert poller.codes[-1] == 200, poller.codes[served:]
    assert set(poller.codes) <= {200, 503}, f"a request failed without a reason: {poller.codes}"
    assert ("cut a tunnel, left a PING unanswered" in c.log()
            or "refused a tunnel, left a PING unanswered" in c.log()), c.log()
    c_id = mesh_status(c)["id"]
    assert f"was reported gone by {c_id}, left a PING unanswered" in b.log(), b.log()
    for proc in (b, c):
        assert "its process is gone; redialing it in the background" in proc.log(), proc.log()
        assert "reconnecting for up to" not in proc.log(), proc.log()
