"""The mesh data model: Peer announcements, the node-owned MeshState and immutable MeshView."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import anyio


class Role(StrEnum):
    HOST = "HOST"
    WORKER = "WORKER"
    CLIENT = "CLIENT"


class Serving(StrEnum):
    """What a node's backend is doing right now."""

    IDLE = "idle"
    LOADING = "loading"
    READY = "ready"  # host: llama-server answers /health
    RPC = "rpc"  # worker: rpc-server is up for the host
    ERROR = "error"


MAX_TEXT = 128  # node ids: printable ASCII (they appear in logs, the console and commands)
MAX_COUNT = 2**62  # vram, model_bytes, seq: far above any real value, far below overflow


def _short_text(value: Any, limit: int = MAX_TEXT, *, ascii_only: bool = True,
                empty: bool = False) -> bool:
    return (isinstance(value, str) and (empty or value != "") and len(value) <= limit
            and (value.isascii() or not ascii_only) and value.isprintable())


@dataclass(frozen=True)
class Peer:
    """One node's announcement, as gossiped. Every field is plain data (JSON-safe)."""

    id: str
    role: Role = Role.WORKER
    vram: int = 0  # bytes this node offers (after --max-vram)
    model: str | None = None  # model this node would serve as host
    model_bytes: int = 0  # all shards summed
    draft: str | None = None
    serving: Serving = Serving.IDLE
    addresses: tuple[str, ...] = ()
    version: str = ""
    rtt_ms: float | None = None  # measured by the observer, not announced
    split: bool = False  # asks the mesh to split even if the model fits on the host
    seq: int = 0  # announcement counter; a higher one replaces a lower one
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_client(self) -> bool:
        return self.role is Role.CLIENT

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["role"] = self.role.value
        data["serving"] = self.serving.value
        data["addresses"] = list(self.addresses)
        data["extra"] = dict(self.extra)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Peer:
        """Build a Peer from gossip; unknown keys are ignored, bad values raise ValueError."""
        if not isinstance(data, Mapping) or not _short_text(data.get("id")):
            raise ValueError(f"peer record needs an 'id' of 1-{MAX_TEXT} printable ASCII "
                             "characters")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        try:
            kwargs["role"] = Role(kwargs.get("role", Role.WORKER))
            kwargs["serving"] = Serving(kwargs.get("serving", Serving.IDLE))
            addresses, extra = kwargs.get("addresses", ()), kwargs.get("extra") or {}
            if not isinstance(addresses, list | tuple) or not all(
                    isinstance(a, str) for a in addresses):
                raise ValueError(f"addresses must be a list of strings, got {addresses!r}")
            if not isinstance(extra, Mapping):
                raise ValueError(f"extra must be an object, got {extra!r}")
            kwargs["addresses"] = tuple(addresses)
            kwargs["extra"] = dict(extra)
            for name in ("vram", "model_bytes", "seq"):
                value = kwargs.get(name, 0)
                if (not isinstance(value, int) or isinstance(value, bool)
                        or not 0 <= value <= MAX_COUNT):
                    raise ValueError(f"{name} must be an integer from 0 to 2**62, "
                                     f"got {value!r:.40}")
            _check_types(kwargs)
        except (TypeError, KeyError) as exc:
            raise ValueError(f"bad peer record: {exc}") from exc
        return cls(**kwargs)


def _check_types(kwargs: Mapping[str, Any]) -> None:
    """Reject gossip fields of the wrong type (ValueError), so a bad record never gets in."""
    for name in ("model", "draft"):
        if kwargs.get(name) is not None and not _short_text(kwargs[name], 512,
                                                             ascii_only=False, empty=True):
            raise ValueError(f"{name} must be a printable string or null, "
                             f"got {kwargs[name]!r:.60}")
    if not _short_text(kwargs.get("version", ""), 64, empty=True):
        raise ValueError(f"version must be a short string, got {kwargs['version']!r:.60}")
    if len(kwargs.get("addresses", ())) > 64:
        raise ValueError("more than 64 addresses")
    if not isinstance(kwargs.get("split", False), bool):
        raise ValueError(f"split must be a boolean, got {kwargs['split']!r}")
    rtt = kwargs.get("rtt_ms")
    if rtt is not None and (isinstance(rtt, bool) or not isinstance(rtt, int | float)
                            or not rtt >= 0):
        raise ValueError(f"rtt_ms must be a non-negative number or null, got {rtt!r}")


@dataclass(frozen=True)
class MeshView:
    """An immutable snapshot of the mesh as one node sees it (itself included)."""

    self_id: str
    peers: tuple[Peer, ...]  # sorted by id
    generation: int = 0

    @property
    def me(self) -> Peer:
        return self.get(self.self_id) or Peer(id=self.self_id)

    def get(self, peer_id: str) -> Peer | None:
        return next((p for p in self.peers if p.id == peer_id), None)

    @property
    def others(self) -> tuple[Peer, ...]:
        return tuple(p for p in self.peers if p.id != self.self_id)

    @property
    def total_vram(self) -> int:
        return sum(p.vram for p in self.peers if not p.is_client)


class MeshState:
    """The mutable mesh state, owned by the Node. Transports call upsert/remove; every change
    bumps the generation and wakes whoever waits in :meth:`changed`."""

    def __init__(self, me: Peer) -> None:
        self._self_id = me.id
        self._peers: dict[str, Peer] = {me.id: me}
        self._generation = 0
        self._event = anyio.Event()

    @property
    def self_id(self) -> str:
        return self._self_id

    @property
    def me(self) -> Peer:
        return self._peers[self._self_id]

    def _bump(self) -> None:
        self._generation += 1
        self._event.set()
        self._event = anyio.Event()

    def update_me(self, **changes: Any) -> Peer:
        """Change this node's own announcement (bumps seq); returns the new Peer."""
        me = self.me
        new = dataclasses.replace(me, seq=me.seq + 1, **changes)
        self._peers[self._self_id] = new
        self._bump()
        return new

    def upsert(self, peer: Peer) -> bool:
        """Add or replace a remote peer; ignores stale announcements. True when it changed."""
        if peer.id == self._self_id:
            return False
        old = self._peers.get(peer.id)
        if old is not None:
            if peer.seq < old.seq:
                return False
            if peer.rtt_ms is None and old.rtt_ms is not None:
                peer = dataclasses.replace(peer, rtt_ms=old.rtt_ms)
            if old == peer:
                return False
        self._peers[peer.id] = peer
        self._bump()
        return True

    def set_rtt(self, peer_id: str, rtt_ms: float) -> None:
        """Record the measured RTT of a peer without bumping the generation (RTT is noisy)."""
        if (old := self._peers.get(peer_id)) is not None and peer_id != self._self_id:
            self._peers[peer_id] = dataclasses.replace(old, rtt_ms=round(rtt_ms, 3))

    def remove(self, peer_id: str) -> bool:
        if peer_id == self._self_id or peer_id not in self._peers:
            return False
        del self._peers[peer_id]
        self._bump()
        return True

    def view(self) -> MeshView:
        peers = tuple(sorted(self._peers.values(), key=lambda p: p.id))
        return MeshView(self._self_id, peers, self._generation)

    @property
    def generation(self) -> int:
        return self._generation

    async def changed(self, since: int) -> int:
        """Wait until the generation is past ``since``; returns the new generation."""
        while self._generation <= since:
            await self._event.wait()
        return self._generation
