"""Seeding ahead of the plan (worker.py): while the election settles, a node that the plan being
formed makes a worker seeds its layers; the plan's own pass then hashes nothing again, and
never runs beside it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import anyio.to_process
import pytest
from meshcore_backend_llamacpp import hashcache
from meshcore_backend_llamacpp.machine import Machine
from meshcore_backend_llamacpp.worker import RpcWorker
from test_hashcache import layered_model

from meshcore.components import ModelInfo
from meshcore.plan import Participant, Plan, PlanState
from meshcore.state import MeshState, Peer

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def split(model: str = "m") -> Plan:
    """Host ``h`` (a GPU) and worker ``w``, half the layers each."""
    return Plan(PlanState.SPLIT, host_id="h", model=model,
                participants=(Participant("w", 1 << 30, 0.5, rpc=True),
                              Participant("h", 1 << 30, 0.5, rpc=False)))


class Hashes:
    """Runs the worker's process calls in a thread, counting the tensors hashed; ``gate``,
    when given, holds every call until it is set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, gate: anyio.Event | None = None) -> None:
        self.count, self.gate, self.calls = 0, gate, 0
        real = hashcache.fnv1a_64

        def counting(data: bytes) -> int:
            self.count += 1
            return int(real(data))

        async def in_thread(func: Callable[[], Any], *, cancellable: bool = False) -> Any:
            self.calls += 1
            if self.gate is not None:
                await self.gate.wait()
            return await anyio.to_thread.run_sync(func)

        monkeypatch.setattr(hashcache, "fnv1a_64", counting)
        monkeypatch.setattr(anyio.to_process, "run_sync", in_thread)


async def worker_for(tmp_path: Path, tg: Any) -> tuple[RpcWorker, Path]:
    path, _ = layered_model(tmp_path, tied=False)  # 3 blocks and an output layer
    state = MeshState(Peer(id="w"))
    state.upsert(Peer(id="h", seq=1, extra={"device": "cuda"}))
    node = SimpleNamespace(id="w", state=state, task_group=tg,
                           model=ModelInfo(name="m", path=path, size=path.stat().st_size))
    machine = Machine(tmp_path / "state", threads=1, n_layer=3)
    return RpcWorker(node, machine, lambda: None), machine.hash_dir


async def test_a_worker_to_be_seeds_its_layers_and_the_plan_hashes_none_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hashes = Hashes(monkeypatch)
    async with anyio.create_task_group() as tg:
        worker, cache = await worker_for(tmp_path, tg)
        assert worker.seed_ahead(split())
        assert not worker.seed_ahead(split())  # one pass at a time
        assert worker.ahead is not None
        ahead = worker.ahead
        await ahead.done.wait()
        names = hashcache.tensors_of_layers(worker.node.model.path, ahead.layers, 3)
        assert names and hashes.count == len(names)
        assert ahead.written > 0
        assert not worker.seed_ahead(split())  # the same layers again: nothing to do
        hashes.count = 0
        known = await worker._seed(split(), cache)  # what serve() runs for the plan
        assert hashes.count == 0, "the plan's pass hashed again what was seeded ahead"
        assert known is not None and set(known) == set(names)
        assert worker.seeded_bytes == ahead.written
        for entry in known.values():
            assert (cache / entry).is_file()


async def test_the_plans_pass_waits_for_the_pass_ahead(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = anyio.Event()
    hashes = Hashes(monkeypatch, gate)
    pruned: list[bool] = []
    real_prune = hashcache.prune_foreign

    def prune(cache: Path) -> list[str]:
        pruned.append(True)
        return list(real_prune(cache))

    monkeypatch.setattr(hashcache, "prune_foreign", prune)
    async with anyio.create_task_group() as tg:
        worker, cache = await worker_for(tmp_path, tg)
        assert worker.seed_ahead(split())
        seeded: list[object] = []

        async def plan_pass() -> None:
            seeded.append(await worker._seed(split(), cache))

        tg.start_soon(plan_pass)
        await anyio.sleep(0.2)
        assert not pruned and not seeded  # still behind the pass ahead: one writer at a time
        assert worker.seeding == "ahead of the plan"  # what the status shows meanwhile
        gate.set()
        with anyio.fail_after(10):
            while not seeded:
                await anyio.sleep(0.01)
        assert pruned and hashes.calls == 2
        assert worker.seeding is None


@pytest.mark.parametrize("case", ["serving", "host", "other model", "no device"])
async def test_no_pass_ahead_where_the_plan_would_not_use_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    Hashes(monkeypatch)
    async with anyio.create_task_group() as tg:
        worker, _ = await worker_for(tmp_path, tg)
        plan = split()
        if case == "serving":  # serve() runs: its own passes write the cache
            worker.serving = True
        elif case == "host":
            plan = Plan(PlanState.SPLIT, host_id="w", model="m", participants=(
                Participant("h", 1 << 30, 0.5, rpc=True),
                Participant("w", 1 << 30, 0.5, rpc=False)))
        elif case == "other model":
            plan = split("another")
        else:  # the host announced no device: the layers cannot be predicted
            worker.node.state.upsert(Peer(id="h", seq=2))
        assert not worker.seed_ahead(plan)
        assert worker.ahead is None


async def test_a_failed_pass_ahead_costs_only_its_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
        ) -> None:
    """Whatever the pass ahead raises (a broken worker process, say) is logged; the node's
    task group goes on, and the plan's own pass seeds the layers."""
    hashes = Hashes(monkeypatch)
    calls = 0
    counted = anyio.to_process.run_sync

    async def broken_once(func: Callable[[], Any], *, cancellable: bool = False) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("the worker process broke")
        return await counted(func, cancellable=cancellable)

    monkeypatch.setattr(anyio.to_process, "run_sync", broken_once)
    async with anyio.create_task_group() as tg:
        worker, cache = await worker_for(tmp_path, tg)
        assert worker.seed_ahead(split()) and worker.ahead is not None
        await worker.ahead.done.wait()
        assert "seeding ahead of the plan failed" in caplog.text
        known = await worker._seed(split(), cache)
        assert known and hashes.count == len(known)
        assert worker.seeded_bytes and worker.seeded_bytes > 0


async def test_the_rest_waits_for_the_host_to_hold_this_workers_layers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The background pass (the rest of the model) starts once the host announces that its
    llama-server holds our layers (``rpc_loaded``), or after LOADED_WAIT_S without it."""
    from meshcore_backend_llamacpp import worker as worker_module
    from meshcore_backend_llamacpp.host import LOADED

    async with anyio.create_task_group() as tg:
        worker, _ = await worker_for(tmp_path, tg)
        state = worker.node.state
        said: list[bool] = []

        async def wait() -> None:
            said.append(await worker.host_loaded("h"))

        tg.start_soon(wait)
        await anyio.sleep(0.1)
        state.upsert(Peer(id="h", seq=2, extra={"device": "cuda", LOADED.key: ["other"]}))
        await anyio.sleep(0.1)
        assert not said  # another worker's layers, not ours
        state.upsert(Peer(id="h", seq=3, extra={"device": "cuda", LOADED.key: ["other", "w"]}))
        with anyio.fail_after(5):
            while not said:
                await anyio.sleep(0.01)
        assert said == [True]
        monkeypatch.setattr(worker_module, "LOADED_WAIT_S", 0.2)  # a host that never says so
        with anyio.fail_after(5):
            assert await worker.host_loaded("gone") is False


async def test_a_pass_runs_in_the_hashing_process_warmed_before_it(tmp_path: Path) -> None:
    """``warm`` starts the hashing process (with its imports) as the node joins; a pass that
    comes while it is still starting waits for it instead of starting a second one."""
    import os

    async with anyio.create_task_group() as tg:
        worker, _ = await worker_for(tmp_path, tg)
        tg.start_soon(worker.warm)
        await anyio.sleep(0)  # warm() is under way, its process not up yet
        assert worker.hashing_pid is None
        with anyio.fail_after(60):
            pid = await worker._in_process(os.getpid)
        assert worker.hashing_pid is not None and pid == worker.hashing_pid != os.getpid()
        await worker.warm()  # once only
        assert await worker._in_process(os.getpid) == pid


async def test_the_rest_failing_in_its_process_leaves_the_rpc_server_serving(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The background pass's process dying (a SIGBUS from a model file cut short under its
    mapping, an OOM kill) is logged; ``_seed_rest`` keeps waiting, as serve() needs it to,
    instead of raising and taking the rpc-server down."""
    from anyio import BrokenWorkerProcess

    async def broken(call: Callable[[], Any]) -> Any:
        raise BrokenWorkerProcess

    async with anyio.create_task_group() as tg:
        worker, cache = await worker_for(tmp_path, tg)
        monkeypatch.setattr(worker, "_in_process", broken)
        monkeypatch.setattr(worker, "host_loaded", lambda host_id: anyio.sleep(0))
        with anyio.move_on_after(0.5) as waited:
            await worker._seed_rest(cache, {}, "h")
        assert waited.cancelled_caught  # still waiting: it did not raise
        assert "seeding the rest of the rpc cache failed" in caplog.text
        assert worker.seeding is None
