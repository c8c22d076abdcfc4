"""Separate ``mesh-llm`` processes (fake backend) on loopback: join, SIGKILL, rejoin, refusal."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from meshcore_testing.pytest_plugin import http_client
from meshcore_transport_quic.token import decode_token

API_RE = re.compile(r"API\s+http://[^:]+:(\d+)/v1")
TOKEN_RE = re.compile(r"join with: mesh-llm --join (\S+)")
WINDOW_S = 5 + 10  # heartbeat silence + reconnect window (the defaults)


class Proc:
    """A mesh-llm child process; stderr is collected by a thread so the pipe never fills."""

    def __init__(self, home: Path, *args: str) -> None:
        env = {**os.environ, "MESH_LLM_HOME": str(home), "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "meshcore_cli", "--backend", "fake", "--transport", "quic",
               "--model", "fake", "--port", "0", *args]
        self.popen = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.api_port = 0
        self.token = ""

    def _read(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_banner(self, timeout: float = 60) -> Proc:
        poll(lambda: bool(TOKEN_RE.search(self.log)) or self.popen.poll() is not None, timeout,
             "the start banner")
        api, token = API_RE.search(self.log), TOKEN_RE.search(self.log)
        assert api and token, f"no banner; log:\n{self.log}"
        self.api_port, self.token = int(api.group(1)), token.group(1)
        return self

    def peers(self) -> set[str]:
        try:
            r = http_client().get(f"http://127.0.0.1:{self.api_port}/mesh/status", timeout=2)
            return {p["id"] for p in r.json()["peers"]}
        except (httpx.HTTPError, ValueError):
            return set()

    def node_id(self) -> str:
        return str(http_client().get(f"http://127.0.0.1:{self.api_port}/mesh/status"
                                     ).json()["id"])

    def kill(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)
        self._reader.join(5)
        if self.popen.stderr is not None:
            self.popen.stderr.close()


def poll(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Wait for ``predicate``; returns the seconds it took; fails naming ``what``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - start


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    procs: list[Proc] = []

    def start(name: str, *args: str) -> Proc:
        proc = Proc(tmp_path / name, *args)
        procs.append(proc)
        return proc.wait_banner()

    try:
        yield start
    finally:
        for proc in procs:
            proc.kill()


def test_three_processes_mesh_survive_sigkill_and_rejoin(spawn: Callable[..., Proc]) -> None:
    a = spawn("a")
    b = spawn("b", "--join", a.token)
    c = spawn("c", "--join", a.token)
    ids = {p: p.node_id() for p in (a, b, c)}
    everyone = set(ids.values())
    took = poll(lambda: all(p.peers() | {ids[p]} == everyone for p in (a, b, c)), 2,
                "all three to see each other within 2 s of the last join")
    print(f"full mesh {took:.2f}s after the last join")

    c.kill()  # SIGKILL: no leave message
    alive = (a, b)
    time.sleep(2)
    assert all(ids[c] in p.peers() for p in alive), "removed before the reconnect window"
    try:
        poll(lambda: all(ids[c] not in p.peers() for p in alive), WINDOW_S + 10,
             "the killed node to be removed after the reconnect window")
    except AssertionError:
        print(a.log, b.log)
        raise

    c2 = spawn("c", "--join", a.token)  # same home: same identity, same token
    assert c2.node_id() == ids[c]
    ids[c2] = ids[c]
    poll(lambda: all(p.peers() | {ids[p]} == everyone for p in (a, b, c2)), 10,
         "the restarted node to rejoin")


def test_wrong_secret_process_is_refused_and_exits(spawn: Callable[..., Proc],
                                                    tmp_path: Path) -> None:
    a = spawn("a")
    token = decode_token(a.token)
    forged = type(token)(token.fingerprint, os.urandom(32), token.port,
                         token.addresses).encode()
    intruder = Proc(tmp_path / "intruder", "--join", forged)
    try:
        code = intruder.popen.wait(60)
        poll(lambda: "mesh secret proof failed" in intruder.log, 5, "the reason on stderr")
    finally:
        intruder.kill()
    assert code != 0, intruder.log
    assert "refused" in intruder.log
    assert a.peers() == set()
    assert "refused a node" in a.log
