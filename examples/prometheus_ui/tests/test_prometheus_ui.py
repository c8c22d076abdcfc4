"""Tests of the ``metrics`` UI plugin: in-process with ``mesh_harness``, and as a real
``mesh-llm`` process with ``mesh_process``. Both scrape ``/metrics`` and parse it with
prometheus_client's own parser."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

BANNER_LINE = re.compile(r"metrics\s+http://[^:/\s]+:(\d+)/")
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "three little words"}]}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape: ``(name, sorted labels) -> value``."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, metric: str, **labels: str) -> float:
    """One sample's value; KeyError (naming what exists) when it is absent."""
    key = (metric, tuple(sorted(labels.items())))
    if key not in samples:
        known = sorted(k for k in samples if k[0] == metric)
        raise KeyError(f"no sample {key}; samples named {metric}: {known}")
    return samples[key]


def total(samples: Samples, metric: str) -> float:
    """The sum of every sample named ``metric``, whatever its labels."""
    return sum(v for (name, _), v in samples.items() if name == metric)


async def scrape(client: httpx.AsyncClient, port: int) -> Samples:
    response = await client.get(f"http://127.0.0.1:{port}/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


@pytest.mark.anyio
async def test_harness_node_exports_mesh_plan_api(mesh_harness: Callable[..., Any]) -> None:
    async with mesh_harness() as mesh:
        watched = await mesh.add(4, uis={"metrics": 0})  # 4 GB: the other node hosts
        host = await mesh.add(8)
        await mesh.wait_for(lambda: watched.plan.host_id == host.id
                            and host.plan.host_id == host.id, what="the 8 GB node hosting")
        port = watched.uis["metrics"].port
        assert isinstance(port, int) and port > 0

        async with httpx.AsyncClient(timeout=20) as client:
            before = await scrape(client, port)
            assert value(before, "mesh_llm_api_requests_received_total") == 0
            reply = await client.post(
                f"http://127.0.0.1:{watched.api_port}/v1/chat/completions", json=CHAT)
            assert reply.status_code == 200, reply.text
            usage = reply.json()["usage"]
            samples = await scrape(client, port)

        # the node itself and its peers
        assert value(samples, "mesh_llm_node_info", node_id=watched.id, name="",
                     version=watched.view().me.version, model="fake-model") == 1
        assert value(samples, "mesh_llm_node_vram_bytes") == 4 * 1024**3
        assert value(samples, "mesh_llm_node_is_host") == 0
        assert value(samples, "mesh_llm_node_role", role=watched.view().me.role.value) == 1
        assert value(samples, "mesh_llm_peers", role="HOST") == 1
        assert value(samples, "mesh_llm_peers", role="CLIENT") == 0
        assert value(samples, "mesh_llm_mesh_nodes") == 2
        assert value(samples, "mesh_llm_peer_vram_bytes", peer_id=host.id) == 8 * 1024**3
        # the plan
        assert value(samples, "mesh_llm_plan_state", state="SOLO") == 1
        assert value(samples, "mesh_llm_plan_state", state="WAITING") == 0
        assert value(samples, "mesh_llm_plan_info", host_id=host.id, model="fake-model",
                     draft="") == 1
        assert value(samples, "mesh_llm_plan_participants") == 1
        assert value(samples, "mesh_llm_plan_share", peer_id=host.id, rpc="false") == 1.0
        # the request went through this node's API, tunneled to the host
        assert value(samples, "mesh_llm_api_requests_total", status="200") == 1
        assert value(samples, "mesh_llm_api_requests_received_total") == 1
        assert value(samples, "mesh_llm_api_errors_total") == 0
        assert value(samples, "mesh_llm_api_prompt_tokens_total") == usage["prompt_tokens"]
        assert (value(samples, "mesh_llm_api_completion_tokens_total")
                == usage["completion_tokens"])
        assert value(samples, "mesh_llm_tunnel_sent_bytes_total", peer_id=host.id,
                     service="api") > 0
        assert value(samples, "mesh_llm_tunnel_received_bytes_total", peer_id=host.id,
                     service="api") > 0
        # latency, from the meshcore_api_request observer hook, for this node only
        path = "/v1/chat/completions"
        assert value(samples, "mesh_llm_api_request_duration_seconds_count", path=path,
                     stream="false") == 1
        assert value(samples, "mesh_llm_api_request_duration_seconds_bucket", path=path,
                     stream="false", le="+Inf") == 1
        assert value(samples, "mesh_llm_api_requests_in_flight") == 0
        assert value(samples, "mesh_llm_exporter_errors_total", section="plan") == 0
        assert "metrics" not in host.uis


def test_real_process_counts_a_request(mesh_process: Callable[..., Any]) -> None:
    node = mesh_process("--backend", "fake", "--transport", "quic", "--model", "fake",
                        "--ui", "metrics=0")
    deadline = time.monotonic() + 30
    while (found := BANNER_LINE.search(node.log())) is None:
        assert time.monotonic() < deadline, f"no metrics banner line:\n{node.log()}"
        time.sleep(0.05)
    url = f"http://127.0.0.1:{found.group(1)}/metrics"

    with httpx.Client(timeout=20) as client:
        # the scrape itself says when the fake host is ready: wait for that, then send one
        samples: Samples = {}
        while time.monotonic() < deadline:
            response = client.get(url)
            assert response.status_code == 200, response.text
            samples = parse(response.text)
            if value(samples, "mesh_llm_node_serving", serving="ready") == 1:
                break
            time.sleep(0.1)
        assert value(samples, "mesh_llm_node_serving", serving="ready") == 1, samples
        assert total(samples, "mesh_llm_api_requests_total") == 0
        reply = client.post(f"{node.url}/chat/completions", json={**CHAT, "model": "fake"})
        assert reply.status_code == 200, reply.text
        samples = parse(client.get(url).text)

    assert value(samples, "mesh_llm_api_requests_total", status="200") == 1
    assert total(samples, "mesh_llm_api_requests_total") == 1
    assert value(samples, "mesh_llm_api_requests_received_total") == 1
    assert (value(samples, "mesh_llm_api_completion_tokens_total")
            == reply.json()["usage"]["completion_tokens"])
    assert value(samples, "mesh_llm_api_request_duration_seconds_count",
                 path="/v1/chat/completions", stream="false") == 1
    assert value(samples, "mesh_llm_node_is_host") == 1
    assert value(samples, "mesh_llm_plan_state", state="SOLO") == 1
    assert value(samples, "mesh_llm_peers", role="WORKER") == 0


@pytest.mark.anyio
async def test_each_node_exports_only_itself(mesh_harness: Callable[..., Any]) -> None:
    async with mesh_harness() as mesh:
        first = await mesh.add(4, uis={"metrics": 0})
        second = await mesh.add(8, uis={"metrics": 0}, api_key="sekrit")
        await mesh.wait_for(lambda: first.plan.host_id == second.id
                            and second.plan.host_id == second.id, what="a plan")
        ports = {n.id: n.uis["metrics"].port for n in (first, second)}
        assert len(set(ports.values())) == 2
        async with httpx.AsyncClient(timeout=20) as client:
            reply = await client.post(
                f"http://127.0.0.1:{first.api_port}/v1/chat/completions", json=CHAT)
            assert reply.status_code == 200, reply.text
            mine = await scrape(client, ports[first.id])
            # the second node has an --api-key: its metrics want it too
            url = f"http://127.0.0.1:{ports[second.id]}/metrics"
            assert (await client.get(url)).status_code == 401
            theirs = await client.get(url, headers={"Authorization": "Bearer sekrit"})
            assert theirs.status_code == 200
        other = parse(theirs.text)
        assert value(mine, "mesh_llm_node_info", node_id=first.id, name="", version="0.1.0",
                     model="fake-model") == 1
        assert value(other, "mesh_llm_node_is_host") == 1
        assert value(mine, "mesh_llm_api_requests_received_total") == 1
        assert value(other, "mesh_llm_api_requests_received_total") == 0
        assert total(other, "mesh_llm_api_request_duration_seconds_count") == 0
        assert value(mine, "mesh_llm_api_request_duration_seconds_count",
                     path="/v1/chat/completions", stream="false") == 1


def test_a_failing_section_is_counted_and_the_rest_served() -> None:
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from mesh_llm_prometheus.collector import NodeCollector

    class Broken:
        """Not a node at all: every attribute read fails."""

        def __getattr__(self, name: str) -> Any:
            raise RuntimeError(f"no {name}")

    collector = NodeCollector(Broken(), None)
    registry = CollectorRegistry()
    registry.register(collector)
    samples = parse(generate_latest(registry).decode())
    samples = parse(generate_latest(registry).decode())
    assert value(samples, "mesh_llm_exporter_errors_total", section="plan") == 2
    assert value(samples, "mesh_llm_exporter_errors_total", section="latency") == 0
