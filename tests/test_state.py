"""The mesh data model: Peer records from gossip, MeshState changes, MeshView snapshots."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcore.state import MeshState, MeshView, Peer, Role, Serving

pytestmark = pytest.mark.anyio

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                           max_leaves=8)
field_names = st.sampled_from(["id", "role", "vram", "model", "model_bytes", "draft", "serving",
                               "addresses", "version", "rtt_ms", "split", "seq", "extra",
                               "unknown"])
records = st.dictionaries(field_names, json_values, max_size=10)


@settings(max_examples=400, deadline=None)
@given(records | json_values)
def test_from_dict_raises_only_value_error(data: Any) -> None:
    try:
        peer = Peer.from_dict(data)
    except ValueError:
        return
    # whatever got in is well-typed and survives a round trip
    assert isinstance(peer.id, str) and peer.id
    assert isinstance(peer.role, Role) and isinstance(peer.serving, Serving)
    assert all(isinstance(v, int) and v >= 0 for v in (peer.vram, peer.model_bytes, peer.seq))
    assert peer.model is None or isinstance(peer.model, str)
    assert isinstance(peer.split, bool)
    assert Peer.from_dict(peer.to_dict()) == peer


peers = st.builds(
    Peer, id=st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1,
                     max_size=8), role=st.sampled_from(Role),
    vram=st.integers(0, 2**50),
    model=st.none() | st.text(st.characters(categories=["L", "N", "P"]), max_size=8),
    model_bytes=st.integers(0, 2**40), serving=st.sampled_from(Serving),
    addresses=st.lists(st.text(max_size=8), max_size=3).map(tuple),
    version=st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=5),
    split=st.booleans(), seq=st.integers(0, 2**31),
    rtt_ms=st.none() | st.floats(0, 1e4), extra=st.dictionaries(st.text(max_size=4),
                                                                 st.integers(), max_size=2))


@settings(max_examples=200, deadline=None)
@given(peers)
def test_peer_round_trip(peer: Peer) -> None:
    assert Peer.from_dict(peer.to_dict()) == peer


@pytest.mark.parametrize(("record", "message"), [
    ({}, "needs an 'id' of 1-128 printable ASCII"),
    ({"id": ""}, "needs an 'id' of 1-128 printable ASCII"),
    ({"id": "\u00e9t\u00e9"}, "needs an 'id' of 1-128 printable ASCII"),
    ({"id": "a" * 129}, "needs an 'id' of 1-128 printable ASCII"),
    ({"id": "a", "vram": -1}, "vram must be an integer from 0 to 2\\*\\*62"),
    ({"id": "a", "vram": 1.5}, "vram must be an integer from 0"),
    ({"id": "a", "vram": 10**30}, "vram must be an integer from 0"),
    ({"id": "a", "seq": True}, "seq must be an integer from 0"),
    ({"id": "a", "role": "KING"}, "KING"),
    ({"id": "a", "role": ["HOST"]}, "not a valid Role"),
    ({"id": "a", "addresses": "10.0.0.1"}, "addresses must be a list of strings"),
    ({"id": "a", "extra": [1]}, "extra must be an object"),
    ({"id": "a", "model": 5}, "model must be a printable string or null"),
    ({"id": "a", "model": "x\n; rm -rf /"}, "model must be a printable string or null"),
    ({"id": "a", "split": "yes"}, "split must be a boolean"),
    ({"id": "a", "rtt_ms": float("nan")}, "rtt_ms"),
])
def test_bad_records_name_the_field(record: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Peer.from_dict(record)


def test_from_dict_ignores_unknown_keys() -> None:
    peer = Peer.from_dict({"id": "a", "vram": 5, "future_field": 1, "role": "HOST"})
    assert peer == Peer("a", role=Role.HOST, vram=5)


def test_state_upsert_remove_and_generation() -> None:
    state = MeshState(Peer("me", vram=1))
    gen = state.generation
    assert state.upsert(Peer("b", seq=2, vram=8))
    assert not state.upsert(Peer("b", seq=1, vram=4)), "stale announcement replaced a newer one"
    assert not state.upsert(Peer("b", seq=2, vram=8)), "identical announcement bumped"
    assert not state.upsert(Peer("me", vram=99)), "a peer overwrote our own record"
    assert state.generation == gen + 1
    state.set_rtt("b", 3.14159)
    assert state.generation == gen + 1, "RTT noise must not trigger re-elections"
    assert state.upsert(Peer("b", seq=3, vram=8))
    assert state.view().get("b") == Peer("b", seq=3, vram=8, rtt_ms=3.142)
    assert state.remove("b") and not state.remove("b") and not state.remove("me")
    assert [p.id for p in state.view().peers] == ["me"]


def test_update_me_bumps_seq() -> None:
    state = MeshState(Peer("me"))
    new = state.update_me(vram=7)
    assert (new.seq, new.vram, state.me) == (1, 7, new)


def test_view_is_an_immutable_sorted_snapshot() -> None:
    state = MeshState(Peer("m", vram=2))
    state.upsert(Peer("z", vram=3))
    state.upsert(Peer("a", vram=5, role=Role.CLIENT))
    view = state.view()
    state.remove("z")
    assert [p.id for p in view.peers] == ["a", "m", "z"]
    assert view.me.id == "m" and [p.id for p in view.others] == ["a", "z"]
    assert view.total_vram == 5, "clients' VRAM is never counted"
    assert isinstance(view, MeshView) and view.get("nope") is None


async def test_changed_wakes_waiters() -> None:
    state = MeshState(Peer("me"))
    gen = state.generation
    woke: list[int] = []

    async def waiter() -> None:
        woke.append(await state.changed(gen))

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.sleep(0.01)
        assert woke == []
        state.upsert(Peer("x"))
    assert woke == [gen + 1]
