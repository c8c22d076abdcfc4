"""The vram election inside running meshes (harness): the --split hint and the debounce."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import anyio
import pytest
from meshcore_election_vram import SOLO_HINT

from meshcore.plan import PlanState

pytestmark = pytest.mark.anyio


def hints(caplog: pytest.LogCaptureFixture) -> Counter[str]:
    return Counter(getattr(r, "node_id", "?") for r in caplog.records
                   if r.name == "meshcore.election.vram" and r.getMessage() == SOLO_HINT)


async def test_workers_log_split_hint_once(mesh_harness: Any,
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="meshcore.election.vram")
    async with mesh_harness() as mesh:
        a = await mesh.add(8)
        b = await mesh.add(4)
        c = await mesh.add(2, client=True)
        await mesh.wait_for(lambda: all(n.plan.host_id == a.id for n in (a, b, c)),
                            what="everyone elects a")
        assert a.plan.state is PlanState.SOLO
        await mesh.wait_for(lambda: hints(caplog)[b.id] == 1, what="b's hint")
        assert hints(caplog) == {b.id: 1}  # not the host, not the client

        # a bigger node takes over: a is now an idle worker and hears the hint once; b, who
        # has already heard it, stays quiet through the new plan
        d = await mesh.add(16)
        await mesh.wait_for(lambda: all(n.plan.host_id == d.id for n in mesh.nodes),
                            what="everyone elects d")
        await mesh.wait_for(lambda: hints(caplog)[a.id] == 1, what="a's hint")
        await anyio.sleep(0.3)
        assert hints(caplog) == {a.id: 1, b.id: 1}


async def test_no_hint_in_a_split(mesh_harness: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="meshcore.election.vram")
    async with mesh_harness() as mesh:
        a = await mesh.add(8, split=True)
        b = await mesh.add(4)
        await mesh.wait_for(lambda: b.plan.state is PlanState.SPLIT and a.plan == b.plan,
                            what="a split plan on both")
        assert [p.peer_id for p in a.plan.participants] == [b.id, a.id]
        assert a.plan.tensor_split == (0.33, 0.67)
        await anyio.sleep(0.3)
        assert hints(caplog) == {}


async def test_burst_of_joins_gives_one_plan_change(mesh_harness: Any) -> None:
    async with mesh_harness(settle_s=1.0) as mesh:
        host = await mesh.add(8, split=True)
        await mesh.wait_for(lambda: len(host.backend.applied) == 1, what="the first plan")
        assert host.plan.state is PlanState.SOLO  # --split, but nobody to split with yet

        for vram in (4, 4, 2):  # three joins 0.2 s apart: each within the settle time
            await mesh.add(vram)
            await anyio.sleep(0.2)
        await mesh.wait_for(lambda: len(host.plan.participants) == 4, what="a 4-node split")
        await anyio.sleep(2.5)  # more than two settle periods: any late re-plan shows up
        applied = host.backend.applied
        assert [p.state for p in applied] == [PlanState.SOLO, PlanState.SPLIT], applied
        assert applied[-1] == host.plan
        for node in mesh.nodes:
            assert node.plan == host.plan
