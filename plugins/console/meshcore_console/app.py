"""The web console: a starlette app (page, status JSON, SSE events, chat proxy) and the
:class:`Console` UI that serves it inside the node's task group."""

from __future__ import annotations

import functools
import ipaddress
import json
from collections.abc import AsyncIterator
from importlib.resources import files
from typing import Any

import anyio
import httpx
from anyio.abc import TaskGroup, TaskStatus
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from meshcore.components import NodeHandle
from meshcore.config import DEFAULT_CONSOLE_PORT
from meshcore.httpguard import HttpGuard, bearer_ok
from meshcore.server import serve_asgi
from meshcore_console.access import enter_with_key, key_challenge, passes_key, query_key
from meshcore_console.payload import build_payload

DEFAULT_HEARTBEAT_S = 15.0
RECONNECT_MS = 1000  # a restarted node's page reconnects within a second
MAX_CHAT_BODY = 1024 * 1024
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def is_loopback(request: Request) -> bool:
    """True when the caller connects from this machine (127.0.0.0/8 or ::1) and addressed us
    by an IP or ``localhost``: a page on a rebound DNS name (DNS rebinding) gets no token."""
    caller = request.client.host if request.client else ""
    try:
        if not ipaddress.ip_address(caller).is_loopback:
            return False
    except ValueError:
        return False
    named = (request.url.hostname or "").strip("[]")
    if named == "localhost":
        return True
    try:
        ipaddress.ip_address(named)
    except ValueError:
        return False
    return True


def may_see_token(node: NodeHandle, request: Request) -> bool:
    """The join token goes to a caller that passed the node's --api-key, or, on a node
    without one, to a caller on the node itself."""
    key = node.config.api_key
    if key:
        return passes_key(request.scope, key) or bearer_ok(request.scope, key)
    return is_loopback(request)


def payload_for(node: NodeHandle, request: Request) -> dict[str, Any]:
    """The status payload as this caller may see it (see :func:`may_see_token`)."""
    api_host = "127.0.0.1"
    if node.config.listen_all:
        api_host = request.url.hostname or api_host
    return build_payload(node, loopback=may_see_token(node, request), api_host=api_host)


def sse(event: str, data: Any, event_id: int | None = None, retry_ms: int | None = None
        ) -> bytes:
    """One Server-Sent Events message (``retry`` tells EventSource how soon to reconnect)."""
    head = f"retry: {retry_ms}\n" if retry_ms is not None else ""
    head += f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def wait_for_change(node: NodeHandle, gen: int, plan_event: anyio.Event, timeout: float
                          ) -> str:
    """Wait until the mesh view passes ``gen`` or the plan changes (``"change"``), the node
    stops (``"stop"``) or ``timeout`` passes (``"timeout"``)."""
    woke = "timeout"

    async def watch(tg: TaskGroup, wait: Any, why: str) -> None:
        nonlocal woke
        await wait()
        woke = why
        tg.cancel_scope.cancel()

    with anyio.move_on_after(timeout):
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch, tg, functools.partial(node.state.changed, gen), "change")
            tg.start_soon(watch, tg, plan_event.wait, "change")
            tg.start_soon(watch, tg, node.wait_stopped, "stop")
    return woke


async def event_stream(node: NodeHandle, request: Request, heartbeat_s: float, limit: int
                       ) -> AsyncIterator[bytes]:
    """``status`` on connect and after every view or plan change that changes the payload,
    ``heartbeat`` after ``heartbeat_s`` without one; stops after ``limit`` messages (0 = never)
    or when the node stops."""
    sent, last, woke = 0, "", "change"
    while True:
        gen = node.state.generation
        plan_event = node.plan_changed
        payload = payload_for(node, request)
        text = json.dumps(payload, sort_keys=True)
        if text != last:
            last = text
            sent += 1
            yield sse("status", payload, payload.get("generation"),
                      RECONNECT_MS if sent == 1 else None)
        elif woke == "timeout":
            sent += 1
            yield sse("heartbeat", {"generation": gen})
        if limit and sent >= limit:
            return
        woke = await wait_for_change(node, gen, plan_event, heartbeat_s)
        if woke == "stop":
            return


class ChatProxy:
    """``POST /api/chat``: stream a chat completion from this node's own OpenAI API."""

    def __init__(self, node: NodeHandle) -> None:
        self.node = node
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0))

    async def handle(self, request: Request) -> Response:
        # HttpGuard already required JSON (a cross-site form post cannot drive the model),
        # the node's --api-key (which this relay then lends), and a body under MAX_CHAT_BODY.
        body = await request.body()
        try:
            payload = json.loads(body)
            if not isinstance(payload, dict) or not isinstance(payload.get("messages"), list):
                raise ValueError("expected a JSON object with a 'messages' list")
        except ValueError as exc:
            return JSONResponse({"error": f"chat request body is not valid: {exc}"}, 400)
        port = self.node.api_port
        if port is None:
            return JSONResponse({"error": "the node's API is not started yet; retry"}, 503)
        payload["stream"] = True
        payload.setdefault("model", self.node.plan.model or "default")
        headers = {"content-type": "application/json"}
        if self.node.config.api_key:
            headers["authorization"] = f"Bearer {self.node.config.api_key}"
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        req = self.client.build_request("POST", url, json=payload, headers=headers)
        try:
            resp = await self.client.send(req, stream=True)
        except httpx.HTTPError as exc:
            return JSONResponse({"error": f"the node's API at {url} did not answer: {exc!r}"},
                                502)

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in resp.aiter_raw():
                    yield chunk
            finally:
                with anyio.CancelScope(shield=True):
                    await resp.aclose()

        media = resp.headers.get("content-type", "text/event-stream")
        return StreamingResponse(relay(), resp.status_code, SSE_HEADERS, media_type=media)

    async def aclose(self) -> None:
        await self.client.aclose()


def build_app(node: NodeHandle) -> Starlette:
    """The console's ASGI app; call ``await app.state.aclose()`` when done with it."""
    heartbeat_s = float(node.config.options.get("console_heartbeat_s", DEFAULT_HEARTBEAT_S))
    static = files("meshcore_console") / "static"
    chat = ChatProxy(node)

    async def index(request: Request) -> Response:
        if node.config.api_key and query_key(request.scope) is not None:  # checked by the guard
            return enter_with_key(request.scope, node.config.api_key)
        return HTMLResponse(static.joinpath("index.html").read_text(encoding="utf-8"),
                            headers={"cache-control": "no-cache"})

    async def status(request: Request) -> Response:
        return JSONResponse(payload_for(node, request))

    async def events(request: Request) -> Response:
        raw = request.query_params.get("max", "0")
        if not raw.isdigit():
            return JSONResponse({"error": f"max={raw!r} must be a whole number of messages "
                                          "(0 = stream until the client leaves)"}, 400)
        stream = event_stream(node, request, heartbeat_s, int(raw))
        return StreamingResponse(stream, headers=SSE_HEADERS, media_type="text/event-stream")

    routes: list[BaseRoute] = [
        Route("/", index),
        Route("/api/status", status),
        Route("/api/events", events),
        Route("/api/chat", chat.handle, methods=["POST"]),
        Mount("/static", StaticFiles(packages=[("meshcore_console", "static")]), name="static"),
    ]
    for extra in node.collect("meshcore_console_routes", node=node):
        routes.extend(extra)
    key = node.config.api_key
    guard = Middleware(HttpGuard, bind_host=node.config.bind_host, api_key=key,
                       max_body=MAX_CHAT_BODY, open_paths=(),
                       authorized=functools.partial(passes_key, api_key=key) if key else None,
                       challenge=key_challenge)
    app = Starlette(routes=routes, middleware=[guard])
    app.state.aclose = chat.aclose
    return app


class Console:
    """The ``console`` UI: serves :func:`build_app` on ``--console PORT`` (0 = any free port);
    ``port`` is the bound port once started (the CLI banner prints it)."""

    def __init__(self, node: NodeHandle, port: int | None = None) -> None:
        self.node = node
        self.want_port = DEFAULT_CONSOLE_PORT if port is None else port
        self.port: int | None = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        config = self.node.config
        app = build_app(self.node)
        try:
            async with anyio.create_task_group() as tg:
                self.port = await tg.start(serve_asgi, app, config.bind_host, self.want_port)
                task_status.started()
        finally:
            with anyio.CancelScope(shield=True):
                await app.state.aclose()
