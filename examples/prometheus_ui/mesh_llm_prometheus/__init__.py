"""mesh-llm plugin ``metrics``: a UI that serves the node's state as Prometheus metrics.

Start it with ``mesh-llm ... --ui metrics`` (port 9464) or ``--ui metrics=PORT`` and scrape
``http://HOST:PORT/metrics``. This module holds only the hook implementations and stays light
(``mesh-llm --help`` imports it): prometheus_client, starlette and uvicorn are imported when
the UI is built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from meshcore import hookimpl

from mesh_llm_prometheus import latency

if TYPE_CHECKING:
    from meshcore.api import ApiEvent
    from meshcore.components import NodeHandle

    from mesh_llm_prometheus.ui import MetricsUI

__version__ = "0.1.0"
UI_NAME = "metrics"
DEFAULT_PORT = 9464  # the port Prometheus exporters conventionally use for OpenTelemetry


def _factory(node: NodeHandle, port: int | None) -> MetricsUI:
    from mesh_llm_prometheus.ui import MetricsUI

    return MetricsUI(node, DEFAULT_PORT if port is None else port)


@hookimpl
def meshcore_register_uis(register: Callable[[str, Callable[..., Any]], None]) -> None:
    register(UI_NAME, _factory)


@hookimpl
def meshcore_api_request(node: NodeHandle, event: ApiEvent) -> None:
    latency.observe(node, event)
