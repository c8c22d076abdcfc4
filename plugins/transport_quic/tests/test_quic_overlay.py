"""Members without connections (overlay.py, records.py): signed records by gossip, a few links."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import anyio
import pytest
from meshcore_transport_quic import membership
from meshcore_transport_quic import overlay as overlay_module
from meshcore_transport_quic.frames import Kind
from meshcore_transport_quic.identity import load_identity
from meshcore_transport_quic.links import parse_address
from meshcore_transport_quic.overlay import Overlay
from meshcore_transport_quic.records import RecordError, open_record, peek, seal_record
from meshcore_transport_quic.state import send
from quic_helpers import QuicMesh, echo_server, wait_for

from meshcore.plan import Plan, PlanState
from meshcore.state import MeshState, Peer

pytestmark = pytest.mark.anyio

SIZE = 7
PARTNERS = 2


def ids(node: Any) -> set[str]:
    return {p.id for p in node.view().peers}


def linked(node: Any) -> set[str]:
    return set(node.transport.links)


async def overlay_mesh(quic_mesh: QuicMesh, size: int = SIZE) -> list[Any]:
    nodes = [await quic_mesh.add(quic_partners=PARTNERS) for _ in range(size)]
    everyone = {n.id for n in nodes}
    await wait_for(lambda: all(ids(n) == everyone for n in nodes), 20, "every member in view")
    return nodes


async def test_members_are_known_without_a_full_mesh_and_all_link_the_host(
        quic_mesh: QuicMesh) -> None:
    nodes = await overlay_mesh(quic_mesh)
    full = SIZE * (SIZE - 1)
    links = sum(len(linked(n)) for n in nodes)
    assert links < full, f"{links} link ends: a full mesh ({full}), not an overlay"
    assert any(len(linked(n)) < SIZE - 1 for n in nodes if n.id != n.plan.host_id)
    await wait_for(lambda: len({n.plan.host_id for n in nodes}) == 1
                   and nodes[0].plan.host_id is not None, 20, "one plan")
    host = nodes[0].plan.host_id
    await wait_for(lambda: all(host in linked(n) for n in nodes if n.id != host), 20,
                   "every node linked to the host (data flows there)")
    # a change of a member's record reaches the nodes that hold no connection to it
    target = min((n for n in nodes if n.id != host),
                 key=lambda t: sum(t.id in linked(n) for n in nodes))
    far = [n for n in nodes if n is not target and target.id not in linked(n)]
    assert far, f"every node linked every node: {[sorted(linked(n)) for n in nodes]}"
    target.state.update_me(extra={**target.state.me.extra, "marker": 7})
    await wait_for(lambda: all((n.view().get(target.id) or Peer("?")).extra.get("marker") == 7
                               for n in far), 10, "the change passed on by gossip")
    status = target.transport.status()
    assert status["members"] == SIZE - 1 and status["links"] == len(linked(target))


async def test_a_tunnel_to_an_unlinked_member_dials_it(quic_mesh: QuicMesh) -> None:
    nodes = await overlay_mesh(quic_mesh)
    pair = next(((a, b) for a in nodes for b in nodes
                 if a is not b and b.id not in linked(a) and a.id not in linked(b)), None)
    assert pair is not None, "every pair is linked: the overlay made a full mesh"
    a, b = pair
    b.services["echo"] = ("127.0.0.1", await quic_mesh.tg.start(echo_server))
    stream = await a.transport.connect(b.id, "echo")
    await stream.send(b"through a link made on demand")
    got = b""
    with anyio.fail_after(10):
        while len(got) < 29:
            got += await stream.receive()
    await stream.aclose()
    assert got == b"through a link made on demand"
    assert b.id in linked(a)


@pytest.mark.parametrize("frames", ["delivered", "lost"])
async def test_leaves_reach_members_without_a_link_to_the_leaver(
        quic_mesh: QuicMesh, monkeypatch: pytest.MonkeyPatch, frames: str) -> None:
    """A leaver's linked members tell the others (GONE, left); also when its LEAVE frames
    are lost and only its connections' LEAVING close code arrives. The digest repair (which
    would bring the news within ~10 s anyway) is off: the report itself must spread."""
    monkeypatch.setattr(overlay_module, "SYNC_EVERY_S", 3600.0)
    nodes = await overlay_mesh(quic_mesh)
    host = nodes[0].plan.host_id
    leaver = min((n for n in nodes if n.id != host),
                 key=lambda t: sum(t.id in linked(n) for n in nodes))
    far = [n for n in nodes if n is not leaver and leaver.id not in linked(n)]
    assert far, f"every node linked every node: {[sorted(linked(n)) for n in nodes]}"
    if frames == "lost":
        real_send = membership.send

        async def lose_leaves(link: Any, kind: Kind, body: Any) -> None:
            if kind is not Kind.LEAVE:
                await real_send(link, kind, body)

        monkeypatch.setattr(membership, "send", lose_leaves)
    leaver.stop()
    rest = [n for n in nodes if n is not leaver]
    await wait_for(lambda: all(leaver.id not in ids(n) for n in rest), 10,
                   "the leaver removed by every node, linked or not")


# ---------------------------------------------------------------- records and reports, unit


def peer(node_id: str, seq: int) -> Peer:
    return Peer(id=node_id, vram=8, model="m", seq=seq, addresses=("127.0.0.1:4000",))


def test_records_are_checked_against_their_signature_and_binding(tmp_path: Path) -> None:
    ident = load_identity(tmp_path / "a", "a")
    other = load_identity(tmp_path / "b", "b")
    record = seal_record(ident, "boot1", 1000, peer("a", 3))
    opened = open_record(dict(record.env), {})
    assert (opened.id, opened.version, opened.boot, opened.fp) == ("a", (1000, 3), "boot1",
                                                                   ident.fingerprint)
    assert peek(dict(record.env)) == ("a", "boot1", (1000, 3))
    forged = dict(record.env, r=record.env["r"].replace('"vram":8', '"vram":9000'))
    with pytest.raises(RecordError, match="not signed"):
        open_record(forged, {})
    with pytest.raises(RecordError, match="not signed"):
        open_record(dict(record.env, b="boot2"), {})  # the boot is signed too
    with pytest.raises(RecordError, match="not signed"):
        open_record(dict(record.env, t=5000), {})  # and its time (what orders boots)
    with pytest.raises(RecordError, match="another certificate"):
        open_record(dict(record.env), {"a": other.fingerprint})
    stolen = seal_record(other, "boot1", 1000, peer("a", 4))  # b signs a record naming a
    with pytest.raises(RecordError, match="another certificate"):
        open_record(dict(stolen.env), {"a": ident.fingerprint})
    for bad in (None, [], {"r": 5, "b": "x", "t": 1}, {"r": "{", "b": "x", "t": 1},
                {"r": "[]", "b": "x", "t": 1}, {"r": record.env["r"], "b": "", "t": 1},
                dict(record.env, t=-1), dict(record.env, t=True), dict(record.env, t="1"),
                dict(record.env, c="%%%"), dict(record.env, s="zz"),
                {"r": "x" * 70_000, "b": "x", "t": 1}):
        with pytest.raises(RecordError):
            open_record(bad, {})


def test_parse_address() -> None:
    assert parse_address("10.0.0.1:7") == ("10.0.0.1", 7)
    assert parse_address("[::1]:9") == ("::1", 9)
    for bad in ("10.0.0.1", "host:7", "10.0.0.1:0", "10.0.0.1:x", "1.2.3.4:70000"):
        assert parse_address(bad) is None


def unit_overlay(tmp_path: Path, links: dict[str, Any], node_id: str = "me"
                 ) -> tuple[Overlay, MeshState, list[tuple[str, Any]]]:
    state = MeshState(Peer(id=node_id, vram=1))
    spawned: list[tuple[str, Any]] = []
    node = SimpleNamespace(id=node_id, state=state, plan=SimpleNamespace(host_id=None))
    mesh = SimpleNamespace(node=node, links=links, lost={}, dialing=set(), bindings={},
                           boot="myboot", identity=load_identity(tmp_path / "me", "me"),
                           spawn=lambda proto, what, func, *args: spawned.append((what, args)))
    mesh.ident = mesh.identity
    checked: list[str] = []
    overlay = Overlay(cast(Any, mesh), dial_addrs=cast(Any, None),
                      check=lambda peer_id, by: checked.append(peer_id),
                      apply=lambda p, current: state.upsert(p) if current() else None)
    spawned.append(("checked", checked))
    return overlay, state, spawned


def test_gone_reports_remove_unlinked_members_keep_a_tombstone_and_are_refuted(
        tmp_path: Path) -> None:
    via = SimpleNamespace(id="v")
    overlay, state, spawned = unit_overlay(tmp_path, {"v": via, "linked": object()})
    ident = load_identity(tmp_path / "x", "x")
    overlay.on_record(cast(Any, via), dict(seal_record(ident, "bx", 9, peer("x", 5)).env))
    assert state.view().get("x") is not None
    assert list(overlay.pending) == ["x"]  # to be passed on at the next tick
    overlay.on_gone(cast(Any, via), {"id": "x", "boot": "bx", "seq": 5})
    assert state.view().get("x") is None, "an unlinked member reported gone is removed"
    overlay.on_gone(cast(Any, via), {"id": "x", "boot": "bx", "seq": 5})  # passed on once
    assert [w for w, _ in spawned].count("telling the mesh a peer is gone") == 1
    overlay.on_record(cast(Any, via), dict(seal_record(ident, "bx", 9, peer("x", 5)).env))
    assert state.view().get("x") is None, "the tombstone keeps the old record out"
    overlay.on_record(cast(Any, via), dict(seal_record(ident, "bx", 9, peer("x", 6)).env))
    assert state.view().get("x") is not None, "a newer record (a refutation) brings it back"
    # a linked member is checked by this node, not removed on hearsay
    overlay.on_gone(cast(Any, via), {"id": "linked", "boot": "bl", "seq": 1})
    assert spawned[0][1] == ["linked"]
    # a report about this node: it announces again with a higher seq
    seq = state.me.seq
    overlay.on_gone(cast(Any, via), {"id": "me", "boot": "myboot", "seq": seq})
    assert state.me.seq == seq + 1
    for bad in ({"id": 5}, {"id": "x", "seq": True}, {"id": "x", "boot": 3}, {"id": "v"}):
        overlay.on_gone(cast(Any, via), bad)  # ignored, nothing raised


def test_a_record_of_a_restarted_member_replaces_the_old_boot(tmp_path: Path) -> None:
    via = SimpleNamespace(id="v")
    overlay, state, _ = unit_overlay(tmp_path, {"v": via})
    ident = load_identity(tmp_path / "x", "x")
    old = dict(seal_record(ident, "old", 1000, peer("x", 40)).env)
    overlay.on_record(cast(Any, via), old)
    overlay.on_record(cast(Any, via), dict(seal_record(ident, "new", 2000, peer("x", 1)).env))
    got = state.view().get("x")
    assert got is not None and got.seq == 1
    overlay.on_record(cast(Any, via), old)  # the old boot's record, late: not taken back
    assert (state.view().get("x") or peer("x", 0)).seq == 1
    restated = dataclasses.replace(peer("x", 1), vram=99)
    overlay.on_record(cast(Any, via), dict(seal_record(ident, "new", 2000, restated).env))
    assert (state.view().get("x") or peer("x", 0)).vram == 8, "same seq: not newer, ignored"


def test_summaries_repair_what_either_side_lacks(tmp_path: Path) -> None:
    via = SimpleNamespace(id="v")
    ours, _, our_spawns = unit_overlay(tmp_path / "ours", {"v": via})
    theirs, _, their_spawns = unit_overlay(tmp_path / "theirs", {"v": via}, "them")
    x = load_identity(tmp_path / "x", "x")
    y = load_identity(tmp_path / "y", "y")
    ours.on_record(cast(Any, via), dict(seal_record(x, "bx", 1, peer("x", 5)).env))
    theirs.on_record(cast(Any, via), dict(seal_record(x, "bx", 1, peer("x", 3)).env))
    theirs.on_record(cast(Any, via), dict(seal_record(y, "by", 1, peer("y", 2)).env))
    assert ours.digest() != theirs.digest()
    their_summary = {"have": theirs.summary(), "reply": True}
    ours.on_summary(cast(Any, via), their_summary)
    sent = {what: args for what, args in our_spawns[1:]}
    newer = [json.loads(env["r"])["id"] for env in sent["sending records"][1]]
    assert sorted(newer) == ["me", "x"], "ours sends x (newer) and its own record, not y"
    assert "sending a summary" in sent, "ours lacks y: it answers with its own summary"
    their_spawns.clear()
    ours_summary = {"have": ours.summary(), "reply": False}
    theirs.on_summary(cast(Any, via), ours_summary)
    sent = {what: args for what, args in their_spawns}
    assert [json.loads(e["r"])["id"] for e in sent["sending records"][1]] == ["them", "y"]
    assert "sending a summary" not in sent, "no reply to a reply"
    theirs.on_summary(cast(Any, via), {"have": [1, 2]})  # malformed: ignored
    theirs.on_summary(cast(Any, via), {"have": {"x": "no", "z": [1, True]}})


async def test_hostile_records_are_rejected_and_the_node_keeps_running(
        quic_mesh: QuicMesh, caplog: pytest.LogCaptureFixture) -> None:
    a = await quic_mesh.add(quic_partners=PARTNERS)
    b = await quic_mesh.add(quic_partners=PARTNERS)
    await wait_for(lambda: ids(a) == ids(b) == {a.id, b.id}, 10, "two nodes")
    link = b.transport.links[a.id]
    forged = dict(b.transport.overlay.mine().env)
    forged["r"] = forged["r"].replace(b.id, "zz")
    with caplog.at_level(logging.WARNING):
        for body in ({"env": forged}, {"env": "x"}, {"env": {"r": "{}", "b": "q"}}):
            await send(link, Kind.RECORD, body)
        await send(link, Kind.RECORDS, {"envs": 3})
        await send(link, Kind.GONE, {"id": "nobody", "boot": "b", "seq": 1})
        await wait_for(lambda: caplog.text.count("rejected a record") >= 3, 10, "rejections")
    assert ids(a) == {a.id, b.id} and a.transport.links.get(b.id) is not None


def test_a_record_never_binds_an_id_and_another_certificate_cannot_replace_it(
        tmp_path: Path) -> None:
    via = SimpleNamespace(id="v")
    overlay, state, _ = unit_overlay(tmp_path, {"v": via})
    real = load_identity(tmp_path / "x", "x")
    impostor = load_identity(tmp_path / "i", "i")
    overlay.on_record(cast(Any, via), dict(seal_record(real, "bx", 1, peer("x", 5)).env))
    assert overlay.mesh.bindings == {}, "only a handshake binds an id to a certificate"
    grab = dataclasses.replace(peer("x", 9), vram=10**12)
    overlay.on_record(cast(Any, via), dict(seal_record(impostor, "bx", 1, grab).env))
    got = state.view().get("x")
    assert got is not None and got.seq == 5 and got.vram == 8, "the impostor's record won"
    overlay.mesh.bindings["x"] = impostor.fingerprint  # unless a handshake proved it
    overlay.on_record(cast(Any, via), dict(seal_record(impostor, "bx", 1, grab).env))
    assert (state.view().get("x") or peer("x", 0)).seq == 9


async def test_a_lost_peer_is_reported_gone_only_if_no_other_link_hears_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SWIM's indirect probe: a node that lost a peer asks other links before telling the
    mesh; a link that heard from it lately says so and the report is not sent."""
    now_rx = SimpleNamespace(last_rx=0.0)
    sent: list[tuple[str, Kind, dict[str, Any]]] = []

    links = {n: SimpleNamespace(id=n) for n in ("a", "b", "c", "d")}  # send() is faked
    overlay, _, spawned = unit_overlay(tmp_path, links)

    async def fake_send(link: Any, kind: Kind, body: dict[str, Any]) -> None:
        sent.append((link.id, kind, body))

    monkeypatch.setattr("meshcore_transport_quic.overlay.send", fake_send)
    async with anyio.create_task_group() as tg:
        async def answer() -> None:
            await wait_for(lambda: len(sent) == 3, 5, "three links asked")
            assert {k for _, k, _ in sent} == {Kind.PROBE}
            assert "x" not in {i for i, _, _ in sent}
            overlay.on_probed(cast(Any, links["a"]), {"id": "x", "alive": True})
        tg.start_soon(answer)
        assert await overlay.heard_by_others("x") is True
    sent.clear()
    overlay.mesh.links = {k: v for k, v in links.items() if k != "d"}
    assert await overlay.heard_by_others("x") is False  # nobody answered within 2 s
    # answering: a link heard from lately is "alive", a silent or absent one is not
    linked = SimpleNamespace(id="x", proto=now_rx)
    overlay.mesh.links["x"] = linked
    overlay.on_probe(cast(Any, links["a"]), {"id": "x"})
    overlay.on_probe(cast(Any, links["a"]), {"id": "nobody"})
    now_rx.last_rx = time.monotonic()
    overlay.on_probe(cast(Any, links["a"]), {"id": "x"})
    overlay.on_probe(cast(Any, links["a"]), {"id": 5})  # malformed: ignored
    answers = [args[2] for what, args in spawned[1:] if what == "answering a probe"]
    assert answers == [{"id": "x", "alive": False}, {"id": "nobody", "alive": False},
                       {"id": "x", "alive": True}]


def test_the_links_data_needs_follow_the_plan_and_the_view(tmp_path: Path) -> None:
    """needed(): the host for a node that is not it; every node with VRAM for a host whose
    plan needs workers; none for a SOLO host. Kept between changes, asked again after one."""
    overlay, state, _ = unit_overlay(tmp_path, {})
    node = cast(Any, overlay.mesh).node
    assert overlay.needed() == frozenset()  # no plan yet
    node.plan = Plan(PlanState.SOLO, host_id="h")
    assert overlay.needed() == {"h"}
    state.upsert(peer("w", 1))
    state.upsert(dataclasses.replace(peer("c", 1), vram=0))  # nothing to give a split
    node.plan = Plan(PlanState.SPLIT, host_id="me")
    assert overlay.needed() == {"w"}
    state.upsert(peer("w2", 1))  # the view changed, the plan did not (yet)
    assert overlay.needed() == {"w", "w2"}
    node.plan = Plan(PlanState.SOLO, host_id="me")
    assert overlay.needed() == frozenset()
