"""The local OpenAI-compatible ASGI app the backend serves on loopback while it hosts.

Proxy mode forwards every ``/v1/*`` request to ``proxy_url`` and passes the answer through
as it arrives (SSE streams included). Echo mode answers ``/v1/chat/completions``,
``/v1/completions`` and ``/v1/models`` with the built-in echo model. Both answer ``/health``.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mesh_llm_openai_proxy.echo import EchoReply, RequestError
from mesh_llm_openai_proxy.settings import ProxySettings

# Hop-by-hop headers (RFC 9110 7.6.1) and those the forwarding itself sets.
_DROP_REQUEST = frozenset({"connection", "keep-alive", "proxy-authenticate",
                           "proxy-authorization", "te", "trailer", "transfer-encoding",
                           "upgrade", "host", "content-length", "accept-encoding"})
_DROP_RESPONSE = frozenset({"connection", "keep-alive", "proxy-authenticate",
                            "proxy-authorization", "te", "trailer", "transfer-encoding",
                            "upgrade", "content-length"})


@dataclass
class ProxyStats:
    """What the local app served, for the backend's ``status()``."""

    requests: int = 0
    errors: int = 0
    last_error: str | None = None
    by_status: dict[int, int] = field(default_factory=dict)

    def record(self, status: int, error: str | None = None) -> None:
        self.requests += 1
        self.by_status[status] = self.by_status.get(status, 0) + 1
        if status >= 400:
            self.errors += 1
        if error is not None:
            self.last_error = error


def openai_error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    """An error in OpenAI's shape."""
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}},
                        status_code=status)


def build_app(settings: ProxySettings, model: str, stats: ProxyStats,
              client: httpx.AsyncClient | None) -> Starlette:
    """The app: proxy mode when ``client`` is given (its base URL is the upstream), else echo."""

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "mode": settings.mode, "model": model})

    if client is None:
        return _echo_app(model, stats, health)
    return _proxy_app(settings, stats, client, health)


def _echo_app(model: str, stats: ProxyStats, health: Any) -> Starlette:
    async def answer(request: Request, chat: bool) -> Response:
        try:
            body = json.loads(await request.body() or b"null")
            if not isinstance(body, dict):
                raise RequestError("the request body must be a JSON object")
            reply = EchoReply(body, model=model, chat=chat)
        except (ValueError, UnicodeDecodeError) as exc:  # RequestError and bad JSON
            stats.record(400, str(exc))
            return openai_error(400, str(exc))
        stats.record(200)
        if body.get("stream"):
            return StreamingResponse(_aiter(reply.sse()), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(reply.response())

    async def chat(request: Request) -> Response:
        return await answer(request, chat=True)

    async def completions(request: Request) -> Response:
        return await answer(request, chat=False)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": model, "object": "model", "created": int(time.time()),
             "owned_by": "mesh-llm-openai-proxy"}]})

    async def not_found(request: Request) -> Response:
        stats.record(404)
        return openai_error(404, f"the echo model does not serve {request.url.path}")

    return Starlette(routes=[
        Route("/health", health, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/{rest:path}", not_found, methods=["GET", "POST"]),
    ])


async def _aiter(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def _rewrite_model(body: bytes, upstream_model: str) -> bytes:
    """The JSON body with ``model`` replaced; anything else is forwarded untouched."""
    try:
        data = json.loads(body)
    except ValueError:
        return body
    if not isinstance(data, dict):
        return body
    data["model"] = upstream_model
    return json.dumps(data).encode()


def _proxy_app(settings: ProxySettings, stats: ProxyStats, client: httpx.AsyncClient,
               health: Any) -> Starlette:
    async def forward(request: Request) -> Response:
        body = await request.body()
        if settings.upstream_model and body:
            body = _rewrite_model(body, settings.upstream_model)
        headers = [(k, v) for k, v in request.headers.items()
                   if k.lower() not in _DROP_REQUEST
                   and not (settings.api_key and k.lower() == "authorization")]
        headers.append(("accept-encoding", "identity"))  # pass bytes through undecoded
        if settings.api_key:
            headers.append(("authorization", f"Bearer {settings.api_key}"))
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        upstream = client.build_request(request.method, target, headers=headers, content=body)
        try:
            answer = await client.send(upstream, stream=True)
        except httpx.HTTPError as exc:
            message = f"upstream {settings.proxy_url} unreachable: {type(exc).__name__}: {exc}"
            stats.record(502, message)
            return openai_error(502, message, "upstream_error")
        stats.record(answer.status_code)
        out = {k: v for k, v in answer.headers.items() if k.lower() not in _DROP_RESPONSE}
        return StreamingResponse(_relay(answer, stats), status_code=answer.status_code,
                                 headers=out, background=BackgroundTask(answer.aclose))

    return Starlette(routes=[
        Route("/health", health, methods=["GET"]),
        Route("/v1/{rest:path}", forward,
              methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]),
    ])


async def _relay(answer: httpx.Response, stats: ProxyStats) -> AsyncIterator[bytes]:
    """The upstream body as it arrives; an upstream failure mid-stream ends it (and is kept
    in ``stats.last_error``) instead of crashing the server. The upstream response is always
    closed, whether the stream ended, broke or the client went away."""
    try:
        async for chunk in answer.aiter_raw():
            yield chunk
    except httpx.HTTPError as exc:
        stats.last_error = f"upstream stream broke: {type(exc).__name__}: {exc}"
    finally:  # also when the client went away mid-stream (the task is cancelled)
        with anyio.CancelScope(shield=True):
            await answer.aclose()
