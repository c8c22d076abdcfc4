"""A prometheus_client collector that reads one node at scrape time.

Nothing is cached between scrapes: every ``/metrics`` request reads the node's public handle
(``view()``, ``plan``, ``tunnel_status()``, ``counters``) and the latency statistics the
observer hook keeps (:mod:`mesh_llm_prometheus.latency`). Each section is collected on its
own; one that fails is logged, counted in ``mesh_llm_exporter_errors_total`` and left out,
so the rest of the scrape still arrives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from meshcore.fields import NAME
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from mesh_llm_prometheus.latency import ApiStats, Histogram

if TYPE_CHECKING:
    from meshcore.components import NodeHandle

log = logging.getLogger(__name__)

PREFIX = "mesh_llm"
ROLES = ("HOST", "WORKER", "CLIENT")  # meshcore.state.Role values
PLAN_STATES = ("SOLO", "SPLIT", "WAITING")  # meshcore.plan.PlanState values
SERVING = ("idle", "loading", "ready", "rpc", "error")  # meshcore.state.Serving values


def _text(value: Any) -> str:
    """A label value: enums by value, None as ""."""
    if value is None:
        return ""
    return str(getattr(value, "value", value))


def _count(value: Any) -> float | None:
    """A number from untrusted data (tunnel status, announcements), or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _one_hot(name: str, doc: str, label: str, known: Iterable[str],
             current: str) -> GaugeMetricFamily:
    """A state-set gauge: 1 for ``current``, 0 for every other known value."""
    family = GaugeMetricFamily(name, doc, labels=[label])
    values = list(known)
    if current not in values:
        values.append(current)
    for value in values:
        family.add_metric([value], 1.0 if value == current else 0.0)
    return family


class NodeCollector(Collector):
    """Collects one node's metrics; registered in the UI's own ``CollectorRegistry``."""

    def __init__(self, node: NodeHandle, stats: ApiStats | None) -> None:
        self.node = node
        self.stats = stats
        self.errors: dict[str, int] = {}

    def collect(self) -> Iterable[Metric]:
        sections: dict[str, Callable[[], Iterator[Metric]]] = {
            "node": self._node, "peers": self._peers, "plan": self._plan,
            "tunnels": self._tunnels, "api": self._api, "latency": self._latency,
        }
        for name, section in sections.items():
            try:
                families = list(section())
            except Exception:
                self.errors[name] = self.errors.get(name, 0) + 1
                if self.errors[name] == 1:  # the traceback once, not on every scrape
                    log.exception("metrics: cannot collect the %s section", name)
                else:
                    log.debug("metrics: cannot collect the %s section", name, exc_info=True)
                continue
            yield from families
        errors = CounterMetricFamily(f"{PREFIX}_exporter_errors",
                                     "Scrapes where a section of these metrics failed.",
                                     labels=["section"])
        for name in sections:
            errors.add_metric([name], float(self.errors.get(name, 0)))
        yield errors

    # ------------------------------------------------------------------ sections

    def _node(self) -> Iterator[Metric]:
        node, view = self.node, self.node.view()
        me = view.me
        name = NAME.read(me)  # --name
        model = node.model
        info = GaugeMetricFamily(f"{PREFIX}_node_info", "This node: always 1; the labels say "
                                 "what it is.",
                                 labels=["node_id", "name", "version", "model"])
        info.add_metric([node.id, name or "", me.version,
                         model.name if model is not None else _text(me.model)], 1.0)
        yield info
        yield _one_hot(f"{PREFIX}_node_role", "This node's announced role (1 for the current "
                       "one).", "role", ROLES, _text(me.role))
        yield _one_hot(f"{PREFIX}_node_serving", "What this node's backend is doing (1 for the "
                       "current state).", "serving", SERVING, _text(me.serving))
        yield GaugeMetricFamily(f"{PREFIX}_node_vram_bytes",
                                "Accelerator memory this node offers to the mesh.",
                                value=float(me.vram))
        yield GaugeMetricFamily(f"{PREFIX}_node_is_host", "1 when this node hosts the model.",
                                value=1.0 if node.plan.host_id == node.id else 0.0)

    def _peers(self) -> Iterator[Metric]:
        view = self.node.view()
        others = view.others
        peers = GaugeMetricFamily(f"{PREFIX}_peers", "Other nodes this node sees, by role.",
                                  labels=["role"])
        by_role = {role: 0 for role in ROLES}
        for peer in others:
            role = _text(peer.role)
            by_role[role] = by_role.get(role, 0) + 1
        for role, count in by_role.items():
            peers.add_metric([role], float(count))
        yield peers
        yield GaugeMetricFamily(f"{PREFIX}_mesh_nodes", "Nodes in the mesh, this one included.",
                                value=float(len(view.peers)))
        yield GaugeMetricFamily(f"{PREFIX}_mesh_vram_bytes",
                                "Accelerator memory of the whole mesh (clients excluded).",
                                value=float(view.total_vram))
        info = GaugeMetricFamily(f"{PREFIX}_peer_info", "Each other node: always 1.",
                                 labels=["peer_id", "role", "serving", "model", "version"])
        vram = GaugeMetricFamily(f"{PREFIX}_peer_vram_bytes",
                                 "Accelerator memory each other node offers.",
                                 labels=["peer_id"])
        rtt = GaugeMetricFamily(f"{PREFIX}_peer_rtt_seconds",
                                "Round-trip time to each other node, as this node measures it.",
                                labels=["peer_id"])
        for peer in others:
            info.add_metric([peer.id, _text(peer.role), _text(peer.serving), _text(peer.model),
                             peer.version], 1.0)
            vram.add_metric([peer.id], float(peer.vram))
            if (ms := _count(peer.rtt_ms)) is not None:
                rtt.add_metric([peer.id], ms / 1000)
        yield from (info, vram, rtt)

    def _plan(self) -> Iterator[Metric]:
        plan = self.node.plan
        yield _one_hot(f"{PREFIX}_plan_state", "The elected plan's state (1 for the current "
                       "one).", "state", PLAN_STATES, _text(plan.state))
        info = GaugeMetricFamily(f"{PREFIX}_plan_info", "The plan in force: always 1.",
                                 labels=["host_id", "model", "draft"])
        info.add_metric([_text(plan.host_id), _text(plan.model), _text(plan.draft)], 1.0)
        yield info
        yield GaugeMetricFamily(f"{PREFIX}_plan_participants",
                                "Devices holding layers (the host included).",
                                value=float(len(plan.participants)))
        share = GaugeMetricFamily(f"{PREFIX}_plan_share",
                                  "Each participant's fraction of the layers (tensor split).",
                                  labels=["peer_id", "rpc"])
        for part in plan.participants:
            share.add_metric([part.peer_id, "true" if part.rpc else "false"], float(part.share))
        yield share
        yield GaugeMetricFamily(f"{PREFIX}_plan_model_bytes", "Size of the planned model.",
                                value=float(plan.model_bytes))
        yield GaugeMetricFamily(f"{PREFIX}_plan_missing_vram_bytes",
                                "What a waiting plan still needs.",
                                value=float(plan.missing_vram))

    def _tunnels(self) -> Iterator[Metric]:
        # tunnel_status(): one dict per forward this node opened. The keys are read defensively
        # (peer, service, bytes_to_peer, bytes_from_peer, connections): the contract only says
        # "peer, service, port, bytes each way".
        totals: dict[tuple[str, str], list[float]] = {}
        for forward in self.node.tunnel_status():
            if not isinstance(forward, dict):
                continue
            key = (_text(forward.get("peer")), _text(forward.get("service")))
            row = totals.setdefault(key, [0.0, 0.0, 0.0, 0.0])
            row[0] += _count(forward.get("bytes_to_peer")) or 0.0
            row[1] += _count(forward.get("bytes_from_peer")) or 0.0
            row[2] += _count(forward.get("connections")) or 0.0
            row[3] += 1
        labels = ["peer_id", "service"]
        sent = CounterMetricFamily(f"{PREFIX}_tunnel_sent_bytes",
                                   "Bytes this node sent through its tunnels to each peer.",
                                   labels=labels)
        received = CounterMetricFamily(f"{PREFIX}_tunnel_received_bytes",
                                       "Bytes this node received through its tunnels from each "
                                       "peer.", labels=labels)
        connections = GaugeMetricFamily(f"{PREFIX}_tunnel_connections",
                                        "Connections of this node's forwards to each peer.",
                                        labels=labels)
        forwards = GaugeMetricFamily(f"{PREFIX}_tunnel_forwards",
                                     "Local forwards this node opened to each peer.",
                                     labels=labels)
        for (peer, service), (to_peer, from_peer, conns, count) in sorted(totals.items()):
            sent.add_metric([peer, service], to_peer)
            received.add_metric([peer, service], from_peer)
            connections.add_metric([peer, service], conns)
            forwards.add_metric([peer, service], count)
        yield from (sent, received, connections, forwards)

    def _api(self) -> Iterator[Metric]:
        counters = self.node.counters
        requests = CounterMetricFamily(f"{PREFIX}_api_requests",
                                       "Finished OpenAI API requests on this node, by HTTP "
                                       "status.", labels=["status"])
        for status, count in sorted(counters.by_status.items()):
            requests.add_metric([str(status)], float(count))
        yield requests
        yield CounterMetricFamily(f"{PREFIX}_api_requests_received",
                                  "OpenAI API requests this node's API received.",
                                  value=float(counters.requests))
        yield CounterMetricFamily(f"{PREFIX}_api_errors",
                                  "OpenAI API requests answered with a status >= 400.",
                                  value=float(counters.errors))
        yield CounterMetricFamily(f"{PREFIX}_api_prompt_tokens",
                                  "Prompt tokens of the requests (from the responses' usage).",
                                  value=float(counters.prompt_tokens))
        yield CounterMetricFamily(f"{PREFIX}_api_completion_tokens",
                                  "Completion tokens of the requests (from the responses' "
                                  "usage).", value=float(counters.completion_tokens))

    def _latency(self) -> Iterator[Metric]:
        stats = self.stats
        if stats is None:
            return
        yield GaugeMetricFamily(f"{PREFIX}_api_requests_in_flight",
                                "OpenAI API requests started and not finished yet.",
                                value=float(stats.in_flight))
        yield self._histogram(f"{PREFIX}_api_request_duration_seconds",
                              "Time from the request to the end of its response.",
                              stats.duration)
        yield self._histogram(f"{PREFIX}_api_first_byte_seconds",
                              "Time from the request to the first byte of its response.",
                              stats.first_byte)

    @staticmethod
    def _histogram(name: str, doc: str,
                   table: dict[tuple[str, bool], Histogram]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=["path", "stream"])
        for (path, stream), histogram in sorted(table.items()):
            family.add_metric([path, "true" if stream else "false"], histogram.cumulative(),
                              histogram.total)
        return family
