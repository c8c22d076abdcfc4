"""The payload's pure parts: RPC entries read defensively from any backend, badges."""

from __future__ import annotations

from typing import Any

from meshcore_console.payload import badge, missing_gb, rpc_entries, serving_label

from meshcore.config import GB
from meshcore.plan import Participant, Plan, PlanState
from meshcore.state import Peer, Role, Serving

SPLIT = Plan(PlanState.SPLIT, host_id="h", model="m", participants=(
    Participant("w1", 4 * GB, 0.25, True), Participant("w2", 4 * GB, 0.25, True),
    Participant("h", 8 * GB, 0.5, False)))


def test_rpc_entries_follow_the_plan_and_name_addresses_by_peer() -> None:
    llamacpp = {"rpc": ["127.0.0.1:4002", "127.0.0.1:4001"],
                "layout": {"rpc_peers": ["w2", "w1"]}}
    assert rpc_entries(llamacpp, SPLIT) == [
        {"peer_id": "w1", "share": 0.25, "address": "127.0.0.1:4001"},
        {"peer_id": "w2", "share": 0.25, "address": "127.0.0.1:4002"}]


def test_rpc_entries_accept_other_shapes_and_junk() -> None:
    assert [e["address"] for e in rpc_entries({"rpc_entries": "a:1,b:2"}, SPLIT)] == ["a:1", "b:2"]
    dicts = {"rpc_servers": [{"host": "x", "port": 5}, {"address": "y:6"}]}
    assert [e["address"] for e in rpc_entries(dicts, SPLIT)] == ["x:5", "y:6"]
    junks: list[dict[str, Any]] = [{}, {"rpc": 42}, {"rpc": None, "layout": "?"}, {"rpc": []}]
    for junk in junks:
        assert [e["address"] for e in rpc_entries(junk, SPLIT)] == [None, None]
    assert rpc_entries({"rpc": ["a:1"]}, Plan(PlanState.SOLO, host_id="h")) == []


def test_badges() -> None:
    host = Peer("h", Role.HOST, serving=Serving.READY)
    assert badge(SPLIT, host, host, 0)["text"] == "Host"
    solo = Plan(PlanState.SOLO, host_id="h", reason="model fits on host; use --split to force")
    assert "--split" in badge(solo, host, host, 0)["detail"]  # a worker could be split with
    assert badge(solo, host, host, 0, alone=True)["detail"].startswith("serving alone")
    loading = Peer("h", Role.HOST, serving=Serving.LOADING)
    assert badge(SPLIT, loading, loading, 0)["text"] == "Loading"
    failed = Peer("h", Role.HOST, serving=Serving.ERROR, extra={"error": "exit 1: bad gguf"})
    assert badge(SPLIT, failed, failed, 0) == {"kind": "error", "text": "Host failed",
                                               "detail": "exit 1: bad gguf"}
    assert badge(SPLIT, Peer("w1"), host, 0)["text"] == "Worker in split"
    assert badge(SPLIT, Peer("w9"), host, 0)["text"] == "Worker idle"
    client = Peer("c", Role.CLIENT)
    assert badge(SPLIT, client, loading, 0) == {"kind": "client", "text": "Client",
                                                "detail": "using host h (loading)"}
    waiting = Plan(PlanState.WAITING, reason="no node that can host has joined")
    assert badge(waiting, Peer("w"), None, 0)["text"] == "Waiting"
    assert badge(waiting, Peer("w"), None, 1.5)["text"] == "Waiting for 1.5 GB more"
    # a former host answering until the new one is ready (the backend's hand-over)
    former = Peer("old", extra={"standby": "m"})
    assert badge(SPLIT, former, loading, 0) == {
        "kind": "loading", "text": "Standby",
        "detail": "still answering for m until the new host h is ready"}
    assert serving_label(former) == "standby" and serving_label(host) == "ready"


def test_missing_vram_is_the_plans_number_rounded_up() -> None:
    # the console reads the number the election put in the plan, never its reason text
    said = Plan(PlanState.WAITING, model_bytes=4 * GB, missing_vram=int(1.41 * GB),
                reason="any words at all")
    assert missing_gb(said) == 1.5
    assert missing_gb(Plan(PlanState.WAITING, missing_vram=GB)) == 1.0
    assert missing_gb(Plan(PlanState.WAITING, model_bytes=GB, reason="waiting for 9 GB more")
                      ) == 0.0
    assert missing_gb(SPLIT) == 0.0
