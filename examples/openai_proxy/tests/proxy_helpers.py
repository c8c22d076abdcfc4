"""Test helpers for the openai-proxy backend: a stand-in upstream OpenAI server, SSE parsing
and bounded pollers. Named uniquely so it cannot clash with other suites' helper modules."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
from meshcore.server import serve_asgi
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

UPSTREAM_WORDS = ["upstream", "says", "hello"]


@dataclass
class UpstreamRecord:
    """What the stand-in upstream received."""

    requests: list[dict[str, Any]] = field(default_factory=list)


def upstream_app(record: UpstreamRecord) -> Starlette:
    """A tiny OpenAI-compatible server whose answers are recognisable (``upstream says hello``,
    id ``chatcmpl-upstream``), streamed or not, with ``usage``."""

    async def chat(request: Request) -> Response:
        body = await request.json()
        record.requests.append({"path": request.url.path, "body": body,
                                "authorization": request.headers.get("authorization")})
        usage = {"prompt_tokens": 3, "completion_tokens": len(UPSTREAM_WORDS),
                 "total_tokens": 3 + len(UPSTREAM_WORDS)}
        head = {"id": "chatcmpl-upstream", "created": 1, "model": body.get("model")}
        if not body.get("stream"):
            return JSONResponse({**head, "object": "chat.completion", "usage": usage,
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant",
                                                          "content": " ".join(UPSTREAM_WORDS)}}]})

        async def events() -> AsyncIterator[bytes]:
            for i, word in enumerate(UPSTREAM_WORDS):
                chunk = {**head, "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "finish_reason": None,
                                      "delta": {"content": word if i == 0 else f" {word}"}}]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
                await anyio.sleep(0.01)
            last = {**head, "object": "chat.completion.chunk", "usage": usage,
                    "choices": [{"index": 0, "finish_reason": "stop", "delta": {}}]}
            yield f"data: {json.dumps(last)}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "upstream-model",
                                                         "object": "model"}]})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                             Route("/v1/models", models, methods=["GET"])])


class UpstreamThread:
    """The stand-in upstream served by ``serve_asgi`` on its own event loop in a thread, for
    synchronous tests: ``with UpstreamThread() as up: up.url``."""

    def __init__(self) -> None:
        self.record = UpstreamRecord()
        self.port = 0
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: anyio.run(self._main), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _main(self) -> None:
        async with anyio.create_task_group() as tg:
            self.port = await tg.start(serve_asgi, upstream_app(self.record), "127.0.0.1", 0)
            self._ready.set()
            await anyio.to_thread.run_sync(self._stop.wait)
            tg.cancel_scope.cancel()

    def __enter__(self) -> UpstreamThread:
        self._thread.start()
        if not self._ready.wait(30):
            raise AssertionError("the stand-in upstream did not start in 30 s")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def sse_data(lines: list[str]) -> list[str]:
    """The ``data:`` payloads of an SSE body's lines."""
    return [line[len("data:"):].strip() for line in lines if line.startswith("data:")]


def stream_text(payloads: list[str]) -> str:
    """The text a chat or completion stream carried (deltas and ``text`` pieces joined)."""
    text = []
    for payload in payloads:
        if payload == "[DONE]":
            continue
        for choice in json.loads(payload).get("choices", []):
            text.append(choice.get("delta", {}).get("content") or choice.get("text") or "")
    return "".join(text)


async def post_until_ok(client: httpx.AsyncClient, url: str, body: dict[str, Any],
                        timeout: float = 30) -> httpx.Response:
    """POST until a 200 (the API may answer 503 until the host's tunnel is up)."""
    last: httpx.Response | None = None
    with anyio.move_on_after(timeout):
        while True:
            last = await client.post(url, json=body)
            if last.status_code == 200:
                return last
            await anyio.sleep(0.2)
    detail = "no answer" if last is None else f"{last.status_code} {last.text[:300]}"
    raise AssertionError(f"{url} did not answer 200 in {timeout}s: {detail}")


def poll(predicate: Callable[[], bool], timeout: float, what: str,
         on_fail: Callable[[], str] = lambda: "") -> None:
    """Synchronous bounded poll; the failure names ``what`` and adds ``on_fail()``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{on_fail()}")
