"""mesh-llm election plugin ``pinned``: the user picks the host, and a split never spans more
than two nodes.

Select it on every node with ``--election pinned --election-opt host=ID_OR_NAME``. The host is
the node whose id, or announced ``--name`` (:data:`meshcore.fields.NAME`), matches ``host``,
as long as it is in the mesh, is not a client, has a model and its backend can host
(:data:`meshcore.fields.CAPS`). Otherwise the plugin delegates to the default election
(``vram``) through :meth:`meshcore.plan.ElectionRequest.delegate`.

Whichever way the plan was made, it holds at most two devices: the host plus the worker with
the most VRAM. A plan that would take more is cut down to those two (shares recomputed with
:func:`meshcore.plan.shares`, in llama-server's device order: the ``--rpc`` worker first, the
host last) and its ``reason`` says who was left out; when two nodes do not hold the model the
plan is WAITING with ``missing_vram`` set.

Like every election it is sync, pure and deterministic: it reads only the view and the
request, so every node computes the same plan.
"""

from __future__ import annotations

import dataclasses
import math

from meshcore import fields, hookimpl
from meshcore.hookspecs import Register
from meshcore.plan import ElectionRequest, Participant, Plan, PlanState, shares
from meshcore.state import MeshView, Peer

__all__ = ["DEFAULT_ELECTION", "ELECTION_NAME", "MAX_NODES", "elect",
           "meshcore_register_elections"]

ELECTION_NAME = "pinned"
DEFAULT_ELECTION = "vram"  # what we delegate to when the pin cannot be honoured
MAX_NODES = 2  # devices in a plan: the host and at most one rpc worker
HOST_OPTION = "host"  # --election-opt host=ID_OR_NAME

_GB = 1024**3


# ---------------------------------------------------------------- helpers


def _can(peer: Peer, capability: str) -> bool:
    """Whether the peer's announced backend capabilities include ``capability``.

    A peer that announces no capability list at all is taken as capable (as the default
    ``vram`` election does); an announced list, even an empty one, is taken at its word.
    """
    caps = fields.CAPS.read(peer)
    return caps is None or capability in caps


def _gb(n: int) -> str:
    return f"{n / _GB:.2f}" if n < _GB else f"{n / _GB:.1f}"


def _gb_up(n: int) -> str:
    """Bytes as GB, rounded up (so a shortfall never reads 0): 2 decimals below 1 GB. The
    inner round() drops float noise, so 2.8 GB plus a byte still reads 2.8."""
    places = 100 if n < _GB else 10
    value = math.ceil(round(n * places / _GB, 6)) / places
    return f"{value:.2f}" if n < _GB else f"{value:.1f}"


def _need(model_bytes: int, request: ElectionRequest) -> int:
    return math.ceil(model_bytes * request.overhead)


def _waiting_reason(missing: int, have: int, need: int) -> str:
    return (f"waiting for {_gb_up(missing)} GB more VRAM (have {_gb(have)} of {_gb(need)} GB "
            f"on at most {MAX_NODES} nodes)")


def _find_pin(view: MeshView, key: str) -> tuple[Peer | None, str]:
    """The node ``key`` names (an id first, else a unique announced name), or why not."""
    peer = view.get(key)
    if peer is None:
        named = [p for p in view.peers if fields.NAME.read(p) == key]
        if not named:
            return None, f"no node with id or name {key!r} in the mesh"
        if len(named) > 1:
            ids = ", ".join(p.id for p in named)
            return None, f"name {key!r} is ambiguous ({ids})"
        peer = named[0]
    label = peer.id if fields.NAME.read(peer) in (None, peer.id) else (
        f"{peer.id} ({fields.NAME.read(peer)})")
    if peer.is_client:
        return None, f"{label} is a client"
    if not peer.model:
        return None, f"{label} has no model"
    if not _can(peer, "host"):
        return None, f"the backend of {label} cannot host"
    return peer, label


def _rtt_from(host: Peer, peer: Peer) -> float | None:
    """The RTT the host announced to ``peer`` (every node reads the same number)."""
    table = fields.RTT_MS.read(host)
    value = None if table is None else table.get(peer.id)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _usable_workers(view: MeshView, host: Peer, request: ElectionRequest,
                    forced: bool) -> tuple[list[Peer], list[str]]:
    """Peers that could serve ``host`` as its rpc worker, and notes on those left out."""
    if not _can(host, "uses_workers"):
        return [], [f"the backend of host {host.id} cannot use rpc workers"]
    usable: list[Peer] = []
    slow: list[str] = []
    for peer in view.peers:
        if peer.id == host.id or peer.is_client or peer.vram <= 0:
            continue
        if not _can(peer, "rpc_worker"):
            continue
        rtt = _rtt_from(host, peer)
        if not forced and rtt is not None and rtt > request.max_rtt_ms:
            slow.append(f"{peer.id} ({rtt:.0f} ms)")
            continue
        usable.append(peer)
    notes = ([f"left out over the {request.max_rtt_ms:.0f} ms RTT limit: {', '.join(slow)}"]
             if slow else [])
    return usable, notes


def _best(peers: list[Peer]) -> Peer | None:
    """The peer with the most VRAM (ties: the larger id, as the default election)."""
    return max(peers, key=lambda p: (p.vram, p.id), default=None)


def _pair(worker: Participant | Peer, host: Participant | Peer) -> tuple[Participant, ...]:
    """Two devices in llama-server's order: the ``--rpc`` worker, then the host."""
    wid = worker.peer_id if isinstance(worker, Participant) else worker.id
    hid = host.peer_id if isinstance(host, Participant) else host.id
    ws, hs = shares([worker.vram, host.vram])
    return (Participant(wid, worker.vram, ws, True), Participant(hid, host.vram, hs, False))


def _with_reason(plan: Plan, prefix: str) -> Plan:
    reason = f"{prefix}; {plan.reason}" if plan.reason else prefix
    return dataclasses.replace(plan, reason=reason)


# ---------------------------------------------------------------- the two ways to a plan


def _elect_pinned(view: MeshView, request: ElectionRequest, host: Peer, label: str) -> Plan:
    """The plan with ``host`` pinned: solo if it fits, else host + the biggest usable worker."""
    model = host.model
    need = _need(host.model_bytes, request)
    draft = host.draft if request.draft_allowed else None
    forced = any(p.split for p in view.peers if not p.is_client)
    workers, notes = _usable_workers(view, host, request, forced)
    best = _best(workers)
    head = f"pinned: host {label}"
    left_out = sorted(p.id for p in workers if p is not best)
    if left_out and (forced or host.vram < need):
        notes.append(f"capped at {MAX_NODES} nodes, left out: {', '.join(left_out)}")
    tail = "".join(f"; {n}" for n in notes)

    if host.vram >= need and (not forced or best is None):
        solo = (Participant(host.id, host.vram, 1.0, False),)
        return Plan(PlanState.SOLO, host_id=host.id, participants=solo, model=model,
                    model_bytes=host.model_bytes, draft=draft,
                    reason=f"{head}: model fits on host{tail}")
    have = host.vram + (best.vram if best is not None else 0)
    if best is None or have < need:
        missing = max(need - have, 1)
        return Plan(PlanState.WAITING, host_id=host.id, model=model,
                    model_bytes=host.model_bytes, draft=draft, missing_vram=missing,
                    reason=f"{head}: {_waiting_reason(missing, have, need)}{tail}")
    why = "--split" if host.vram >= need else "split"
    return Plan(PlanState.SPLIT, host_id=host.id, participants=_pair(best, host), model=model,
                model_bytes=host.model_bytes, draft=draft,
                reason=f"{head}: {why} over 2 nodes ({best.id}, {host.id}){tail}")


def _cap_delegated(view: MeshView, request: ElectionRequest, plan: Plan, why: str) -> Plan:
    """The delegated plan, cut down to at most :data:`MAX_NODES` devices."""
    head = f"pinned: {why}, {DEFAULT_ELECTION} elects"
    parts = plan.participants
    need = _need(plan.model_bytes, request)

    if plan.state is PlanState.WAITING and plan.missing_vram > 0 and plan.host_id is not None:
        # Not enough VRAM even on every node: on two it is worse; report that figure.
        # (With one usable worker or none, the delegate's figure is already the two-node one.)
        host_peer = view.get(plan.host_id)
        forced = any(p.split for p in view.peers if not p.is_client)
        usable = ([] if host_peer is None
                  else _usable_workers(view, host_peer, request, forced)[0])
        if host_peer is not None and len(usable) > 1:
            best_peer = _best(usable)
            have = host_peer.vram + (best_peer.vram if best_peer is not None else 0)
            missing = max(plan.missing_vram, need - have)
            if missing > plan.missing_vram:
                return dataclasses.replace(
                    plan, missing_vram=missing,
                    reason=f"{head}; {_waiting_reason(missing, have, need)}")
        return _with_reason(plan, head)

    if len(parts) <= MAX_NODES:
        return _with_reason(plan, head)

    host = next((p for p in parts if p.peer_id == plan.host_id and not p.rpc), parts[-1])
    workers = [p for p in parts if p is not host]
    best = max(workers, key=lambda p: (p.vram, p.peer_id))
    left_out = ", ".join(sorted(p.peer_id for p in workers if p is not best))
    cap = f"capped at {MAX_NODES} of {len(parts)} nodes, left out: {left_out}"
    have = host.vram + best.vram
    if have < need:
        missing = need - have
        return Plan(PlanState.WAITING, host_id=plan.host_id, model=plan.model,
                    model_bytes=plan.model_bytes, draft=plan.draft, missing_vram=missing,
                    reason=f"{head}; {cap}; {_waiting_reason(missing, have, need)}")
    return dataclasses.replace(plan, state=PlanState.SPLIT, participants=_pair(best, host),
                               reason=f"{head}; {cap}")


# ---------------------------------------------------------------- the election


def elect(view: MeshView, request: ElectionRequest) -> Plan:
    """Pin the host named by ``request.options["host"]``, else delegate to ``vram``; never
    more than :data:`MAX_NODES` participants."""
    key = request.options.get(HOST_OPTION, "").strip()
    if key:
        host, label = _find_pin(view, key)
        if host is not None:
            return _elect_pinned(view, request, host, label)
        why = label
    else:
        why = f"no --election-opt {HOST_OPTION}=ID_OR_NAME"
    try:
        delegated = request.delegate(DEFAULT_ELECTION, view)
    except LookupError as exc:
        return Plan(PlanState.WAITING, reason=f"pinned: {why}, and {exc}")
    return _cap_delegated(view, request, delegated, why)


@hookimpl
def meshcore_register_elections(register: Register) -> None:
    """Register the ``pinned`` election."""
    register(ELECTION_NAME, elect)
