"""The election's output: who hosts, who takes part, with which tensor split."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class PlanState(StrEnum):
    SOLO = "SOLO"  # the host serves alone, on its own device
    SPLIT = "SPLIT"  # the host plus remote rpc workers
    WAITING = "WAITING"  # no plan can run yet; ``reason`` says why


@dataclass(frozen=True)
class Participant:
    """A device that holds layers. The host drives its own device directly (rpc=False)."""

    peer_id: str
    vram: int
    share: float  # fraction of layers, two decimals
    rpc: bool  # True: reached as an ``--rpc`` entry through a tunnel


@dataclass(frozen=True)
class ElectionRequest:
    """What the election needs beyond the view: options every node agrees on."""

    overhead: float = 1.1  # needed VRAM = model bytes x overhead
    draft_allowed: bool = True
    max_rtt_ms: float = 80.0  # peers slower than this are not pulled into a split
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    state: PlanState
    host_id: str | None = None
    participants: tuple[Participant, ...] = ()  # llama-server device order: host first
    model: str | None = None
    model_bytes: int = 0
    draft: str | None = None
    reason: str = ""

    @property
    def tensor_split(self) -> tuple[float, ...]:
        return tuple(p.share for p in self.participants)

    @property
    def workers(self) -> tuple[Participant, ...]:
        """Participants reached through RPC (the ``--rpc`` entries), in device order."""
        return tuple(p for p in self.participants if p.rpc)

    def includes(self, peer_id: str) -> bool:
        return any(p.peer_id == peer_id for p in self.participants)

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "host_id": self.host_id,
            "participants": [
                {"peer_id": p.peer_id, "vram": p.vram, "share": p.share, "rpc": p.rpc}
                for p in self.participants
            ],
            "tensor_split": list(self.tensor_split),
            "model": self.model,
            "model_bytes": self.model_bytes,
            "draft": self.draft,
            "reason": self.reason,
        }


WAITING_FOR_PEERS = Plan(PlanState.WAITING, reason="election in progress: no node can host yet")


def shares(vrams: list[int]) -> list[float]:
    """VRAM shares rounded to two decimals, adjusted so they sum to exactly 1.00."""
    total = sum(vrams)
    if total <= 0:
        return [round(1 / len(vrams), 2) for _ in vrams] if vrams else []
    out = [round(v / total, 2) for v in vrams]
    drift = round(1.0 - sum(out), 2)
    if out and drift:
        biggest = max(range(len(out)), key=lambda i: out[i])
        out[biggest] = round(out[biggest] + drift, 2)
    return out
