"""The component interfaces plugins implement (structural: no base class needed)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from anyio.abc import ByteStream, TaskStatus

from meshcore.plan import Plan
from meshcore.state import MeshView


@dataclass(frozen=True)
class ModelInfo:
    """The model a node would serve as host, once resolved to local files."""

    name: str
    path: Path | None  # first shard for split GGUF; None for backends without files
    size: int  # bytes, all shards summed
    draft_name: str | None = None
    draft_path: Path | None = None


class Transport(Protocol):
    """Finds peers, gossips announcements into ``node.state`` and carries tunnels.

    Inbound tunnel streams are handed to ``await node.serve_inbound(service, stream)``.
    """

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        """Bind, call ``task_status.started()``, then serve until cancelled."""

    def invite_token(self) -> str | None:
        """A token other nodes pass to ``--join``; None before ``run`` started."""

    async def announce(self) -> None:
        """Send this node's current announcement (``node.state.me``) to every peer."""

    async def connect(self, peer_id: str, service: str) -> ByteStream:
        """Open a byte stream to ``service`` on ``peer_id`` (e.g. ``rpc``, ``llama``)."""

    def link(self, peer_id: str) -> str:
        """What carries traffic to this peer, for humans: ``QUIC``, ``TCP+AES-GCM``, ..."""

    # Optional (looked up with getattr, so not part of the Protocol): ``async
    # open_raw(peer_id, service, protocol_factory) -> asyncio.Transport | None`` connects the
    # tunnel to ``protocol_factory()`` and returns its asyncio Transport (half-close through
    # ``write_eof``), or None when no such path exists now. ``node.forward_port`` then splices
    # it to local connections in Protocol callbacks (meshcore.relay), skipping anyio streams.


class Backend(Protocol):
    """Runs inference processes according to the plan."""

    def detect_vram(self) -> int:
        """Bytes of accelerator memory this node can offer (before ``--max-vram``)."""

    async def prepare(self) -> ModelInfo | None:
        """Resolve ``config.model`` (and its draft) to local files; None if no model."""

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        """Supervise processes until cancelled; stop every child on the way out."""

    async def apply(self, plan: Plan, view: MeshView) -> None:
        """Make the running processes match ``plan``; must return quickly and be idempotent."""

    def api_base(self) -> str | None:
        """Base URL (``http://127.0.0.1:PORT``) of the local OpenAI server when ready."""

    def status(self) -> dict[str, Any]:
        """JSON-safe details for the console and ``/mesh/status``."""


class UI(Protocol):
    async def run(self, *, task_status: TaskStatus[None]) -> None:
        """Bind, call ``task_status.started()``, serve until cancelled."""
