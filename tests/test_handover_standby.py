"""The llama.cpp hand-over as the node routes it: from the moment a plan moves the host away
from this node's ready llama-server, ``/health`` finds a server (the old one, announced as
``standby``), before the backend's supervisor has run at all.

No llama.cpp runs here: the host part's state is set as ``host.serve`` leaves it with a
healthy server, and only the node's routing (``Node.upstream``, the API's ``/health``) is
exercised.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest
from meshcore_backend_llamacpp import commands
from meshcore_backend_llamacpp.backend import LlamaCppBackend

from meshcore import fields
from meshcore.api import build_api
from meshcore.config import NodeConfig
from meshcore.node import Node
from meshcore.plan import Participant, Plan, PlanState
from meshcore.state import Peer, Serving

pytestmark = pytest.mark.anyio

GB = 1024**3
OLD_PORT = 4321  # where the old host's llama-server listens (nothing is started there)


def solo(host: str, model: str = "m") -> Plan:
    return Plan(PlanState.SOLO, host, (Participant(host, 8 * GB, 1.0, False),), model=model)


def old_host(tmp_path: Path) -> tuple[Node, LlamaCppBackend]:
    """Node ``a`` hosting ``m`` alone with a healthy llama-server; ``b`` (8 GB) has joined."""
    node = Node(NodeConfig(model="m", backend="fake", transport="memory", state_dir=tmp_path,
                           node_id="a"))
    backend = LlamaCppBackend(node)
    node.backend = backend
    host, served = backend.host, solo("a")
    host.server = cast(Any, SimpleNamespace(alive=True))  # what the code reads of a live Child
    host.port, host.ready = OLD_PORT, True
    host.serving_plan = served
    host.lay = commands.layout(served, host_has_gpu=False, n_layer=30)
    node.plan, backend.plan = served, served
    node.state.update_me(model="m", serving=Serving.READY)
    node.state.upsert(Peer("b", vram=8 * GB, model="m", serving=Serving.LOADING))
    return node, backend


async def health(node: Node) -> httpx.Response:
    app = build_api(node)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app),
                                     base_url="http://127.0.0.1") as client:
            return await client.get("/health")
    finally:
        await app.state.close_client()


async def test_health_answers_from_the_moment_the_host_moves(tmp_path: Path) -> None:
    node, backend = old_host(tmp_path)
    await backend.apply(solo("a"), node.view())
    await node._adopt(solo("b"), node.view())  # b elected; a's supervisor has not run yet
    answer = await health(node)
    assert answer.status_code == 200, answer.text
    assert await node.upstream() == f"http://127.0.0.1:{OLD_PORT}"
    assert fields.STANDBY.read(node.state.me) == "m"


async def test_an_early_standby_is_withdrawn_when_the_next_plan_allows_none(tmp_path: Path
                                                                            ) -> None:
    node, backend = old_host(tmp_path)
    await backend.apply(solo("a"), node.view())
    await node._adopt(solo("b"), node.view())
    node.state.upsert(Peer("c", vram=8 * GB, model="other", serving=Serving.LOADING))
    await node._adopt(solo("c", model="other"), node.view())  # another model: no hand-over
    assert fields.STANDBY.read(node.state.me) is None
    assert (await health(node)).status_code == 503
