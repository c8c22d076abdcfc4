"""The Node: one anyio task group that owns MeshState and runs transport, backend, API and UIs.
It implements :class:`meshcore.components.NodeHandle`, the only view plugins get of it."""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any
from urllib.parse import urlsplit

import anyio
import pluggy
from anyio.abc import ByteStream, TaskGroup, TaskStatus

from meshcore import __version__, fields
from meshcore.api import serve_api
from meshcore.components import (
    UI,
    ApiCounters,
    Backend,
    Capabilities,
    Elect,
    ModelInfo,
    Transport,
)
from meshcore.config import NodeConfig
from meshcore.identity import load_node_id
from meshcore.plan import WAITING_FOR_PEERS, ElectionRequest, Plan, PlanState
from meshcore.plugins import call_contained, get_plugin_manager
from meshcore.registry import Registry, collect
from meshcore.relay import Tally, relay, serve_forward
from meshcore.state import MeshState, MeshView, Peer, Role, Serving

log = logging.getLogger("meshcore.node")
API = "api"  # the service every node offers: its backend's OpenAI server (api_base())


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
        elections = self.registries["election"]
        self._elect: Elect = elections.get(config.election, "--election")
        self.request = ElectionRequest(draft_allowed=not config.no_draft,
                                       options=dict(config.election_options),
                                       elections=elections.factories())
        self.transport: Transport = self._build("transport", config.transport, self)
        self.backend: Backend | None = (
            None if config.client else self._build("backend", config.backend, self))
        self.uis: dict[str, UI] = {name: self._build("ui", name, self, port)
                                   for name, port in config.ui_ports().items()}
        self.plan: Plan = WAITING_FOR_PEERS
        self.model: ModelInfo | None = None
        self.services: dict[str, tuple[str, int]] = {}  # local endpoints tunnels may reach
        self.api_port: int | None = None
        self.counters = ApiCounters()
        self.plan_changed = anyio.Event()  # set and replaced on every plan change
        self._forwards: dict[tuple[str, str], int] = {}
        self.tunnels: dict[tuple[str, str], Tally] = {}  # (peer, service) -> bytes forwarded
        self._forward_lock = anyio.Lock()
        self._tg: TaskGroup | None = None
        self._stop = anyio.Event()

    def _build(self, kind: str, name: str, *args: Any) -> Any:
        """A component from its registered factory; a failing factory names its plugin."""
        registry = self.registries[kind]
        factory = registry.get(name, f"--{kind}")
        try:
            return factory(*args)
        except Exception as exc:
            raise RuntimeError(f"plugin {registry.plugin_of(name)}, {kind} {name!r}: could "
                               f"not be created: {type(exc).__name__}: {exc}") from exc

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start every service in order, report started, and run until :meth:`stop`."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            if self.backend is not None:
                await self._prepare(self.backend)
            if self.config.name:
                self.announce(name=self.config.name)
            await tg.start(self.transport.run)
            self.api_port = await tg.start(serve_api, self)
            if self.backend is not None:
                await tg.start(self.backend.run)
            for name, ui in self.uis.items():
                try:
                    await tg.start(ui.run)
                except Exception as exc:
                    raise RuntimeError(f"plugin {self.registries['ui'].plugin_of(name)}, ui "
                                       f"{name!r}: failed to start: {exc}") from exc
            tg.start_soon(self._announce_loop)
            tg.start_soon(self._election_loop)
            task_status.started()
            await self._stop.wait()
            tg.cancel_scope.cancel()

    async def _prepare(self, backend: Backend) -> None:
        vram = backend.detect_vram()
        if (cap := self.config.max_vram_bytes) is not None:
            vram = min(vram, cap)
        self.model = info = await backend.prepare()
        caps = getattr(backend, "capabilities", None) or Capabilities()
        self.state.update_me(vram=vram, model=info.name if info else None,
                             model_bytes=info.size if info else 0,
                             draft=info.draft_name if info else None,
                             extra={**self.state.me.extra, "caps": caps.names()})

    def stop(self) -> None:
        """Ask the node to shut down; ``run`` returns once every service stopped."""
        self._stop.set()

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

    def invite_token(self) -> str | None:
        return self.transport.invite_token()

    def election(self, name: str) -> Elect:
        return self.registries["election"].get(name)

    def collect(self, hook: str, **kwargs: Any) -> list[Any]:
        """Call ``hook`` on every plugin, each failure logged and skipped (never raised)."""
        return call_contained(self.pm, hook, **kwargs)

    def announce(self, **changes: Any) -> None:
        """Gossip declared fields (see meshcore.fields) of this node's announcement."""
        self.set_serving(self.state.me.serving, **changes)

    def set_serving(self, serving: Serving, **changes: Any) -> None:
        """Backends report what they run; the change is gossiped to every peer."""
        me = self.state.me
        merged = {**me.extra, **fields.checked(changes)}
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
        """Debounced: a burst of changes settles into one plan, but never waits longer than
        ``max_settle_s`` (a chatty peer cannot postpone the election forever). A node that
        starts a mesh (no ``--join``) elects at once the first time: nobody holds its token
        yet, so no burst is coming, and a solo node serves a settle (1 s) sooner."""
        gen, bound = -1, self.config.max_settle_s if self.config.joins else 0.0
        while True:
            gen = await self.state.changed(gen)
            with anyio.move_on_after(bound):
                while True:
                    with anyio.move_on_after(self.config.settle_s) as scope:
                        gen = await self.state.changed(gen)
                    if scope.cancelled_caught:
                        break
            view, bound = self.state.view(), self.config.max_settle_s
            self.collect("meshcore_mesh_changed", node=self, view=view)
            plan = self.elect(view)
            if plan != self.plan:
                await self._adopt(plan, view)

    def elect(self, view: MeshView) -> Plan:
        """The configured election's plan; if it raises or returns no Plan, the plan in
        force stays and the failure is logged naming the plugin."""
        try:
            plan = self._elect(view, self.request)
            if isinstance(plan, Plan):
                return plan
            problem = f"returned {type(plan).__name__}, not a Plan"
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
        where = self.registries["election"].plugin_of(self.config.election)
        log.error("plugin %s, election %r: %s; keeping the current plan", where,
                  self.config.election, problem)
        return self.plan

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
        self.collect("meshcore_plan_changed", node=self, plan=plan)
        self.plan_changed.set()
        self.plan_changed = anyio.Event()

    # ------------------------------------------------------------------ services, tunnels

    def offer_service(self, name: str, port: int) -> None:
        self.services[name] = ("127.0.0.1", port)

    def withdraw_service(self, name: str, port: int | None = None) -> None:
        if port is None or self.services.get(name) == ("127.0.0.1", port):
            self.services.pop(name, None)

    def service_address(self, name: str, peer_id: str | None = None) -> tuple[str, int] | None:
        """Where a tunnel for ``name`` goes: ``api`` is the backend's OpenAI server (any
        member may use it); ``rpc`` only for the host of the plan that names this node as a
        worker; other services as offered. None (logged) when refused or not offered."""
        if name == API:
            base = self.backend.api_base() if self.backend is not None else None
            url = urlsplit(base) if base else None
            return (url.hostname or "127.0.0.1", url.port or 80) if url else None
        if name == "rpc" and not (peer_id is not None and self.plan.host_id == peer_id
                                  and self.plan.includes(self.id)):
            log.warning("refused a tunnel to rpc from %s: not the host of a plan that names "
                        "this node as a worker", peer_id)
            return None
        target = self.services.get(name)
        if target is None:
            log.warning("tunnel for unknown or stopped service %r refused", name)
        return target

    async def serve_inbound(self, service: str, stream: ByteStream, *,
                            peer_id: str | None = None) -> None:
        """Relay an inbound tunnel stream to the local endpoint of ``service``."""
        target = self.service_address(service, peer_id)
        if target is None:
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

                tally = self.tunnels.setdefault(key, Tally())
                taker = getattr(self.transport, "take_connection", None)  # optional
                take = taker and functools.partial(taker, peer_id, service, tally=tally)
                self._forwards[key] = await self.task_group.start(
                    functools.partial(serve_forward, take=take, tally=tally), open_remote)
            return self._forwards[key]

    async def upstream(self) -> str | None:
        """Base URL that serves OpenAI requests for this node right now, or None: the plan's
        host once it is ready, else a node still answering for the same model while the new
        host loads (it announces the ``standby`` field; see :meth:`standby_upstream`)."""
        if self.is_host and self.backend is not None:
            if (base := self.backend.api_base()) is not None:
                return base
        else:
            host = self.state.view().get(self.plan.host_id or "")
            if (host is not None and host.serving is Serving.READY
                    and self.plan.state is not PlanState.WAITING):
                return f"http://127.0.0.1:{await self.forward_port(host.id, API)}"
        return await self.standby_upstream()

    async def standby_upstream(self) -> str | None:
        """A node that hosted the plan's model before the host moved and still serves it:
        requests go there instead of failing during the new host's load."""
        model = self.plan.model
        view = self.state.view()
        for peer in (view.me, *view.others):
            if not model or fields.STANDBY.read(peer) != model:
                continue
            if peer.id == self.id:
                return self.backend.api_base() if self.backend is not None else None
            return f"http://127.0.0.1:{await self.forward_port(peer.id, API)}"
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
        c = self.counters
        return {
            "id": self.id, "role": me.role.value, "is_host": self.is_host,
            "version": __version__, "model": self.plan.model or me.model,
            "draft": self.plan.draft, "api_port": self.api_port, "plan": self.plan.to_dict(),
            "total_vram": view.total_vram,
            "peers": [{**p.to_dict(), "link": self._guarded(self.transport.link, p.id)}
                      for p in view.others],
            "me": me.to_dict(),
            "backend": self._guarded(self.backend.status) if self.backend else {},
            "transport": self._guarded(getattr(self.transport, "status", dict)),  # optional
            "generation": view.generation, "tunnels": self.tunnel_status(),
            "api": {**dataclasses.asdict(c), "by_status": {str(k): v for k, v in
                                                          sorted(c.by_status.items())}},
        }

    def _guarded(self, call: Any, *args: Any) -> Any:
        """A plugin's status call: its error is reported in place, never raised."""
        try:
            return call(*args)
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}

    def tunnel_status(self) -> list[dict[str, Any]]:
        """Every host-side forward: its peer, service, local port, the path its connections
        take now (``transport.link``) and bytes each way."""
        return [{"peer": peer, "service": service, "port": self._forwards.get((peer, service)),
                 "link": self.transport.link(peer), **tally.to_dict()}
                for (peer, service), tally in self.tunnels.items()]
