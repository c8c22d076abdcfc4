"""Which peers a heartbeat round pings: a few, in turn, not all of them (pure decisions).

Pinging every peer every round costs each node O(N) datagrams a second and the mesh O(N^2).
A round pings ``probes_per_round`` peers in turn (round-robin over the peer ids), plus the
peers that need an answer now: one with an unanswered PING (it is suspected until it
answers), one with no RTT yet (a node that just joined: the election waits for its RTT), and
the peers this node's plan depends on (the host for a worker, the workers for the host), so
a dead host is noticed within a round or two whatever the size of the mesh.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

PROBES_PER_ROUND = 3  # peers pinged in turn per round (more only where the silence limit needs)
TURNS_PER_LIMIT = 3  # every peer is pinged in turn at least 3 times per silence limit


def probes_per_round(peers: int, heartbeat_s: float, dead_after_s: float) -> int:
    """How many peers a round pings in turn: PROBES_PER_ROUND, or more when the mesh is so
    large that a turn would otherwise come round less than TURNS_PER_LIMIT times within
    ``dead_after_s`` (a peer must be heard from well within the silence limit)."""
    rounds = max(1.0, dead_after_s / TURNS_PER_LIMIT / max(heartbeat_s, 1e-3))
    return max(PROBES_PER_ROUND, math.ceil(peers / rounds))


def pick_probes(peers: Sequence[str], cursor: int, count: int,
                urgent: Collection[str]) -> tuple[list[str], int]:
    """The peers to ping this round (``count`` from ``cursor`` on in ``peers``' order,
    wrapping, plus every ``urgent`` one that is a peer) and the next round's cursor."""
    if not peers:
        return [], 0
    start = cursor % len(peers)
    turn = [peers[(start + i) % len(peers)] for i in range(min(count, len(peers)))]
    chosen = set(turn)
    extra = [p for p in peers if p in urgent and p not in chosen]
    return turn + extra, (start + len(turn)) % len(peers)
