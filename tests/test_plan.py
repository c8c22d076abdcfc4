"""The Plan model and the tensor-split math."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from meshcore.plan import WAITING_FOR_PEERS, Participant, Plan, PlanState, shares


@given(st.lists(st.integers(0, 2**45), min_size=1, max_size=300))
def test_shares_sum_to_one_in_hundredths(vrams: list[int]) -> None:
    out = shares(vrams)
    assert len(out) == len(vrams)
    hundredths = [round(s * 100) for s in out]
    assert all(abs(s * 100 - h) < 1e-9 for s, h in zip(out, hundredths, strict=True))
    assert sum(hundredths) == 100
    assert all(0 <= s <= 1 for s in out)


@given(st.lists(st.integers(1, 2**45), min_size=1, max_size=30))
def test_shares_follow_vram(vrams: list[int]) -> None:
    out = shares(vrams)
    total = sum(vrams)
    for v, s in zip(vrams, out, strict=True):
        assert abs(s - v / total) < 0.01 + 1e-9, "a share is off by more than one hundredth"
    for i in range(len(vrams)):
        for j in range(len(vrams)):
            if vrams[i] > vrams[j]:
                assert out[i] >= out[j], "more VRAM never gets fewer layers"


@given(st.lists(st.integers(0, 2**45), max_size=20))
def test_shares_is_deterministic(vrams: list[int]) -> None:
    assert shares(vrams) == shares(list(vrams))


def test_shares_examples() -> None:
    assert shares([]) == []
    assert shares([5]) == [1.0]
    assert shares([24, 12]) == [0.67, 0.33]
    assert shares([1, 1, 1]) == [0.34, 0.33, 0.33]
    assert shares([0, 0]) == [0.5, 0.5]
    assert shares([8] * 6) == [0.17, 0.17, 0.17, 0.17, 0.16, 0.16]


def test_plan_views() -> None:
    plan = Plan(PlanState.SPLIT, host_id="h", model="m", participants=(
        Participant("h", 8, 0.67, False), Participant("w", 4, 0.33, True)))
    assert plan.tensor_split == (0.67, 0.33)
    assert [p.peer_id for p in plan.workers] == ["w"]
    assert plan.includes("w") and not plan.includes("x")
    data = plan.to_dict()
    assert data["state"] == "SPLIT" and data["tensor_split"] == [0.67, 0.33]
    assert data["participants"][1] == {"peer_id": "w", "vram": 4, "share": 0.33, "rpc": True}
    assert WAITING_FOR_PEERS.state is PlanState.WAITING and WAITING_FOR_PEERS.reason
