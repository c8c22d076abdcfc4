"""The console's status payload: node.status() plus what the page needs to draw the mesh.

One function, :func:`build_payload`, reads the node and returns plain JSON; the page renders
it as is (the same payload feeds ``GET /api/status`` and every ``/api/events`` message).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from meshcore import fields
from meshcore.components import NodeHandle
from meshcore.config import GB
from meshcore.plan import Plan, PlanState
from meshcore.state import MeshView, Peer, Role, Serving

# Links are labelled by what runs over them (the page shows the label on the line).
LINK_RPC = "RPC"
LINK_API = "API tunnel"
LINK_CONTROL = "QUIC · HTTP"

# Keys a backend's status() may use for llama-server's --rpc entries (read defensively).
RPC_KEYS = ("rpc_entries", "rpc", "rpc_servers", "rpc_endpoints", "rpc_addrs")


def gb(n: float) -> float:
    """Bytes to GB (GiB, like the CLI's --max-vram), one decimal."""
    return round(n / GB, 1)


def speculation(backend: Mapping[str, Any], plan: Plan, api: Mapping[str, Any],
                is_host: bool) -> str:
    """The "speculation" line: what the host drafts with (known on the host from its backend;
    elsewhere only a draft model is in the plan) and how many drafted tokens were accepted in
    the replies this node's API relayed."""
    if is_host:
        mode = str(backend.get("speculation"))
        label = {"draft": f"draft {plan.draft}", "ngram": "n-gram lookup"}.get(mode, "off")
    else:
        label = f"draft {plan.draft}" if plan.draft else "set by the host"
    drafted, accepted = api.get("drafted"), api.get("draft_accepted")
    if isinstance(drafted, int) and isinstance(accepted, int) and drafted > 0:
        label += (f" · {accepted}/{drafted} drafted tokens accepted "
                  f"({round(100 * accepted / drafted)}%) in replies through this node")
    return label


def missing_gb(plan: Plan) -> float:
    """How many more GB of VRAM a waiting plan needs (the election's ``missing_vram``),
    rounded up to a tenth: a shortfall never reads as 0.0."""
    if plan.state is not PlanState.WAITING or plan.missing_vram <= 0:
        return 0.0
    return math.ceil(plan.missing_vram / GB * 10) / 10  # as the election words it


ALONE = "serving alone: no other node has joined yet (add one with the join command)"


def badge(plan: Plan, me: Peer, host: Peer | None, missing: float, *, alone: bool = False
          ) -> dict[str, str]:
    """The status badge: ``kind`` (a CSS class), ``text`` and a one-line ``detail``.
    ``alone``: no other node that could work for this one has joined (a lone host is not
    told to ``--split``: there is nobody to split with)."""
    if me.is_client:
        if plan.state is PlanState.WAITING:
            return {"kind": "client", "text": "Client", "detail": plan.reason}
        ready = host is not None and host.serving is Serving.READY
        return {"kind": "client", "text": "Client",
                "detail": f"using host {plan.host_id}" + ("" if ready else " (loading)")}
    if plan.state is PlanState.WAITING:
        text = f"Waiting for {missing:.1f} GB more" if missing else "Waiting"
        return {"kind": "waiting", "text": text, "detail": plan.reason}
    if plan.host_id == me.id:
        if me.serving is Serving.READY:
            solo_alone = alone and plan.state is PlanState.SOLO
            return {"kind": "host", "text": "Host", "detail": ALONE if solo_alone else plan.reason}
        if me.serving is Serving.ERROR:
            return {"kind": "error", "text": "Host failed",
                    "detail": fields.ERROR.read(me) or "the model server did not start; "
                                                       "see the node's log"}
        return {"kind": "loading", "text": "Loading", "detail": f"loading {plan.model}"}
    if plan.includes(me.id):
        return {"kind": "split", "text": "Worker in split",
                "detail": f"serving layers for host {plan.host_id} over RPC"}
    if standby := fields.STANDBY.read(me):
        return {"kind": "loading", "text": "Standby",
                "detail": f"still answering for {standby} until the new host "
                          f"{plan.host_id} is ready"}
    return {"kind": "idle", "text": "Worker idle", "detail": plan.reason}


def serving_label(peer: Peer) -> str:
    """``serving`` for the console: ``standby`` while a former host still answers."""
    return "standby" if fields.STANDBY.read(peer) else peer.serving.value


def rpc_entries(backend: Mapping[str, Any], plan: Plan) -> list[dict[str, Any]]:
    """llama-server's ``--rpc`` entries: the plan's remote workers in device order, with the
    address the backend reports for each when it does."""
    reported: list[Any] = []
    for key in RPC_KEYS:
        value = backend.get(key)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if isinstance(value, list | tuple) and value:
            reported = list(value)
            break
    # The backend may name the peer of each entry (llamacpp: layout.rpc_peers, same order).
    layout = backend.get("layout")
    ids = layout.get("rpc_peers") if isinstance(layout, Mapping) else None
    by_peer = dict(zip(ids, reported, strict=False)) if isinstance(ids, list) else {}
    out: list[dict[str, Any]] = []
    in_order = dict(zip((w.peer_id for w in plan.workers), reported, strict=False))
    for part in plan.workers:
        item = (by_peer or in_order).get(part.peer_id)
        if isinstance(item, Mapping):
            address = item.get("address") or item.get("endpoint") or item.get("addr")
            if address is None and item.get("port") is not None:
                address = f"{item.get('host', '127.0.0.1')}:{item['port']}"
        else:
            address = item
        out.append({"peer_id": part.peer_id, "share": part.share,
                    "address": None if address is None else str(address)})
    return out


def link_label(peer: Peer, plan: Plan) -> str:
    """What runs between ``peer`` and the host."""
    if plan.state is not PlanState.WAITING and any(
        w.peer_id == peer.id for w in plan.workers
    ):
        return LINK_RPC
    if peer.is_client:
        return LINK_API
    return LINK_CONTROL


def diagram(view: MeshView, plan: Plan, transport_links: Mapping[str, str]
            ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Boxes (every node, this one included) and links (each node to the hub: the host, or
    this node while there is none)."""
    shares = {p.peer_id: p for p in plan.participants}
    nodes = []
    for p in view.peers:
        part = shares.get(p.id)
        nodes.append({
            "id": p.id, "role": p.role.value, "vram": 0 if p.is_client else p.vram,
            "vram_gb": 0.0 if p.is_client else gb(p.vram), "serving": serving_label(p),
            "model": p.model, "is_self": p.id == view.self_id, "is_host": p.id == plan.host_id,
            "share": part.share if part else None, "rpc": bool(part and part.rpc),
        })
    hub = plan.host_id if plan.host_id and view.get(plan.host_id) else view.self_id
    links = []
    for p in view.peers:
        if p.id == hub:
            continue
        label = link_label(p, plan) if hub == plan.host_id else LINK_CONTROL
        near = p.id if p.id != view.self_id else hub
        links.append({"from": hub, "to": p.id, "label": label,
                      "transport": transport_links.get(near)
                      if view.self_id in (p.id, hub) else None})
    return nodes, links


def build_payload(node: NodeHandle, *, loopback: bool, api_host: str) -> dict[str, Any]:
    """Everything the page shows. ``loopback``: the caller may see the join token (it passed
    the --api-key, or, on a node without one, is on this machine: ``app.may_see_token``);
    ``api_host``: the host name the caller should use for the API."""
    status: dict[str, Any] = node.status()
    view: MeshView = node.view()
    plan: Plan = node.plan
    me = view.me
    host = view.get(plan.host_id) if plan.host_id else None
    missing = missing_gb(plan)
    links_by_peer = {p["id"]: p.get("link") for p in status.get("peers", [])}
    nodes, links = diagram(view, plan, links_by_peer)
    peers = [
        {"id": p.id, "role": p.role.value, "vram": p.vram, "vram_gb": gb(p.vram),
         "model": p.model, "rtt_ms": p.rtt_ms, "link": links_by_peer.get(p.id),
         "name": fields.NAME.read(p),
         "serving": serving_label(p)}
        for p in view.others
    ]
    backend = status.get("backend") or {}
    backend = backend if isinstance(backend, Mapping) else {}
    token = node.invite_token() if loopback else None
    api_url = f"http://{api_host}:{status.get('api_port')}/v1"
    return {
        **status,
        "role": me.role.value,
        "is_client": me.role is Role.CLIENT,
        "badge": badge(plan, me, host, missing,
                       alone=not any(not p.is_client for p in view.others)),
        "peers": peers,
        "peers_count": len(peers),
        "nodes": nodes,
        "links": links,
        "total_vram": view.total_vram,
        "total_vram_gb": gb(view.total_vram),
        "missing_vram_gb": missing,
        "plan_state": plan.state.value,
        "plan_reason": plan.reason,
        "tensor_split": list(plan.tensor_split),
        "speculation": speculation(backend, plan, status.get("api") or {},
                                   plan.host_id == me.id),
        "server_tensor_split": list(backend.get("tensor_split") or []),
        "rpc_entries": rpc_entries(backend, plan),
        "host_ready": host is not None and host.serving is Serving.READY,
        "api_url": api_url,
        "api_key_required": bool(node.config.api_key),
        "join_token": token,
        "join_command": f"mesh-llm --join {token}" if token else None,
        "token_hidden": not loopback,
    }
