"""Client mode: no backend, never counted in VRAM, never hosts, its API answers through the host.

First in one process (harness, memory transport), then as separate ``mesh-llm`` processes over
the real QUIC transport with the fake backend (no llama.cpp needed).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from meshcore_testing.pytest_plugin import MeshProcess

from meshcore.config import GB
from meshcore.plan import PlanState
from meshcore.state import Role

pytestmark = pytest.mark.anyio


async def test_client_never_hosts_or_counts(mesh_harness: Any) -> None:
    async with mesh_harness() as mesh:
        a = await mesh.add(8)
        c = await mesh.add(64, client=True)  # whatever VRAM it has, a client offers none
        await mesh.wait_for(lambda: c.plan.host_id == a.id and a.plan.host_id == a.id,
                            what="both elect a")
        assert c.backend is None
        assert c.state.me.role is Role.CLIENT and c.state.me.vram == 0
        assert a.plan.state is PlanState.SOLO and not a.plan.includes(c.id)
        assert a.view().total_vram == 8 * GB and c.view().total_vram == 8 * GB
        assert c.status()["role"] == "CLIENT" and not c.status()["is_host"]

        async with httpx.AsyncClient() as http:
            r = await http.post(f"http://127.0.0.1:{c.api_port}/v1/chat/completions",
                                json={"messages": [{"role": "user", "content": "via client"}]})
        assert r.status_code == 200, r.text
        assert r.json()["system_fingerprint"] == a.id  # the fake stamps the serving node
        assert r.json()["choices"][0]["message"]["content"] == " via client"


async def test_client_alone_waits_and_host_loss_is_reported(mesh_harness: Any) -> None:
    async with mesh_harness() as mesh:
        a = await mesh.add(8)
        c = await mesh.add(client=True)
        await mesh.wait_for(lambda: c.plan.host_id == a.id, what="c elects a")
        await mesh.remove(a)
        await mesh.wait_for(lambda: c.plan.state is PlanState.WAITING, what="c waits")
        assert c.plan.host_id is None and "clients never host" in c.plan.reason
        async with httpx.AsyncClient() as http:
            r = await http.get(f"http://127.0.0.1:{c.api_port}/health")
        assert r.status_code == 503 and "clients never host" in r.json()["reason"]


def mesh_status(node: MeshProcess) -> dict[str, Any]:
    r = node.get("/mesh/status")
    r.raise_for_status()
    status: dict[str, Any] = r.json()
    return status


def wait_status(node: MeshProcess, predicate: Callable[[dict[str, Any]], bool], what: str,
                timeout: float = 60) -> dict[str, Any]:
    """Poll ``/mesh/status`` until ``predicate`` holds; fails naming ``what`` with the log."""
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            status = mesh_status(node)
            if predicate(status):
                return status
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last status {status}\n{node.log()}")


def quic_missing() -> str | None:
    """Why the QUIC transport cannot be used yet, or None."""
    try:
        from meshcore_transport_quic.transport import QuicTransport  # noqa: F401
    except ImportError as exc:
        return f"the QUIC transport (plugins/transport_quic, transport.py) is missing: {exc}"
    return None


def test_client_process_over_quic(mesh_process: Callable[..., MeshProcess]) -> None:
    if missing := quic_missing():
        pytest.skip(missing)
    import openai

    a = mesh_process("--backend", "fake", "--model", "fake-model", "--max-vram", "8")
    assert a.token, a.log()
    a_id = mesh_status(a)["id"]
    c = mesh_process("--client", "--join", a.token)
    c_id = wait_status(c, lambda s: s["plan"]["host_id"] == a_id, "c elects a")["id"]
    status_a = wait_status(a, lambda s: any(p["id"] == c_id for p in s["peers"]), "a sees c")
    status_c = mesh_status(c)
    assert status_c["role"] == "CLIENT" and status_c["backend"] == {}
    assert not status_c["is_host"] and status_c["me"]["vram"] == 0
    assert status_a["plan"]["state"] == "SOLO"
    assert [p["peer_id"] for p in status_a["plan"]["participants"]] == [a_id]
    assert status_a["total_vram"] == 8 * GB == status_c["total_vram"]
    peer_c = next(p for p in status_a["peers"] if p["id"] == c_id)
    assert peer_c["role"] == "CLIENT" and peer_c["vram"] == 0

    wait_status(c, lambda s: httpx.get(f"{c.url.removesuffix('/v1')}/health").status_code
                == 200, "c's API routes to a ready host")
    with openai.OpenAI(base_url=c.url, api_key="unused", max_retries=0) as api:
        reply = api.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hello over quic"}])
    assert reply.choices[0].message.content == " hello over quic"
    assert reply.system_fingerprint == a_id  # the fake backend stamps the node that served
    assert "Traceback" not in c.log() + a.log()
