"""The ``metrics`` UI: a small starlette app serving ``GET /metrics`` for one node.

Each UI owns its own :class:`prometheus_client.CollectorRegistry` (never the module-level
global one), so several nodes in one process each export only themselves. The app listens on
``node.config.bind_host`` (loopback unless ``--listen-all``); when the node has an
``--api-key``, ``/metrics`` asks for it too (``Authorization: Bearer KEY``).
"""

from __future__ import annotations

import functools
import logging
import secrets

import anyio
from anyio.abc import TaskStatus
from meshcore.components import NodeHandle
from meshcore.server import serve_asgi
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from mesh_llm_prometheus import latency
from mesh_llm_prometheus.collector import NodeCollector

log = logging.getLogger(__name__)

INDEX = "mesh-llm Prometheus exporter: scrape /metrics\n"


class MetricsUI:
    """A UI (``meshcore.components.UI``): serves the node's metrics until cancelled."""

    port: int | None

    def __init__(self, node: NodeHandle, port: int) -> None:
        self.node = node
        self.port = None  # set once bound (the requested port may be 0: any free one)
        self.requested_port = port
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(NodeCollector(node, latency.track(node)))
        self.app = Starlette(routes=[Route("/", self.index, methods=["GET"]),
                                     Route("/metrics", self.metrics, methods=["GET"])])

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        host = self.node.config.bind_host
        async with anyio.create_task_group() as tg:
            bound = await tg.start(functools.partial(serve_asgi, self.app, host,
                                                     self.requested_port))
            self.port = int(bound)
            log.info("prometheus exporter on http://%s:%d/metrics", host, self.port)
            task_status.started()

    def _authorized(self, request: Request) -> bool:
        key = self.node.config.api_key
        if not key:
            return True
        given = request.headers.get("authorization", "")
        return secrets.compare_digest(given.encode(), f"Bearer {key}".encode())

    async def index(self, request: Request) -> Response:
        return PlainTextResponse(INDEX)

    async def metrics(self, request: Request) -> Response:
        # async on purpose: the collector reads the node on the node's event loop, never
        # from starlette's thread pool.
        if not self._authorized(request):
            return PlainTextResponse("missing or wrong API key: send 'Authorization: Bearer "
                                     "<key>' (the node's --api-key)\n", 401,
                                     headers={"WWW-Authenticate": "Bearer"})
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(self.registry), headers={"Content-Type": content_type})
