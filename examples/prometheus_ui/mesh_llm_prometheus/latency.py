"""Per-node API request statistics fed by the ``meshcore_api_request`` observer hook.

The core already counts requests, errors and tokens (``node.counters``); what it does not keep
is how long requests took. This module keeps latency histograms and an in-flight gauge for
every node that runs the ``metrics`` UI, keyed by the node object in a
:class:`weakref.WeakKeyDictionary` (several nodes may live in one process, and a stopped node
must not be kept alive by its statistics). Standard library only: the hook module imports it,
and ``mesh-llm --help`` imports every plugin's hook module.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshcore.api import ApiEvent

log = logging.getLogger(__name__)

# LLM requests range from tens of milliseconds (a cached short prompt) to minutes.
BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                              300.0)
MAX_SERIES = 32  # distinct (path, stream) label sets kept; later ones are counted as "other"
OTHER_PATH = "other"


@dataclass
class Histogram:
    """A fixed-bucket histogram: ``counts[i]`` for ``value <= BUCKETS[i]``, the last slot +Inf."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        value = max(0.0, value)
        index = next((i for i, bound in enumerate(BUCKETS) if value <= bound), len(BUCKETS))
        self.counts[index] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus buckets: ``(le, cumulative count)``, ending with ``+Inf``."""
        running, out = 0, []
        for bound, count in zip((*map(str, BUCKETS), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, float(running)))
        return out


@dataclass
class ApiStats:
    """What one node's API requests looked like, as the observer hook saw them."""

    duration: dict[tuple[str, bool], Histogram] = field(default_factory=dict)
    first_byte: dict[tuple[str, bool], Histogram] = field(default_factory=dict)
    in_flight: int = 0
    started: int = 0
    finished: int = 0

    def _series(self, table: dict[tuple[str, bool], Histogram], path: str,
                stream: bool) -> Histogram:
        key = (path, stream)
        if key not in table and len(table) >= MAX_SERIES:
            key = (OTHER_PATH, stream)  # bounded label cardinality, whatever paths arrive
        return table.setdefault(key, Histogram())

    def observe(self, event: ApiEvent) -> None:
        """Record one ``meshcore.api.ApiEvent`` (``started`` or ``finished``)."""
        phase = event.phase
        if phase == "started":
            self.started += 1
            self.in_flight += 1
            return
        if phase != "finished":
            return
        self.finished += 1
        self.in_flight = max(0, self.in_flight - 1)
        path = event.path if isinstance(event.path, str) else OTHER_PATH
        stream = event.stream is True
        seconds = event.seconds
        if isinstance(seconds, int | float) and not isinstance(seconds, bool):
            self._series(self.duration, path, stream).observe(float(seconds))
        first = event.first_byte_s
        if isinstance(first, int | float) and not isinstance(first, bool):
            self._series(self.first_byte, path, stream).observe(float(first))


_STATS: weakref.WeakKeyDictionary[Any, ApiStats] = weakref.WeakKeyDictionary()


def track(node: Any) -> ApiStats | None:
    """Start keeping statistics for ``node`` (the metrics UI calls this when it is built);
    returns them, or None when the node object cannot be a weak dictionary key."""
    try:
        stats = _STATS.get(node)
        if stats is None:
            stats = _STATS[node] = ApiStats()
        return stats
    except TypeError as exc:  # not hashable or not weak-referenceable
        log.warning("metrics: no request latency for this node (%s)", exc)
        return None


def observe(node: Any, event: ApiEvent) -> None:
    """The hook's work: update ``node``'s statistics if its metrics UI tracks it."""
    try:
        stats = _STATS.get(node)
    except TypeError:
        return
    if stats is not None:
        stats.observe(event)
