"""Many Nodes in one process, and pollers for tests: the harness behind ``mesh_harness``."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup

from meshcore.config import NodeConfig
from meshcore.node import Node
from meshcore.plan import ElectionRequest
from meshcore.plugins import get_plugin_manager
from meshcore.registry import collect
from meshcore_testing.fakes import MemoryHub
from meshcore_testing.swim import SwimConfig


async def wait_until(predicate: Callable[[], bool], timeout: float = 10,
                     what: str = "condition") -> None:
    """Poll ``predicate`` until true; fails the test naming ``what`` on timeout."""
    with anyio.move_on_after(timeout):
        while not predicate():
            await anyio.sleep(0.02)
    if not predicate():
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class MeshHarness:
    """Runs many Nodes in one process on a shared MemoryHub (or any transport).

    ``swim=True`` (or a :class:`~meshcore_testing.swim.SwimConfig`, e.g. with short timers)
    puts the hub in swim mode: membership and announcements travel by SWIM gossip, each
    message lost with probability ``loss``, and :meth:`kill` is detected by the others.
    """

    def __init__(self, tg: TaskGroup, state_root: Path, *, transport: str = "memory",
                 election: str = "vram", settle_s: float = 0.05,
                 swim: bool | SwimConfig = False, loss: float = 0.0, seed: int = 0) -> None:
        self.tg = tg
        self.state_root = state_root
        self.hub = MemoryHub(swim=swim, loss=loss, seed=seed)
        self.transport = transport
        self.election = election
        self.settle_s = settle_s
        self.nodes: list[Node] = []
        self.added = 0  # nodes ever added: default ids stay unique after a remove or kill

    async def add(self, vram_gb: float = 8, *, model: str | None = "fake-model",
                  model_gb: float = 1, client: bool = False, split: bool = False,
                  node_id: str | None = None, **config: Any) -> Node:
        n, self.added = self.added, self.added + 1
        node_id = node_id or f"node{n:02d}"
        options = {"memory_hub": self.hub, "fake_vram_gb": vram_gb, "fake_model_gb": model_gb,
                   **config.pop("options", {})}
        # Real transports join the first node's token; the memory hub needs none.
        join = (("memory",) if self.transport == "memory" or not self.nodes
                else (self.nodes[0].transport.invite_token() or "",))
        cfg = NodeConfig(
            model=None if client else model, client=client, split=split,
            joins=() if n == 0 and not client else join,
            backend=config.pop("backend", "fake"), transport=self.transport,
            election=self.election, api_port=0, settle_s=self.settle_s,
            state_dir=self.state_root / node_id, node_id=node_id, options=options, **config,
        )
        node = Node(cfg)
        await self.tg.start(node.run)
        self.nodes.append(node)
        return node

    async def remove(self, node: Node) -> None:
        """Stop ``node`` (its transport says goodbye); returns once it left the hub (memory
        transport) or stopped serving (any other)."""
        node.stop()
        self.nodes.remove(node)
        with anyio.fail_after(10):
            while node.id in self.hub.members or await port_open(node.api_port):
                await anyio.sleep(0.01)

    async def kill(self, node: Node) -> None:
        """Stop ``node`` without a goodbye (kill -9): it stops sending and answering at once,
        its tasks stop, and the others are not told; in swim mode they detect it, in the
        default mode it stays in every view. Returns once its tasks stopped."""
        self.hub.kill(node.id)
        node.stop()
        self.nodes.remove(node)
        with anyio.fail_after(10):
            while await port_open(node.api_port):
                await anyio.sleep(0.01)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10,
                       what: str = "condition") -> None:
        """Poll ``predicate`` until true; fails the test naming ``what`` on timeout."""
        await wait_until(predicate, timeout, what)

    def stop_all(self) -> None:
        for node in self.nodes:
            node.stop()


async def port_open(port: int | None) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port`` (None: no port)."""
    if port is None:
        return False
    try:
        stream = await anyio.connect_tcp("127.0.0.1", port)
    except OSError:
        return False
    await stream.aclose()
    return True


@contextlib.asynccontextmanager
async def run_mesh(state_root: Path, **kwargs: Any) -> AsyncIterator[MeshHarness]:
    """``async with run_mesh(tmp_path) as mesh: await mesh.add(...)``; stops every node."""
    async with anyio.create_task_group() as tg:
        harness = MeshHarness(tg, state_root, **kwargs)
        try:
            yield harness
        finally:
            harness.stop_all()


def election_request(**fields: Any) -> ElectionRequest:
    """An ElectionRequest as a node builds it, for unit tests of an election: every installed
    election registered (so ``request.delegate("vram", view)`` works), ``fields`` on top."""
    elections = collect(get_plugin_manager())["election"].factories()
    return ElectionRequest(elections=elections, **fields)


class HealthPoller:
    """GETs ``url`` (POSTs ``json`` there, when given) every ``every`` seconds in a thread
    while the block runs (or until :meth:`stop`); ``answers`` holds (sent, answered, status)
    with status 0 for no answer, ``codes`` the statuses. Shows whether an API kept serving
    through a plan change (the backend's hand-over) or a host's loss; used by tests,
    bench/gpu.py and bench/scale.py."""

    def __init__(self, url: str, *, every: float = 0.05, timeout: float = 10,
                 json: dict[str, Any] | None = None) -> None:
        self.url, self.every, self.timeout, self.json = url, every, timeout, json
        self.answers: list[tuple[float, float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def codes(self) -> list[int]:
        return [code for _, _, code in self.answers]

    def _run(self) -> None:
        import httpx  # not at import time: the CLI loads this module as a plugin

        # One client, a new connection for every probe (no keep-alive): each probe is a
        # fresh client's view, without httpx.get's SSL context per call (~10-25 ms of CPU on
        # a 2-core machine, every 50 ms, taken from the mesh under test).
        with httpx.Client(timeout=self.timeout,
                          limits=httpx.Limits(max_keepalive_connections=0)) as client:
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    resp = (client.get(self.url) if self.json is None else
                            client.post(self.url, json=self.json))
                    code = resp.status_code
                except httpx.HTTPError:
                    code = 0
                self.answers.append((sent, time.monotonic(), code))
                self._stop.wait(self.every)

    def __enter__(self) -> HealthPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.timeout + 5)

    def counts(self) -> dict[str, int]:
        """``{"200": n, ...}``, status codes as strings (JSON keys)."""
        return {str(code): self.codes.count(code) for code in sorted(set(self.codes))}

    def summary(self) -> str:
        return ", ".join(f"{n} x {code}" for code, n in self.counts().items()) or "no probe"
