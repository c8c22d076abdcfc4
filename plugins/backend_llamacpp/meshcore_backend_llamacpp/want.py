"""What this node must run for a plan: nothing, llama-server (the host) or rpc-server (a worker).

A pure decision. Equal wants mean nothing restarts: a worker's want names only the model, so
other workers joining or leaving its split keep its rpc-server running, while the host's names
the whole split, so any change to it restarts llama-server.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshcore.plan import Participant, Plan, PlanState


@dataclass(frozen=True)
class Idle:
    """Run nothing (a handed-over llama-server may still answer: see handover.py)."""


@dataclass(frozen=True)
class Host:
    """Run llama-server for ``model`` over ``participants`` (solo when they hold no worker)."""

    model: str | None
    draft: str | None
    participants: tuple[Participant, ...]


@dataclass(frozen=True)
class Worker:
    """Run ggml-rpc-server for the host of ``model``."""

    model: str | None


Want = Idle | Host | Worker


def want(plan: Plan, node_id: str) -> Want:
    """What the node ``node_id`` must run for ``plan``."""
    if plan.state is PlanState.WAITING or not plan.includes(node_id):
        return Idle()
    if plan.host_id == node_id:
        return Host(plan.model, plan.draft, plan.participants)
    return Worker(plan.model)
