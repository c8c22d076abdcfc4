"""The Node: one anyio task group that owns MeshState and runs transport, backend, API and UIs."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import anyio
import pluggy
from anyio.abc import ByteStream, TaskGroup, TaskStatus

from meshcore import __version__
from meshcore.components import Backend, ModelInfo, Transport
from meshcore.config import NodeConfig
from meshcore.identity import load_node_id
from meshcore.plan import WAITING_FOR_PEERS, ElectionRequest, Plan, PlanState
from meshcore.plugins import get_plugin_manager
from meshcore.registry import Registry, collect
from meshcore.relay import Tally, relay, serve_forward
from meshcore.state import MeshState, MeshView, Peer, Role, Serving

log = logging.getLogger("meshcore.node")

Elect = Callable[[MeshView, ElectionRequest], Plan]


class Node:
    """A mesh member. Build it with a config, then ``await node.run()`` (or ``tg.start``)."""

    def __init__(self, config: NodeConfig, pm: pluggy.PluginManager | None = None) -> None:
        self.config = config
        self.pm = pm or get_plugin_manager()
        self.registries: dict[str, Registry] = collect(self.pm)
        self.pm.hook.meshcore_configure.call_historic(kwargs={"config": config})
        self.id = config.node_id or load_node_id(config.state_dir)
        role = Role.CLIENT if config.client else Role.WORKER
        self.state = MeshState(Peer(id=self.id, role=role, version=__version__, split=config.split))
        self.elect: Elect = self.registries["election"].get(config.election)
        self.transport: Transport = self.registries["transport"].get(config.transport)(self)
        self.backend: Backend | None = (
            None if config.client else self.registries["backend"].get(config.backend)(self)
        )
        self.uis: dict[str, Any] = {}
        if config.console_port is not None:
            self.uis["console"] = self.registries["ui"].get("console")(self)
        self.request = ElectionRequest(draft_allowed=not config.no_draft)
        self.plan: Plan = WAITING_FOR_PEERS
        self.model: ModelInfo | None = None
        self.services: dict[str, tuple[str, int]] = {}  # local endpoints tunnels may reach
        self.api_port: int | None = None
        self.plan_changed = anyio.Event()  # set and replaced on every plan change
        self._forwards: dict[tuple[str, str], int] = {}
        self.tunnels: dict[tuple[str, str], Tally] = {}  # (peer, service) -> bytes forwarded
        self._forward_lock = anyio.Lock()
        self._tg: TaskGroup | None = None
        self._stop = anyio.Event()
        self._started = anyio.Event()

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start every service in order, report started, and run until :meth:`stop`."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            if self.backend is not None:
                vram = self.backend.detect_vram()
                if (cap := self.config.max_vram_bytes) is not None:
                    vram = min(vram, cap)
                self.model = await self.backend.prepare()
                info = self.model
                self.state.update_me(
                    vram=vram,
                    model=info.name if info else None,
                    model_bytes=info.size if info else 0,
                    draft=info.draft_name if info else None,
                )
            await tg.start(self.transport.run)
            from meshcore.api import serve_api

            self.api_port = await tg.start(serve_api, self)
            if self.backend is not None:
                await tg.start(self.backend.run)
            for ui in self.uis.values():
                await tg.start(ui.run)
            tg.start_soon(self._announce_loop)
            tg.start_soon(self._election_loop)
            self._started.set()
            task_status.started()
            await self._stop.wait()
            tg.cancel_scope.cancel()

    def stop(self) -> None:
        """Ask the node to shut down; ``run`` returns once every service stopped."""
        self._stop.set()

    async def wait_started(self) -> None:
        await self._started.wait()

    async def wait_stopped(self) -> None:
        await self._stop.wait()

    @property
    def task_group(self) -> TaskGroup:
        if self._tg is None:
            raise RuntimeError("the node is not running")
        return self._tg

    # ------------------------------------------------------------------ mesh and plan

    def view(self) -> MeshView:
        return self.state.view()

    @property
    def is_host(self) -> bool:
        return self.plan.host_id == self.id

    def set_serving(self, serving: Serving, **extra: Any) -> None:
        """Backends report what they run; the change is gossiped to every peer."""
        me = self.state.me
        merged = {**me.extra, **extra}
        if me.serving != serving or merged != dict(me.extra):
            self.state.update_me(serving=serving, extra=merged)

    async def _announce_loop(self) -> None:
        seen_seq, gen = -1, -1
        while True:
            gen = await self.state.changed(gen)
            if self.state.me.seq != seen_seq:
                seen_seq = self.state.me.seq
                await self.transport.announce()

    async def _election_loop(self) -> None:
        gen = -1
        while True:
            gen = await self.state.changed(gen)
            # Debounce: let a burst of joins/leaves settle into one plan.
            while True:
                with anyio.move_on_after(self.config.settle_s) as scope:
                    gen = await self.state.changed(gen)
                if scope.cancelled_caught:
                    break
            view = self.state.view()
            self.pm.hook.meshcore_mesh_changed(node=self, view=view)
            plan = self.elect(view, self.request)
            if plan != self.plan:
                await self._adopt(plan, view)

    async def _adopt(self, plan: Plan, view: MeshView) -> None:
        log.info("plan %s host=%s split=%s %s", plan.state, plan.host_id, plan.tensor_split,
                 plan.reason)
        self.plan = plan
        me = self.state.me
        if not me.is_client:
            role = Role.HOST if plan.host_id == self.id else Role.WORKER
            if me.role != role:
                self.state.update_me(role=role)
        if self.backend is not None:
            await self.backend.apply(plan, view)
        self.pm.hook.meshcore_plan_changed(node=self, plan=plan)
        self.plan_changed.set()
        self.plan_changed = anyio.Event()

    # ------------------------------------------------------------------ tunnels

    async def serve_inbound(self, service: str, stream: ByteStream) -> None:
        """Relay an inbound tunnel stream to the local endpoint registered for ``service``."""
        target = self.services.get(service)
        if target is None:
            log.warning("tunnel for unknown or stopped service %r refused", service)
            await stream.aclose()
            return
        try:
            local = await anyio.connect_tcp(*target)
        except OSError as exc:
            log.warning("tunnel to local %s at %s:%s failed: %s", service, *target, exc)
            await stream.aclose()
            return
        await relay(stream, local)

    async def forward_port(self, peer_id: str, service: str) -> int:
        """A 127.0.0.1 port whose connections are tunneled to ``service`` on ``peer_id``."""
        async with self._forward_lock:
            key = (peer_id, service)
            if key not in self._forwards:

                async def open_remote() -> ByteStream:
                    return await self.transport.connect(peer_id, service)

                raw = getattr(self.transport, "open_raw", None)  # optional: see components
                open_raw = functools.partial(raw, peer_id, service) if raw else None
                tally = self.tunnels.setdefault(key, Tally())
                self._forwards[key] = await self.task_group.start(
                    functools.partial(serve_forward, open_raw=open_raw, tally=tally), open_remote)
            return self._forwards[key]

    async def upstream(self) -> str | None:
        """Base URL that serves OpenAI requests for this node right now, or None: the plan's
        host once it is ready, else a node still answering for the same model while the new
        host loads (it announces ``extra["standby"] = model``; see :meth:`standby_upstream`)."""
        if self.is_host and self.backend is not None:
            if (base := self.backend.api_base()) is not None:
                return base
        else:
            host_id = self.plan.host_id
            host = self.state.view().get(host_id) if host_id else None
            if (host is not None and host.serving is Serving.READY
                    and self.plan.state is not PlanState.WAITING):
                port = await self.forward_port(host.id, "llama")
                return f"http://127.0.0.1:{port}"
        return await self.standby_upstream()

    async def standby_upstream(self) -> str | None:
        """A node that hosted the plan's model before the host moved and still serves it
        (a backend announces ``extra["standby"]`` with the model's name until the new host
        is ready): requests go there instead of failing during the new host's load."""
        model = self.plan.model
        if not model:
            return None
        view = self.state.view()
        for peer in (view.me, *view.others):
            if peer.extra.get("standby") != model:
                continue
            if peer.id == self.id:
                return self.backend.api_base() if self.backend is not None else None
            port = await self.forward_port(peer.id, "llama")
            return f"http://127.0.0.1:{port}"
        return None

    def not_ready_reason(self) -> str:
        plan = self.plan
        if plan.state is PlanState.WAITING:
            return plan.reason or "election in progress"
        host = self.state.view().get(plan.host_id or "")
        if host is None:
            return "election in progress: the host is gone"
        if host.serving is Serving.ERROR:
            return f"host {host.id} failed to start its model; see its log"
        return f"model {plan.model or ''} is loading on host {host.id}".replace("  ", " ")

    def status(self) -> dict[str, Any]:
        """The node's state as plain JSON (the core status call and the console's source)."""
        view = self.state.view()
        me = view.me
        return {
            "id": self.id,
            "role": me.role.value,
            "is_host": self.is_host,
            "version": __version__,
            "model": self.plan.model or me.model,
            "draft": self.plan.draft,
            "api_port": self.api_port,
            "plan": self.plan.to_dict(),
            "total_vram": view.total_vram,
            "peers": [
                {**p.to_dict(), "link": self.transport.link(p.id)} for p in view.others
            ],
            "me": me.to_dict(),
            "backend": self.backend.status() if self.backend is not None else {},
            "generation": view.generation,
            "tunnels": self.tunnel_status(),
        }

    def tunnel_status(self) -> list[dict[str, Any]]:
        """Every host-side forward: its peer, service, local port and bytes each way."""
        return [{"peer": peer, "service": service, "port": self._forwards.get((peer, service)),
                 **tally.to_dict()} for (peer, service), tally in self.tunnels.items()]
