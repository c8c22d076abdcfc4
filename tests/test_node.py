"""Node lifecycle: services started in order and all stopped, roles, tunnels, status."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest
from meshcore_testing import port_open

from meshcore.config import NodeConfig
from meshcore.node import Node
from meshcore.plan import PlanState
from meshcore.state import Role, Serving

pytestmark = pytest.mark.anyio


async def test_stop_stops_every_service(tmp_path: Path) -> None:
    node = Node(NodeConfig(model="m", backend="fake", transport="memory", api_port=0,
                           settle_s=0.01, state_dir=tmp_path, node_id="solo"))
    async with anyio.create_task_group() as tg:
        await tg.start(node.run)
        api_port = node.api_port
        assert api_port and await port_open(api_port)
        with anyio.fail_after(10):
            while node.state.me.serving is not Serving.READY:
                await anyio.sleep(0.01)
        llama_port = node.service_address("api")[1]
        assert await port_open(llama_port)
        hub = node.transport.hub
        assert "solo" in hub.members
        node.stop()
    # the task group exited: everything the node started is gone
    assert not await port_open(api_port)
    assert not await port_open(llama_port)
    assert "solo" not in hub.members
    with pytest.raises(RuntimeError, match="not running"):
        _ = Node(node.config).task_group


async def test_failing_service_fails_the_node(tmp_path: Path) -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    taken = listener.extra(anyio.abc.SocketAttribute.local_port)
    node = Node(NodeConfig(model="m", backend="fake", transport="memory", api_port=taken,
                           state_dir=tmp_path, node_id="x"))
    try:
        with pytest.RaisesGroup(pytest.RaisesExc(OSError, match="cannot listen"),
                                flatten_subgroups=True):
            async with anyio.create_task_group() as tg:
                await tg.start(node.run)
        assert "x" not in node.transport.hub.members, "the transport was not stopped"
    finally:
        await listener.aclose()


async def test_roles_client_and_status(mesh_harness: Any) -> None:
    async with mesh_harness() as mesh:
        big = await mesh.add(16)
        small = await mesh.add(4)
        client = await mesh.add(64, client=True)
        nodes = [big, small, client]
        await mesh.wait_for(lambda: all(n.plan.host_id == big.id for n in nodes), what="plan")
        await mesh.wait_for(lambda: big.state.me.role is Role.HOST, what="host role")
        assert small.state.me.role is Role.WORKER and client.state.me.role is Role.CLIENT
        assert client.backend is None and client.state.me.vram == 0
        assert big.view().total_vram == 20 * 1024**3, "a client's VRAM is never counted"
        status = json.loads(json.dumps(client.status()))
        assert status["role"] == "CLIENT" and status["is_host"] is False
        assert {p["id"] for p in status["peers"]} == {big.id, small.id}
        assert all(p["link"] == "memory" for p in status["peers"])


async def test_split_plan_and_tunnel_to_worker(mesh_harness: Any) -> None:
    async with mesh_harness() as mesh:
        host = await mesh.add(8, split=True)
        worker = await mesh.add(4)
        await mesh.wait_for(lambda: host.plan.state is PlanState.SPLIT
                            and worker.plan == host.plan, what="split plan")
        assert [p.peer_id for p in host.plan.workers] == [worker.id]
        assert {p.peer_id: p.share for p in host.plan.participants} == {
            host.id: 0.67, worker.id: 0.33}
        await mesh.wait_for(lambda: worker.state.me.serving is Serving.RPC, what="worker rpc")
        await mesh.wait_for(lambda: host.view().get(worker.id).serving is Serving.RPC,
                            what="host sees the worker")
        port = await host.forward_port(worker.id, "rpc")
        assert await host.forward_port(worker.id, "rpc") == port, "forwards are reused"
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(b"ping through the mesh")
            with anyio.fail_after(10):
                assert await stream.receive() == b"ping through the mesh"


async def test_plan_changed_event_and_backend_apply(mesh_harness: Any) -> None:
    async with mesh_harness() as mesh:
        first = await mesh.add(4)
        await mesh.wait_for(lambda: first.plan.host_id == first.id, what="solo plan")
        changed = first.plan_changed
        await mesh.add(8)
        with anyio.fail_after(10):
            await changed.wait()
        await mesh.wait_for(lambda: first.plan.host_id != first.id, what="re-election")
        assert [p.host_id for p in first.backend.applied] == [first.id, first.plan.host_id]
