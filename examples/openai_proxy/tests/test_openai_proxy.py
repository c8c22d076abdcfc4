"""Tests of the openai-proxy backend through the documented test kit only: an in-process
mesh (``mesh_harness``) and real ``mesh-llm`` processes (``mesh_process``)."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest
from meshcore.config import ConfigError
from meshcore.server import serve_asgi
from meshcore.state import Serving

from mesh_llm_openai_proxy.settings import GB, ProxySettings, normalize_url
from proxy_helpers import (
    UPSTREAM_WORDS,
    UpstreamRecord,
    UpstreamThread,
    poll,
    post_until_ok,
    sse_data,
    stream_text,
    upstream_app,
)

CHAT = {"model": "echo-model", "max_tokens": 32,
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": "hello from the mesh"}]}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ---------------------------------------------------------------- settings (no mesh)


def test_settings_defaults_and_checks() -> None:
    s = ProxySettings.from_options({}, "m")
    assert (s.mode, s.model, s.vram_bytes, s.model_bytes) == ("echo", "m", 16 * GB, GB)
    s = ProxySettings.from_options({"proxy_url": "http://h:8000/v1/", "proxy_vram_gb": "24",
                                    "proxy_model": "other"}, "m")
    assert (s.mode, s.proxy_url, s.model, s.vram_bytes) == ("proxy", "http://h:8000", "other",
                                                            24 * GB)
    for bad in ({"proxy_vram_gb": "lots"}, {"proxy_vram_gb": -1}, {"proxy_url": "h:8000"},
                {"proxy_url": 5}, {"proxy_timeout_s": 0}):
        with pytest.raises(ConfigError, match="option proxy_"):
            ProxySettings.from_options(bad, "m")
    assert normalize_url("https://api.example.com/openai/v1") == "https://api.example.com/openai"


# ---------------------------------------------------------------- in-process mesh


async def _proxy_mesh_ready(mesh: Any, options: dict[str, Any]) -> tuple[Any, Any]:
    """A proxy node (hosting: it has the most VRAM) and a fake node with no model."""
    proxy = await mesh.add(backend="openai-proxy", model="echo-model",
                           options={"proxy_vram_gb": 24, **options})
    other = await mesh.add(8, model=None)
    nodes = (proxy, other)
    await mesh.wait_for(lambda: all(n.plan.host_id == proxy.id for n in nodes),
                        timeout=20, what="both nodes electing the proxy node as host")

    def proxy_ready() -> bool:
        peer = other.view().get(proxy.id)
        return peer is not None and peer.serving is Serving.READY

    await mesh.wait_for(proxy_ready, timeout=20, what="the proxy node announcing ready")
    return proxy, other


async def _stream(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> list[str]:
    async with client.stream("POST", url, json={**body, "stream": True}) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        return sse_data([line async for line in response.aiter_lines()])


@pytest.mark.anyio
async def test_echo_host_answers_through_another_node(mesh_harness: Callable[..., Any]) -> None:
    async with mesh_harness() as mesh:
        proxy, other = await _proxy_mesh_ready(mesh, {})
        assert other.model is None
        base = f"http://127.0.0.1:{other.api_port}/v1"
        async with httpx.AsyncClient(timeout=20) as client:
            answer = (await post_until_ok(client, f"{base}/chat/completions", CHAT)).json()
            assert answer["id"].startswith("chatcmpl-echo-"), answer
            assert answer["choices"][0]["message"]["content"] == "echo: hello from the mesh"
            assert answer["usage"] == {"prompt_tokens": 6, "completion_tokens": 5,
                                       "total_tokens": 11}

            payloads = await _stream(client, f"{base}/chat/completions", CHAT)
            assert payloads[-1] == "[DONE]"
            assert stream_text(payloads) == "echo: hello from the mesh"
            assert json.loads(payloads[-2])["usage"]["completion_tokens"] == 5

            body = {"model": "echo-model", "prompt": "one two three", "max_tokens": 3}
            text = (await post_until_ok(client, f"{base}/completions", body)).json()
            assert text["choices"][0] == {"index": 0, "finish_reason": "length",
                                          "text": "echo: one two", "logprobs": None}
            payloads = await _stream(client, f"{base}/completions", body)
            assert payloads[-1] == "[DONE]" and stream_text(payloads) == "echo: one two"
        status = proxy.status()
        assert json.dumps(status)  # JSON-safe, the backend's status() included


@pytest.mark.anyio
async def test_proxy_mode_forwards_to_upstream(mesh_harness: Callable[..., Any]) -> None:
    record = UpstreamRecord()
    async with anyio.create_task_group() as upstream_tg:
        port = await upstream_tg.start(serve_asgi, upstream_app(record), "127.0.0.1", 0)
        options = {"proxy_url": f"http://127.0.0.1:{port}/v1",
                   "proxy_upstream_model": "real-name", "proxy_api_key": "sk-up"}
        async with mesh_harness() as mesh:
            _, other = await _proxy_mesh_ready(mesh, options)
            url = f"http://127.0.0.1:{other.api_port}/v1/chat/completions"
            async with httpx.AsyncClient(timeout=20) as client:
                answer = (await post_until_ok(client, url, CHAT)).json()
                assert answer["id"] == "chatcmpl-upstream"
                assert answer["choices"][0]["message"]["content"] == " ".join(UPSTREAM_WORDS)
                payloads = await _stream(client, url, CHAT)
            assert payloads[-1] == "[DONE]"
            assert stream_text(payloads) == " ".join(UPSTREAM_WORDS)
            assert json.loads(payloads[-2])["usage"]["completion_tokens"] == 3
            assert [r["body"]["model"] for r in record.requests] == ["real-name", "real-name"]
            assert {r["authorization"] for r in record.requests} == {"Bearer sk-up"}
            assert record.requests[0]["body"]["messages"] == CHAT["messages"]
        upstream_tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_serves_only_while_host(mesh_harness: Callable[..., Any]) -> None:
    async with mesh_harness() as mesh:
        proxy = await mesh.add(backend="openai-proxy", model="echo-model")  # 16 GB default
        await mesh.wait_for(lambda: proxy.status()["backend"]["serving"] == "ready",
                            timeout=20, what="the proxy node serving")
        first_url = proxy.status()["backend"]["api_base"]
        bigger = await mesh.add(64, model="fake-model")  # more VRAM: it takes over
        await mesh.wait_for(lambda: proxy.plan.host_id == bigger.id, timeout=20,
                            what="the bigger node becoming host")
        await mesh.wait_for(lambda: proxy.view().me.serving is Serving.IDLE, timeout=20,
                            what="the proxy node going idle")
        assert proxy.status()["backend"]["api_base"] is None
        assert proxy.status()["backend"]["hosting"] is False
        await mesh.remove(bigger)
        await mesh.wait_for(lambda: proxy.status()["backend"]["serving"] == "ready",
                            timeout=20, what="the proxy node serving again")
        url = f"http://127.0.0.1:{proxy.api_port}/v1/chat/completions"
        async with httpx.AsyncClient(timeout=20) as client:
            answer = (await post_until_ok(client, url, CHAT)).json()
        assert answer["choices"][0]["message"]["content"] == "echo: hello from the mesh"
        assert isinstance(first_url, str)


@pytest.mark.anyio
async def test_unreachable_upstream_is_reported(mesh_harness: Callable[..., Any]) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    async with mesh_harness() as mesh:
        proxy = await mesh.add(backend="openai-proxy", model="echo-model",
                               options={"proxy_vram_gb": 24, "proxy_ready_timeout_s": 0,
                                        "proxy_url": f"http://127.0.0.1:{dead}"})
        await mesh.wait_for(lambda: proxy.view().me.serving is Serving.ERROR, timeout=20,
                            what="the proxy node announcing error")
        assert "unreachable" in (proxy.view().me.extra.get("error") or "")


# ---------------------------------------------------------------- real processes


def test_processes_default_node_uses_proxy_host(mesh_process: Callable[..., Any]) -> None:
    with UpstreamThread() as upstream:
        options = json.dumps({"proxy_url": upstream.url})  # default 16 GB of "VRAM"
        host = mesh_process("--backend", "openai-proxy", "--transport", "quic",
                            "--model", "proxied", env={"MESH_LLM_OPTIONS": options})
        assert host.token, host.log()
        # A default node: backend llamacpp, no --model, so it must not host (nor need a file).
        member = mesh_process("--transport", "quic", "--join", host.token,
                              env={"MESH_LLM_OPTIONS": "{}"})
        health = member.url.removesuffix("/v1") + "/health"

        def healthy() -> bool:
            try:
                return httpx.get(health, timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        def logs() -> str:
            return f"--- host log:\n{host.log()[-3000:]}\n--- member log:\n{member.log()[-3000:]}"

        poll(healthy, 90, f"{health} to answer 200", logs)
        body = {**CHAT, "model": "proxied"}
        answer: dict[str, Any] = {}

        def answered() -> bool:
            try:
                response = httpx.post(member.url + "/chat/completions", json=body, timeout=30)
            except httpx.HTTPError:
                return False
            if response.status_code == 200:
                answer.update(response.json())
            return response.status_code == 200

        poll(answered, 60, "a 200 answer from the member's API", logs)
        assert answer["id"] == "chatcmpl-upstream", answer
        assert answer["choices"][0]["message"]["content"] == " ".join(UPSTREAM_WORDS)
        with httpx.stream("POST", member.url + "/chat/completions", timeout=30,
                          json={**body, "stream": True}) as response:
            assert response.status_code == 200
            payloads = sse_data(list(response.iter_lines()))
        assert payloads[-1] == "[DONE]"
        assert stream_text(payloads) == " ".join(UPSTREAM_WORDS)
        models = [r["body"]["model"] for r in upstream.record.requests]
        assert len(models) >= 2 and set(models) == {"proxied"}, models
        status = httpx.get(member.url.removesuffix("/v1") + "/mesh/status", timeout=10).json()
        assert json.dumps(status)
        assert member.proc.poll() is None and host.proc.poll() is None
