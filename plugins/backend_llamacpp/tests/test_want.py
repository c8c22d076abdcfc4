"""``want``: what a node must run for a plan; equal wants mean nothing restarts."""

from __future__ import annotations

from meshcore_backend_llamacpp.want import Host, Idle, Worker, want

from meshcore.plan import Participant, Plan, PlanState


def plan(*workers: str, host: str = "h", model: str = "m", draft: str | None = None) -> Plan:
    parts = (*(Participant(w, 4, 0.25, True) for w in workers), Participant(host, 8, 0.5, False))
    return Plan(PlanState.SPLIT if workers else PlanState.SOLO, host, parts, model=model,
                draft=draft)


def test_the_host_runs_llama_server_for_the_whole_plan() -> None:
    p = plan("w1", draft="d")
    assert want(p, "h") == Host("m", "d", p.participants)


def test_a_worker_runs_rpc_server_for_the_model() -> None:
    assert want(plan("w1", "w2"), "w2") == Worker("m")


def test_a_node_outside_the_plan_is_idle() -> None:
    assert want(plan("w1"), "x") == Idle()


def test_a_waiting_plan_is_idle_even_for_its_host() -> None:
    waiting = Plan(PlanState.WAITING, "h", (Participant("h", 8, 1.0, False),), model="m",
                   reason="waiting for 1.0 GB more VRAM")
    assert want(waiting, "h") == Idle()
    assert want(Plan(PlanState.WAITING), "h") == Idle()


def test_the_same_plan_twice_wants_the_same() -> None:
    assert want(plan("w1"), "h") == want(plan("w1"), "h")
    assert want(plan("w1"), "w1") == want(plan("w1"), "w1")


def test_the_host_wants_a_restart_for_any_change_of_its_split() -> None:
    assert want(plan("w1"), "h") != want(plan("w1", "w2"), "h")
    assert want(plan(), "h") != want(plan("w1"), "h")
    assert want(plan("w1"), "h") != want(plan("w1", draft="d"), "h")
    assert want(plan("w1"), "h") != want(plan("w1", model="other"), "h")


def test_a_worker_keeps_its_want_when_other_workers_come_and_go() -> None:
    assert want(plan("w1"), "w1") == want(plan("w1", "w2"), "w1")
    assert want(plan("w1"), "w1") == want(plan("w1", draft="d"), "w1")
    assert want(plan("w1"), "w1") != want(plan("w1", model="other"), "w1")


def test_roles_never_compare_equal() -> None:
    assert Worker("m") != Host("m", None, ()) != Idle()
    assert Idle() == Idle()


def test_wants_are_frozen_values() -> None:
    w = want(plan("w1"), "h")
    assert len({w, want(plan("w1"), "h"), Idle(), Worker("m")}) == 3  # hashable: frozen
