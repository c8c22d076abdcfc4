"""The fakes of the test kit: a fake OpenAI server and backend, an in-memory transport."""

from __future__ import annotations

import contextlib
import functools
import json
import random
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import ByteStream, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from meshcore import hookimpl
from meshcore.components import Capabilities, ModelInfo, NodeHandle
from meshcore.config import GB
from meshcore.plan import Plan, PlanState
from meshcore.state import MeshView, Peer, Serving
from meshcore_testing.swim import (
    Message,
    Output,
    Status,
    SwimConfig,
    SwimMember,
    Traffic,
)

# ---------------------------------------------------------------- fake OpenAI server


def fake_reply(prompt: str, max_tokens: int) -> list[str]:
    """Deterministic tokens: the prompt's words echoed back, at most ``max_tokens``."""
    words = prompt.split() or ["ok"]
    return [f" {w}" for w in words][:max_tokens]


def build_fake_openai(server_id: str, delay_s: float = 0.0,
                      cancelled: list[dict[str, Any]] | None = None) -> Any:
    """A starlette app that mimics llama-server's OpenAI endpoints, with ``timings``.

    ``delay_s``: seconds spent on each token (a non-streaming answer waits for all of them).
    Like llama-server, a request whose client disconnects first is cancelled; its body is
    appended to ``cancelled``.
    """
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
        gone = cancelled if cancelled is not None else []
        created = int(time.time())
        base = {"id": "fake-1", "created": created, "model": body.get("model", "fake"),
                "system_fingerprint": server_id}
        if body.get("stream"):
            async def events() -> AsyncIterator[bytes]:
                done = False
                try:
                    async for chunk in token_events():
                        yield chunk
                    done = True
                finally:
                    if not done:
                        gone.append(body)

            async def token_events() -> AsyncIterator[bytes]:
                for tok in tokens:
                    if delay_s:
                        await anyio.sleep(delay_s)
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
        if delay_s and await left_within(request, delay_s * len(tokens)):
            gone.append(body)
            return Response(status_code=499)
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

    async def left_within(request: Request, seconds: float) -> bool:
        """Wait ``seconds``; True as soon as the client disconnects meanwhile."""
        with anyio.move_on_after(seconds):
            while (await request.receive())["type"] != "http.disconnect":
                pass
            return True
        return False

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
    (default 1), ``fake_delay_s`` (seconds per token the OpenAI server takes, default 0).
    ``cancelled`` lists the bodies of requests whose client left before the answer.
    """

    capabilities = Capabilities(host=True, rpc_worker=True, uses_workers=True)

    def __init__(self, node: NodeHandle) -> None:
        self.node = node
        self.plan: Plan | None = None
        self.applied: list[Plan] = []  # every distinct plan applied, for tests
        self.cancelled: list[dict[str, Any]] = []  # requests whose client left, for tests
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
                    node.set_serving(Serving.READY)
                    await self._wake.wait()
                    tg.cancel_scope.cancel()
                self._port = None
            elif plan is not None and plan.includes(node.id):
                async with anyio.create_task_group() as tg:
                    port = await tg.start(_echo_server)
                    node.offer_service("rpc", port)
                    node.set_serving(Serving.RPC)
                    await self._wake.wait()
                    tg.cancel_scope.cancel()
                node.withdraw_service("rpc", port)
            else:
                node.set_serving(Serving.IDLE)
                await self._wake.wait()

    async def _serve_openai(self, *, task_status: TaskStatus[int]) -> None:
        from meshcore.server import serve_asgi

        delay = float(self.node.config.options.get("fake_delay_s", 0))
        app = build_fake_openai(self.node.id, delay, self.cancelled)
        await serve_asgi(app, "127.0.0.1", 0, task_status=task_status)


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
    """A mesh in one process.

    Default: every member sees every other at once (a join or a clean leave updates every
    member's state directly), and a member that stops without leaving stays in every view.
    ``swim=True`` (or a :class:`~meshcore_testing.swim.SwimConfig`): membership and
    announcements travel by SWIM messages (:mod:`meshcore_testing.swim`), which the hub
    carries between live members only, losing each with probability ``loss``; a node's state
    follows its SWIM view (a peer appears once learnt alive and goes once declared dead), and
    a killed member (:meth:`kill`) stops answering without a goodbye, so the others detect it.
    ``traffic`` counts each member's messages and bytes (their compact JSON size).
    """

    members: dict[str, MemoryTransport] = field(default_factory=dict)
    swim: bool | SwimConfig = False
    loss: float = 0.0
    seed: int = 0
    killed: set[str] = field(default_factory=set)
    traffic: dict[str, Traffic] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(f"hub:{self.seed}")

    @property
    def swim_config(self) -> SwimConfig | None:
        """The SWIM parameters in swim mode; None in the default (instant) mode."""
        if isinstance(self.swim, SwimConfig):
            return self.swim
        return SwimConfig() if self.swim else None

    def live(self) -> list[str]:
        """Members that run (not killed), in joining order."""
        return [m for m in self.members if m not in self.killed]

    def join(self, member: MemoryTransport) -> list[str]:
        """Add ``member``; in swim mode, returns the live members it may contact (shuffled)."""
        seeds = [m for m in self.live() if m != member.node.id]
        self.members[member.node.id] = member
        self.killed.discard(member.node.id)
        if self.swim_config is not None:
            self.traffic.setdefault(member.node.id, Traffic())
            self.rng.shuffle(seeds)
            return seeds
        for other in list(self.members.values()):
            if other is not member:
                other.node.state.upsert(member.node.state.me)
                member.node.state.upsert(other.node.state.me)
        return []

    def leave(self, node_id: str) -> None:
        """A clean leave: everyone drops it (instant mode), or its goodbye is gossiped (swim
        mode). A killed member says nothing: it stays until the others detect it."""
        if node_id in self.killed:
            return
        member = self.members.pop(node_id, None)
        if member is None:
            return
        if member.swim is not None:
            member.swim_leave()
            return
        for other in self.members.values():
            other.node.state.remove(node_id)

    def kill(self, node_id: str) -> None:
        """From now on ``node_id`` neither sends nor receives (kill -9); nobody is told."""
        self.killed.add(node_id)

    def deliver(self, sender: str, recipient: str, message: Message) -> None:
        """Carry one SWIM message, unless either end is killed or it is lost."""
        if sender in self.killed:
            return
        self.traffic.setdefault(sender, Traffic()).sent(message)
        target = self.members.get(recipient)
        if target is None or recipient in self.killed:
            return
        if self.loss and self.rng.random() < self.loss:
            return
        self.traffic.setdefault(recipient, Traffic()).received(message)
        target.swim_inbox(message)

    def detected(self, node_id: str) -> bool:
        """Whether every live member declared ``node_id`` dead (or never knew it); a killed
        member then leaves the hub."""
        done = all(m.swim is None or m.swim.status_of(node_id) in (None, Status.DEAD)
                   for i, m in self.members.items() if i not in self.killed)
        if done and node_id in self.killed:
            self.members.pop(node_id, None)
        return done


class MemoryTransport:
    """Gossip by direct calls (or SWIM messages, in a swim-mode hub) and tunnels by memory
    pipes, within one :class:`MemoryHub` (``NodeConfig.options["memory_hub"]``; a private hub
    when absent)."""

    def __init__(self, node: NodeHandle) -> None:
        self.node = node
        self.hub: MemoryHub = node.config.options.get("memory_hub") or MemoryHub()
        self.swim: SwimMember | None = None
        self._inbox: deque[Message] = deque()
        self._wake = anyio.Event()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        config = self.hub.swim_config
        if config is not None:
            self.swim = SwimMember(self.node.id, self.node.state.me.to_dict(),
                                   now=anyio.current_time(), config=config,
                                   rng=random.Random(f"{self.hub.seed}:{self.node.id}"))
        seeds = self.hub.join(self)
        task_status.started()
        try:
            if self.swim is None:
                await anyio.sleep_forever()
            else:
                self._carry_out(self.swim.join(seeds[:3], anyio.current_time()))
                await self._swim_loop(self.swim)
        finally:
            self.hub.leave(self.node.id)

    async def _swim_loop(self, swim: SwimMember) -> None:
        """The member's timers on the wall clock, and its inbox."""
        while True:
            while self._inbox:
                self._carry_out(swim.receive(self._inbox.popleft(), anyio.current_time()))
            self._carry_out(swim.tick(anyio.current_time()))
            if self._inbox:
                continue
            self._wake = anyio.Event()
            with anyio.move_on_after(max(0.0, swim.next_deadline() - anyio.current_time())):
                await self._wake.wait()

    def swim_inbox(self, message: Message) -> None:
        """A message for this member (called by the hub)."""
        self._inbox.append(message)
        self._wake.set()

    def swim_leave(self) -> None:
        """Send the goodbye (called by the hub on a clean leave)."""
        if self.swim is not None:
            self._carry_out(self.swim.leave(anyio.current_time()))

    def _carry_out(self, out: Output) -> None:
        """Send what the member sends; make the node's state follow its view."""
        for recipient, message in out.sends:
            self.hub.deliver(self.node.id, recipient, message)
        state = self.node.state
        for event in out.events:
            if event.status is Status.DEAD:
                state.remove(event.member)
                self.hub.detected(event.member)
            elif event.status is Status.ALIVE and event.record is not None:
                with contextlib.suppress(ValueError):
                    state.upsert(Peer.from_dict(event.record))

    def invite_token(self) -> str | None:
        return f"memory:{id(self.hub):x}"

    async def announce(self) -> None:
        me = self.node.state.me
        if self.swim is not None:
            self._carry_out(self.swim.announce(me.to_dict(), anyio.current_time()))
            self._wake.set()  # the new update is due for gossip now
            return
        for other in list(self.hub.members.values()):
            if other is not self:
                other.node.state.upsert(me)

    async def connect(self, peer_id: str, service: str) -> ByteStream:
        member = self.hub.members.get(peer_id)
        if member is None or peer_id in self.hub.killed:
            raise ConnectionError(f"peer {peer_id} is not in the mesh")
        near, far = MemoryByteStream.pair()
        serve = functools.partial(member.node.serve_inbound, peer_id=self.node.id)
        member.node.task_group.start_soon(serve, service, far)
        return near

    def link(self, peer_id: str) -> str:
        return "memory"

    def status(self) -> dict[str, Any]:
        """Swim mode: this member's traffic and view (``transport`` in ``/mesh/status``)."""
        if self.swim is None:
            return {}
        counts = Counter(m.status.value for m in self.swim.members.values())
        traffic = self.hub.traffic.get(self.node.id, Traffic())
        return {**traffic.to_dict(), "incarnation": self.swim.incarnation,
                "members": dict(sorted(counts.items())), "queued_updates": self.swim.queued}


@hookimpl
def meshcore_register_backends(register: Callable[..., None]) -> None:
    register("fake", FakeBackend)


@hookimpl
def meshcore_register_transports(register: Callable[..., None]) -> None:
    register("memory", MemoryTransport)


