"""SWIM membership: the sans-IO core (in simulated time) and the memory hub's swim mode."""

from __future__ import annotations

from typing import Any

import pytest
from meshcore_testing.swim import (
    Kind,
    MemberEvent,
    Message,
    Simulation,
    Status,
    SwimConfig,
    SwimMember,
    Update,
)

from meshcore.plan import PlanState
from meshcore.state import Serving

IDS = [f"m{i:02d}" for i in range(12)]


def events_log(sim_events: list[tuple[float, str, MemberEvent]]) -> Any:
    """An ``on_event`` callback appending to ``sim_events``."""
    return lambda now, observer, event: sim_events.append((now, observer, event))


def about(log: list[tuple[float, str, MemberEvent]], member: str,
          status: Status) -> list[tuple[float, str, MemberEvent]]:
    return [e for e in log if e[2].member == member and e[2].status is status]


def gossip(member: SwimMember, *updates: Update, now: float = 0.0) -> None:
    member.receive(Message(Kind.GOSSIP, "someone", updates=updates), now)


# ---------------------------------------------------------------- the core


def test_ping_is_acked_and_a_silent_peer_becomes_suspect() -> None:
    log: list[tuple[float, str, MemberEvent]] = []
    silent: set[str] = set()
    sim = Simulation(seed=1, on_event=events_log(log),
                     drop=lambda sender, to, msg: sender in silent)
    sim.preform(["a", "b"])
    sim.run_for(10)
    sent = sim.traffic["a"].kinds_out
    assert 9 <= sent["ping"] <= 11 and 9 <= sent["ack"] <= 11  # one probe each way a period
    assert not about(log, "b", Status.SUSPECT) and not about(log, "a", Status.SUSPECT)
    silent.add("b")  # b's answers get lost: nobody can vouch for it (no third member)
    sim.run_for(2.1)
    assert sim.members["a"].status_of("b") is Status.SUSPECT
    assert [e[1] for e in about(log, "b", Status.SUSPECT)] == ["a"]


@pytest.mark.parametrize("k", [3, 0])
def test_indirect_probe_rescues_a_peer_whose_direct_path_drops(k: int) -> None:
    """a <-> b is cut both ways; with k=3 others probe b for a and a never suspects it;
    with k=0 (no indirect probes) it does (and b refutes, raising its incarnation)."""
    log: list[tuple[float, str, MemberEvent]] = []
    cut = {("a", "b"), ("b", "a")}
    sim = Simulation(SwimConfig(indirect_k=k), seed=2, on_event=events_log(log),
                     drop=lambda sender, to, msg: (sender, to) in cut)
    sim.preform([*IDS[:6], "a", "b"])
    sim.run_for(40)  # a probes b at least 5 times (one pass of 7 takes 7 periods)
    a = sim.members["a"]
    suspected_by_a = [e for e in about(log, "b", Status.SUSPECT) if e[1] == "a"]
    if k:
        assert sim.traffic["a"].kinds_out["ping-req"] >= 3 * 5
        assert suspected_by_a == [] and a.members["b"].incarnation == 0
        assert not about(log, "b", Status.DEAD) and a.status_of("b") is Status.ALIVE
    else:
        assert suspected_by_a and sim.members["b"].incarnation >= 1


def test_suspicion_about_oneself_is_refuted_with_a_higher_incarnation() -> None:
    me = SwimMember("me", {"id": "me"}, now=0)
    gossip(me, Update("me", Status.SUSPECT, 0))
    assert me.incarnation == 1
    gossip(me, Update("me", Status.SUSPECT, 0))  # old news: nothing to refute
    assert me.incarnation == 1
    gossip(me, Update("me", Status.DEAD, 4))
    assert me.incarnation == 5
    other = SwimMember("other", {"id": "other"}, now=0)
    gossip(other, Update("me", Status.ALIVE, 0, {"id": "me"}))
    gossip(other, Update("me", Status.SUSPECT, 0))
    assert other.status_of("me") is Status.SUSPECT
    sent = me.tick(me.next_deadline())  # the refutation rides on the next message
    gossip(me, Update("other", Status.ALIVE, 0, {"id": "other"}))
    out = me.tick(me.next_deadline())
    refutes = [u for _, m in sent.sends + out.sends for u in m.updates if u.member == "me"]
    assert refutes and refutes[0].status is Status.ALIVE and refutes[0].incarnation == 5
    gossip(other, refutes[0])
    assert other.status_of("me") is Status.ALIVE and other.members["me"].incarnation == 5


def test_a_suspect_that_comes_back_in_time_is_not_declared_dead() -> None:
    log: list[tuple[float, str, MemberEvent]] = []
    muted: set[str] = set()
    sim = Simulation(seed=3, on_event=events_log(log),
                     drop=lambda sender, to, msg: sender in muted or to in muted)
    sim.preform(IDS)
    sim.run_for(5)
    muted.add("m03")
    assert sim.run_until_true(lambda: bool(about(log, "m03", Status.SUSPECT)), 20) is not None
    muted.clear()  # back before the suspicion timeout (3 s at 12 members)
    sim.run_for(10)
    assert not about(log, "m03", Status.DEAD)
    assert sim.members["m03"].incarnation >= 1
    assert all(m.status_of("m03") is Status.ALIVE for i, m in sim.members.items() if i != "m03")


def test_a_killed_member_is_declared_dead_by_all_after_the_suspicion_timeout() -> None:
    log: list[tuple[float, str, MemberEvent]] = []
    config = SwimConfig()
    sim = Simulation(config, seed=4, on_event=events_log(log))
    sim.preform(IDS)
    sim.run_for(5)
    sim.kill("m07")
    killed_at = sim.now
    live = [m for m in IDS if m != "m07"]
    took = sim.run_until_true(
        lambda: all(sim.members[m].status_of("m07") is Status.DEAD for m in live), 30)
    assert took is not None
    first_suspect = min(t for t, _, _ in about(log, "m07", Status.SUSPECT))
    first_dead = min(t for t, _, _ in about(log, "m07", Status.DEAD))
    assert first_suspect >= killed_at + config.ping_timeout_s
    # dead only once a suspicion ran its course (3 s at 12 members), never straight away
    assert first_dead >= first_suspect + config.suspicion_s(len(IDS)) - 1e-9
    assert sorted(o for _, o, _ in about(log, "m07", Status.DEAD)) == live  # each once
    sim.run_for(10)
    assert all(m.status_of("m07") is Status.DEAD for i, m in sim.members.items() if i in live)


@pytest.mark.parametrize(("known", "update", "wins"), [
    ((Status.ALIVE, 1), (Status.ALIVE, 2), True),
    ((Status.ALIVE, 2), (Status.ALIVE, 2), False),
    ((Status.ALIVE, 2), (Status.SUSPECT, 2), True),
    ((Status.ALIVE, 2), (Status.SUSPECT, 1), False),
    ((Status.SUSPECT, 2), (Status.SUSPECT, 2), False),
    ((Status.SUSPECT, 2), (Status.SUSPECT, 3), True),
    ((Status.SUSPECT, 2), (Status.ALIVE, 2), False),
    ((Status.SUSPECT, 2), (Status.ALIVE, 3), True),
    ((Status.SUSPECT, 2), (Status.DEAD, 2), True),
    ((Status.ALIVE, 3), (Status.DEAD, 2), False),
    ((Status.DEAD, 2), (Status.ALIVE, 2), False),
    ((Status.DEAD, 2), (Status.SUSPECT, 5), False),
    ((Status.DEAD, 2), (Status.ALIVE, 3), True),
])
def test_precedence(known: tuple[Status, int], update: tuple[Status, int], wins: bool) -> None:
    me = SwimMember("me", {"id": "me"}, now=0)
    record = {"id": "x"}
    gossip(me, Update("x", Status.ALIVE, known[1], record))
    if known[0] is not Status.ALIVE:
        gossip(me, Update("x", known[0], known[1]))
    assert (me.status_of("x"), me.members["x"].incarnation) == known
    gossip(me, Update("x", update[0], update[1], record if update[0] is Status.ALIVE else None))
    assert (me.status_of("x"), me.members["x"].incarnation) == (update if wins else known)


def test_strangers_suspicion_is_ignored_and_their_death_remembered() -> None:
    me = SwimMember("me", {"id": "me"}, now=0)
    gossip(me, Update("x", Status.SUSPECT, 0))
    assert me.status_of("x") is None
    gossip(me, Update("y", Status.DEAD, 3))
    gossip(me, Update("y", Status.ALIVE, 3, {"id": "y"}))  # a stale ALIVE cannot revive it
    assert me.status_of("y") is Status.DEAD


def test_piggyback_is_bounded_and_each_update_is_sent_a_bounded_number_of_times() -> None:
    config = SwimConfig(max_piggyback=5, max_message_bytes=600, period_s=1e6)  # no probes
    me = SwimMember("me", {"id": "me"}, now=0, config=config)
    records = [Update(f"p{i:02d}", Status.ALIVE, 0, {"id": f"p{i:02d}", "pad": "x" * 60})
               for i in range(40)]
    gossip(me, *records)
    assert me.queued == 40
    limit = config.retransmits(me.live_count())
    assert limit == 12  # 41 members: ceil(3 x ln(42))
    sent: dict[str, int] = {}
    now, messages = 0.0, 0
    while me.queued and now < 500:
        now = me.next_deadline()
        for _, message in me.tick(now).sends:
            messages += 1
            assert len(message.updates) <= config.max_piggyback
            assert message.size <= config.max_message_bytes
            for u in message.updates:
                sent[u.member] = sent.get(u.member, 0) + 1
    assert me.queued == 0 and messages > 0
    assert sent == {u.member: limit for u in records}  # each exactly its budget, then dropped


def test_an_update_reaches_every_member_and_the_traffic_is_deterministic() -> None:
    def run(seed: int) -> tuple[float | None, int]:
        sim = Simulation(seed=seed)
        sim.preform(IDS)
        sim.run_for(3)
        sim.announce("m05", {"id": "m05", "vram": 24})
        took = sim.run_until_true(lambda: all(
            m.members["m05"].record == {"id": "m05", "vram": 24} for m in sim.members.values()),
            10)
        return took, sum(t.bytes_out for t in sim.traffic.values())

    first, again, other = run(7), run(7), run(8)
    assert first == again and first[0] is not None and first[0] < 2
    assert other != first


def test_join_pulls_the_whole_state_once_and_retries_another_seed() -> None:
    log: list[tuple[float, str, MemberEvent]] = []
    sim = Simulation(seed=5, on_event=events_log(log))
    sim.preform(IDS)
    sim.run_for(2)
    sim.kill("m01")
    new = sim.add("new", {"id": "new"}, seeds=["m01", "m02"])  # the first seed is gone
    assert new.joining
    sim.run_for(0.5)
    assert new.joining  # m01 never answers
    sim.run_for(0.6)  # join_timeout_s = 1 s: m02 is asked
    assert not new.joining
    assert sorted(new.members) == sorted([*IDS, "new"])
    assert sim.traffic["m02"].kinds_out["sync"] == 1
    took = sim.run_until_true(
        lambda: all(sim.members[m].status_of("new") is Status.ALIVE for m in IDS if m != "m01"),
        5)
    assert took is not None and took < 2
    # the joiner learnt the others from the SYNC without re-gossiping them
    assert new.queued <= 1


@pytest.mark.parametrize("seed", range(8))
def test_quick_joins_on_a_lossy_network_converge(seed: int) -> None:
    """Joins 20 ms apart with 10 % loss: a seed may still be joining itself, or a newcomer's
    ALIVE may be in flight while another joins; every view ends complete anyway."""
    fast = SwimConfig(period_s=0.2, ping_timeout_s=0.08, gossip_interval_s=0.05,
                      join_timeout_s=0.3)
    sim = Simulation(fast, seed=seed, loss=0.1)
    for member_id in IDS:
        sim.add(member_id)
        sim.run_for(0.02)
    took = sim.run_until_true(
        lambda: all(m.live_count() == len(IDS) for m in sim.members.values()), 20)
    assert took is not None
    sim.run_for(5)  # a JOIN or SYNC may have been lost: retried every 0.3 s
    assert not any(m.joining for m in sim.members.values())
    assert all(m.live_count() == len(IDS) for m in sim.members.values())


def test_digests_repair_a_divergent_view_and_cost_nothing_when_views_agree() -> None:
    hide = [True]

    def drop(sender: str, to: str, message: Message) -> bool:
        """m04 never hears from "new", nor about it while ``hide``."""
        return to == "m04" and (sender == "new" or (
            hide[0] and any(u.member == "new" for u in message.updates)))

    sim = Simulation(seed=11, drop=drop)
    sim.preform(IDS)
    sim.run_for(25)
    kinds = [t.kinds_out for t in sim.traffic.values()]
    assert sum(k["digest"] for k in kinds) >= 2 * len(IDS)  # one per member per 10 s
    assert sum(k["sync-req"] for k in kinds) == 0  # equal views: nothing more
    sim.add("new", seeds=["m00"])
    sim.run_for(8)  # "new" is known to all but m04, and nobody gossips it any more
    assert all(sim.members[m].status_of("new") is Status.ALIVE for m in IDS if m != "m04")
    assert sim.members["m04"].status_of("new") is None
    hide[0] = False
    took = sim.run_until_true(lambda: sim.members["m04"].status_of("new") is Status.ALIVE, 60)
    assert took is not None
    assert sum(t.kinds_out["sync-req"] for t in sim.traffic.values()) >= 2  # "new"'s resync too


def test_messages_per_member_per_period_do_not_grow_with_the_mesh() -> None:
    rates = {}
    for n in (10, 80):
        sim = Simulation(seed=6)
        sim.preform([f"n{i:03d}" for i in range(n)])
        sim.run_for(5)
        before = {i: t.messages_out for i, t in sim.traffic.items()}
        sim.run_for(20)
        per_member = [(t.messages_out - before[i]) / 20 for i, t in sim.traffic.items()]
        rates[n] = (sum(per_member) / n, max(per_member))
    for mean, most in rates.values():
        assert 1.8 <= mean <= 2.3  # a PING, on average an ACK, and a DIGEST per 10 periods
        assert most <= 4
    assert abs(rates[80][0] - rates[10][0]) < 0.2


def test_lossy_network_keeps_every_member() -> None:
    log: list[tuple[float, str, MemberEvent]] = []
    sim = Simulation(seed=9, loss=0.05, on_event=events_log(log))
    sim.preform([f"n{i:02d}" for i in range(30)])
    sim.run_for(60)
    assert not [e for e in log if e[2].status is Status.DEAD]
    assert all(m.live_count() == 30 for m in sim.members.values())


def test_suspicion_timeout_scales_with_log_n() -> None:
    config = SwimConfig()
    assert config.suspicion_s(10) == 3.0 and config.suspicion_s(31) == 3.0
    assert config.suspicion_s(1000) == pytest.approx(6.0)
    assert config.retransmits(10) == 8 and config.retransmits(200) == 16
    assert config.retransmits(1000) == 21


# ---------------------------------------------------------------- the harness in swim mode

FAST = SwimConfig(period_s=0.2, ping_timeout_s=0.08, gossip_interval_s=0.05,
                  join_timeout_s=0.3)


def agreed(mesh: Any, host_not: str | None = None) -> bool:
    """Every node sees every other and all hold one plan whose host announces ready."""
    nodes = mesh.nodes
    plans = {(n.plan.host_id, n.plan.state, n.plan.participants) for n in nodes}
    host = nodes[0].plan.host_id
    return (len(plans) == 1 and host is not None and host != host_not
            and all(len(n.view().others) == len(nodes) - 1 for n in nodes)
            and all((p := n.view().get(host)) is not None and p.serving is Serving.READY
                    for n in nodes))



@pytest.mark.anyio
async def test_swim_mesh_agrees_and_replaces_a_killed_host(mesh_harness: Any) -> None:
    async with mesh_harness(swim=FAST) as mesh:
        nodes = [await mesh.add(24 if i == 5 else 8) for i in range(25)]
        await mesh.wait_for(lambda: agreed(mesh), 30, "one plan on 25 nodes")
        host = nodes[5]
        assert nodes[0].plan.host_id == host.id
        assert host.id in mesh.hub.members
        await mesh.kill(host)
        assert all(n.view().get(host.id) is not None for n in mesh.nodes)  # nobody was told
        await mesh.wait_for(lambda: agreed(mesh, host_not=host.id), 30,
                            "every survivor dropped the host and agreed on a new one")
        assert host.id not in mesh.hub.members  # gone from the hub once all detected it
        status = mesh.nodes[0].transport.status()
        assert status["members"]["dead"] == 1 and status["members"]["alive"] == 24


@pytest.mark.anyio
async def test_swim_mesh_drops_a_killed_worker_of_a_split(mesh_harness: Any) -> None:
    async with mesh_harness(swim=FAST) as mesh:
        nodes = [await mesh.add(v, model_gb=20) for v in (16, 8, 6, 4, 4, 4, 4, 4, 4, 4)]
        await mesh.wait_for(lambda: agreed(mesh), 30, "one split plan")
        plan = nodes[0].plan
        assert plan.state is PlanState.SPLIT
        worker = next(n for n in nodes if n.id in {p.peer_id for p in plan.participants}
                      and n.id != plan.host_id)
        await mesh.kill(worker)
        await mesh.wait_for(lambda: agreed(mesh) and all(
            worker.id not in {p.peer_id for p in n.plan.participants} for n in mesh.nodes),
            30, "a plan without the killed worker")
        assert all(n.view().get(worker.id) is None for n in mesh.nodes)


@pytest.mark.anyio
async def test_swim_mesh_clean_leave_and_join_travel_by_gossip(mesh_harness: Any) -> None:
    async with mesh_harness(swim=FAST) as mesh:
        nodes = [await mesh.add(8) for _ in range(12)]
        await mesh.wait_for(lambda: agreed(mesh), 30, "one plan")
        leaver = nodes[3]
        await mesh.remove(leaver)  # says goodbye: a DEAD about itself, gossiped
        await mesh.wait_for(lambda: all(n.view().get(leaver.id) is None for n in mesh.nodes),
                            10, "everyone dropped the leaver")
        big = await mesh.add(32, node_id="big")  # (the next default id is taken)
        await mesh.wait_for(lambda: agreed(mesh) and nodes[0].plan.host_id == big.id, 30,
                            "the joiner is known to all and hosts")
        # nobody got the announcements by a direct call: every one of them left as gossip
        sent = {i: t.kinds_out for i, t in mesh.hub.traffic.items()}
        assert all(k["ping"] > 0 for i, k in sent.items() if i != big.id)
        assert sum(k["sync"] for k in sent.values()) == 12  # one full state per join


@pytest.mark.anyio
async def test_swim_mesh_survives_message_loss(mesh_harness: Any) -> None:
    async with mesh_harness(swim=FAST, loss=0.05) as mesh:
        nodes = [await mesh.add(16 if i == 0 else 8) for i in range(12)]
        await mesh.wait_for(lambda: agreed(mesh), 30, "one plan despite 5 % loss")
        victim = nodes[4]
        await mesh.kill(victim)
        await mesh.wait_for(lambda: agreed(mesh) and all(
            n.view().get(victim.id) is None for n in mesh.nodes), 30, "the kill detected")
        assert len(mesh.nodes[0].view().peers) == 11


@pytest.mark.anyio
async def test_default_mode_is_instant_and_never_detects_a_kill(mesh_harness: Any) -> None:
    async with mesh_harness() as mesh:
        nodes = [await mesh.add(8) for _ in range(3)]
        assert all(len(n.view().peers) == 3 for n in nodes)  # at once, without gossip
        assert nodes[0].transport.status() == {} and mesh.hub.traffic == {}
        await mesh.kill(nodes[2])
        assert all(n.view().get(nodes[2].id) is not None for n in nodes[:2])
