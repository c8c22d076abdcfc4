"""The ``llamacpp`` Backend: a supervisor that runs what each plan wants of this node.

``apply`` only records what this node should run (want.py) and wakes ``run``, the supervisor
loop. It gives the plan to the host part (host.py: llama-server, with one ``--rpc`` entry per
remote worker when split), the worker part (worker.py: ggml-rpc-server) or, when idle, to the
hand-over (handover.py: a former llama-server that still answers while its successor loads).
A child that dies is restarted with backoff; an unchanged plan restarts nothing. Every child is
stopped on every exit path (see process.py).
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread

from meshcore.components import Capabilities, ModelInfo, NodeHandle
from meshcore.plan import Plan
from meshcore.state import MeshView, Serving
from meshcore_backend_llamacpp import binaries, commands, gguf_info, vram
from meshcore_backend_llamacpp.binaries import BackendError
from meshcore_backend_llamacpp.commands import Layout
from meshcore_backend_llamacpp.handover import HandOver, may_hand_over
from meshcore_backend_llamacpp.host import LlamaServerHost
from meshcore_backend_llamacpp.machine import Machine
from meshcore_backend_llamacpp.models import resolve, resolve_draft
from meshcore_backend_llamacpp.process import Child, ChildFailed
from meshcore_backend_llamacpp.want import Host, Idle, Want, want
from meshcore_backend_llamacpp.worker import RpcWorker

log = logging.getLogger("meshcore.llamacpp")

MAX_BACKOFF_S = 30.0
STABLE_S = 60.0  # a child that ran this long resets the backoff
FORESEE_S = 0.2  # after a change of the mesh, the rest of its burst before looking ahead


def child_status(c: Child | None, port: int | None = None) -> dict[str, Any] | None:
    """A running child process as ``status()`` shows it; None once it has exited (a stopped
    server's pid and argv would mislead; why it died is in ``error``)."""
    if c is None or not c.alive:
        return None
    return {"pid": c.pid, "argv": c.argv, "port": port, "log": str(c.log_path), "alive": True}


class LlamaCppBackend:
    """Options (``NodeConfig.options``): ``threads`` (or env MESH_LLM_THREADS),
    ``load_timeout_s`` (default 900), ``llama_args`` (extra llama-server arguments),
    ``handover`` (default True: see handover.py), ``seed_ahead`` (default True: see
    worker.py)."""

    capabilities = Capabilities(host=True, rpc_worker=True, uses_workers=True)

    def __init__(self, node: NodeHandle) -> None:
        self.node = node
        self.plan: Plan | None = None
        self.wanted: Want = Idle()
        self._wake = anyio.Event()
        self.machine = Machine(Path(node.config.state_dir),
                               commands.default_threads(node.config.options))
        self.handover = HandOver(node)
        self._early_standby = False  # apply announced ``standby`` (see _announce_standby)
        self.host = LlamaServerHost(node, self.machine, self.handover, self._recovered)
        self.worker = RpcWorker(node, self.machine, self._recovered)
        self.restarts = 0
        self.error: str | None = None

    # ------------------------------------------------------------------ Backend protocol

    def detect_vram(self) -> int:
        self.machine.capacity = vram.detect()
        return self.machine.capacity.bytes

    async def prepare(self) -> ModelInfo | None:
        cfg = self.node.config
        try:  # a bad MESH_LLM_OPTIONS value fails here, before anything is loaded
            commands.speculation(str(cfg.options.get("speculation", "auto")),
                                 has_draft=False, split=False)
        except ValueError as exc:
            raise BackendError(str(exc)) from None
        self.machine.bins = binaries.locate(cfg.bin_dir)
        await anyio.to_thread.run_sync(binaries.check_rpc, self.machine.bins)
        if cfg.model is None:
            return None
        model = await anyio.to_thread.run_sync(functools.partial(resolve, cfg.model))
        gguf_info.check_gguf(model.path)
        draft = resolve_draft(model, override=cfg.draft, disabled=cfg.no_draft)
        if draft is not None:
            gguf_info.check_gguf(draft.path)
        self.machine.n_layer = await anyio.to_thread.run_sync(gguf_info.block_count, model.path)
        return ModelInfo(name=model.name, path=model.path, size=model.size,
                         draft_name=draft.name if draft else None,
                         draft_path=draft.path if draft else None)

    async def apply(self, plan: Plan, view: MeshView) -> None:
        wanted = want(plan, self.node.id)
        self.plan = plan
        if wanted != self.wanted:
            self.wanted = wanted
            self._wake.set()
        self._announce_standby(plan)

    def api_base(self) -> str | None:
        host, standby = self.host, self.handover.standby
        if host.ready and host.server is not None and host.server.alive:
            return f"http://127.0.0.1:{host.port}"
        if standby is not None and standby.child.alive:
            return f"http://127.0.0.1:{standby.port}"
        return None

    def serves_current_plan(self) -> bool:
        """Host: its llama-server is ready, runs the current plan and answers alone (no
        handed-over server still serving in its place). What tools wait for after a plan
        change, since during a hand-over the node keeps announcing ``serving = ready``."""
        host = self.host
        return (host.ready and self.handover.standby is None and host.serving_plan is not None
                and host.serving_plan == self.plan)

    def status(self) -> dict[str, Any]:
        machine, host, worker = self.machine, self.host, self.worker
        standby, lay = self.handover.standby, host.lay
        return {
            "name": "llamacpp",
            "device": machine.capacity.kind,
            "binaries": machine.bins.to_dict() if machine.bins else None,
            "threads": machine.threads,
            "llama_server": child_status(host.server, host.port),
            "speculation": host.speculation if host.server else None,
            "standby": child_status(standby.child, standby.port) if standby else None,
            "serving_current_plan": self.serves_current_plan(),
            "handovers": self.handover.handovers,
            "rpc_server": child_status(worker.rpc, worker.rpc_port),
            "rpc": list(host.rpc_endpoints),
            "layout": lay.to_dict() if lay else None,
            "tensor_split": list(lay.tensor_split) if lay else [],
            "effective_shares": self._effective_shares(),
            "n_layer": machine.n_layer,
            "restarts": self.restarts,
            "error": self.error,
            "seeded_bytes": worker.seeded_bytes,
            "seeding": worker.seeding,
            "load_tunneled_bytes": host.load_tunneled_bytes,
            "log_dir": str(machine.log_dir),
        }

    def _effective_shares(self) -> dict[str, float]:
        """Fraction of layers each participant really holds (peer id -> share)."""
        lay, plan = self.host.lay, self.plan
        if lay is None or plan is None or plan.host_id is None:
            return {}
        shares = commands.effective_shares(lay, self.machine.n_layer)
        return dict(zip((plan.host_id, *lay.rpc_peers), shares, strict=True))

    # ------------------------------------------------------------------ supervision

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        # Workers predict their layers from the host's device kind (see worker.py).
        self.node.set_serving(self.node.state.me.serving, device=self.machine.capacity.kind)
        model = self.node.model
        if model is not None and model.path is not None \
                and self.node.config.options.get("seed_ahead", True):
            self.node.task_group.start_soon(self._foresee)
            if self.node.config.joins:  # it may be made a worker as soon as it has joined
                self.node.task_group.start_soon(self.worker.warm)
        backoff = 1.0
        try:
            while True:
                wake = self._wake = anyio.Event()
                began = time.monotonic()
                try:
                    await self._step(self.plan, self.wanted, wake)
                except Exception as exc:  # any failure: report, back off, re-apply the plan
                    backoff = await self._failed(exc, wake, began, backoff)
        finally:
            await self.handover.retire()
            self.node.withdraw_service("rpc")

    async def _foresee(self) -> None:
        """Seed ahead of the plan (worker.py): after each change of the mesh, the plan the
        election will make once it settles; one that makes this node a worker of our model
        starts the seeding of its layers now, not 1 s later."""
        node, gen = self.node, -1
        while True:
            gen = await node.state.changed(gen)
            await anyio.sleep(FORESEE_S)
            gen = node.state.generation
            if self.worker.serving:  # seed_ahead starts nothing then: no election to run
                continue
            try:
                plan = node.elect(node.view())
                if plan != node.plan and self.worker.seed_ahead(plan):
                    log.info("the mesh is settling on a split with this node as a worker: "
                             "seeding its layers ahead of the plan")
            except Exception:  # a look ahead must never stop the node
                log.exception("looking ahead of the election failed")

    async def _step(self, plan: Plan | None, wanted: Want, wake: anyio.Event) -> None:
        """Run what ``wanted`` asks until ``wake`` is set (or a part returns to start over)."""
        if plan is None or isinstance(wanted, Idle):
            await self._idle(plan, wake)
        elif isinstance(wanted, Host):
            await self.host.serve(plan, wake, self._hands_over)
        else:
            await self.handover.retire()
            await self.worker.serve(plan, wake)

    async def _idle(self, plan: Plan | None, wake: anyio.Event) -> None:
        """Run nothing: once the standby (if it answers for a new host) is done."""
        if plan is not None and self.handover.stands_by(plan):
            await self.handover.serve_as_standby(plan, wake)
            if isinstance(self.wanted, Idle) and self.plan is not None \
                    and self.handover.stands_by(self.plan):
                return  # another plan change, still the same new host
        await self.handover.retire()
        self.node.set_serving(Serving.IDLE, standby=None)
        await wake.wait()

    async def _failed(self, exc: Exception, wake: anyio.Event, began: float,
                      backoff: float) -> float:
        """Report ``exc`` and wait ``backoff`` seconds (less on a plan change); returns the
        next backoff."""
        await self.handover.retire()  # it may be what the new server lacked room for
        if not isinstance(exc, ChildFailed | BackendError | OSError):
            log.exception("unexpected backend error", exc_info=exc)
        self.restarts += 1
        self.error = str(exc)
        backoff = 1.0 if time.monotonic() - began > STABLE_S else backoff
        log.error("%s; restarting in %.0f s", exc, backoff)
        first = (str(exc) or type(exc).__name__).splitlines()[0]
        self.node.set_serving(Serving.ERROR, error=first[:300])
        with anyio.move_on_after(backoff):
            await wake.wait()
        return min(backoff * 2, MAX_BACKOFF_S)

    def _hands_over(self, served: Plan, lay: Layout, child: Child) -> bool:
        """Whether the llama-server ``child`` of ``served`` stands by while the current plan
        loads (handover.may_hand_over; option ``handover``)."""
        if not child.alive or not self.node.config.options.get("handover", True):
            return False
        return may_hand_over(served, lay, self.plan, self.wanted, self.node.id)

    def _announce_standby(self, plan: Plan) -> None:
        """When ``plan`` moves the host away from this node's ready llama-server, announce
        it as ``standby`` now, before ``apply`` returns: the node routes by the new plan from
        then on, and until the supervisor reaches the hand-over (``serve_as_standby``) no
        server would be announced and the API would answer 503. An early announcement that
        a later plan no longer allows is withdrawn here; one the supervisor does not keep,
        by ``_idle`` or ``HandOver.retire``."""
        host = self.host
        if (isinstance(self.wanted, Idle) and host.ready and host.server is not None
                and host.serving_plan is not None and host.lay is not None
                and self._hands_over(host.serving_plan, host.lay, host.server)):
            self.node.announce(standby=plan.model)
            self._early_standby = True
        elif self._early_standby and self.handover.standby is None:
            self.node.announce(standby=None)
            self._early_standby = False

    def _recovered(self) -> None:
        """A part's child is up again: clear the last error."""
        self.error = None
