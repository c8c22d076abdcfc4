"""The election's settle wait has a maximum: a peer that re-announces faster than the settle
time (here every 100 ms against a 1 s settle) cannot postpone re-election forever."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest

from meshcore.config import NodeConfig

pytestmark = pytest.mark.anyio


async def chatter(node: Any, every: float) -> None:
    for i in range(10_000):  # bounded: the test cancels it long before
        node.announce(name=f"chatty-{i}")
        await anyio.sleep(every)


@pytest.mark.parametrize("max_settle_s", [2.0, None], ids=["2s", "default"])
async def test_a_chatty_peer_cannot_starve_the_election(mesh_harness: Callable[..., Any],
                                                       max_settle_s: float | None) -> None:
    """(With no maximum, e.g. ``max_settle_s=1e9``, this times out: checked by hand.)"""
    opts = {} if max_settle_s is None else {"max_settle_s": max_settle_s}
    bound = NodeConfig(model="m", **opts).max_settle_s
    async with mesh_harness(settle_s=1.0) as mesh:
        host = await mesh.add(8, **opts)
        heir = await mesh.add(6, **opts)
        chatty = await mesh.add(2, **opts)
        nodes = (heir, chatty)
        await mesh.wait_for(lambda: all(n.plan.host_id == host.id for n in nodes), 10,
                            "the 8 GB node hosts")
        async with anyio.create_task_group() as tg:
            tg.start_soon(chatter, chatty, 0.1)
            await anyio.sleep(0.5)
            await mesh.remove(host)  # the host is gone while the chatter goes on
            # without a maximum wait, the 1 s settle restarts every 100 ms and never ends
            await mesh.wait_for(lambda: all(n.plan.host_id == heir.id for n in nodes),
                                3 * bound + 2, "re-election despite the chatter")
            tg.cancel_scope.cancel()


async def test_a_node_that_starts_a_mesh_elects_at_once(mesh_harness: Callable[..., Any]) -> None:
    """Without ``--join`` nobody holds the node's token yet, so its first election does not
    wait for the settle (here 30 s, longer than the test's limit): a solo node serves a
    settle sooner. A node that joins still waits for the join's burst to settle, and every
    later election of the first node does too."""
    long = {"max_settle_s": 60.0}
    async with mesh_harness(settle_s=30.0) as mesh:
        first = await mesh.add(8, node_id="first", **long)
        await mesh.wait_for(lambda: first.plan.host_id == first.id, 10,
                            "the first node's plan, without waiting 30 s")
        joiner = await mesh.add(16, node_id="joiner", **long)
        await anyio.sleep(1.0)
        assert joiner.plan.host_id is None, "the joining node elected before its settle"
        assert first.plan.host_id == first.id, "a later election skipped the settle"
