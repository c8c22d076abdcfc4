"""The host: runs llama-server for a plan, once every worker's rpc-server is up.

Solo, llama-server gets no ``--rpc``; split, one ``--rpc`` entry per remote worker, reached
through ``node.forward_port``. The host records what loading cost (bytes its rpc tunnels
carried to the workers meanwhile), serves until the plan changes or a worker's rpc-server goes
away, and then either hands its server over (handover.py) or stops it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio

from meshcore.components import ModelInfo, NodeHandle
from meshcore.fields import Field, declare
from meshcore.plan import Plan
from meshcore.state import MeshView, Serving
from meshcore_backend_llamacpp import commands
from meshcore_backend_llamacpp.binaries import BackendError
from meshcore_backend_llamacpp.commands import Layout
from meshcore_backend_llamacpp.handover import HandOver, Standby
from meshcore_backend_llamacpp.machine import Machine
from meshcore_backend_llamacpp.process import Child, free_port, supervised, wait_healthy
from meshcore_backend_llamacpp.race import Woken, race

log = logging.getLogger("meshcore.llamacpp")

MayKeep = Callable[[Plan, Layout, Child], bool]  # may this server stand by for the new plan?

LOADED = declare(Field("rpc_loaded", list, "backend (llamacpp) hosts",
                       "backend (llamacpp) workers",
                       "list of str: the workers whose layers this host's ready llama-server "
                       "holds (a worker seeds the rest of the model only then, see worker.py)"))


def without_rpc(view: MeshView, peers: Iterable[str]) -> list[str]:
    """The ``peers`` that do not announce a live rpc-server (absent ones included)."""
    return [p for p in peers if (peer := view.get(p)) is None or peer.serving is not Serving.RPC]


def tunneled_to(tunnels: Iterable[Mapping[str, Any]], peers: Sequence[str]) -> int:
    """Bytes the rpc tunnels among ``tunnels`` have carried towards ``peers``."""
    return sum(t["bytes_to_peer"] for t in tunnels if t["service"] == "rpc" and t["peer"] in peers)


class LlamaServerHost:
    """Runs llama-server for the plans that make this node the host; keeps its status."""

    def __init__(self, node: NodeHandle, machine: Machine, handover: HandOver,
                 on_ready: Callable[[], None]) -> None:
        self.node = node
        self.machine = machine
        self.handover = handover
        self.on_ready = on_ready  # called once llama-server is healthy
        self.server: Child | None = None
        self.port: int | None = None
        self.ready = False
        self.serving_plan: Plan | None = None  # the plan the ready llama-server runs
        self.lay: Layout | None = None
        self.rpc_endpoints: list[str] = []
        self.load_tunneled_bytes: int | None = None  # sent to workers while llama-server loaded
        self.speculation: str | None = None  # "draft" / "ngram" / None, of the last argv

    async def serve(self, plan: Plan, wake: anyio.Event, may_keep: MayKeep) -> None:
        """Run llama-server for ``plan`` until ``wake`` is set (returns) or it fails (raises);
        returns too when a worker's rpc-server went away, to start over."""
        info = self.node.model
        if info is None or info.path is None or self.machine.bins is None:
            raise BackendError(f"this node is the host for {plan.model} but has no model file; "
                               f"start it with --model")
        if not self.handover.alive:
            await self.handover.retire()
            self.node.set_serving(Serving.LOADING, error=None)
        lay = commands.layout(plan, host_has_gpu=self.machine.capacity.has_gpu,
                              n_layer=self.machine.n_layer)
        self.lay = lay
        endpoints: list[str] = []
        if lay.rpc_peers:
            got = await race(wake, (), functools.partial(self._worker_endpoints, lay.rpc_peers))
            if isinstance(got, Woken):
                return
            endpoints = got.value
        self.rpc_endpoints = endpoints
        port = free_port()
        argv = self._argv(plan, info, self.machine.bins.llama_server, info.path, lay,
                          endpoints, port)
        await self._run(plan, lay, argv, port, wake, may_keep)

    def _argv(self, plan: Plan, info: ModelInfo, binary: Path, model: Path, lay: Layout,
              endpoints: Sequence[str], port: int) -> list[str]:
        cap, config = self.machine.capacity, self.node.config
        spec = commands.speculation(
            str(config.options.get("speculation", "auto")),
            has_draft=plan.draft is not None and info.draft_path is not None,
            split=bool(endpoints))
        self.speculation = spec
        return commands.llama_server_argv(
            binary, model, port=port, threads=self.machine.threads, lay=lay,
            rpc_endpoints=endpoints, draft=info.draft_path if spec == "draft" else None,
            draft_max=config.draft_max, no_mmap=cap.has_gpu,
            draft_devices=commands.local_devices(cap.kind, cap.devices) if endpoints else None,
            alias=plan.model, ngram=spec == "ngram",
            extra=list(config.options.get("llama_args", ())))

    async def _run(self, plan: Plan, lay: Layout, argv: list[str], port: int,
                   wake: anyio.Event, may_keep: MayKeep) -> None:
        """Start llama-server, wait until it is healthy, serve; on the way out hand it over
        (when ``may_keep`` says so after a plan change) or stop it."""
        node = self.node
        timeout = float(node.config.options.get("load_timeout_s", 900))
        self.load_tunneled_bytes, began = None, time.monotonic()
        sent_before = tunneled_to(node.tunnel_status(), lay.rpc_peers)
        stack = contextlib.AsyncExitStack()
        handed_over = False
        try:
            child = await stack.enter_async_context(
                supervised("llama-server", argv, self.machine.log_dir))
            self.server, self.port = child, port
            loaded = await race(wake, [child],
                                functools.partial(wait_healthy, child, port, timeout))
            if isinstance(loaded, Woken):
                return
            self._loaded(lay.rpc_peers, sent_before, time.monotonic() - began)
            self.ready, self.serving_plan = True, plan
            self.on_ready()
            node.set_serving(Serving.READY, error=None,
                             **{LOADED.key: list(lay.rpc_peers) or None})
            served = await race(wake, [child],
                                functools.partial(self._serve_and_retire, lay.rpc_peers))
            if isinstance(served, Woken) and may_keep(plan, lay, child):
                self.handover.keep(Standby(stack, child, port, plan.model or ""))
                handed_over = True
        finally:
            if self.ready:
                node.announce(**{LOADED.key: None})
            self.ready, self.serving_plan = False, None
            if not handed_over:
                with anyio.CancelScope(shield=True):
                    await stack.aclose()
                if node.state.me.serving is Serving.READY and not self.handover.alive:
                    node.set_serving(Serving.LOADING)

    def _loaded(self, peers: Sequence[str], sent_before: int, seconds: float) -> None:
        """Record and log what loading cost: with workers that seeded their rpc hash cache,
        only the tensors under llama.cpp's 10 MiB hash threshold should have crossed."""
        if not peers:
            log.info("llama-server loaded in %.1f s", seconds)
            return
        self.load_tunneled_bytes = tunneled_to(self.node.tunnel_status(), peers) - sent_before
        log.info("llama-server loaded in %.1f s; %d bytes tunneled to %d worker(s) during "
                 "load", seconds, self.load_tunneled_bytes, len(peers))

    async def _serve_and_retire(self, peers: Sequence[str]) -> None:
        """The new server is serving: let the old one finish and stop, and meanwhile (and
        after) watch the workers."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(self.handover.retire, graceful=True))
            await self._worker_lost(peers)
            tg.cancel_scope.cancel()

    async def _worker_endpoints(self, peers: Sequence[str]) -> list[str]:
        """``127.0.0.1:port`` tunnels to each worker's rpc-server, once every one is up."""
        state = self.node.state
        gen, last_note = -1, 0.0
        while missing := without_rpc(state.view(), peers):
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
        while not (lost := without_rpc(state.view(), peers)):
            with anyio.move_on_after(1):
                gen = await state.changed(gen)
        log.warning("the rpc-server of %s went away; restarting llama-server to re-apply the "
                    "split", ", ".join(lost))
