"""The backend applies plans idempotently: only a change in what this node runs wakes it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from meshcore_backend_llamacpp.backend import LlamaCppBackend
from meshcore_backend_llamacpp.want import Host, Idle, Worker

from meshcore.config import NodeConfig
from meshcore.plan import Participant, Plan, PlanState
from meshcore.state import MeshView

pytestmark = pytest.mark.anyio


def backend(node_id: str, tmp_path: Path) -> LlamaCppBackend:
    cfg = NodeConfig(model="SmolLM2-135M", state_dir=tmp_path, node_id=node_id)
    return LlamaCppBackend(SimpleNamespace(id=node_id, config=cfg, services={}, model=None))


def plan(*workers: str, host: str = "h", model: str = "m") -> Plan:
    parts = (Participant(host, 8, 0.5, False), *(Participant(w, 4, 0.25, True) for w in workers))
    return Plan(PlanState.SPLIT if workers else PlanState.SOLO, host, parts, model=model)


async def applied(b: LlamaCppBackend, p: Plan) -> bool:
    """Apply ``p``; True when the supervisor was woken (something must restart)."""
    wake = b._wake
    await b.apply(p, MeshView(b.node.id, ()))
    woke = wake.is_set()
    b._wake = type(wake)()
    return woke


async def test_same_plan_twice_restarts_nothing(tmp_path: Path) -> None:
    b = backend("h", tmp_path)
    assert await applied(b, plan())
    assert isinstance(b.wanted, Host)
    assert not await applied(b, plan())


async def test_host_restarts_when_its_split_changes(tmp_path: Path) -> None:
    b = backend("h", tmp_path)
    assert await applied(b, plan("w1"))
    assert await applied(b, plan("w1", "w2"))


async def test_worker_keeps_its_rpc_server_when_other_workers_come_and_go(tmp_path: Path
                                                                          ) -> None:
    b = backend("w1", tmp_path)
    assert await applied(b, plan("w1"))
    assert b.wanted == Worker("m")
    assert not await applied(b, plan("w1", "w2"))
    assert await applied(b, plan("w2"))  # dropped from the plan: stop
    assert b.wanted == Idle()


async def test_waiting_plan_is_idle(tmp_path: Path) -> None:
    b = backend("h", tmp_path)
    waiting: Any = Plan(PlanState.WAITING, "h", reason="waiting for 1.0 GB more VRAM")
    await applied(b, waiting)
    assert b.wanted == Idle()
    assert b.api_base() is None
