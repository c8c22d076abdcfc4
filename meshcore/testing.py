"""Test harness for plugin authors and our own tests: fake backend, in-memory transport,
and a factory that runs many Nodes in one process. Also loaded as the pytest plugin."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import ByteStream, TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from meshcore import hookimpl
from meshcore.components import ModelInfo
from meshcore.config import GB, NodeConfig
from meshcore.plan import Plan, PlanState
from meshcore.state import MeshView, Serving

# ---------------------------------------------------------------- fake OpenAI server


def fake_reply(prompt: str, max_tokens: int) -> list[str]:
    """Deterministic tokens: the prompt's words echoed back, at most ``max_tokens``."""
    words = prompt.split() or ["ok"]
    return [f" {w}" for w in words][:max_tokens]


def build_fake_openai(server_id: str) -> Any:
    """A starlette app that mimics llama-server's OpenAI endpoints, with ``timings``."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    def timings(n: int) -> dict[str, Any]:
        return {"predicted_n": n, "predicted_ms": n * 5.0, "predicted_per_second": 200.0,
                "prompt_n": 1, "draft_n": n, "draft_n_accepted": max(0, n - 1)}

    async def complete(request: Request) -> Response:
        body = await request.json()
        chat = request.url.path.endswith("/chat/completions")
        if chat:
            prompt = " ".join(str(m.get("content", "")) for m in body.get("messages", [])[-1:])
        else:
            prompt = str(body.get("prompt", ""))
        tokens = fake_reply(prompt, int(body.get("max_tokens") or 16))
        created = int(time.time())
        base = {"id": "fake-1", "created": created, "model": body.get("model", "fake"),
                "system_fingerprint": server_id}
        if body.get("stream"):
            async def events() -> AsyncIterator[bytes]:
                for tok in tokens:
                    choice: dict[str, Any] = (
                        {"index": 0, "delta": {"content": tok}, "finish_reason": None}
                        if chat else {"index": 0, "text": tok, "finish_reason": None}
                    )
                    obj = "chat.completion.chunk" if chat else "text_completion"
                    chunk = {**base, "object": obj, "choices": [choice]}
                    yield f"data: {json.dumps(chunk)}\n\n".encode()
                last_choice: dict[str, Any] = (
                    {"index": 0, "delta": {}, "finish_reason": "stop"} if chat
                    else {"index": 0, "text": "", "finish_reason": "stop"}
                )
                final = {**base, "object": "chat.completion.chunk" if chat else "text_completion",
                         "choices": [last_choice], "timings": timings(len(tokens))}
                yield f"data: {json.dumps(final)}\n\n".encode()
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        text = "".join(tokens)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                   "finish_reason": "stop"} if chat
                  else {"index": 0, "text": text, "finish_reason": "stop"})
        usage = {"prompt_tokens": 1, "completion_tokens": len(tokens),
                 "total_tokens": len(tokens) + 1}
        return JSONResponse({**base, "object": "chat.completion" if chat else "text_completion",
                             "choices": [choice], "usage": usage,
                             "timings": timings(len(tokens))})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[
        Route("/health", health),
        Route("/v1/chat/completions", complete, methods=["POST"]),
        Route("/v1/completions", complete, methods=["POST"]),
    ])


# ---------------------------------------------------------------- fake backend


class FakeBackend:
    """Reports a configurable VRAM; as host it serves :func:`build_fake_openai` on a free
    loopback port; as a plan worker it offers an ``rpc`` echo service.

    Options (``NodeConfig.options``): ``fake_vram_gb`` (default 8), ``fake_model_gb``
    (default 1).
    """

    def __init__(self, node: Any) -> None:
        self.node = node
        self.plan: Plan | None = None
        self.applied: list[Plan] = []  # every distinct plan applied, for tests
        self._wake = anyio.Event()
        self._port: int | None = None

    def detect_vram(self) -> int:
        return int(float(self.node.config.options.get("fake_vram_gb", 8)) * GB)

    async def prepare(self) -> ModelInfo | None:
        name = self.node.config.model
        if name is None:
            return None
        size = int(float(self.node.config.options.get("fake_model_gb", 1)) * GB)
        return ModelInfo(name=name, path=None, size=size)

    async def apply(self, plan: Plan, view: MeshView) -> None:
        if plan != self.plan:
            self.plan = plan
            self.applied.append(plan)
            self._wake.set()

    def api_base(self) -> str | None:
        return None if self._port is None else f"http://127.0.0.1:{self._port}"

    def status(self) -> dict[str, Any]:
        return {"name": "fake", "port": self._port, "plans_applied": len(self.applied)}

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self._wake = anyio.Event()
            plan = self.plan
            node = self.node
            if plan is not None and plan.host_id == node.id and plan.state is not PlanState.WAITING:
                async with anyio.create_task_group() as tg:
                    node.set_serving(Serving.LOADING)
                    self._port = await tg.start(self._serve_openai)
                    node.services["llama"] = ("127.0.0.1", self._port)
                    node.set_serving(Serving.READY)
                    await self._wake.wait()
                    tg.cancel_scope.cancel()
                self._port = None
                node.services.pop("llama", None)
            elif plan is not None and plan.includes(node.id):
                async with anyio.create_task_group() as tg:
                    port = await tg.start(_echo_server)
                    node.services["rpc"] = ("127.0.0.1", port)
                    node.set_serving(Serving.RPC)
                    await self._wake.wait()
                    tg.cancel_scope.cancel()
                node.services.pop("rpc", None)
            else:
                node.set_serving(Serving.IDLE)
                await self._wake.wait()

    async def _serve_openai(self, *, task_status: TaskStatus[int]) -> None:
        from meshcore.server import serve_asgi

        await serve_asgi(build_fake_openai(self.node.id), "127.0.0.1", 0, task_status=task_status)


async def _echo_server(*, task_status: TaskStatus[int]) -> None:
    """Stands in for an rpc-server: echoes bytes (enough to prove a tunnel works)."""

    async def echo(stream: ByteStream) -> None:
        async with stream:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.EndOfStream):
                async for chunk in stream:
                    await stream.send(chunk)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with listener:
        task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))
        await listener.serve(echo)


# ---------------------------------------------------------------- in-memory transport


class MemoryByteStream(ByteStream):
    """One end of an in-memory duplex byte pipe."""

    def __init__(self, send: MemoryObjectSendStream[bytes],
                 receive: MemoryObjectReceiveStream[bytes]) -> None:
        self._send = send
        self._receive = receive

    @classmethod
    def pair(cls) -> tuple[MemoryByteStream, MemoryByteStream]:
        a_send, a_recv = anyio.create_memory_object_stream[bytes](64)
        b_send, b_recv = anyio.create_memory_object_stream[bytes](64)
        return cls(a_send, b_recv), cls(b_send, a_recv)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self._receive.receive()

    async def send(self, item: bytes) -> None:
        await self._send.send(bytes(item))

    async def send_eof(self) -> None:
        await self._send.aclose()

    async def aclose(self) -> None:
        await self._send.aclose()
        await self._receive.aclose()


@dataclass
class MemoryHub:
    """A mesh in one process: every member sees every other member."""

    members: dict[str, MemoryTransport] = field(default_factory=dict)

    def join(self, member: MemoryTransport) -> None:
        self.members[member.node.id] = member
        for other in list(self.members.values()):
            if other is not member:
                other.node.state.upsert(member.node.state.me)
                member.node.state.upsert(other.node.state.me)

    def leave(self, node_id: str) -> None:
        if self.members.pop(node_id, None) is not None:
            for other in self.members.values():
                other.node.state.remove(node_id)


class MemoryTransport:
    """Gossip by direct calls and tunnels by memory pipes, within one :class:`MemoryHub`
    (``NodeConfig.options["memory_hub"]``; a private hub when absent)."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.hub: MemoryHub = node.config.options.get("memory_hub") or MemoryHub()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self.hub.join(self)
        task_status.started()
        try:
            await anyio.sleep_forever()
        finally:
            self.hub.leave(self.node.id)

    def invite_token(self) -> str | None:
        return f"memory:{id(self.hub):x}"

    async def announce(self) -> None:
        me = self.node.state.me
        for other in list(self.hub.members.values()):
            if other is not self:
                other.node.state.upsert(me)

    async def connect(self, peer_id: str, service: str) -> ByteStream:
        member = self.hub.members.get(peer_id)
        if member is None:
            raise ConnectionError(f"peer {peer_id} is not in the mesh")
        near, far = MemoryByteStream.pair()
        member.node.task_group.start_soon(member.node.serve_inbound, service, far)
        return near

    def link(self, peer_id: str) -> str:
        return "memory"


@hookimpl
def meshcore_register_backends(register: Callable[..., None]) -> None:
    register("fake", FakeBackend)


@hookimpl
def meshcore_register_transports(register: Callable[..., None]) -> None:
    register("memory", MemoryTransport)


# ---------------------------------------------------------------- node factory


async def wait_until(predicate: Callable[[], bool], timeout: float = 10,
                     what: str = "condition") -> None:
    """Poll ``predicate`` until true; fails the test naming ``what`` on timeout."""
    with anyio.move_on_after(timeout):
        while not predicate():
            await anyio.sleep(0.02)
    if not predicate():
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class MeshHarness:
    """Runs many Nodes in one process on a shared MemoryHub (or any transport)."""

    def __init__(self, tg: TaskGroup, state_root: Path, *, transport: str = "memory",
                 election: str = "vram", settle_s: float = 0.05) -> None:
        self.tg = tg
        self.state_root = state_root
        self.hub = MemoryHub()
        self.transport = transport
        self.election = election
        self.settle_s = settle_s
        self.nodes: list[Any] = []

    async def add(self, vram_gb: float = 8, *, model: str | None = "fake-model",
                  model_gb: float = 1, client: bool = False, split: bool = False,
                  node_id: str | None = None, **config: Any) -> Any:
        from meshcore.node import Node

        n = len(self.nodes)
        node_id = node_id or f"node{n:02d}"
        options = {"memory_hub": self.hub, "fake_vram_gb": vram_gb, "fake_model_gb": model_gb,
                   **config.pop("options", {})}
        # Real transports join the first node's token; the memory hub needs none.
        join = (("memory",) if self.transport == "memory" or not self.nodes
                else (self.nodes[0].transport.invite_token(),))
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

    async def remove(self, node: Any) -> None:
        node.stop()
        self.nodes.remove(node)
        with anyio.fail_after(10):
            while node.id in self.hub.members:
                await anyio.sleep(0.01)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10,
                       what: str = "condition") -> None:
        """Poll ``predicate`` until true; fails the test naming ``what`` on timeout."""
        await wait_until(predicate, timeout, what)

    def stop_all(self) -> None:
        for node in self.nodes:
            node.stop()


@contextlib.asynccontextmanager
async def run_mesh(state_root: Path, **kwargs: Any) -> AsyncIterator[MeshHarness]:
    """``async with run_mesh(tmp_path) as mesh: await mesh.add(...)``; stops every node."""
    async with anyio.create_task_group() as tg:
        harness = MeshHarness(tg, state_root, **kwargs)
        try:
            yield harness
        finally:
            harness.stop_all()


class HealthPoller:
    """GETs ``url`` every ``every`` seconds in a thread while the block runs (or until
    :meth:`stop`); ``codes`` holds the answers, 0 for none. Shows whether an API kept
    serving through a plan change (the backend's hand-over); used by tests and bench/gpu.py."""

    def __init__(self, url: str, *, every: float = 0.05, timeout: float = 10) -> None:
        self.url, self.every, self.timeout = url, every, timeout
        self.codes: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import httpx  # not at import time: the CLI loads this module as a plugin

        while not self._stop.is_set():
            try:
                self.codes.append(httpx.get(self.url, timeout=self.timeout).status_code)
            except httpx.HTTPError:
                self.codes.append(0)
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
