"""The OpenAI-compatible API every node serves on :9337, routed to the mesh's host."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import httpx
from anyio.abc import TaskStatus
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from meshcore.components import NodeHandle
from meshcore.httpguard import HttpGuard, error
from meshcore.server import serve_asgi

MAX_BODY = 8 * 1024 * 1024
PASSED_HEADERS = ("content-type", "cache-control", "content-encoding")
CLIENT_LEFT = 499  # the status of a request whose client disconnected (as nginx logs it)


QUANT = re.compile(r"[-_.](i?q\d\w*|bf16|f16|f32)$", re.IGNORECASE)  # -Q4_K_M, .f16, ...


def names_served(asked: object, served: str | None) -> bool:
    """Whether a request's ``model`` names the model the mesh serves. Accepted: no model
    (absent or null), ``default``, and any mesh when no model is known yet (the request then
    meets the no-host answer); else, compared case-insensitively with ``.gguf`` dropped, the
    served name, that name without its quantisation suffix (``-Q4_K_M``, ``.f16``), or a
    prefix of either that ends where a ``-``, ``_`` or ``.`` follows (served
    ``SmolLM2-135M-Instruct-Q8_0`` accepts ``smollm2-135m`` and ``SmolLM2-135M-Instruct``)."""
    if asked is None or asked == "default" or served is None:
        return True
    if not isinstance(asked, str) or not asked.strip():
        return False
    want = asked.strip().lower().removesuffix(".gguf")
    for name in {served.lower(), QUANT.sub("", served.lower())}:
        if name == want or (name.startswith(want) and name[len(want)] in "-_."):
            return True
    return False


@dataclass(frozen=True)
class ApiEvent:
    """One API request, as the ``meshcore_api_request`` hook sees it: once ``started``, once
    ``finished`` (with the status, and usage and timings when the response carried them)."""

    phase: str  # "started" | "finished"
    id: int  # pairs a request's two events (counts up from 1 per node)
    path: str
    model: str | None
    stream: bool
    status: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    drafted: int | None = None  # speculative decoding (``timings.draft_n``)
    draft_accepted: int | None = None  # ``timings.draft_n_accepted``
    seconds: float = 0.0  # request to end of response
    first_byte_s: float | None = None  # request to the first response byte


def usage_of(tail: bytes, key: str = "usage") -> dict[str, Any]:
    """The ``usage`` object (or another top-level object: ``timings``) in a response's tail:
    a JSON body, or the last SSE event that carries one; {} when there is none."""
    return _tail_objects(tail, (key,)).get(key, {})


def _tail_objects(tail: bytes, keys: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """{key: object} for each of ``keys`` found as :func:`usage_of` finds one, in one pass."""
    chunks = [tail] if tail.lstrip().startswith(b"{") else [
        line[5:] for line in reversed(tail.split(b"\n")) if line.startswith(b"data:")]
    found: dict[str, dict[str, Any]] = {}
    for chunk in chunks:
        try:
            event = json.loads(chunk)
        except ValueError:
            continue
        if isinstance(event, dict):
            found.update({k: v for k in keys if k not in found
                          and isinstance(v := event.get(k), dict)})
        if len(found) == len(keys):
            break
    return found


def _ints(found: dict[str, Any], *keys: str) -> list[int | None]:
    return [v if isinstance(v := found.get(k), int) and v >= 0 else None for k in keys]


class Observed:
    """Counts a request in the node's counters and tells the observers, start and finish."""

    TAIL = 64 * 1024

    def __init__(self, node: NodeHandle, path: str, payload: dict[str, Any]) -> None:
        self.node, self.began, self.done = node, time.monotonic(), False
        model = payload.get("model")
        node.counters.requests += 1
        self.event = ApiEvent("started", node.counters.requests, path,
                              model if isinstance(model, str) else None,
                              payload.get("stream") is True)
        node.collect("meshcore_api_request", node=node, event=self.event)

    def finish(self, status: int, tail: bytes = b"", first_byte_s: float | None = None) -> None:
        if self.done:  # once per request
            return
        self.done = True
        ok = status < 400
        found = _tail_objects(tail, ("usage", "timings")) if ok else {}
        prompt, completion = _ints(found.get("usage", {}), "prompt_tokens", "completion_tokens")
        drafted, accepted = _ints(found.get("timings", {}), "draft_n", "draft_n_accepted")
        c = self.node.counters
        c.by_status[status] = c.by_status.get(status, 0) + 1
        c.errors += status >= 400
        c.prompt_tokens += prompt or 0
        c.completion_tokens += completion or 0
        if drafted is not None and accepted is not None and accepted <= drafted:
            c.drafted, c.draft_accepted = c.drafted + drafted, c.draft_accepted + accepted
        done = dataclasses.replace(self.event, phase="finished", status=status,
                                   prompt_tokens=prompt, completion_tokens=completion,
                                   drafted=drafted, draft_accepted=accepted,
                                   seconds=time.monotonic() - self.began,
                                   first_byte_s=first_byte_s)
        self.node.collect("meshcore_api_request", node=self.node, event=done)

    async def relay(self, resp: httpx.Response) -> AsyncGenerator[bytes]:
        """The upstream body, chunk by chunk; closing it early (the client left: Starlette
        cancels the stream, then the background task closes this generator) closes the
        upstream connection, which cancels the request there, and finishes as 499."""
        tail, first, status = b"", None, CLIENT_LEFT
        try:
            async for chunk in resp.aiter_raw():
                first = time.monotonic() - self.began if first is None else first
                tail = (tail + chunk)[-self.TAIL:]
                yield chunk
            status = resp.status_code
        except Exception:
            status = resp.status_code
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await resp.aclose()
            self.finish(status, tail, first)


class Routing(NodeHandle, Protocol):
    """What the API needs beyond the plugin handle: where requests go now (the Node)."""

    async def upstream(self) -> str | None: ...
    def not_ready_reason(self) -> str: ...


STOPPING = "the node is shutting down; retry on another node of the mesh"


def build_api(node: Routing) -> Starlette:
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0))
    inflight: set[httpx.Response | anyio.CancelScope] = set()  # what a stopping node ends
    stopping = anyio.Event()

    async def health(request: Request) -> Response:
        upstream = await node.upstream()
        if upstream is None:
            return JSONResponse({"status": "unavailable", "reason": node.not_ready_reason()}, 503)
        return JSONResponse({"status": "ok", "host": node.plan.host_id, "model": node.plan.model})

    async def models(request: Request) -> Response:
        model = node.plan.model or node.state.me.model
        data = [] if model is None else [
            {"id": model, "object": "model", "created": 0, "owned_by": "mesh-llm"}
        ]
        return JSONResponse({"object": "list", "data": data})

    async def status(request: Request) -> Response:
        return JSONResponse(node.status())

    async def proxy(request: Request) -> Response:
        body = await request.body()  # HttpGuard caps it at MAX_BODY while it streams in
        try:
            payload: Any = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return error(400, f"request body is not valid JSON: {exc}", "invalid_request_error")
        if not isinstance(payload, dict):
            return error(400, "request body must be a JSON object", "invalid_request_error")
        served = node.plan.model or node.state.me.model
        if not names_served(payload.get("model"), served):
            return JSONResponse({"error": {
                "message": f"The model {payload.get('model')!r} does not exist: this mesh "
                           f"serves {served!r} (or send 'default', or no model)",
                "type": "invalid_request_error", "param": "model", "code": "model_not_found"}},
                404)
        seen = Observed(node, request.url.path, payload)
        upstream = await node.upstream()
        if upstream is None:
            seen.finish(503)
            reason = node.not_ready_reason()
            return error(503, f"no ready host: {reason}", "unavailable")
        req = client.build_request("POST", upstream + request.url.path, content=body,
                                   headers={"content-type": "application/json"})
        try:
            resp = await send_unless_gone(request, req)
        except httpx.HTTPError as exc:  # retryable: the host restarts it, or a new host comes
            seen.finish(503)
            return error(503, f"host {node.plan.host_id} did not answer: {exc!r}; its model "
                              f"server is restarting or the mesh re-elects: retry", "unavailable")
        if resp is None:
            seen.finish(503 if stopping.is_set() else CLIENT_LEFT)
            if stopping.is_set():
                return error(503, STOPPING, "unavailable")
            return Response(status_code=CLIENT_LEFT)
        headers = {k: v for k, v in resp.headers.items() if k.lower() in PASSED_HEADERS}
        body_chunks = seen.relay(resp)
        inflight.add(resp)

        async def relayed() -> AsyncGenerator[bytes]:
            try:
                async for chunk in body_chunks:
                    yield chunk
            except httpx.HTTPError as exc:  # the host's server died, or this node stops
                why = STOPPING if stopping.is_set() else (
                    f"host {node.plan.host_id} stopped answering mid-response "
                    f"({type(exc).__name__}); retry")
                if payload.get("stream") is True:  # the stream ends with a clear reason
                    yield b"data: %s\n\n" % json.dumps(
                        {"error": {"message": why, "type": "unavailable", "code": 503}}).encode()

        async def end() -> None:  # also when the client left before the body was started
            inflight.discard(resp)
            await body_chunks.aclose()
            await resp.aclose()
            seen.finish(CLIENT_LEFT)

        return StreamingResponse(relayed(), resp.status_code, headers,
                                 background=BackgroundTask(end))

    async def send_unless_gone(request: Request, req: httpx.Request) -> httpx.Response | None:
        """Send ``req`` upstream, watching the client while no response has come yet (a
        non-streaming answer sends nothing until done): None when the client left first,
        the upstream request cancelled (its connection closed)."""
        resp: httpx.Response | httpx.HTTPError | None = None
        async with anyio.create_task_group() as tg:
            async def watch() -> None:
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            inflight.add(tg.cancel_scope)
            try:
                resp = await client.send(req, stream=True)
            except httpx.HTTPError as exc:  # raised below, not wrapped in an ExceptionGroup
                resp = exc
            finally:
                inflight.discard(tg.cancel_scope)
            tg.cancel_scope.cancel()
        if isinstance(resp, httpx.HTTPError):
            raise resp
        return resp

    async def close_client() -> None:
        await client.aclose()

    async def end_inflight() -> None:
        """The node stops: end every relayed request now (503, or a last SSE error event),
        so the server's graceful shutdown finds none left and the host's server is free."""
        stopping.set()
        for item in list(inflight):
            await item.aclose() if isinstance(item, httpx.Response) else item.cancel()

    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", models),
            Route("/v1/chat/completions", proxy, methods=["POST"]),
            Route("/v1/completions", proxy, methods=["POST"]),
            Route("/mesh/status", status),
        ],
        middleware=[Middleware(HttpGuard, bind_host=node.config.bind_host,
                               api_key=node.config.api_key, max_body=MAX_BODY)],
    )
    app.state.close_client = close_client
    app.state.end_inflight = end_inflight
    return app


async def serve_api(node: Routing, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED
                    ) -> None:
    """Serve the node's API on ``--port`` (loopback unless ``--listen-all``)."""
    app = build_api(node)
    try:
        await serve_asgi(app, node.config.bind_host, node.config.api_port,
                         task_status=task_status, on_stop=app.state.end_inflight)
    finally:
        with anyio.CancelScope(shield=True):
            await app.state.close_client()
