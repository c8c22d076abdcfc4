"""The in-process harness: many nodes with the fake backend on the memory transport."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from meshcore.plan import PlanState
from meshcore.state import Role, Serving

pytestmark = pytest.mark.anyio


def hosts(mesh: Any) -> set[str | None]:
    return {n.plan.host_id for n in mesh.nodes}


async def test_five_nodes_elect_highest_vram_and_reelect_on_removal(mesh_harness: Any) -> None:
    async with mesh_harness() as mesh:
        vrams = [4, 12, 8, 24, 6]
        nodes = [await mesh.add(v) for v in vrams]
        biggest = nodes[3]
        await mesh.wait_for(lambda: all(len(n.view().peers) == 5 for n in nodes), what="5 peers")
        await mesh.wait_for(lambda: hosts(mesh) == {biggest.id}, what="everyone elects node03")
        await mesh.wait_for(lambda: biggest.state.me.serving is Serving.READY, what="host ready")
        assert biggest.state.me.role is Role.HOST
        assert all(n.state.me.role is Role.WORKER for n in nodes if n is not biggest)
        assert biggest.plan.state is PlanState.SOLO
        assert [p.peer_id for p in biggest.plan.participants] == [biggest.id]

        # every node's API answers, routed to the host (the fake stamps its id)
        for node in nodes:
            async with httpx.AsyncClient() as client:
                await mesh.wait_for(lambda n=node: n.plan.host_id == biggest.id)
                r = await client.post(
                    f"http://127.0.0.1:{node.api_port}/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": "hello mesh"}]},
                )
            assert r.status_code == 200, r.text
            assert r.json()["system_fingerprint"] == biggest.id
            assert r.json()["choices"][0]["message"]["content"] == " hello mesh"

        await mesh.remove(biggest)
        second = nodes[1]
        await mesh.wait_for(lambda: hosts(mesh) == {second.id}, what="re-election of node01")
        await mesh.wait_for(lambda: second.state.me.serving is Serving.READY, what="new host")
        assert all(len(n.view().peers) == 4 for n in mesh.nodes)


async def test_default_ids_stay_unique_after_a_remove(mesh_harness: Any) -> None:
    """An id is never handed out twice: a node added after a remove gets a new one (before,
    it got the length of the list, the id of a node still running)."""
    async with mesh_harness() as mesh:
        first, second, third = [await mesh.add(v) for v in (4, 8, 6)]
        await mesh.remove(second)
        fourth = await mesh.add(2)
        ids = [n.id for n in mesh.nodes]
        assert len(set(ids)) == len(ids) == 3 and fourth.id not in (first.id, third.id)
        await mesh.wait_for(lambda: all(len(n.view().peers) == 3 for n in mesh.nodes),
                            what="the three distinct nodes to see each other")
