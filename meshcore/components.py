"""The contract between the core and its plugins: the node handle every hook and factory
receives, and the Transport / Backend / UI protocols plugins implement (structural: no base
class needed). docs/plugins.md explains each; mypy checks the default plugins against them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import anyio
from anyio.abc import ByteStream, TaskGroup, TaskStatus

from meshcore.config import NodeConfig
from meshcore.plan import ElectionRequest, Plan
from meshcore.state import MeshState, MeshView, Serving

Elect = Callable[[MeshView, ElectionRequest], Plan]


@dataclass(frozen=True)
class ModelInfo:
    """The model a node would serve as host, once resolved to local files."""

    name: str
    path: Path | None  # first shard for split GGUF; None for backends without files
    size: int  # bytes, all shards summed
    draft_name: str | None = None
    draft_path: Path | None = None


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; announced (field ``caps``) so every election respects it."""

    host: bool = True  # can serve the model behind an OpenAI API at api_base()
    rpc_worker: bool = False  # can hold layers for another node's host
    uses_workers: bool = False  # as host, can spread layers over rpc workers

    def names(self) -> list[str]:
        return [n for n in ("host", "rpc_worker", "uses_workers") if getattr(self, n)]


@dataclass
class ApiCounters:
    """What the node's API served since start: ``requests`` counted when each starts;
    ``by_status``, ``errors`` (status >= 400), the tokens (from the responses' ``usage``) and
    speculative decoding's drafted and accepted tokens (llama-server's ``timings``) when each
    finishes."""

    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    drafted: int = 0
    draft_accepted: int = 0
    by_status: dict[int, int] = field(default_factory=dict)


class NodeHandle(Protocol):
    """What a plugin may use of the running node. Nothing else of the Node is public. Hooks
    and factories of one node always get the same (hashable, weak-referenceable) object."""

    @property
    def id(self) -> str: ...
    @property
    def config(self) -> NodeConfig: ...
    @property
    def plan(self) -> Plan:
        """The plan in force (WAITING until the first election)."""
    @property
    def model(self) -> ModelInfo | None:
        """What this node's backend resolved ``--model`` to (None for clients)."""
    @property
    def state(self) -> MeshState:
        """The mesh state: transports feed it (upsert, remove, set_rtt); others read view()."""
    @property
    def task_group(self) -> TaskGroup:
        """The node's task group, for work that must end with the node."""
    @property
    def api_port(self) -> int | None: ...
    @property
    def counters(self) -> ApiCounters: ...
    @property
    def plan_changed(self) -> anyio.Event:
        """Set (and replaced by a new Event) on every plan change."""

    def view(self) -> MeshView: ...
    def status(self) -> dict[str, Any]:
        """The node's state as plain JSON (``/mesh/status``)."""
    def announce(self, **fields: Any) -> None:
        """Gossip declared fields (meshcore.fields) of this node's announcement."""
    def set_serving(self, serving: Serving, **fields: Any) -> None:
        """Report what the backend runs, with declared fields; gossiped to every peer."""
    def offer_service(self, name: str, port: int) -> None:
        """Let tunnels reach 127.0.0.1:``port`` as ``name`` (e.g. ``rpc``)."""
    def withdraw_service(self, name: str, port: int | None = None) -> None:
        """Stop offering ``name`` (only if it still points at ``port``, when given)."""
    def service_address(self, name: str, peer_id: str | None = None) -> tuple[str, int] | None:
        """Where an inbound tunnel from ``peer_id`` for ``name`` goes; None: refused."""
    async def serve_inbound(self, service: str, stream: ByteStream, *,
                            peer_id: str | None = None) -> None:
        """Transports hand each inbound tunnel stream here."""
    async def forward_port(self, peer_id: str, service: str) -> int:
        """A 127.0.0.1 port whose connections are tunneled to ``service`` on ``peer_id``."""
    def tunnel_status(self) -> list[dict[str, Any]]:
        """Each forward this node opened, as dicts with ``peer``, ``service``, ``port``,
        ``bytes_to_peer``, ``bytes_from_peer`` and ``connections`` (all since start)."""
    def collect(self, hook: str, **kwargs: Any) -> list[Any]:
        """Call a hook on every plugin (failures logged and skipped); non-None results."""
    def invite_token(self) -> str | None: ...
    def election(self, name: str) -> Elect:
        """A registered election by name (an election may delegate to another)."""
    def elect(self, view: MeshView) -> Plan:
        """The plan the configured election makes of ``view`` (the plan in force when it
        fails): what the next election will decide, known before the election settles."""
    async def wait_stopped(self) -> None: ...


class Transport(Protocol):
    """Finds peers, gossips announcements into ``node.state`` and carries tunnels; inbound
    tunnel streams go to ``node.serve_inbound``. Built as ``factory(node)``."""

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        """Bind, call ``task_status.started()``, then serve until cancelled."""

    def invite_token(self) -> str | None:
        """A token other nodes pass to ``--join``; None before ``run`` started."""

    async def announce(self) -> None:
        """Send this node's current announcement (``node.state.me``) to every peer."""

    async def connect(self, peer_id: str, service: str) -> ByteStream:
        """Open a byte stream to ``service`` on ``peer_id`` (e.g. ``rpc``, ``api``)."""

    def link(self, peer_id: str) -> str:
        """What carries traffic to this peer, for humans: ``QUIC``, ``TCP+AES-GCM``, ..."""

    # Optional: ``async take_connection(peer_id, service, conn: socket.socket, *, tally)
    # -> bool`` relays one of ``node.forward_port``'s local connections its own (faster) way;
    # False leaves it to the core, which relays it through ``connect``.
    # Optional: ``status() -> dict`` JSON-safe counters, shown as ``transport`` in
    # ``/mesh/status``.


class Backend(Protocol):
    """Runs inference according to the plan. Built as ``factory(node)``."""

    capabilities: Capabilities

    def detect_vram(self) -> int:
        """Bytes of accelerator memory this node can offer (before ``--max-vram``)."""

    async def prepare(self) -> ModelInfo | None:
        """Resolve ``config.model`` (and its draft) to local files; None if no model."""

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        """Supervise processes until cancelled; stop every child on the way out."""

    async def apply(self, plan: Plan, view: MeshView) -> None:
        """Make the running processes match ``plan``; must return quickly and be idempotent."""

    def api_base(self) -> str | None:
        """Base URL (``http://127.0.0.1:PORT``) of the local OpenAI server when ready; the
        core tunnels it to every node (service ``api``)."""

    def status(self) -> dict[str, Any]:
        """JSON-safe details for the console and ``/mesh/status``."""


class UI(Protocol):
    """A user interface. Built as ``factory(node, port)`` (port None: the UI's default)."""

    port: int | None

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        """Bind, set ``port``, call ``task_status.started()``, serve until cancelled."""

