"""Tests of the ``pinned`` election: the policy on hand-built views, a three-node in-process
mesh (``mesh_harness``) and two real ``mesh-llm`` processes over QUIC (``mesh_process``)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx
import pytest
from mesh_llm_pinned import elect

from meshcore.plan import ElectionRequest, Plan, PlanState
from meshcore.plugins import get_plugin_manager
from meshcore.state import MeshView, Peer, Role

GB = 1024**3
CAPS = ["host", "rpc_worker", "uses_workers"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ---------------------------------------------------------------- helpers


def installed_elections() -> dict[str, Callable[..., Plan]]:
    """Every registered election, gathered through the documented registration hook."""
    found: dict[str, Callable[..., Plan]] = {}

    def register(name: str, factory: Callable[..., Any]) -> None:
        found[name] = factory

    get_plugin_manager().hook.meshcore_register_elections(register=register)
    return found


ELECTIONS = installed_elections()


def request(**options: str) -> ElectionRequest:
    return ElectionRequest(options=options, elections=ELECTIONS)


def peer(pid: str, vram_gb: float, *, model_gb: float | None = 1, name: str | None = None,
         caps: list[str] | None = CAPS, **kwargs: Any) -> Peer:
    extra: dict[str, Any] = dict(kwargs.pop("extra", {}))
    if name is not None:
        extra["name"] = name
    if caps is not None:
        extra["caps"] = caps
    return Peer(pid, vram=int(vram_gb * GB), model=None if model_gb is None else "m",
                model_bytes=0 if model_gb is None else int(model_gb * GB), extra=extra,
                **kwargs)


def view(*peers: Peer, me: str | None = None) -> MeshView:
    ordered = tuple(sorted(peers, key=lambda p: p.id))
    return MeshView(me or ordered[0].id, ordered)


def layout(plan: Plan) -> list[tuple[str, float, bool]]:
    return [(p.peer_id, p.share, p.rpc) for p in plan.participants]


def check_invariants(plan: Plan) -> None:
    assert len(plan.participants) <= 2
    if plan.participants:
        assert abs(sum(plan.tensor_split) - 1.0) < 1e-9
        assert plan.participants[-1].peer_id == plan.host_id
        assert not plan.participants[-1].rpc
        assert all(p.rpc for p in plan.participants[:-1])


# ---------------------------------------------------------------- the policy, pure


def test_vram_is_installed_for_delegation() -> None:
    assert "vram" in ELECTIONS and "pinned" in ELECTIONS
    assert ELECTIONS["pinned"] is elect


def test_pin_by_id_beats_vram() -> None:
    v = view(peer("a", 8), peer("b", 6), peer("c", 4))
    plan = elect(v, request(host="c"))
    assert plan.state is PlanState.SOLO
    assert plan.host_id == "c"
    assert layout(plan) == [("c", 1.0, False)]
    assert plan.model == "m" and plan.model_bytes == GB
    assert "pinned: host c" in plan.reason
    check_invariants(plan)


def test_pin_by_name() -> None:
    v = view(peer("a", 8, name="big"), peer("b", 4, name="small"))
    plan = elect(v, request(host="small"))
    assert plan.host_id == "b"
    assert "b (small)" in plan.reason
    # the same plan on every node: the view's self_id does not matter
    assert elect(view(*v.peers, me="b"), request(host="small")) == plan


def test_id_match_wins_over_a_name() -> None:
    v = view(peer("a", 8, name="b"), peer("b", 4))
    assert elect(v, request(host="b")).host_id == "b"


def test_ambiguous_name_falls_back() -> None:
    v = view(peer("a", 8, name="gpu"), peer("b", 4, name="gpu"))
    plan = elect(v, request(host="gpu"))
    assert plan.host_id == "a"
    assert "ambiguous" in plan.reason


@pytest.mark.parametrize(
    ("nodes", "why"),
    [
        ((peer("a", 8), peer("b", 4)), "no node with id or name 'zz'"),
        ((peer("a", 8), peer("zz", 4, model_gb=None)), "has no model"),
        ((peer("a", 8), peer("zz", 0, model_gb=None, role=Role.CLIENT)), "is a client"),
        ((peer("a", 8), peer("zz", 12, caps=["rpc_worker"])), "cannot host"),
    ],
    ids=["absent", "no-model", "client", "cannot-host"],
)
def test_unusable_pin_falls_back_to_vram(nodes: tuple[Peer, ...], why: str) -> None:
    v = view(*nodes)
    plan = elect(v, request(host="zz"))
    vram = request().delegate("vram", v)
    assert plan.host_id == vram.host_id == "a"
    assert plan.participants == vram.participants
    assert plan.reason.startswith("pinned: ") and why in plan.reason
    assert vram.reason in plan.reason


def test_no_option_is_plain_vram() -> None:
    v = view(peer("a", 4), peer("b", 8), peer("c", 6))
    plan = elect(v, request())
    vram = request().delegate("vram", v)
    assert (plan.state, plan.host_id, plan.participants) == (
        vram.state, vram.host_id, vram.participants)
    assert "no --election-opt host" in plan.reason


def test_pinned_split_takes_the_biggest_worker_only() -> None:
    # need 11 GB: c (4) + a (8) = 12 is enough; b is left out even with VRAM to spare
    v = view(peer("a", 8, model_gb=10), peer("b", 6, model_gb=10), peer("c", 4, model_gb=10))
    plan = elect(v, request(host="c"))
    assert plan.state is PlanState.SPLIT
    assert layout(plan) == [("a", 0.67, True), ("c", 0.33, False)]
    assert "left out: b" in plan.reason
    check_invariants(plan)


def test_forced_split_is_capped_at_two() -> None:
    v = view(peer("a", 8), peer("b", 6), peer("c", 4, split=True), peer("d", 2))
    plan = elect(v, request(host="c"))
    assert plan.state is PlanState.SPLIT
    assert layout(plan) == [("a", 0.67, True), ("c", 0.33, False)]
    assert "left out: b, d" in plan.reason
    check_invariants(plan)


def test_delegated_plan_over_two_nodes_is_cut_to_host_and_biggest_worker() -> None:
    # vram: host a (4 GB, the only model), need 5.5 GB; --split pulls in b, c and d
    v = view(peer("a", 4, model_gb=5, split=True), peer("b", 2, model_gb=None),
             peer("c", 3, model_gb=None), peer("d", 1, model_gb=None))
    vram = request().delegate("vram", v)
    assert len(vram.participants) == 4  # what the default election would run
    plan = elect(v, request())
    assert plan.state is PlanState.SPLIT
    assert plan.host_id == "a"
    assert layout(plan) == [("c", 0.43, True), ("a", 0.57, False)]
    assert "capped at 2 of 4 nodes, left out: b, d" in plan.reason
    check_invariants(plan)


def test_delegated_plan_too_big_for_two_nodes_waits() -> None:
    # vram needs all three (4 + 4 + 4 >= 9.9); two hold only 8 of 9.9 GB
    v = view(peer("a", 4, model_gb=9), peer("b", 4, model_gb=None), peer("c", 4, model_gb=None))
    assert len(request().delegate("vram", v).participants) == 3
    plan = elect(v, request(host="nobody"))
    assert plan.state is PlanState.WAITING
    assert plan.participants == ()
    need = int(9 * GB * 1.1) + 1
    assert plan.missing_vram in (need - 8 * GB, need - 8 * GB - 1)
    assert plan.host_id == "a" and plan.model == "m"
    assert "capped at 2 of 3 nodes" in plan.reason and "more VRAM" in plan.reason


def test_delegated_waiting_reports_what_two_nodes_miss() -> None:
    # 12 GB in the mesh for 22 GB: vram misses 10 GB; on two nodes (8 GB) 14 GB are missing
    v = view(peer("a", 4, model_gb=20), peer("b", 4, model_gb=None), peer("c", 4, model_gb=None))
    vram = request().delegate("vram", v)
    assert vram.state is PlanState.WAITING
    plan = elect(v, request())
    assert plan.state is PlanState.WAITING and plan.host_id == "a"
    assert plan.missing_vram > vram.missing_vram
    assert abs(plan.missing_vram - 14 * GB) <= 1
    assert "waiting for 14.0 GB more VRAM (have 8.0 of 22.0 GB on at most 2 nodes)" in (
        plan.reason)


def test_pinned_host_waits_when_two_nodes_are_not_enough() -> None:
    v = view(peer("a", 4, model_gb=None), peer("b", 3, model_gb=None),
             peer("c", 2, model_gb=8))
    plan = elect(v, request(host="c"))
    assert plan.state is PlanState.WAITING
    assert plan.host_id == "c"
    assert plan.participants == ()
    need = 8 * GB * 1.1
    assert abs(plan.missing_vram - (need - 6 * GB)) <= 1
    assert "waiting for 2.8 GB more VRAM (have 6.0 of 8.8 GB on at most 2 nodes)" in (
        plan.reason)
    assert "left out: b" in plan.reason


def test_pinned_host_that_cannot_use_workers_waits() -> None:
    v = view(peer("a", 8), peer("c", 2, model_gb=4, caps=["host", "rpc_worker"]))
    plan = elect(v, request(host="c"))
    assert plan.state is PlanState.WAITING
    assert plan.missing_vram > 0
    assert "cannot use rpc workers" in plan.reason


def test_workers_must_announce_rpc_worker_and_be_near() -> None:
    host = peer("c", 4, model_gb=5, extra={"rtt_ms": {"a": 300.0, "b": 5.0}})
    v = view(peer("a", 16), peer("b", 2), host, peer("d", 12, caps=["host"]))
    plan = elect(v, request(host="c"))
    # a is too far, d cannot be a worker: b (2 GB) is the best, 6 of 5.5 GB
    assert layout(plan) == [("b", 0.33, True), ("c", 0.67, False)]
    assert "RTT limit: a (300 ms)" in plan.reason


def test_deterministic_and_json_safe() -> None:
    v = view(peer("a", 8, model_gb=10), peer("b", 6, model_gb=10), peer("c", 4, model_gb=10))
    plans = {json.dumps(elect(v, request(host="c")).to_dict(), sort_keys=True)
             for _ in range(5)}
    assert len(plans) == 1


def test_missing_delegate_is_a_waiting_plan() -> None:
    plan = elect(view(peer("a", 8)), ElectionRequest(options={"host": "zz"}))
    assert plan.state is PlanState.WAITING
    assert "no election named 'vram'" in plan.reason


# ---------------------------------------------------------------- in-process mesh


@pytest.mark.anyio
async def test_harness_mesh_agrees_on_the_pinned_host(mesh_harness: Any) -> None:
    pin: Mapping[str, str] = {"host": "small"}
    async with mesh_harness(election="pinned") as mesh:
        big = await mesh.add(8, model_gb=5, name="big", election_options=pin)
        mid = await mesh.add(6, model_gb=5, name="mid", election_options=pin)
        small = await mesh.add(4, model_gb=5, name="small", election_options=pin)
        nodes = [big, mid, small]

        def agreed() -> bool:
            return all(n.plan.host_id == small.id and n.plan.state is PlanState.SPLIT
                       and n.plan == small.plan for n in nodes)

        await mesh.wait_for(agreed, timeout=30, what="every node to elect the pinned host")
        plan = small.plan
        assert [(p.peer_id, p.rpc) for p in plan.participants] == [(big.id, True),
                                                                    (small.id, False)]
        assert plan.tensor_split == (0.67, 0.33)
        assert "left out" in plan.reason and mid.id in plan.reason

        # the pinned host leaves: the others fall back to vram (big hosts, solo: 8 >= 5.5)
        await mesh.remove(small)
        await mesh.wait_for(lambda: all(n.plan.host_id == big.id for n in (big, mid)),
                            timeout=30, what="the fallback to vram")
        assert "no node with id or name 'small'" in big.plan.reason


# ---------------------------------------------------------------- real processes


def mesh_status(node: Any) -> dict[str, Any]:
    base = node.url.replace("/v1", "")
    reply = httpx.get(f"{base}/mesh/status", timeout=5)
    reply.raise_for_status()
    data: dict[str, Any] = reply.json()
    return data


def test_two_processes_agree_on_the_pinned_host(mesh_process: Any) -> None:
    def start(name: str, vram_gb: int, *join: str) -> Any:
        env = {"MESH_LLM_OPTIONS": json.dumps({"fake_vram_gb": vram_gb,
                                               "fake_model_gb": 1})}
        return mesh_process("--backend", "fake", "--transport", "quic", "--model", "fake",
                            "--election", "pinned", "--election-opt", "host=small",
                            "--name", name, *join, env=env, timeout=60)

    big = start("big", 8)
    assert big.token, big.log()
    small = start("small", 4, "--join", big.token)
    deadline = time.monotonic() + 60
    seen: list[Any] = []
    while time.monotonic() < deadline:
        try:
            statuses = [mesh_status(big), mesh_status(small)]
        except httpx.HTTPError as exc:
            seen = [repr(exc)]
        else:
            small_id = statuses[1]["id"]
            plans = [s["plan"] for s in statuses]
            seen = plans
            if all(p["host_id"] == small_id and p["state"] == "SOLO" for p in plans):
                break
        time.sleep(0.25)
    else:
        raise AssertionError(f"no agreement on the pinned host within 60 s: {seen}\n"
                             f"--- big ---\n{big.log()}\n--- small ---\n{small.log()}")
    assert plans[0] == plans[1]
    assert "pinned: host" in plans[0]["reason"] and "(small)" in plans[0]["reason"]
