"""The pure decisions of the hand-over, the host and the worker."""

from __future__ import annotations

from meshcore_backend_llamacpp import commands
from meshcore_backend_llamacpp.handover import keeps_answering, may_hand_over
from meshcore_backend_llamacpp.host import tunneled_to, without_rpc
from meshcore_backend_llamacpp.want import Host, Idle, Worker, want
from meshcore_backend_llamacpp.worker import predicted_layers

from meshcore.plan import Participant, Plan, PlanState
from meshcore.state import MeshView, Peer, Serving


def plan(*workers: str, host: str = "h", model: str = "m") -> Plan:
    parts = (*(Participant(w, 4, 0.5, True) for w in workers), Participant(host, 8, 0.5, False))
    return Plan(PlanState.SPLIT if workers else PlanState.SOLO, host, parts, model=model)


SOLO = commands.layout(plan(), host_has_gpu=False, n_layer=30)
SPLIT = commands.layout(plan("w"), host_has_gpu=False, n_layer=30)


def test_a_solo_host_that_stays_host_hands_over() -> None:
    new = plan("w")
    assert may_hand_over(plan(), SOLO, new, want(new, "h"), "h")


def test_a_solo_host_that_leaves_for_another_host_hands_over() -> None:
    new = plan("h2", host="x")
    assert may_hand_over(plan(), SOLO, new, Idle(), "h")


def test_no_hand_over_from_a_split_to_a_new_model_or_to_a_worker() -> None:
    new = plan("w")
    assert not may_hand_over(plan("w"), SPLIT, new, want(new, "h"), "h")  # shares the worker
    other = plan("w", model="other")
    assert not may_hand_over(plan(), SOLO, other, want(other, "h"), "h")
    becomes_worker = plan("h", host="x")
    assert not may_hand_over(plan(), SOLO, becomes_worker, Worker("m"), "h")
    assert not may_hand_over(plan(), SOLO, None, Host("m", None, ()), "h")
    waiting = Plan(PlanState.WAITING, model="m")
    assert not may_hand_over(plan(), SOLO, waiting, Idle(), "h")


def test_a_standby_answers_only_while_another_node_hosts_its_model() -> None:
    assert keeps_answering("m", plan(host="x"), "h")
    assert not keeps_answering("m", plan(), "h")
    assert not keeps_answering("m", plan(host="x", model="other"), "h")
    assert not keeps_answering("m", Plan(PlanState.WAITING, model="m"), "h")


def test_workers_without_a_live_rpc_server() -> None:
    peers = (Peer("a", serving=Serving.RPC), Peer("b", serving=Serving.LOADING))
    view = MeshView("h", peers)
    assert without_rpc(view, ["a", "b", "c"]) == ["b", "c"]
    assert without_rpc(view, ["a"]) == []


def test_bytes_tunneled_count_only_rpc_tunnels_to_the_workers() -> None:
    tunnels = [{"service": "rpc", "peer": "a", "bytes_to_peer": 5},
               {"service": "api", "peer": "a", "bytes_to_peer": 7},
               {"service": "rpc", "peer": "z", "bytes_to_peer": 11}]
    assert tunneled_to(tunnels, ["a"]) == 5


def test_a_worker_predicts_its_layers_from_the_hosts_device() -> None:
    p = plan("w")
    assert predicted_layers(p, None, 30, "w") is None
    assert predicted_layers(p, "cpu", 0, "w") is None
    on_cpu = predicted_layers(p, "cpu", 30, "w")
    on_gpu = predicted_layers(p, "cuda", 30, "w")
    # a CPU host offloads the last layers but keeps the output matrix (OUTPUT_ON_CPU): the
    # worker seeds layers up to 29, not the output layer's; a GPU host's workers come first
    assert on_cpu and on_gpu and 29 in on_cpu and 30 not in on_cpu
    assert 0 in on_gpu and 30 not in on_gpu
    assert predicted_layers(p, "cuda", 30, "other") == set()
