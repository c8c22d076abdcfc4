"""The OpenAI-compatible API every node serves, against in-process meshes (fake backend)."""

from __future__ import annotations

import json
import socket
from typing import Any

import httpx
import pytest
from meshcore_testing import fakes as testing

from meshcore.api import names_served, usage_of
from meshcore.state import Serving

pytestmark = pytest.mark.anyio

CHAT = {"messages": [{"role": "user", "content": "one two three"}], "max_tokens": 8}


def api(node: Any) -> str:
    return f"http://127.0.0.1:{node.api_port}"


async def ready_mesh(mesh: Any, *vrams: float, **config: Any) -> list[Any]:
    nodes = [await mesh.add(v, **config) for v in vrams]
    host = max(nodes, key=lambda n: n.state.me.vram)
    await mesh.wait_for(lambda: all(n.plan.host_id == host.id for n in nodes), what="election")
    await mesh.wait_for(lambda: host.state.me.serving is Serving.READY, what="host ready")
    await mesh.wait_for(lambda: all(n.view().get(host.id).serving is Serving.READY
                                    for n in nodes), what="everyone sees the host ready")
    return nodes


async def test_bad_json_is_400(mesh_harness: Any) -> None:
    async with mesh_harness() as mesh:
        (node,) = await ready_mesh(mesh, 8)
        async with httpx.AsyncClient(base_url=api(node)) as client:
            r = await client.post("/v1/chat/completions", content=b"{not json",
                                  headers={"content-type": "application/json"})
            assert r.status_code == 400
            assert "request body is not valid JSON" in r.json()["error"]["message"]
            r = await client.post("/v1/completions", json=["a", "list"])
            assert r.status_code == 400
            assert r.json()["error"]["message"] == "request body must be a JSON object"


async def test_no_host_is_503_with_the_reason(mesh_harness: Any) -> None:
    async with mesh_harness() as mesh:
        node = await mesh.add(4, model_gb=10)
        await mesh.wait_for(lambda: node.plan.reason.startswith("waiting for"), what="plan")
        async with httpx.AsyncClient(base_url=api(node)) as client:
            r = await client.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 503
            message = r.json()["error"]["message"]
            assert message == "no ready host: waiting for 7.0 GB more VRAM (have 4.0 of 11.0 GB)"
            r = await client.get("/health")
            assert r.status_code == 503
            assert r.json() == {"status": "unavailable",
                                "reason": "waiting for 7.0 GB more VRAM (have 4.0 of 11.0 GB)"}
            r = await client.get("/v1/models")
            assert r.json()["data"][0]["id"] == "fake-model"


async def test_api_key_is_enforced(mesh_harness: Any) -> None:
    async with mesh_harness() as mesh:
        (node,) = await ready_mesh(mesh, 8, api_key="sekret")
        async with httpx.AsyncClient(base_url=api(node)) as client:
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "sekret"}):
                r = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
                assert r.status_code == 401, headers
                assert r.json()["error"]["type"] == "invalid_api_key"
                assert (await client.get("/v1/models", headers=headers)).status_code == 401
                assert (await client.get("/mesh/status", headers=headers)).status_code == 401
            good = {"authorization": "Bearer sekret"}
            r = await client.post("/v1/chat/completions", json=CHAT, headers=good)
            assert r.status_code == 200
            assert (await client.get("/v1/models", headers=good)).status_code == 200
            assert (await client.get("/health")).status_code == 200, "health stays open"


async def test_models_health_and_status(mesh_harness: Any) -> None:
    async with mesh_harness() as mesh:
        host, worker = await ready_mesh(mesh, 8, 4)
        async with httpx.AsyncClient(base_url=api(worker)) as client:
            models = (await client.get("/v1/models")).json()
            assert models["object"] == "list"
            assert [m["id"] for m in models["data"]] == ["fake-model"]
            health = await client.get("/health")
            assert health.status_code == 200
            assert health.json() == {"status": "ok", "host": host.id, "model": "fake-model"}
            status = (await client.get("/mesh/status")).json()
            assert status["id"] == worker.id and status["role"] == "WORKER"
            assert status["plan"]["host_id"] == host.id
            assert [p["id"] for p in status["peers"]] == [host.id]
            json.dumps(host.status())  # plain JSON


async def test_streaming_is_passed_through_byte_for_byte(
        mesh_harness: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(testing.time, "time", lambda: 1_700_000_000.0)  # fixed "created"
    async with mesh_harness() as mesh:
        host, worker = await ready_mesh(mesh, 8, 4)
        direct_base = host.backend.api_base()
        body = {**CHAT, "stream": True}
        async with httpx.AsyncClient() as client:
            direct = await client.post(f"{direct_base}/v1/chat/completions", json=body)
            via_host = await client.post(f"{api(host)}/v1/chat/completions", json=body)
            via_worker = await client.post(f"{api(worker)}/v1/chat/completions", json=body)
        assert direct.status_code == via_host.status_code == via_worker.status_code == 200
        assert via_worker.headers["content-type"].startswith("text/event-stream")
        assert direct.content == via_host.content == via_worker.content
        events = [line[6:] for line in via_worker.text.split("\n\n") if line]
        assert events[-1] == "[DONE]"
        final = json.loads(events[-2])
        assert final["timings"]["draft_n"] == 3 and "predicted_per_second" in final["timings"]
        text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "")
                       for e in events[:-1])
        assert text == " one two three"


async def test_completion_keeps_timings(mesh_harness: Any) -> None:
    async with mesh_harness() as mesh:
        _host, worker = await ready_mesh(mesh, 8, 4)
        async with httpx.AsyncClient(base_url=api(worker)) as client:
            r = await client.post("/v1/completions", json={"prompt": "a b", "max_tokens": 1})
        assert r.status_code == 200
        data = r.json()
        assert data["choices"][0]["text"] == " a"
        assert data["timings"]["predicted_n"] == 1


async def test_api_counts_drafted_and_accepted_tokens(mesh_harness: Any) -> None:
    """Speculative decoding's acceptance, summed from the responses' ``timings`` (streamed:
    the last event that has them) in the node that relayed them: what the console shows."""
    async with mesh_harness() as mesh:
        host, worker = await ready_mesh(mesh, 8, 4)
        async with httpx.AsyncClient(base_url=api(worker)) as client:
            streamed = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
            plain = await client.post("/v1/completions", json={"prompt": "a b", "max_tokens": 2})
        assert streamed.status_code == plain.status_code == 200
        # the fake drafts n tokens for an n-token reply and has n - 1 accepted: 3/2 and 2/1
        assert (worker.counters.drafted, worker.counters.draft_accepted) == (5, 3)
        assert worker.status()["api"]["drafted"] == 5
        assert (host.counters.drafted, host.counters.draft_accepted) == (0, 0)


def test_usage_of_reads_timings_and_skips_what_is_not_an_object() -> None:
    sse = (b'data: {"timings": {"draft_n": 4, "draft_n_accepted": 3}}\n\n'
           b'data: {"choices": []}\n\ndata: [DONE]\n\n')
    assert usage_of(sse, "timings") == {"draft_n": 4, "draft_n_accepted": 3}
    assert usage_of(sse) == {}
    assert usage_of(b'{"timings": [1, 2]}', "timings") == {}
    assert usage_of(b'{"usage": {"prompt_tokens": 1}}') == {"prompt_tokens": 1}


@pytest.mark.parametrize(("asked", "served", "ok"), [
    (None, "fake-model", True), ("default", "fake-model", True), ("fake-model", "fake-model", True),
    ("FAKE-Model", "fake-model", True), ("fake", "fake-model", True), ("gpt-4o", None, True),
    ("SmolLM2-135M", "SmolLM2-135M-Instruct", True), ("smollm2-135m-instruct.gguf",
                                                       "SmolLM2-135M-Instruct-Q8_0", True),
    ("SmolLM2-135M-Instruct-Q8_0", "SmolLM2-135M-Instruct-Q8_0", True),
    ("gpt-4o", "fake-model", False), ("fak", "fake-model", False), ("", "fake-model", False),
    ("fake-model-2", "fake-model", False), (5, "fake-model", False),
    ("SmolLM2-135M-Instruct-Q4_0", "SmolLM2-135M-Instruct-Q8_0", False),
])
def test_which_model_names_are_the_served_model(asked: object, served: str | None,
                                                ok: bool) -> None:
    assert names_served(asked, served) is ok


async def test_an_unknown_model_is_404_and_known_names_are_answered(mesh_harness: Any) -> None:
    async with mesh_harness() as mesh:
        _host, worker = await ready_mesh(mesh, 8, 4)
        async with httpx.AsyncClient(base_url=api(worker)) as client:
            for name in ("fake-model", "Fake-Model", "fake", "default", None):
                r = await client.post("/v1/chat/completions", json={**CHAT, "model": name})
                assert r.status_code == 200, (name, r.text)
            r = await client.post("/v1/completions", json={"prompt": "a", "model": "gpt-4o"})
            assert r.status_code == 404
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and err["param"] == "model"
            assert err["code"] == "model_not_found"
            assert "'gpt-4o'" in err["message"] and "'fake-model'" in err["message"]
            models = (await client.get("/v1/models")).json()
            assert [m["id"] for m in models["data"]] == ["fake-model"]
        assert worker.counters.requests == 5, "a refused request never reaches the host"


async def test_an_upstream_that_does_not_answer_is_a_retryable_503(
        mesh_harness: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    async with mesh_harness() as mesh:
        (node,) = await ready_mesh(mesh, 8)

        async def nowhere() -> str:
            return f"http://127.0.0.1:{dead}"

        monkeypatch.setattr(node, "upstream", nowhere)
        async with httpx.AsyncClient(base_url=api(node)) as client:
            r = await client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable"
        assert "did not answer" in r.json()["error"]["message"]
        assert node.counters.by_status == {503: 1}


async def test_a_host_that_dies_mid_stream_ends_the_stream_with_a_clear_503_event(
        mesh_harness: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 14: when the host's server dies mid-response (e.g. llama-server aborting on a
    lost rpc tunnel) a streamed request ends with a last ``data:`` error event saying so,
    not a truncated chunked body."""
    import anyio

    async def dying(stream: Any) -> None:  # an upstream that sends one event, then dies
        async with stream:
            await stream.receive()  # the request
            await stream.send(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                              b"transfer-encoding: chunked\r\n\r\n")
            event = b'data: {"choices": [{"delta": {"content": "one"}}]}\n\n'
            await stream.send(b"%x\r\n%s\r\n" % (len(event), event))

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg, mesh_harness() as mesh:
        tg.start_soon(listener.serve, dying)
        (node,) = await ready_mesh(mesh, 8)

        async def there() -> str:
            return f"http://127.0.0.1:{port}"

        monkeypatch.setattr(node, "upstream", there)
        async with httpx.AsyncClient(base_url=api(node)) as client, client.stream(
                "POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            lines = [line async for line in r.aiter_lines() if line.startswith("data:")]
        tg.cancel_scope.cancel()
    assert r.status_code == 200 and len(lines) == 2, lines
    last = json.loads(lines[-1][5:])
    assert last["error"]["code"] == 503 and "stopped answering" in last["error"]["message"]
