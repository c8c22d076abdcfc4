"""The ``openai-proxy`` Backend: hosts an existing OpenAI server (or the echo model) for a mesh.

The node that the plan makes host serves a loopback ASGI app (``meshcore.server.serve_asgi``)
and returns its URL from :meth:`OpenAIProxyBackend.api_base` once ready; the core tunnels that
URL to every other node, so a mesh of default nodes reaches it through any node's API. Nothing
here names a tunnel service: the contract (``Backend.api_base``) is all the plugin needs.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import anyio
import httpx
from anyio.abc import TaskStatus
from meshcore.components import Capabilities, ModelInfo, NodeHandle
from meshcore.plan import Plan, PlanState
from meshcore.server import serve_asgi
from meshcore.state import MeshView, Serving

from mesh_llm_openai_proxy.app import ProxyStats, build_app
from mesh_llm_openai_proxy.settings import ProxySettings

log = logging.getLogger(__name__)

NAME = "openai-proxy"
RETRY_S = 2.0  # after the local server failed, wait this long before serving again
PROBE_EVERY_S = 0.5  # upstream probe interval while loading


class OpenAIProxyBackend:
    """A Backend (``meshcore.components.Backend``) with no processes of its own: while this
    node hosts it serves one local ASGI app, forwarding to ``proxy_url`` or echoing."""

    capabilities = Capabilities(host=True, rpc_worker=False, uses_workers=False)

    def __init__(self, node: NodeHandle) -> None:
        self._node = node
        self.settings = ProxySettings.from_options(node.config.options, node.config.model)
        self._plan: Plan | None = None
        self._wake = anyio.Event()
        self._scope: anyio.CancelScope | None = None
        self._url: str | None = None
        self._serving = Serving.IDLE
        self._error: str | None = None
        self._ready_since: float | None = None
        self._stats = ProxyStats()

    # ------------------------------------------------------------ Backend protocol

    def detect_vram(self) -> int:
        return self.settings.vram_bytes

    async def prepare(self) -> ModelInfo | None:
        if self._node.config.client or self.settings.model is None:
            return None
        return ModelInfo(name=self.settings.model, path=None, size=self.settings.model_bytes)

    async def apply(self, plan: Plan, view: MeshView) -> None:
        """Remember the plan and wake :meth:`run`; stops serving at once when no longer host."""
        self._plan = plan
        if not self._hosting() and self._scope is not None:
            self._scope.cancel()
        self._wake.set()
        self._wake = anyio.Event()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                while not self._hosting():
                    await self._wake.wait()
                with anyio.CancelScope() as self._scope:
                    try:
                        await self._serve()
                    except Exception as exc:
                        log.exception("openai-proxy: the local server failed")
                        self._report(Serving.ERROR, f"{type(exc).__name__}: {exc}")
                        await anyio.sleep(RETRY_S)
                self._scope = None
                self._url = None
                if not self._hosting():
                    self._report(Serving.IDLE)
        finally:
            self._scope = None
            self._url = None

    def api_base(self) -> str | None:
        return self._url

    def status(self) -> dict[str, Any]:
        return {
            "backend": NAME,
            "mode": self.settings.mode,
            "proxy_url": self.settings.proxy_url,
            "model": self.settings.model,
            "upstream_model": self.settings.upstream_model,
            "hosting": self._hosting(),
            "serving": self._serving.value,
            "api_base": self._url,
            "ready_since": self._ready_since,
            "error": self._error,
            "requests": self._stats.requests,
            "errors": self._stats.errors,
            "by_status": {str(k): v for k, v in sorted(self._stats.by_status.items())},
            "last_error": self._stats.last_error,
        }

    # ------------------------------------------------------------ internals

    def _hosting(self) -> bool:
        plan = self._plan
        return (plan is not None and plan.state is not PlanState.WAITING
                and plan.host_id == self._node.id and self._node.model is not None)

    def _report(self, serving: Serving, error: str | None = None) -> None:
        """Tell the mesh what we serve (only on a change: set_serving gossips)."""
        if (serving, error) == (self._serving, self._error):
            return
        self._serving, self._error = serving, error
        self._ready_since = time.time() if serving is Serving.READY else None
        self._node.set_serving(serving, error=error)

    async def _serve(self) -> None:
        """Serve until cancelled: bind the app, wait for the upstream, report READY."""
        info = self._node.model
        model = info.name if info is not None else (self.settings.model or NAME)
        self._report(Serving.LOADING)
        async with contextlib.AsyncExitStack() as stack:
            client = None
            if self.settings.proxy_url is not None:
                timeout = httpx.Timeout(self.settings.timeout_s, connect=10.0)
                client = await stack.enter_async_context(httpx.AsyncClient(
                    base_url=self.settings.proxy_url, timeout=timeout, trust_env=False))
            app = build_app(self.settings, model, self._stats, client)
            async with anyio.create_task_group() as tg:
                port: int = await tg.start(serve_asgi, app, "127.0.0.1", 0)
                if client is not None:
                    await self._wait_upstream(client)
                self._url = f"http://127.0.0.1:{port}"
                self._report(Serving.READY)
                log.info("openai-proxy: serving %s (%s) at %s", model, self.settings.mode,
                         self._url)
                await anyio.sleep_forever()

    async def _wait_upstream(self, client: httpx.AsyncClient) -> None:
        """Until the upstream answers HTTP at all (any status: some servers lack /v1/models);
        past ``proxy_ready_timeout_s`` report ``error`` but keep trying."""
        deadline = time.monotonic() + self.settings.ready_timeout_s
        while True:
            try:
                await client.get("/v1/models", timeout=5.0)
                return
            except httpx.HTTPError as exc:
                if time.monotonic() > deadline:
                    self._report(Serving.ERROR, f"upstream {self.settings.proxy_url} "
                                                f"unreachable: {type(exc).__name__}")
            await anyio.sleep(PROBE_EVERY_S)
