"""``mesh-llm status``: the CLI asks a running node (in-process meshes, fake backend)."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from meshcore_cli import cli
from meshcore_cli import status as status_mod

from meshcore.state import Serving

NO_NODE = ("error: no mesh-llm node answers at http://127.0.0.1:1: start one with "
           "'mesh-llm --model ...', or pass --url")


def url(node: Any) -> str:
    return f"http://127.0.0.1:{node.api_port}"


async def two_nodes(mesh: Any, **config: Any) -> tuple[Any, Any]:
    host = await mesh.add(8, name="alpha", **config)
    worker = await mesh.add(4, **config)
    await mesh.wait_for(lambda: all(n.plan.host_id == host.id for n in (host, worker)),
                        what="election")
    await mesh.wait_for(lambda: worker.view().get(host.id).serving is Serving.READY,
                        what="the worker sees the host ready")
    return host, worker


async def status(*args: str) -> int:
    """``mesh-llm status ARGS`` in a worker thread (the mesh runs on this event loop)."""
    code: int = await anyio.to_thread.run_sync(cli.main, ["status", *args])
    return code


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESH_LLM_API_KEY", raising=False)


@pytest.mark.anyio
async def test_status_shows_the_mesh_and_json_matches(
        mesh_harness: Any, capsys: pytest.CaptureFixture[str]) -> None:
    async with mesh_harness() as mesh:
        host, worker = await two_nodes(mesh)
        assert await status("--url", url(worker)) == 0
        out, err = capsys.readouterr()
        assert err == ""
        lines = out.splitlines()
        assert lines[0].startswith(f"node {worker.id}  WORKER  at {url(worker)}")
        assert "model fake-model  draft none" in out
        plan_line = next(line for line in lines if line.startswith("plan "))
        assert plan_line.startswith(f"plan SOLO  host {host.id} (alpha)")
        assert worker.plan.reason in plan_line
        assert f"{host.id} (alpha)" in out and f"{worker.id} *" in out
        host_row = next(line for line in lines if f"{host.id} (alpha) " in line
                        and "HOST" in line)
        assert "8.0" in host_row and "memory" in host_row and "ready" in host_row
        assert "1.00" in host_row
        assert "tunnels: none" in out
        assert "API requests 0, errors 0" in out

        # host:port and a .../v1 base URL mean the same node
        assert await status("--url", f"127.0.0.1:{host.api_port}/v1") == 0
        out = capsys.readouterr().out
        assert out.splitlines()[0].startswith(f"node {host.id} (alpha)  HOST")

        assert await status("--url", url(worker), "--json") == 0
        data = json.loads(capsys.readouterr().out)
        assert data["id"] == worker.id and data["role"] == "WORKER"
        assert data["plan"]["state"] == "SOLO" and data["plan"]["host_id"] == host.id
        assert [p["id"] for p in data["peers"]] == [host.id]
        assert data["plan"] == worker.plan.to_dict()


@pytest.mark.anyio
async def test_watch_refreshes_until_ctrl_c(mesh_harness: Any, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    naps: list[float] = []

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(status_mod, "sleep", sleep)
    async with mesh_harness() as mesh:
        _, worker = await two_nodes(mesh)
        code = await status("--url", url(worker), "--watch", "--json", "--interval", "0.5")
        assert code == 0 and naps == [0.5, 0.5, 0.5]
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert len(rows) == 3 and all(r["id"] == worker.id for r in rows)

        naps.clear()
        assert await status("--url", url(worker), "--watch") == 0
        out = capsys.readouterr().out
        assert f"node {worker.id}" in out and "plan SOLO" in out


def test_no_node_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["status", "--url", "http://127.0.0.1:1"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == NO_NODE + "\n"
    assert cli.main(["status", "--url", "http://127.0.0.1:1", "--watch"]) == 1
    assert capsys.readouterr().err == NO_NODE + "\n"


@pytest.mark.anyio
async def test_api_key(mesh_harness: Any, monkeypatch: pytest.MonkeyPatch,
                       capsys: pytest.CaptureFixture[str]) -> None:
    async with mesh_harness() as mesh:
        host = await mesh.add(8, api_key="k")
        await mesh.wait_for(lambda: host.state.me.serving is Serving.READY, what="host ready")

        assert await status("--url", url(host)) == 1
        out, err = capsys.readouterr()
        assert out == ""
        assert err == (f"error: the node at {url(host)} requires an API key: pass --api-key "
                       "KEY or set MESH_LLM_API_KEY\n")

        assert await status("--url", url(host), "--api-key", "wrong", "--json") == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: the node at {url(host)} rejected the API key")
        assert len(err.splitlines()) == 1 and "Traceback" not in err

        assert await status("--url", url(host), "--api-key", "k", "--json") == 0
        assert json.loads(capsys.readouterr().out)["id"] == host.id

        monkeypatch.setenv("MESH_LLM_API_KEY", "k")
        assert await status("--url", url(host)) == 0
        assert capsys.readouterr().out.startswith(f"node {host.id}  HOST")


def test_render_survives_odd_and_partial_status() -> None:
    """Another version's status (fields missing, plugin errors in place) still renders,
    tunnels included."""
    from rich.console import Console

    data = {
        "id": "aaa", "role": "HOST", "plan": {"state": "SPLIT", "host_id": "aaa",
                                              "participants": [
                                                  {"peer_id": "bbb", "share": 0.4, "rpc": True},
                                                  {"peer_id": "aaa", "share": 0.6}],
                                              "tensor_split": [0.4, 0.6]},
        "peers": [{"id": "bbb", "role": "WORKER", "vram": "lots", "rtt_ms": 3.25,
                   "link": {"error": "RuntimeError: gone"}, "extra": {"name": "bee"}}, 7],
        "tunnels": [{"peer": "bbb", "service": "rpc", "port": 50052, "link": "TCP+AES-GCM",
                     "bytes_to_peer": 3 * 1024**2, "bytes_from_peer": 512, "connections": 2}],
        "api": {"requests": 5, "errors": 1, "by_status": {"200": 4, "503": 1}},
    }
    console = Console(width=120)
    with console.capture() as captured:
        console.print(status_mod.render(data, "http://x:1"))
    text = captured.get()
    assert "plan SPLIT  host aaa" in text and "tensor split 0.40 / 0.60" in text
    assert "bbb (bee)" in text and "0.40 rpc" in text and "3.2" in text
    assert "error: RuntimeError: gone" in text
    assert "3.0 MB" in text and "512 B" in text and "(200: 4, 503: 1)" in text
    assert "TCP+AES-GCM" in text  # which path the tunnel takes
