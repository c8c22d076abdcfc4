"""The ``llamacpp`` Backend: turns plans into running llama-server / ggml-rpc-server processes.

``apply`` only records what this node should run and wakes ``run``, the supervisor loop. The
host runs llama-server on its own device (no ``--rpc`` when solo; one ``--rpc`` entry per
remote worker, reached through ``node.forward_port``, when split); a worker in the plan runs
ggml-rpc-server. A child that dies is restarted with backoff; an unchanged plan restarts
nothing. Every child is stopped on every exit path (see process.py).

Hand-over: when a plan change keeps this node the host of the same model and the running
llama-server needs no worker (it was solo, e.g. ``--split`` alone before a worker joins), the
old server keeps answering while the new one loads (``_Standby``); once the new one is
healthy the API moves to it and the old one stops when its slots are idle (at most
RETIRE_GRACE_S). If the new one fails (e.g. out of memory with both loaded), the old one
stops and the plan is re-applied the plain way.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_process

from meshcore import fields
from meshcore.components import Capabilities, ModelInfo, NodeHandle
from meshcore.plan import Plan, PlanState
from meshcore.state import MeshView, Serving
from meshcore_backend_llamacpp import binaries, commands, gguf_info, vram
from meshcore_backend_llamacpp.binaries import BackendError
from meshcore_backend_llamacpp.models import resolve, resolve_draft
from meshcore_backend_llamacpp.process import (
    Child,
    ChildFailed,
    free_port,
    slots_busy,
    supervised,
    wait_healthy,
    wait_listening,
)

log = logging.getLogger("meshcore.llamacpp")
T = TypeVar("T")

MAX_BACKOFF_S = 30.0
STABLE_S = 60.0  # a child that ran this long resets the backoff
RETIRE_GRACE_S = 60.0  # longest wait for a handed-over llama-server's requests to finish


@dataclass
class _Standby:
    """A llama-server that keeps serving while its successor loads."""

    stack: contextlib.AsyncExitStack
    child: Child
    port: int
    model: str


class LlamaCppBackend:
    """Options (``NodeConfig.options``): ``threads`` (or env MESH_LLM_THREADS),
    ``load_timeout_s`` (default 900), ``llama_args`` (extra llama-server arguments),
    ``handover`` (default True: see the module's docstring)."""

    capabilities = Capabilities(host=True, rpc_worker=True, uses_workers=True)

    def __init__(self, node: NodeHandle) -> None:
        self.node = node
        self.plan: Plan | None = None
        self.wanted: tuple[Any, ...] = ("idle",)
        self._wake = anyio.Event()
        self.capacity = vram.Capacity(0, "cpu", 0)
        self.bins: binaries.Binaries | None = None
        self.n_layer = 0
        self.threads = commands.default_threads(node.config.options)
        self.server: Child | None = None
        self.rpc: Child | None = None
        self.rpc_port: int | None = None
        self.port: int | None = None
        self.ready = False
        self.serving_plan: Plan | None = None  # the plan the ready llama-server runs
        self.lay: commands.Layout | None = None
        self.rpc_endpoints: list[str] = []
        self.restarts = 0
        self.error: str | None = None
        self.seeded_bytes: int | None = None
        self.load_tunneled_bytes: int | None = None  # sent to workers while llama-server loaded
        self._standby: _Standby | None = None
        self.handovers = 0

    @property
    def log_dir(self) -> Path:
        return Path(self.node.config.state_dir) / "logs"

    # ------------------------------------------------------------------ Backend protocol

    def detect_vram(self) -> int:
        self.capacity = vram.detect()
        return self.capacity.bytes

    async def prepare(self) -> ModelInfo | None:
        cfg = self.node.config
        self.bins = binaries.locate(cfg.bin_dir)
        await anyio.to_thread.run_sync(binaries.check_rpc, self.bins)
        if cfg.model is None:
            return None
        model = await anyio.to_thread.run_sync(functools.partial(resolve, cfg.model))
        gguf_info.check_gguf(model.path)
        draft = resolve_draft(model, override=cfg.draft, disabled=cfg.no_draft)
        if draft is not None:
            gguf_info.check_gguf(draft.path)
        self.n_layer = await anyio.to_thread.run_sync(gguf_info.block_count, model.path)
        return ModelInfo(name=model.name, path=model.path, size=model.size,
                         draft_name=draft.name if draft else None,
                         draft_path=draft.path if draft else None)

    async def apply(self, plan: Plan, view: MeshView) -> None:
        wanted = self._wanted(plan)
        self.plan = plan
        if wanted != self.wanted:
            self.wanted = wanted
            self._wake.set()

    def api_base(self) -> str | None:
        if self.ready and self.server is not None and self.server.alive:
            return f"http://127.0.0.1:{self.port}"
        standby = self._standby
        if standby is not None and standby.child.alive:
            return f"http://127.0.0.1:{standby.port}"
        return None

    def serves_current_plan(self) -> bool:
        """Host: its llama-server is ready, runs the current plan and answers alone (no
        handed-over server still serving in its place). What tools wait for after a plan
        change, since during a hand-over the node keeps announcing ``serving = ready``."""
        return (self.ready and self._standby is None and self.serving_plan is not None
                and self.serving_plan == self.plan)

    def status(self) -> dict[str, Any]:
        def child(c: Child | None, port: int | None = None) -> dict[str, Any] | None:
            return None if c is None else {"pid": c.pid, "argv": c.argv, "port": port,
                                           "log": str(c.log_path), "alive": c.alive}

        lay = self.lay
        return {
            "name": "llamacpp",
            "device": self.capacity.kind,
            "binaries": self.bins.to_dict() if self.bins else None,
            "threads": self.threads,
            "llama_server": child(self.server, self.port),
            "standby": child(self._standby.child, self._standby.port) if self._standby else None,
            "serving_current_plan": self.serves_current_plan(),
            "handovers": self.handovers,
            "rpc_server": child(self.rpc, self.rpc_port),
            "rpc": list(self.rpc_endpoints),
            "layout": lay.to_dict() if lay else None,
            "tensor_split": list(lay.tensor_split) if lay else [],
            "effective_shares": self._effective_shares(),
            "n_layer": self.n_layer,
            "restarts": self.restarts,
            "error": self.error,
            "seeded_bytes": self.seeded_bytes,
            "load_tunneled_bytes": self.load_tunneled_bytes,
            "log_dir": str(self.log_dir),
        }

    def _effective_shares(self) -> dict[str, float]:
        """Fraction of layers each participant really holds (peer id -> share)."""
        lay, plan = self.lay, self.plan
        if lay is None or plan is None or plan.host_id is None:
            return {}
        shares = commands.effective_shares(lay, self.n_layer)
        return dict(zip((plan.host_id, *lay.rpc_peers), shares, strict=True))

    # ------------------------------------------------------------------ supervision

    def _wanted(self, plan: Plan) -> tuple[Any, ...]:
        """What this node must run for ``plan``; equal tuples mean nothing restarts."""
        me = self.node.id
        if plan.state is PlanState.WAITING or not plan.includes(me):
            return ("idle",)
        if plan.host_id == me:
            return ("host", plan.model, plan.draft, plan.participants)
        return ("worker", plan.model)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        # Workers predict their layers from the host's device kind (see _my_layers).
        self.node.set_serving(self.node.state.me.serving, device=self.capacity.kind)
        backoff = 1.0
        try:
            while True:
                self._wake = anyio.Event()
                wanted, plan, began = self.wanted, self.plan, time.monotonic()
                try:
                    if plan is None or wanted[0] == "idle":
                        if plan is not None and self._stands_by(plan):
                            await self._serve_as_standby(plan)
                            if self.wanted[0] == "idle" and self.plan is not None \
                                    and self._stands_by(self.plan):
                                continue  # another plan change, still the same new host
                        await self._retire_standby()
                        self.node.set_serving(Serving.IDLE, standby=None)
                        await self._wake.wait()
                    elif wanted[0] == "host":
                        await self._serve_host(plan)
                    else:
                        await self._retire_standby()
                        await self._serve_worker(plan)
                except Exception as exc:  # any failure: report, back off, re-apply the plan
                    await self._retire_standby()  # it may be what the new server lacked room for
                    if not isinstance(exc, ChildFailed | BackendError | OSError):
                        log.exception("unexpected backend error")
                    self.restarts += 1
                    self.error = str(exc)
                    backoff = 1.0 if time.monotonic() - began > STABLE_S else backoff
                    log.error("%s; restarting in %.0f s", exc, backoff)
                    self.node.set_serving(Serving.ERROR, error=str(exc).splitlines()[0][:300])
                    with anyio.move_on_after(backoff):
                        await self._wake.wait()
                    backoff = min(backoff * 2, MAX_BACKOFF_S)
        finally:
            await self._retire_standby()
            self.node.withdraw_service("rpc")

    async def _retire_standby(self, *, graceful: bool = False) -> None:
        """Stop the handed-over llama-server, if any; ``graceful``: first let the requests
        it is still generating finish (up to RETIRE_GRACE_S)."""
        standby, self._standby = self._standby, None
        if standby is None:
            return
        me = self.node.state.me
        if fields.STANDBY.read(me) is not None:  # the mesh stops routing here first
            self.node.set_serving(me.serving, standby=None)
        try:
            if graceful:
                with anyio.move_on_after(RETIRE_GRACE_S):
                    while standby.child.alive and await slots_busy(standby.port):
                        await anyio.sleep(0.25)
        finally:
            with anyio.CancelScope(shield=True):
                await standby.stack.aclose()
            log.info("stopped the previous llama-server (port %d)", standby.port)

    def _can_hand_over(self, plan: Plan, lay: commands.Layout, child: Child) -> bool:
        """Whether ``child`` may keep serving while the new plan's server loads: the new
        plan serves the same model, ``child`` uses no worker (a worker's rpc-server serves
        one client at a time, so old and new could not share it), and this node either stays
        the host or leaves the plan for another host (not to become a worker: its device
        memory is needed for the rpc-server)."""
        new = self.plan
        if new is None or new.model != plan.model or lay.rpc_peers or not child.alive:
            return False
        if not self.node.config.options.get("handover", True):
            return False
        moved = (self.wanted[0] == "idle" and new.host_id is not None
                 and new.host_id != self.node.id)
        return self.wanted[0] == "host" or moved

    def _stands_by(self, plan: Plan) -> bool:
        """Whether the handed-over server should keep answering under ``plan``: another
        node hosts the same model and has not taken over yet."""
        standby = self._standby
        return (standby is not None and standby.child.alive and standby.model == plan.model
                and plan.host_id is not None and plan.host_id != self.node.id)

    async def _serve_as_standby(self, plan: Plan) -> None:
        """No longer the host: keep the old llama-server answering (announced as
        ``extra["standby"]``; the node routes requests here) until the new host is ready,
        then let its requests finish and stop it. Returns early on a plan change."""
        assert plan.host_id is not None
        self.node.set_serving(Serving.IDLE, standby=plan.model)
        log.info("%s now hosts %s; this node's llama-server answers until it is ready",
                 plan.host_id, plan.model)
        await self._race((), functools.partial(self._standby_until_ready, plan.host_id))

    async def _standby_until_ready(self, host_id: str) -> None:
        state, gen = self.node.state, -1
        while (standby := self._standby) is not None and standby.child.alive:
            host = state.view().get(host_id)
            if host is not None and host.serving is Serving.READY:
                break
            with anyio.move_on_after(1):
                gen = await state.changed(gen)
        await self._retire_standby(graceful=True)

    async def _serve_and_retire(self, peers: Sequence[str]) -> None:
        """The new server is serving: let the old one finish and stop, and meanwhile (and
        after) watch the workers."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(self._retire_standby, graceful=True))
            await self._worker_lost(peers)
            tg.cancel_scope.cancel()

    async def _race(self, children: Sequence[Child],
                    work: Callable[[], Awaitable[T]] | None = None) -> tuple[bool, T | None]:
        """Run ``work`` (or wait forever) while watching ``children`` and the plan.

        Returns (True, result) when work finished, (False, None) when the plan changed;
        raises ChildFailed when a child exits, and re-raises work's own error.
        """
        wake = self._wake
        outcome: dict[str, Any] = {}

        async with anyio.create_task_group() as tg:

            async def do_work() -> None:
                assert work is not None
                try:
                    outcome["result"] = await work()
                except Exception as exc:  # re-raised below, outside the task group
                    outcome["error"] = exc
                tg.cancel_scope.cancel()

            async def watch(c: Child) -> None:
                code = await c.wait()
                outcome.setdefault("error", c.failure(f"exited with code {code}"))
                tg.cancel_scope.cancel()

            async def on_wake() -> None:
                await wake.wait()
                tg.cancel_scope.cancel()

            for c in children:
                tg.start_soon(watch, c)
            tg.start_soon(on_wake)
            if work is not None:
                tg.start_soon(do_work)
        if "error" in outcome:
            raise outcome["error"]
        if "result" in outcome:
            return True, outcome["result"]
        return False, None

    # ------------------------------------------------------------------ host

    async def _serve_host(self, plan: Plan) -> None:
        node, info, bins = self.node, self.node.model, self.bins
        if info is None or info.path is None or bins is None:
            raise BackendError(f"this node is the host for {plan.model} but has no model file; "
                               f"start it with --model")
        standby = self._standby
        if standby is None or not standby.child.alive:
            await self._retire_standby()
            node.set_serving(Serving.LOADING, error=None)
        lay = commands.layout(plan, host_has_gpu=self.capacity.has_gpu, n_layer=self.n_layer)
        self.lay = lay
        endpoints: list[str] = []
        if lay.rpc_peers:
            done, got = await self._race((), functools.partial(self._worker_endpoints,
                                                               lay.rpc_peers))
            if not done or got is None:
                return
            endpoints = got
        self.rpc_endpoints = endpoints
        use_draft = plan.draft is not None and info.draft_path is not None
        port = free_port()
        argv = commands.llama_server_argv(
            bins.llama_server, info.path, port=port, threads=self.threads, lay=lay,
            rpc_endpoints=endpoints, draft=info.draft_path if use_draft else None,
            draft_max=node.config.draft_max, no_mmap=self.capacity.has_gpu,
            draft_devices=commands.local_devices(self.capacity.kind, self.capacity.devices)
            if endpoints else None,
            alias=plan.model, extra=list(node.config.options.get("llama_args", ())))
        timeout = float(node.config.options.get("load_timeout_s", 900))
        self.load_tunneled_bytes, began = None, time.monotonic()
        sent_before = self._sent_to_workers(lay.rpc_peers)
        stack = contextlib.AsyncExitStack()
        handed_over = False
        try:
            child = await stack.enter_async_context(
                supervised("llama-server", argv, self.log_dir))
            self.server, self.port = child, port
            done, _ = await self._race(
                [child], functools.partial(wait_healthy, child, port, timeout))
            if not done:
                return
            self._loaded(lay.rpc_peers, sent_before, time.monotonic() - began)
            self.ready, self.error, self.serving_plan = True, None, plan
            node.set_serving(Serving.READY, error=None)
            done, _ = await self._race([child], functools.partial(self._serve_and_retire,
                                                                  lay.rpc_peers))
            if not done and self._can_hand_over(plan, lay, child):
                self._standby = _Standby(stack, child, port, plan.model or "")
                self.handovers += 1
                handed_over = True
                log.info("plan changed: llama-server (port %d) keeps serving until the new "
                         "one is ready", port)
        finally:
            self.ready, self.serving_plan = False, None
            if not handed_over:
                with anyio.CancelScope(shield=True):
                    await stack.aclose()
                alive = self._standby is not None and self._standby.child.alive
                if self.node.state.me.serving is Serving.READY and not alive:
                    node.set_serving(Serving.LOADING)

    def _sent_to_workers(self, peers: Sequence[str]) -> int:
        """Bytes the host's rpc tunnels to ``peers`` have carried towards them so far."""
        return sum(t["bytes_to_peer"] for t in self.node.tunnel_status()
                   if t["service"] == "rpc" and t["peer"] in peers)

    def _loaded(self, peers: Sequence[str], sent_before: int, seconds: float) -> None:
        """Record and log what loading cost: with workers that seeded their rpc hash cache,
        only the tensors under llama.cpp's 10 MiB hash threshold should have crossed."""
        if not peers:
            log.info("llama-server loaded in %.1f s", seconds)
            return
        self.load_tunneled_bytes = self._sent_to_workers(peers) - sent_before
        log.info("llama-server loaded in %.1f s; %d bytes tunneled to %d worker(s) during "
                 "load", seconds, self.load_tunneled_bytes, len(peers))

    async def _worker_endpoints(self, peers: Sequence[str]) -> list[str]:
        """``127.0.0.1:port`` tunnels to each worker's rpc-server, once every one is up."""
        state = self.node.state
        gen, last_note = -1, 0.0
        while True:
            view = state.view()
            missing = [p for p in peers if (peer := view.get(p)) is None
                       or peer.serving is not Serving.RPC]
            if not missing:
                break
            if time.monotonic() - last_note > 10:
                last_note = time.monotonic()
                log.info("waiting for the rpc-server of %s", ", ".join(missing))
            with anyio.move_on_after(1):
                gen = await state.changed(gen)
        return [f"127.0.0.1:{await self.node.forward_port(p, 'rpc')}" for p in peers]

    async def _worker_lost(self, peers: Sequence[str]) -> None:
        """Return once a worker of the running split stops announcing a live rpc-server (it
        died and restarts, or left): llama-server's connection to it is dead and would fail
        the next request, so the host restarts llama-server now (the plan is re-applied)."""
        if not peers:
            await anyio.sleep_forever()
        state, gen = self.node.state, -1
        while True:
            view = state.view()
            lost = [p for p in peers if (peer := view.get(p)) is None
                    or peer.serving is not Serving.RPC]
            if lost:
                log.warning("the rpc-server of %s went away; restarting llama-server to "
                            "re-apply the split", ", ".join(lost))
                return
            with anyio.move_on_after(1):
                gen = await state.changed(gen)

    # ------------------------------------------------------------------ worker

    async def _serve_worker(self, plan: Plan) -> None:
        node, bins = self.node, self.bins
        assert bins is not None
        node.set_serving(Serving.LOADING, error=None)
        cache_base = Path(node.config.state_dir) / "rpc-cache"
        cache_dir = cache_base / "rpc"
        done, known = await self._race((), functools.partial(self._seed, plan, cache_dir))
        if not done:
            return
        port = free_port()
        argv = commands.rpc_server_argv(bins.rpc_server, port=port, threads=self.threads)
        env = {**os.environ, "LLAMA_CACHE": str(cache_base)}
        async with supervised("rpc-server", argv, self.log_dir, env) as child:
            self.rpc = child
            try:
                done, _ = await self._race([child], functools.partial(
                    wait_listening, child, port, 60.0))
                if not done:
                    return
                self.error = None
                node.offer_service("rpc", port)
                self.rpc_port = port
                node.set_serving(Serving.RPC, error=None)
                await self._race([child], functools.partial(self._seed_rest, cache_dir, known))
            finally:
                node.withdraw_service("rpc", port)
                self.rpc_port = None

    def _my_layers(self, plan: Plan) -> set[int] | None:
        """The layers the host's llama-server will put on this worker, predicted from the
        plan and the device the host announced (None when it announced none)."""
        host = self.node.state.view().get(plan.host_id or "")
        device = fields.DEVICE.read(host)
        if device is None or not self.n_layer:
            return None
        lay = commands.layout(plan, host_has_gpu=device != "cpu", n_layer=self.n_layer)
        return commands.worker_layers(lay, self.n_layer, self.node.id)

    async def _seed(self, plan: Plan, cache_dir: Path) -> dict[str, str] | None:
        """Pre-fill rpc-server's hash cache from our own copy of the plan's model, if any:
        the tensors of the layers this worker will hold first (the rest follows once the
        rpc-server runs, see ``_seed_rest``). Returns what the second pass may skip, or None
        when there is no second pass."""
        self.seeded_bytes = None
        info = self.node.model
        if info is None or info.path is None or info.name != plan.model:
            return None
        try:
            from meshcore_backend_llamacpp import hashcache
        except ImportError:
            return None
        cache_dir.mkdir(parents=True, exist_ok=True)
        if await anyio.to_thread.run_sync(hashcache.cache_complete, info.path, cache_dir):
            self.seeded_bytes = 0
            return None
        started = time.monotonic()
        layers = self._my_layers(plan)
        # In a worker process: hashing a big GGUF in a thread would hold the GIL for long
        # stretches and starve the event loop (gossip, tunnels).
        if layers is None:
            self.seeded_bytes = await anyio.to_process.run_sync(
                hashcache.seed_cache, info.path, cache_dir, cancellable=True)
            log.info("seeded the rpc cache with %s bytes of %s in %.1f s", self.seeded_bytes,
                     info.path.name, time.monotonic() - started)
            return None
        names = await anyio.to_thread.run_sync(functools.partial(
            hashcache.tensors_of_layers, info.path, layers, self.n_layer))
        self.seeded_bytes, known = await anyio.to_process.run_sync(
            hashcache.seed_tensors, info.path, cache_dir, names, cancellable=True)
        log.info("seeded the rpc cache with the %d tensors of this worker's %d layers "
                 "(%s bytes) in %.1f s; the rest of %s follows in the background",
                 len(names), len(layers), self.seeded_bytes, time.monotonic() - started,
                 info.path.name)
        return known

    async def _seed_rest(self, cache_dir: Path, known: dict[str, str] | None) -> None:
        """Seed the rest of the model while the rpc-server runs (a later plan may give this
        worker other layers), then wait. A failure here only costs load time later."""
        info = self.node.model
        if known is not None and info is not None and info.path is not None:
            from meshcore_backend_llamacpp import hashcache

            started = time.monotonic()
            try:
                more = await anyio.to_process.run_sync(
                    hashcache.seed_cache, info.path, cache_dir, hashcache.HASH_THRESHOLD,
                    known, cancellable=True)
            except (OSError, ValueError) as exc:
                log.warning("seeding the rest of the rpc cache failed: %s", exc)
            else:
                self.seeded_bytes = (self.seeded_bytes or 0) + more
                log.info("seeded the rest of the rpc cache (%d bytes) in %.1f s", more,
                         time.monotonic() - started)
        await anyio.sleep_forever()
