"""The console's HTTP API (/api/status, /api/events, /api/chat) for every role, against the
ASGI app with httpx and the fake-backend harness."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from meshcore_console.app import build_app
from meshcore_console.payload import speculation
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from meshcore import hookimpl
from meshcore.plan import Plan, PlanState
from meshcore.state import Serving

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def console(node: Any, caller: str = "127.0.0.1", base_url: str = "http://127.0.0.1:3131"
                  ) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(node)
    transport = httpx.ASGITransport(app=app, client=(caller, 40000))
    try:
        async with httpx.AsyncClient(transport=transport, base_url=base_url) as client:
            yield client
    finally:
        await app.state.aclose()


async def status(node: Any, caller: str = "127.0.0.1", base_url: str = "http://127.0.0.1:3131"
                 ) -> dict[str, Any]:
    async with console(node, caller, base_url) as client:
        r = await client.get("/api/status")
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def parse_sse(raw: str) -> list[tuple[str, Any]]:
    """(event, data) pairs of an SSE body."""
    out = []
    for block in raw.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        out.append((fields.get("event", "message"), json.loads(fields["data"])))
    return out


async def ready(mesh: Any, host: Any, *nodes: Any, peers: int) -> None:
    await mesh.wait_for(lambda: host.state.me.serving is Serving.READY, what="host ready")
    for n in (host, *nodes):
        await mesh.wait_for(lambda n=n: len(n.view().peers) == peers and
                            n.plan.host_id == host.id, what=f"{n.id} sees the mesh")


async def test_solo_host(mesh_harness: Any) -> None:
    async with mesh_harness() as mesh:
        host = await mesh.add(8, console_port=0)
        await ready(mesh, host, peers=1)
        data = await status(host)
    assert data["id"] == host.id
    assert (data["role"], data["is_host"], data["is_client"]) == ("HOST", True, False)
    assert data["badge"]["text"] == "Host"
    # a lone host is not told to --split: there is nobody to split with
    assert data["badge"]["detail"] == ("serving alone: no other node has joined yet "
                                       "(add one with the join command)")
    assert (data["peers_count"], data["peers"]) == (0, [])
    assert (data["plan_state"], data["tensor_split"], data["rpc_entries"]) == ("SOLO", [1.0], [])
    assert data["plan_reason"] == "model fits on host; use --split to force"
    assert (data["model"], data["total_vram_gb"]) == ("fake-model", 8.0)
    assert data["api_url"] == f"http://127.0.0.1:{host.api_port}/v1"
    assert data["join_command"] == f"mesh-llm --join {host.transport.invite_token()}"
    assert [n["id"] for n in data["nodes"]] == [host.id] and data["links"] == []
    assert data["nodes"][0]["share"] == 1.0


async def test_join_token_only_for_loopback_callers(mesh_harness: Any) -> None:
    async with mesh_harness() as mesh:
        host = await mesh.add(8, console_port=0)
        remote = await status(host, caller="10.1.2.3")
        local = await status(host, caller="::1", base_url="http://[::1]:3131")
        named = await status(host, base_url="http://localhost:3131")
        async with console(host, base_url="http://evil.example:3131") as client:
            rebound = await client.get("/api/status")  # DNS rebinding: refused outright
    assert remote["join_token"] is None and remote["join_command"] is None
    assert remote["token_hidden"] is True
    token = host.transport.invite_token()
    assert local["join_token"] == named["join_token"] == token and not local["token_hidden"]
    assert rebound.status_code == 421 and "evil.example" in rebound.json()["error"]["message"]


async def test_idle_worker(mesh_harness: Any) -> None:
    async with mesh_harness() as mesh:
        host = await mesh.add(8, console_port=0)
        worker = await mesh.add(4, console_port=0)
        await ready(mesh, host, worker, peers=2)
        data, hosting = await status(worker), await status(host)
    assert hosting["badge"]["detail"] == "model fits on host; use --split to force"  # not alone
    assert (data["role"], data["is_host"]) == ("WORKER", False)
    assert data["badge"] == {"kind": "idle", "text": "Worker idle",
                             "detail": "model fits on host; use --split to force"}
    assert data["peers_count"] == 1
    peer = data["peers"][0]
    assert {k: peer[k] for k in ("id", "role", "vram_gb", "model", "link")} == {
        "id": host.id, "role": "HOST", "vram_gb": 8.0, "model": "fake-model", "link": "memory"}
    assert "rtt_ms" in peer
    assert data["total_vram_gb"] == 12.0
    assert data["links"] == [{"from": host.id, "to": worker.id, "label": "QUIC · HTTP",
                              "transport": "memory"}]


async def test_worker_in_split_and_its_host(mesh_harness: Any) -> None:
    async with mesh_harness() as mesh:
        host = await mesh.add(8, split=True, console_port=0)
        worker = await mesh.add(4, split=True, console_port=0)
        await ready(mesh, host, worker, peers=2)
        await mesh.wait_for(lambda: worker.state.me.serving is Serving.RPC, what="worker rpc")
        w, h = await status(worker), await status(host)
    assert w["badge"]["text"] == "Worker in split" and w["role"] == "WORKER"
    assert w["plan_state"] == "SPLIT"
    # tensor split in llama-server's device order, as the election lists participants
    order = [p.peer_id for p in worker.plan.participants]
    assert sorted(order) == sorted([host.id, worker.id])
    assert w["tensor_split"] == [{host.id: 0.67, worker.id: 0.33}[i] for i in order]
    assert {n["id"]: n["share"] for n in w["nodes"]} == {host.id: 0.67, worker.id: 0.33}
    assert [link["label"] for link in w["links"]] == ["RPC"]
    assert h["badge"]["text"] == "Host" and h["total_vram_gb"] == 12.0
    assert h["rpc_entries"] == [{"peer_id": worker.id, "share": 0.33, "address": None}]


async def test_client(mesh_harness: Any) -> None:
    async with mesh_harness() as mesh:
        host = await mesh.add(8, console_port=0)
        client = await mesh.add(client=True, console_port=0)
        await ready(mesh, host, client, peers=2)
        data = await status(client)
    assert (data["role"], data["is_client"], data["badge"]["text"]) == ("CLIENT", True, "Client")
    assert data["total_vram_gb"] == 8.0  # clients never count
    assert data["links"] == [{"from": host.id, "to": client.id, "label": "API tunnel",
                              "transport": "memory"}]
    me = next(n for n in data["nodes"] if n["is_self"])
    assert (me["role"], me["vram"]) == ("CLIENT", 0)


async def test_waiting_for_more_vram(mesh_harness: Any) -> None:
    async with mesh_harness() as mesh:
        node = await mesh.add(2, model_gb=4, console_port=0)
        await mesh.wait_for(lambda: node.plan.reason.startswith("waiting"), what="waiting plan")
        data = await status(node)
    assert data["plan_state"] == "WAITING"
    assert data["badge"]["kind"] == "waiting"
    missing = data["missing_vram_gb"]
    assert 2.4 <= missing <= 2.5  # 4 GB x 1.1 - 2 GB, as the election rounds it (up)
    assert data["badge"]["text"] == f"Waiting for {missing:.1f} GB more"
    assert f"waiting for {missing:.1f} GB more" in data["plan_reason"]  # badge agrees


async def test_events_start_with_the_status_then_heartbeat(mesh_harness: Any) -> None:
    async with mesh_harness() as mesh:
        host = await mesh.add(8, console_port=0, options={"console_heartbeat_s": 0.05})
        await ready(mesh, host, peers=1)
        async with console(host) as client:
            r = await client.get("/api/events", params={"max": 3})
            bad = await client.get("/api/events", params={"max": "lots"})
        now = await status(host)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    assert [e for e, _ in events] == ["status", "heartbeat", "heartbeat"]
    assert events[0][1] == now
    assert bad.status_code == 400 and "max='lots'" in bad.json()["error"]


async def next_status(lines: AsyncIterator[str], want: Any) -> dict[str, Any]:
    """Read SSE lines until a status payload satisfies ``want``."""
    event = ""
    async for line in lines:
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: ") and event == "status":
            payload: dict[str, Any] = json.loads(line[6:])
            if want(payload):
                return payload
    raise AssertionError("event stream ended")


async def test_events_push_joins_plan_changes_and_leaves(mesh_harness: Any) -> None:
    async with mesh_harness() as mesh:
        host = await mesh.add(8, console_port=0)
        await ready(mesh, host, peers=1)
        url = f"http://127.0.0.1:{host.uis['console'].port}/api/events"
        async with httpx.AsyncClient(timeout=10) as client, client.stream("GET", url) as r:
            lines = r.aiter_lines()
            with anyio.fail_after(10):
                first = await next_status(lines, lambda p: True)
                assert first["peers_count"] == 0
                worker = await mesh.add(4, split=True)
                joined = await next_status(lines, lambda p: p["peers_count"] == 1)
                assert joined["peers"][0]["id"] == worker.id
                split = await next_status(lines, lambda p: p["plan_state"] == "SPLIT")
                assert sorted(split["tensor_split"]) == [0.33, 0.67]
                await mesh.remove(worker)
                left = await next_status(lines, lambda p: p["peers_count"] == 0)
                assert [n["id"] for n in left["nodes"]] == [host.id]


async def chat(node: Any, content: str, key: str | None = None) -> tuple[str, dict[str, Any]]:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    async with console(node) as client:
        r = await client.post("/api/chat", json={"messages": [{"role": "user",
                                                               "content": content}]},
                              headers=headers)
    assert r.status_code == 200, r.text
    text, timings = "", dict[str, Any]()
    for _, chunk in parse_sse(r.text.replace("data: [DONE]\n\n", "")):
        text += chunk["choices"][0].get("delta", {}).get("content") or ""
        timings = chunk.get("timings") or timings
    return text, timings


async def test_chat_streams_from_the_host_for_host_and_client(mesh_harness: Any) -> None:
    async with mesh_harness() as mesh:
        host = await mesh.add(8, console_port=0, api_key="s3cret")
        client = await mesh.add(client=True, console_port=0)
        await ready(mesh, host, client, peers=2)
        assert await chat(host, "hello mesh", key="s3cret") == (" hello mesh", {
            "predicted_n": 2, "predicted_ms": 10.0, "predicted_per_second": 200.0,
            "prompt_n": 1, "draft_n": 2, "draft_n_accepted": 1})
        text, _ = await chat(client, "through the tunnel")
        assert text == " through the tunnel"
        async with console(host, caller="10.1.2.3") as remote:  # the key is lent only to
            refused = await remote.post("/api/chat", json={"messages": []})  # its holders
        assert refused.status_code == 401 and "--api-key" in refused.json()["error"]["message"]
        async with httpx.AsyncClient() as direct:  # the key the console passed is needed
            r = await direct.post(f"http://127.0.0.1:{host.api_port}/v1/chat/completions",
                                  json={"messages": []})
        assert r.status_code == 401


@pytest.mark.parametrize(("is_host", "mode", "draft", "api", "shown"), [
    (True, "ngram", None, {"drafted": 40, "draft_accepted": 30},
     "n-gram lookup · 30/40 drafted tokens accepted (75%) in replies through this node"),
    (True, "draft", "tiny", {}, "draft tiny"),
    (True, None, "tiny", {"drafted": 0, "draft_accepted": 0}, "off"),  # --speculation off
    (False, None, "tiny", {}, "draft tiny"),
    (False, None, None, {"drafted": 3, "draft_accepted": 3},
     "set by the host · 3/3 drafted tokens accepted (100%) in replies through this node"),
])
def test_speculation_line(is_host: bool, mode: str | None, draft: str | None,
                          api: dict[str, int], shown: str) -> None:
    plan = Plan(state=PlanState.SOLO, host_id="h", model="m", draft=draft)
    assert speculation({"speculation": mode}, plan, api, is_host) == shown


async def test_chat_rejects_bad_bodies_and_reports_no_host(mesh_harness: Any) -> None:
    async with mesh_harness() as mesh:
        node = await mesh.add(2, model_gb=4, console_port=0)
        await mesh.wait_for(lambda: node.plan.reason.startswith("waiting"), what="waiting plan")
        async with console(node) as client:
            form = await client.post("/api/chat", data={"messages": "x"})
            bad = await client.post("/api/chat", content=b"{not json",
                                    headers={"content-type": "application/json"})
            wrong = await client.post("/api/chat", json={"prompt": "hi"})
            waiting = await client.post("/api/chat", json={"messages": []})
    assert form.status_code == 415 and "application/json" in form.json()["error"]["message"]
    assert bad.status_code == 400 and "chat request body is not valid" in bad.json()["error"]
    assert wrong.status_code == 400 and "'messages' list" in wrong.json()["error"]
    assert waiting.status_code == 503 and "waiting for" in waiting.text


class ExtraRoutes:
    @hookimpl
    def meshcore_console_routes(self, node: Any) -> list[Any]:
        async def hello(request: Request) -> PlainTextResponse:
            return PlainTextResponse(f"hello from {node.id}")

        return [Route("/plugin/hello", hello)]


async def test_page_assets_and_plugin_routes(mesh_harness: Any) -> None:
    async with mesh_harness() as mesh:
        node = await mesh.add(8, console_port=0)
        node.pm.register(ExtraRoutes())
        async with console(node) as client:
            page = await client.get("/")
            script = await client.get("/static/console.js")
            extra = await client.get("/plugin/hello")
        async with httpx.AsyncClient() as real:  # the served port answers too
            served = await real.get(f"http://127.0.0.1:{node.uis['console'].port}/")
    assert page.status_code == 200 and 'id="topology"' in page.text
    assert served.text == page.text
    assert script.status_code == 200 and "EventSource" in script.text
    assert "setInterval" not in script.text and "location.reload" not in script.text
    assert extra.text == f"hello from {node.id}"


async def test_open_event_streams_end_when_the_node_stops(mesh_harness: Any) -> None:
    async with mesh_harness() as mesh:
        node = await mesh.add(8, console_port=0)
        url = f"http://127.0.0.1:{node.uis['console'].port}/api/events"
        async with httpx.AsyncClient(timeout=10) as client, client.stream("GET", url) as r:
            lines = r.aiter_lines()
            with anyio.fail_after(10):
                await next_status(lines, lambda p: True)
                await mesh.remove(node)
                rest = [line async for line in lines]
        assert not any(line.startswith("event: status") for line in rest)


async def role_node(mesh: Any, role: str) -> Any:
    """A settled node in ``role``: host, idle, split, client or waiting."""
    if role == "waiting":
        node = await mesh.add(2, model_gb=4, console_port=0)
        await mesh.wait_for(lambda: node.plan.reason.startswith("waiting"), what="waiting")
        return node
    host = await mesh.add(8, console_port=0, split=role == "split")
    other = await mesh.add(4, console_port=0) if role in ("idle", "split") else None
    if role == "client":
        other = await mesh.add(client=True, console_port=0)
    node = other or host
    await ready(mesh, host, *([other] if other else []), peers=2 if other else 1)
    if role == "split":
        await mesh.wait_for(lambda: node.state.me.serving is Serving.RPC, what="worker rpc")
    return node


@pytest.mark.parametrize(("role", "badge"), [
    ("host", "Host"), ("idle", "Worker idle"), ("split", "Worker in split"),
    ("client", "Client"), ("waiting", "Waiting for ")])
async def test_first_event_is_the_status_for_every_role(mesh_harness: Any, role: str,
                                                        badge: str) -> None:
    async with mesh_harness() as mesh:
        node = await role_node(mesh, role)
        async with console(node) as client:
            events = parse_sse((await client.get("/api/events?max=1")).text)
            now = (await client.get("/api/status")).json()
    assert events == [("status", now)]
    text = now["badge"]["text"]
    assert text.startswith(badge) if role == "waiting" else text == badge
