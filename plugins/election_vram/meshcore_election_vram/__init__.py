"""Default election: the node with the most VRAM hosts; workers join when the model needs them.

A pure function of the view (see DESIGN.md section 4 and docs/election.md), so every node
computes the same plan. RTT comes from the host's own announcement (``extra["rtt_ms"]``, a
table peer id -> milliseconds), never from the local observer, so that nodes that measure
different RTTs still agree.

Participants are listed in llama-server's device order for b11434: every ``--rpc`` device
first, in ``--rpc`` order, then the host's own device (``src/llama.cpp``,
``llama_prepare_model_devices``: "add RPC servers at the front of the list").
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from meshcore import fields, hookimpl
from meshcore.components import NodeHandle
from meshcore.config import GB
from meshcore.plan import ElectionRequest, Participant, Plan, PlanState, shares
from meshcore.state import MeshView, Peer, Role, Serving

log = logging.getLogger("meshcore.election.vram")

SOLO_HINT = "model fits on host; use --split to force"
RTT_BAND_MS = 10.0  # RTTs within one band count as equal, so noise does not reorder workers
RTT_GRACE = 3.0  # a worker already in a split is dropped only over 3x the RTT limit


def format_gb(n: float, *, up: bool = False) -> str:
    """Bytes as GB for messages: one decimal, two below 1 GB; ``up`` rounds up (missing VRAM
    must never read as 0.0)."""
    digits = 1 if n >= GB else 2
    value = n / GB
    if up:
        value = math.ceil(value * 10**digits) / 10**digits
    return f"{value:.{digits}f}"


def waiting_message(need: int, have: int) -> str:
    """``waiting for N GB more VRAM (have X of Y GB)``."""
    return (f"waiting for {format_gb(need - have, up=True)} GB more VRAM "
            f"(have {format_gb(have)} of {format_gb(need)} GB)")


def can(peer: Peer, capability: str) -> bool:
    """Whether the peer's backend announced ``capability`` (a peer that announced no
    capabilities at all is taken to have every one)."""
    caps = fields.CAPS.read(peer)
    return caps is None or capability in caps


def host_rtt(host: Peer, peer: Peer) -> float | None:
    """The RTT from ``host`` to ``peer`` as the host announced it, if it did."""
    table = fields.RTT_MS.read(host)
    value = table.get(peer.id) if table is not None else None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return None
    return float(value)


def pick_host(nodes: Sequence[Peer]) -> Peer | None:
    """Highest VRAM among the nodes that have a model to serve; tie -> the node already
    hosting (its announced role is HOST), then the larger node id.

    The incumbent rule matters: without it a node of equal VRAM joining with a larger id
    took the host role away and the mesh had no model for ~46 s (8B model on H100s).
    """
    serving = [p for p in nodes if p.model and can(p, "host")]
    if not serving:
        return None
    return max(serving, key=lambda p: (p.vram, p.role is Role.HOST, p.id))


def rtt_limit(peer: Peer, max_rtt_ms: float) -> float:
    """The RTT limit for ``peer``: a worker already serving a split (rpc-server up or coming
    up) keeps its place up to RTT_GRACE times the limit, so one slow ping (a busy CPU, a
    GC pause) does not tear the split down and restart llama-server."""
    engaged = peer.serving in (Serving.RPC, Serving.LOADING)
    return max_rtt_ms * RTT_GRACE if engaged else max_rtt_ms


def usable_workers(host: Peer, nodes: Sequence[Peer],
                   max_rtt_ms: float) -> tuple[list[Peer], list[str], list[str]]:
    """Non-host nodes with VRAM and an RTT from the host within the limit, best first:
    lower RTT band first (unknown RTT after every known one), then more VRAM, then id.
    Also returns ``id (N ms)`` for each node left out for its RTT, and the ids of nodes
    left out because the host measures RTTs but has none for them yet (a node that just
    joined: pulled in once measured, a second later, not before; with no limit, i.e.
    ``--split``, they are used)."""
    def key(peer: Peer) -> tuple[float, int, str]:
        rtt = host_rtt(host, peer)
        band = math.inf if rtt is None else rtt // RTT_BAND_MS
        return (band, -peer.vram, peer.id)

    measures = fields.RTT_MS.read(host) is not None
    usable, slow, unmeasured = [], [], []
    for peer in nodes:
        if peer is host or peer.vram <= 0 or not can(peer, "rpc_worker"):
            continue
        rtt = host_rtt(host, peer)
        if rtt is not None and rtt > rtt_limit(peer, max_rtt_ms):
            slow.append(f"{peer.id} ({rtt:.0f} ms)")
            continue
        if (rtt is None and measures and max_rtt_ms != math.inf
                and peer.serving not in (Serving.RPC, Serving.LOADING)):
            unmeasured.append(peer.id)
            continue
        usable.append(peer)
    return sorted(usable, key=key), sorted(slow), sorted(unmeasured)


def elect(view: MeshView, request: ElectionRequest) -> Plan:
    """Highest VRAM hosts (tie: larger id); solo when the model fits, else split or wait."""
    nodes = [p for p in view.peers if not p.is_client]
    if not nodes:
        return Plan(PlanState.WAITING,
                    reason="no node that can host has joined (clients never host)")
    host = pick_host(nodes)
    if host is None:
        return Plan(PlanState.WAITING,
                    reason="no node has a model to serve; start one node with --model")
    need = math.ceil(host.model_bytes * request.overhead)
    common: dict[str, Any] = {"host_id": host.id, "model": host.model,
                              "model_bytes": host.model_bytes,
                              "draft": host.draft if request.draft_allowed else None}
    solo = (Participant(host.id, host.vram, 1.0, False),)
    forced = any(p.split for p in nodes)
    if host.vram >= need and not forced:
        return Plan(PlanState.SOLO, participants=solo, reason=SOLO_HINT, **common)
    if not can(host, "uses_workers"):
        why = f"the backend of host {host.id} cannot use rpc workers"
        if host.vram >= need:
            return Plan(PlanState.SOLO, participants=solo, reason=f"--split asked, but {why}",
                        **common)
        return Plan(PlanState.WAITING, reason=f"{waiting_message(need, host.vram)}: {why}",
                    missing_vram=need - host.vram, **common)
    # --split forces every worker in (DESIGN.md section 4): the user asked for it, so the RTT
    # limit, which guards automatic splits against slow links, does not apply.
    max_rtt = math.inf if forced else request.max_rtt_ms
    candidates, slow, unmeasured = usable_workers(host, nodes, max_rtt)
    skipped = (f"; left out over the {request.max_rtt_ms:g} ms RTT limit: {', '.join(slow)}"
               if slow else "")
    if unmeasured:
        skipped += f"; waiting for the host to measure the RTT of {', '.join(unmeasured)}"
    chosen, have = [], host.vram
    for peer in candidates:
        if have >= need and not forced:
            break
        chosen.append(peer)
        have += peer.vram
    if have < need:
        return Plan(PlanState.WAITING, reason=waiting_message(need, have) + skipped,
                    missing_vram=need - have, **common)
    if not chosen:
        return Plan(PlanState.SOLO, participants=solo,
                    reason=f"--split asked, but no other node offers VRAM{skipped}", **common)
    members = [*chosen, host]  # llama-server device order: --rpc devices, then the host's
    split = shares([p.vram for p in members])
    parts = tuple(Participant(p.id, p.vram, s, p is not host)
                  for p, s in zip(members, split, strict=True))
    return Plan(PlanState.SPLIT, participants=parts,
                reason=f"split over {len(parts)} nodes{skipped}", **common)


_hinted: weakref.WeakSet[Any] = weakref.WeakSet()


@hookimpl
def meshcore_register_elections(register: Callable[..., None]) -> None:
    register("vram", elect)


@hookimpl
def meshcore_plan_changed(node: NodeHandle, plan: Plan) -> None:
    """Tell an idle worker, once, why it holds no layers and how to change that."""
    if (plan.state is PlanState.SOLO and plan.reason == SOLO_HINT
            and plan.host_id != node.id and not node.state.me.is_client
            and node not in _hinted):
        _hinted.add(node)
        log.info(SOLO_HINT, extra={"node_id": node.id})
