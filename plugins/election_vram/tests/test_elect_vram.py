"""The vram election as a pure function: every scenario of DESIGN.md section 4 and issue 6."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from meshcore_election_vram import SOLO_HINT, elect, format_gb, waiting_message

from meshcore.config import GB
from meshcore.plan import ElectionRequest, Plan, PlanState, shares
from meshcore.state import MeshView, Peer, Role, Serving

MODEL = "SmolLM2-135M"
REQ = ElectionRequest()


def peer(pid: str, vram_gb: float, *, model_gb: float | None = 1.0, **kw: Any) -> Peer:
    model = MODEL if model_gb is not None else None
    return Peer(id=pid, vram=int(vram_gb * GB), model=model,
                model_bytes=int((model_gb or 0) * GB), **kw)


def client(pid: str, vram_gb: float = 0) -> Peer:
    return Peer(id=pid, role=Role.CLIENT, vram=int(vram_gb * GB))


def view(*peers: Peer, me: str | None = None) -> MeshView:
    ordered = tuple(sorted(peers, key=lambda p: p.id))
    return MeshView(me or ordered[0].id, ordered)


def layout(plan: Plan) -> list[tuple[str, float, bool]]:
    return [(p.peer_id, p.share, p.rpc) for p in plan.participants]


# ------------------------------------------------------------------ solo


def test_single_node_is_solo_host_without_rpc() -> None:
    plan = elect(view(peer("a", 8)), REQ)
    assert plan.state is PlanState.SOLO and plan.host_id == "a"
    assert layout(plan) == [("a", 1.0, False)]
    assert plan.workers == () and plan.tensor_split == (1.0,)
    assert plan.model == MODEL and plan.model_bytes == GB


def test_fits_on_host_is_solo_with_hint_and_idle_workers() -> None:
    plan = elect(view(peer("a", 8), peer("b", 4)), REQ)
    assert plan.state is PlanState.SOLO and plan.host_id == "a"
    assert layout(plan) == [("a", 1.0, False)]
    assert plan.reason == SOLO_HINT == "model fits on host; use --split to force"


def test_need_is_model_bytes_times_overhead() -> None:
    # 1 GB model needs 1.1 GB: a 1.1 GB host fits exactly, one byte less does not.
    exact = Peer(id="a", vram=int(1.1 * GB) + 1, model=MODEL, model_bytes=GB)
    assert elect(view(exact), REQ).state is PlanState.SOLO
    short = Peer(id="a", vram=int(1.1 * GB) - 1, model=MODEL, model_bytes=GB)
    assert elect(view(short), REQ).state is PlanState.WAITING
    loose = ElectionRequest(overhead=1.0)
    assert elect(view(short), loose).state is PlanState.SOLO


def test_draft_follows_request() -> None:
    p = Peer(id="a", vram=8 * GB, model=MODEL, model_bytes=GB, draft="SmolLM2-135M")
    assert elect(view(p), REQ).draft == "SmolLM2-135M"
    assert elect(view(p), ElectionRequest(draft_allowed=False)).draft is None


# ------------------------------------------------------------------ host choice


def test_highest_vram_hosts() -> None:
    plan = elect(view(peer("a", 4), peer("b", 24), peer("c", 12)), REQ)
    assert plan.host_id == "b"


def test_tie_goes_to_larger_id() -> None:
    assert elect(view(peer("node-a", 8), peer("node-b", 8)), REQ).host_id == "node-b"
    assert elect(view(peer("z", 8), peer("y", 8), peer("x", 8)), REQ).host_id == "z"


def test_tie_keeps_the_incumbent_host() -> None:
    # an equal node joining with a larger id must not move the model off the serving host
    incumbent = peer("node-a", 8, role=Role.HOST, serving=Serving.READY)
    assert elect(view(incumbent, peer("node-b", 8)), REQ).host_id == "node-a"
    # strictly more VRAM still wins over the incumbent
    assert elect(view(incumbent, peer("node-b", 9)), REQ).host_id == "node-b"
    # two claimants (e.g. after a partition heals): back to the larger id
    both = view(incumbent, peer("node-b", 8, role=Role.HOST))
    assert elect(both, REQ).host_id == "node-b"


def test_node_without_model_never_hosts_but_can_work() -> None:
    # b has more VRAM but no model file: it cannot run llama-server, so a hosts and b works.
    plan = elect(view(peer("a", 1), peer("b", 24, model_gb=None)), REQ)
    assert plan.host_id == "a" and plan.state is PlanState.SPLIT
    assert layout(plan) == [("b", 0.96, True), ("a", 0.04, False)]


def test_no_model_anywhere_waits_with_fix() -> None:
    plan = elect(view(peer("a", 8, model_gb=None)), REQ)
    assert plan.state is PlanState.WAITING and "--model" in plan.reason


# ------------------------------------------------------------------ clients


def test_clients_never_host_or_count() -> None:
    plan = elect(view(peer("a", 8), client("zz", vram_gb=80)), REQ)
    assert plan.host_id == "a" and plan.state is PlanState.SOLO
    assert layout(plan) == [("a", 1.0, False)]
    assert view(peer("a", 8), client("zz", vram_gb=80)).total_vram == 8 * GB


def test_clients_never_fill_a_split() -> None:
    plan = elect(view(peer("a", 1), client("c", vram_gb=80)), REQ)
    assert plan.state is PlanState.WAITING and not plan.includes("c")
    forced = elect(view(peer("a", 8, split=True), client("c", vram_gb=80)), REQ)
    assert not forced.includes("c")


def test_only_clients_waits() -> None:
    plan = elect(view(client("c1"), client("c2")), REQ)
    assert plan.state is PlanState.WAITING and plan.host_id is None
    assert "clients never host" in plan.reason


# ------------------------------------------------------------------ split


def test_split_needed_adds_workers_until_covered() -> None:
    # need 11 GB: host 8 + the biggest worker 4 covers it; the 2 GB worker stays idle.
    plan = elect(view(peer("a", 8, model_gb=10), peer("b", 4, model_gb=10),
                      peer("c", 2, model_gb=10)), REQ)
    assert plan.state is PlanState.SPLIT and plan.host_id == "a"
    assert layout(plan) == [("b", 0.33, True), ("a", 0.67, False)]
    assert not plan.includes("c")


def test_device_order_is_rpc_workers_then_host() -> None:
    # need 18.7 GB: every worker is needed
    plan = elect(view(peer("a", 8, model_gb=17), peer("b", 6, model_gb=17),
                      peer("c", 4, model_gb=17), peer("d", 2, model_gb=17)), REQ)
    assert [p.peer_id for p in plan.participants] == ["b", "c", "d", "a"]
    assert [p.rpc for p in plan.participants] == [True, True, True, False]
    assert [p.peer_id for p in plan.workers] == ["b", "c", "d"]
    assert plan.tensor_split == (0.3, 0.2, 0.1, 0.4)


def test_forced_split_takes_every_worker() -> None:
    # the --split of issue 6's acceptance 3: A 8 GB + B 4 GB -> 0.67 (A) and 0.33 (B)
    plan = elect(view(peer("a", 8, split=True), peer("b", 4)), REQ)
    assert plan.state is PlanState.SPLIT and plan.host_id == "a"
    assert layout(plan) == [("b", 0.33, True), ("a", 0.67, False)]
    more = elect(view(peer("a", 8), peer("b", 4), peer("c", 2), peer("d", 2, split=True)), REQ)
    assert {p.peer_id for p in more.participants} == {"a", "b", "c", "d"}


def test_forced_split_alone_stays_solo() -> None:
    plan = elect(view(peer("a", 8, split=True), peer("b", 0)), REQ)
    assert plan.state is PlanState.SOLO and layout(plan) == [("a", 1.0, False)]
    assert "--split" in plan.reason


def test_forced_split_still_needs_enough_vram() -> None:
    plan = elect(view(peer("a", 4, model_gb=10, split=True), peer("b", 4, model_gb=10)), REQ)
    assert plan.state is PlanState.WAITING


def test_waiting_message_names_what_is_missing() -> None:
    plan = elect(view(peer("a", 8, model_gb=20), peer("b", 4, model_gb=20)), REQ)
    assert plan.state is PlanState.WAITING and plan.host_id == "a"
    assert plan.reason == "waiting for 10.0 GB more VRAM (have 12.0 of 22.0 GB)"
    assert plan.participants == ()


def test_waiting_then_split_when_a_worker_joins() -> None:
    # acceptance 4: A below the need waits; B joining makes a split without --split
    small = elect(view(peer("a", 0.06, model_gb=0.092)), REQ)
    assert small.state is PlanState.WAITING and small.host_id == "a"
    assert re.fullmatch(r"waiting for [\d.]+ GB more VRAM \(have [\d.]+ of [\d.]+ GB\)",
                        small.reason)
    assert small.reason == "waiting for 0.05 GB more VRAM (have 0.06 of 0.10 GB)"
    both = elect(view(peer("a", 0.06, model_gb=0.092), peer("b", 0.03, model_gb=0.092)), REQ)
    assert both.state is PlanState.WAITING  # still short
    grown = elect(view(peer("a", 0.06, model_gb=0.092), peer("b", 0.05, model_gb=0.092)), REQ)
    assert grown.state is PlanState.SPLIT and grown.host_id == "a"
    assert layout(grown) == [("b", 0.45, True), ("a", 0.55, False)]


def test_format_gb_never_rounds_missing_to_zero() -> None:
    assert format_gb(1) == "0.00" and format_gb(1, up=True) == "0.01"
    assert format_gb(int(1.25 * GB)) == "1.2" and format_gb(int(1.21 * GB), up=True) == "1.3"
    assert waiting_message(10 * GB, 4 * GB) == "waiting for 6.0 GB more VRAM (have 4.0 of 10.0 GB)"


# ------------------------------------------------------------------ RTT


def with_rtt(host: Peer, table: dict[str, float]) -> Peer:
    return Peer(**{**host.__dict__, "extra": {"rtt_ms": table}})


def test_rtt_limit_comes_from_host_announcement() -> None:
    host = with_rtt(peer("a", 8, model_gb=10), {"b": 200.0, "c": 5.0})
    plan = elect(view(host, peer("b", 6, model_gb=10), peer("c", 4, model_gb=10)), REQ)
    assert plan.state is PlanState.SPLIT and not plan.includes("b")
    assert [p.peer_id for p in plan.workers] == ["c"]
    # the same view computed on b: b's own idea of the RTT is irrelevant
    b_view = view(host, with_rtt(peer("b", 6, model_gb=10), {"a": 1.0}),
                  peer("c", 4, model_gb=10), me="b")
    assert elect(b_view, REQ).workers == plan.workers
    # with a looser limit b is allowed, but c (lower RTT) comes first and covers the need
    loose = elect(view(host, peer("b", 6, model_gb=10), peer("c", 4, model_gb=10)),
                  ElectionRequest(max_rtt_ms=500))
    assert [p.peer_id for p in loose.workers] == ["c"]


def test_slow_peers_do_not_count_towards_need() -> None:
    host = with_rtt(peer("a", 8, model_gb=10), {"b": 200.0})
    plan = elect(view(host, peer("b", 6, model_gb=10)), REQ)
    assert plan.state is PlanState.WAITING and "more VRAM" in plan.reason
    # --split forces every worker in: the user asked for it, the RTT limit does not apply
    forced = elect(view(with_rtt(peer("a", 8, split=True), {"b": 200.0}), peer("b", 6)), REQ)
    assert forced.state is PlanState.SPLIT and forced.includes("b")


def test_rtt_skips_are_named_in_the_reason() -> None:
    host = with_rtt(peer("a", 8, model_gb=10), {"b": 200.0})
    plan = elect(view(host, peer("b", 6, model_gb=10)), REQ)
    assert plan.reason.startswith("waiting for 3.0 GB more VRAM (have 8.0 of 11.0 GB)")
    assert plan.reason.endswith("; left out over the 80 ms RTT limit: b (200 ms)")


def test_engaged_worker_keeps_its_place_through_an_rtt_spike() -> None:
    # the model needs b (11 GB > 8); b already runs its rpc-server for the split: a spike to
    # 150 ms (under 3 x 80) keeps it
    host = with_rtt(peer("a", 8, model_gb=10), {"b": 150.0})
    for serving in (Serving.RPC, Serving.LOADING):
        plan = elect(view(host, peer("b", 4, serving=serving)), REQ)
        assert plan.state is PlanState.SPLIT and plan.includes("b"), serving
    # an idle peer at 150 ms is not pulled in, and an engaged one goes past 240 ms
    assert not elect(view(host, peer("b", 4, serving=Serving.IDLE)), REQ).includes("b")
    far = with_rtt(peer("a", 8, model_gb=10), {"b": 250.0})
    assert not elect(view(far, peer("b", 4, serving=Serving.RPC)), REQ).includes("b")


def test_a_peer_the_host_has_not_measured_yet_waits_for_its_rtt() -> None:
    # the host measures RTTs (it announces a table) but has no entry for b, which just
    # joined: an automatic split does not take b on trust, it waits for the measurement
    host = with_rtt(peer("a", 8, model_gb=10), {})
    plan = elect(view(host, peer("b", 6, model_gb=10)), REQ)
    assert plan.state is PlanState.WAITING and not plan.includes("b")
    assert plan.reason.endswith("; waiting for the host to measure the RTT of b")
    measured = with_rtt(peer("a", 8, model_gb=10), {"b": 3.0})
    assert elect(view(measured, peer("b", 6, model_gb=10)), REQ).includes("b")
    # --split takes it anyway; an engaged worker keeps its place while its entry is missing
    # (a reconnect restarts its measurement); a host that announces no table at all (a
    # transport that does not measure) leaves unknown peers usable
    forced = with_rtt(peer("a", 8, model_gb=10, split=True), {})
    assert elect(view(forced, peer("b", 6, model_gb=10)), REQ).includes("b")
    assert elect(view(host, peer("b", 6, serving=Serving.RPC)), REQ).includes("b")
    assert elect(view(peer("a", 8, model_gb=10), peer("b", 6)), REQ).includes("b")


def test_lower_rtt_band_preferred_then_vram() -> None:
    host = with_rtt(peer("a", 8, model_gb=11), {"b": 30.0, "c": 2.0, "d": 3.0})
    plan = elect(view(host, peer("b", 6, model_gb=11), peer("c", 2, model_gb=11),
                      peer("d", 3, model_gb=11)), REQ)
    # c and d share the 0-10 ms band: bigger d first, then c; b (30 ms) is not needed
    assert [p.peer_id for p in plan.workers] == ["d", "c"]


def test_unknown_rtt_after_known_and_bad_entries_ignored() -> None:
    host = with_rtt(peer("a", 8, model_gb=10), {"c": 40.0, "b": "fast"})  # type: ignore[dict-item]
    plan = elect(view(host, peer("b", 6, model_gb=10), peer("c", 4, model_gb=10)), REQ)
    assert [p.peer_id for p in plan.workers] == ["c"]


# ------------------------------------------------------------------ shares


@given(st.lists(st.integers(min_value=1, max_value=10**12), min_size=1, max_size=12))
def test_shares_have_two_decimals_and_sum_to_one(vrams: list[int]) -> None:
    out = shares(vrams)
    assert len(out) == len(vrams)
    assert abs(sum(out) - 1.0) < 1e-9
    assert all(round(s, 2) == s for s in out)
    assert all(abs(s - v / sum(vrams)) <= 0.01 * len(vrams) for s, v in zip(out, vrams,
                                                                             strict=True))


@pytest.mark.parametrize(("vrams", "expected"), [
    ([8, 4], [0.67, 0.33]),
    ([1, 1, 1], [0.34, 0.33, 0.33]),
    ([24, 8, 8], [0.6, 0.2, 0.2]),
])
def test_shares_table(vrams: list[int], expected: list[float]) -> None:
    assert shares(vrams) == expected


# ------------------------------------------------------------------ purity


peers_strategy = st.lists(
    st.builds(
        lambda i, vram, has_model, is_client, split, rtt: (i, vram, has_model, is_client,
                                                           split, rtt),
        st.integers(0, 50), st.integers(0, 64), st.booleans(), st.booleans(),
        st.booleans(), st.one_of(st.none(), st.floats(0, 300)),
    ),
    min_size=1, max_size=8, unique_by=lambda t: t[0],
)


def build_peers(spec: list[tuple[int, int, bool, bool, bool, float | None]]) -> list[Peer]:
    ids = [f"n{i:02d}" for i, *_ in spec]
    out = []
    for i, vram, has_model, is_client, split, _ in spec:
        rtts = {pid: r for pid, (*_, r) in zip(ids, spec, strict=True) if r is not None}
        if is_client:
            out.append(client(f"n{i:02d}", vram))
        else:
            out.append(Peer(id=f"n{i:02d}", vram=vram * GB // 4, model=MODEL if has_model else None,
                            model_bytes=3 * GB, split=split, extra={"rtt_ms": rtts}))
    return out


@given(peers_strategy, st.randoms(use_true_random=False), st.integers(0, 7))
@settings(max_examples=300)
def test_plan_independent_of_order_and_observer(spec: Any, rnd: Any, who: int) -> None:
    peers = build_peers(spec)
    reference = elect(MeshView(peers[0].id, tuple(sorted(peers, key=lambda p: p.id))), REQ)
    shuffled = list(peers)
    rnd.shuffle(shuffled)
    observer = shuffled[who % len(shuffled)].id
    plan = elect(MeshView(observer, tuple(shuffled), generation=who), REQ)
    assert plan == reference
    # and it is pure: computing again gives the same, the view is untouched
    assert elect(MeshView(observer, tuple(shuffled)), REQ) == plan


@given(peers_strategy)
@settings(max_examples=300)
def test_plan_invariants(spec: Any) -> None:
    peers = build_peers(spec)
    plan = elect(view(*peers), REQ)
    ids = {p.id: p for p in peers}
    if plan.state is PlanState.WAITING:
        assert plan.participants == () and plan.reason
        return
    host = ids[plan.host_id or ""]
    assert not host.is_client and host.model
    assert plan.participants[-1].peer_id == host.id and not plan.participants[-1].rpc
    assert all(p.rpc for p in plan.participants[:-1])
    assert all(not ids[p.peer_id].is_client for p in plan.participants)
    assert abs(sum(plan.tensor_split) - 1.0) < 1e-9
    assert sum(p.vram for p in plan.participants) >= host.model_bytes * REQ.overhead
    best = max((p for p in peers if not p.is_client and p.model), key=lambda p: (p.vram, p.id))
    assert host is best
