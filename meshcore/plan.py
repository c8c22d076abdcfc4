"""The election's output: who hosts, who takes part, with which tensor split."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from meshcore.state import MeshView


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
    options: Mapping[str, str] = field(default_factory=dict)  # --election-opt KEY=VALUE
    elections: Mapping[str, Callable[..., Plan]] = field(default_factory=dict, compare=False,
                                                         repr=False)

    def delegate(self, name: str, view: MeshView) -> Plan:
        """Run the registered election ``name`` on ``view`` (e.g. the default ``vram``)."""
        if name not in self.elections:
            raise LookupError(f"no election named {name!r} to delegate to; installed: "
                              f"{', '.join(sorted(self.elections)) or 'none'}")
        return self.elections[name](view, self)


@dataclass(frozen=True)
class Plan:
    state: PlanState
    host_id: str | None = None
    participants: tuple[Participant, ...] = ()  # device order: --rpc entries, then the host
    model: str | None = None
    model_bytes: int = 0
    draft: str | None = None
    reason: str = ""
    missing_vram: int = 0  # WAITING for VRAM: how many more bytes the mesh needs

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
        return {**dataclasses.asdict(self), "state": self.state.value,
                "participants": [dataclasses.asdict(p) for p in self.participants],
                "tensor_split": list(self.tensor_split)}


WAITING_FOR_PEERS = Plan(PlanState.WAITING, reason="election in progress: no node can host yet")


def shares(vrams: list[int]) -> list[float]:
    """VRAM shares in hundredths that sum to exactly 1.00, none negative.

    Largest remainder: each share is rounded down, then the hundredths left over go to the
    largest remainders (ties: earlier device). Plain rounding plus a fix-up on the biggest
    share can go negative with many devices. All-zero VRAM splits evenly.
    """
    if not vrams:
        return []
    weights = [max(v, 0) for v in vrams]
    total = sum(weights)
    if total <= 0:
        weights, total = [1] * len(vrams), len(vrams)
    units = [w * 100 // total for w in weights]
    order = sorted(range(len(weights)), key=lambda i: (-(weights[i] * 100 % total), i))
    for i in order[: 100 - sum(units)]:
        units[i] += 1
    return [u / 100 for u in units]
