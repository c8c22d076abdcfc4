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
from meshcore_testing.pytest_plugin import MeshProcess, start_mesh_process
from test_client import mesh_status, quic_missing, wait_status

pytestmark = pytest.mark.skipif(quic_missing() is not None, reason=str(quic_missing()))

FAKE = ("--backend", "fake", "--model", "fake-model")
FROZEN_S = 12.0  # over twice the old 5 s silence limit, well under the new 60 s one


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Callable[..., MeshProcess]]:
    started: list[MeshProcess] = []

    def start(name: str, *args: str) -> MeshProcess:
        # default liveness timers: MESH_LLM_OPTIONS must not shorten them here
        env = {"MESH_LLM_OPTIONS": json.dumps({}), "MESH_LLM_THREADS": "1"}
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
