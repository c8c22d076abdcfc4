"""pytest plugin (``pytest11`` entry point): fixtures for testing meshcore and its plugins.

``mesh_harness`` runs many nodes in one process (fake backend, memory transport);
``mesh_process`` runs real ``mesh-llm`` processes and cleans them up.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from meshcore_testing import run_mesh

API_LINE = re.compile(r"API\s+http://([^:/\s]+):(\d+)/v1")
JOIN_LINE = re.compile(r"join with: mesh-llm --join (\S+)")


@pytest.fixture
def mesh_harness(tmp_path: Path) -> Callable[..., Any]:
    """Factory of in-process meshes: ``async with mesh_harness() as mesh: await mesh.add(8)``."""
    return functools.partial(run_mesh, tmp_path / "nodes")


@functools.cache
def http_client() -> httpx.Client:
    """One httpx client for a test run's requests to nodes (thread-safe). ``httpx.get``
    builds an SSL context from certifi's bundle on every call, ~30 ms of CPU: a test
    polling a node every 0.1 s with it takes a third of a core from the mesh it waits for.
    No keep-alive: every request opens its own connection, as ``httpx.get``'s do."""
    return httpx.Client(timeout=10, limits=httpx.Limits(max_keepalive_connections=0))


@dataclass
class MeshProcess:
    """A ``mesh-llm`` process started by :func:`mesh_process`, once its banner is printed."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    api_port: int
    token: str | None
    home: Path

    @property
    def url(self) -> str:
        """Base URL of the node's OpenAI API (``.../v1``)."""
        return f"http://127.0.0.1:{self.api_port}/v1"

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        """``GET path`` on the node's API port (``/health``, ``/mesh/status``...) through
        :func:`http_client`; ``kwargs`` go to httpx (``timeout``, ``headers``)."""
        return http_client().get(f"http://127.0.0.1:{self.api_port}{path}", **kwargs)

    def log(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")

    def ui_port(self, name: str) -> int:
        """The port of the UI ``name`` (``--ui NAME[=PORT]``), from the start banner."""
        found = re.search(rf"^\s+{re.escape(name)}\s+http://[^\s]+:(\d+)/", self.log(), re.M)
        if found is None:
            raise AssertionError(f"no UI {name!r} in the banner:\n{self.log()}")
        return int(found.group(1))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Send ``sig`` to the process and wait for it; returns its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the process group (the node and anything sharing its group)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group outlives a dead leader
        self.proc.wait(10)


def start_mesh_process(args: list[str], home: Path, *, env: Mapping[str, str] | None = None,
                       timeout: float = 120) -> MeshProcess:
    """Start ``python -m meshcore_cli ARGS`` in its own session and wait for its banner.

    ``--port 0`` is added unless ``--port`` is given; ``MESH_LLM_HOME`` is ``home``.
    """
    return wait_for_banner(spawn_mesh_process(args, home, env=env), timeout)


def spawn_mesh_process(args: list[str], home: Path, *, env: Mapping[str, str] | None = None
                       ) -> MeshProcess:
    """:func:`start_mesh_process` without the wait (to start many nodes at once; then
    :func:`wait_for_banner` each)."""
    if "--port" not in args:
        args = [*args, "--port", "0"]
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / f"mesh-llm-{time.monotonic_ns()}.log"
    full_env = {**os.environ, "MESH_LLM_HOME": str(home), "PYTHONUNBUFFERED": "1",
                **(env or {})}
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "meshcore_cli", *args], env=full_env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return MeshProcess(proc, log_path, 0, None, home)


def wait_for_banner(node: MeshProcess, timeout: float = 120) -> MeshProcess:
    """Wait until ``node`` printed its banner (API port and join token read from it); raise
    AssertionError naming the node's arguments and its log if it exits or times out."""
    args = " ".join(node.proc.args[3:]) if isinstance(node.proc.args, list) else ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = node.log()
        if (found := API_LINE.search(text)) is not None:
            node.api_port = int(found.group(2))
            if (join := JOIN_LINE.search(text)) is not None:
                node.token = join.group(1)
            return node
        if node.proc.poll() is not None:
            raise AssertionError(f"mesh-llm {args} exited with {node.proc.returncode} "
                                 f"before its banner:\n{text}")
        time.sleep(0.05)
    node.kill()
    raise AssertionError(f"no banner from mesh-llm {args} in {timeout}s:\n{node.log()}")


@pytest.fixture
def mesh_process(tmp_path: Path) -> Iterator[Callable[..., MeshProcess]]:
    """Factory of ``mesh-llm`` processes: ``node = mesh_process("--model", "x", ...)``.

    Each gets its own ``MESH_LLM_HOME`` under ``tmp_path`` and an API port chosen by the OS;
    every process still running at teardown is stopped (SIGTERM, then SIGKILL of its group).
    """
    started: list[MeshProcess] = []

    def start(*args: str, env: Mapping[str, str] | None = None,
              timeout: float = 120) -> MeshProcess:
        home = tmp_path / f"node{len(started)}"
        node = start_mesh_process(list(args), home, env=env, timeout=timeout)
        started.append(node)
        return node

    try:
        yield start
    finally:
        for node in started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.stop(signal.SIGTERM, timeout=10)
            node.kill()
