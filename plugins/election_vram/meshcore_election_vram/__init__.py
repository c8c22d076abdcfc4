"""Default election: the node with the most VRAM hosts; workers join when the model needs them.

A pure function of the view (see DESIGN.md section 4), so every node computes the same plan.
RTT comes from the host's own announcement (``extra["rtt_ms"]``), never from the local
observer, so that nodes that measure different RTTs still agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from meshcore import hookimpl
from meshcore.config import GB
from meshcore.plan import ElectionRequest, Participant, Plan, PlanState, shares
from meshcore.state import MeshView, Peer


def _gb(n: float) -> str:
    return f"{n / GB:.1f}"


def host_rtt(host: Peer, peer: Peer) -> float | None:
    """The RTT from ``host`` to ``peer`` as the host announced it, if it did."""
    table = host.extra.get("rtt_ms")
    value = table.get(peer.id) if isinstance(table, dict) else None
    return float(value) if isinstance(value, int | float) else None


def elect(view: MeshView, request: ElectionRequest) -> Plan:
    """Highest VRAM hosts (tie: larger id); solo when the model fits, else split or wait."""
    candidates = [p for p in view.peers if not p.is_client]
    if not candidates:
        return Plan(PlanState.WAITING,
                    reason="no node that can host has joined (clients never host)")
    host = max(candidates, key=lambda p: (p.vram, p.id))
    if not host.model:
        return Plan(PlanState.WAITING, host_id=host.id,
                    reason=f"host {host.id} has no model; start it with --model")
    need = math.ceil(host.model_bytes * request.overhead)
    draft = host.draft if request.draft_allowed else None
    forced = any(p.split for p in candidates)
    common: dict[str, Any] = {"host_id": host.id, "model": host.model,
                              "model_bytes": host.model_bytes, "draft": draft}
    if host.vram >= need and not forced:
        return Plan(PlanState.SOLO, participants=(Participant(host.id, host.vram, 1.0, False),),
                    reason="model fits on host; use --split to force", **common)
    others = sorted((p for p in candidates if p is not host and p.vram > 0),
                    key=lambda p: (-p.vram, p.id))
    if forced:
        chosen = others
    else:
        chosen, have = [], host.vram
        for peer in others:
            rtt = host_rtt(host, peer)
            if rtt is not None and rtt > request.max_rtt_ms:
                continue
            if have >= need:
                break
            chosen.append(peer)
            have += peer.vram
        if have < need:
            return Plan(PlanState.WAITING,
                        reason=f"waiting for {_gb(need - have)} GB more VRAM "
                               f"(have {_gb(have)} of {_gb(need)} GB)", **common)
    if not chosen:
        return Plan(PlanState.SOLO, participants=(Participant(host.id, host.vram, 1.0, False),),
                    reason="--split asked, but no other node has VRAM", **common)
    members = [host, *chosen]
    split = shares([p.vram for p in members])
    parts = tuple(Participant(p.id, p.vram, s, p is not host) for p, s in zip(members, split,
                                                                            strict=True))
    return Plan(PlanState.SPLIT, participants=parts,
                reason=f"split over {len(parts)} nodes", **common)


@hookimpl
def meshcore_register_elections(register: Callable[..., None]) -> None:
    register("vram", elect)
