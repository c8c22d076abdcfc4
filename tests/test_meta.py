"""Meta-tests: every hookspec is documented in docs/plugins.md and called by a test."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import typer
from meshcore_cli import cli

from meshcore import hookimpl, hookspecs
from meshcore.config import NodeConfig
from meshcore.node import Node
from meshcore.plugins import get_plugin_manager
from meshcore.state import Serving

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
HOOKS = sorted(name for name, obj in vars(hookspecs).items()
               if name.startswith("meshcore_") and inspect.isfunction(obj))


class Recorder:
    """Implements every hook and records each call (name -> keyword arguments)."""

    def __init__(self) -> None:
        self.calls: dict[str, list[dict[str, Any]]] = {}

    def _record(self, name: str, **kwargs: Any) -> None:
        self.calls.setdefault(name, []).append(kwargs)

    @hookimpl
    def meshcore_register_transports(self, register: Any) -> None:
        self._record("meshcore_register_transports", register=register)

    @hookimpl
    def meshcore_register_elections(self, register: Any) -> None:
        self._record("meshcore_register_elections", register=register)

    @hookimpl
    def meshcore_register_backends(self, register: Any) -> None:
        self._record("meshcore_register_backends", register=register)

    @hookimpl
    def meshcore_register_uis(self, register: Any) -> None:
        self._record("meshcore_register_uis", register=register)

    @hookimpl
    def meshcore_register_commands(self, app: typer.Typer) -> None:
        self._record("meshcore_register_commands", app=app)

    @hookimpl
    def meshcore_configure(self, config: NodeConfig) -> None:
        self._record("meshcore_configure", config=config)

    @hookimpl
    def meshcore_mesh_changed(self, node: Node, view: Any) -> None:
        self._record("meshcore_mesh_changed", node=node, view=view)

    @hookimpl
    def meshcore_plan_changed(self, node: Node, plan: Any) -> None:
        self._record("meshcore_plan_changed", node=node, plan=plan)

    @hookimpl
    def meshcore_api_request(self, node: Node, event: Any) -> None:
        self._record("meshcore_api_request", node=node, event=event)

    @hookimpl
    def meshcore_console_routes(self, node: Node) -> list[Any]:
        self._record("meshcore_console_routes", node=node)
        return ["recorder-route"]


def test_docs_cover_every_hook() -> None:
    doc = (ROOT / "docs" / "plugins.md").read_text()
    headings = set(re.findall(r"^#+ `(meshcore_\w+)", doc, flags=re.M))
    missing = [h for h in HOOKS if h not in headings]
    assert not missing, f"hooks without a '### `name`' section in docs/plugins.md: {missing}"
    unknown = headings - set(HOOKS)
    assert not unknown, f"docs/plugins.md documents hooks that do not exist: {unknown}"


def test_every_hookspec_has_a_docstring_saying_how_it_is_called() -> None:
    for name in HOOKS:
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        assert "Sync" in doc or "sync" in doc, f"{name}: say whether it is sync or async"


def test_recorder_implements_every_hook() -> None:
    implemented = sorted(n for n in vars(Recorder) if n.startswith("meshcore_"))
    assert implemented == HOOKS


async def test_every_hook_is_called(tmp_path: Path) -> None:
    """A running node calls every hook with the documented arguments."""
    recorder = Recorder()
    pm = get_plugin_manager()
    pm.register(recorder, name="recorder")
    config = NodeConfig(model="m", backend="fake", transport="memory", api_port=0,
                        settle_s=0.01, state_dir=tmp_path, node_id="solo")
    node = Node(config, pm=pm)
    async with anyio.create_task_group() as tg:
        await tg.start(node.run)
        with anyio.fail_after(30):
            while node.state.me.serving is not Serving.READY:
                await anyio.sleep(0.01)
        async with httpx.AsyncClient() as client:
            r = await client.post(f"http://127.0.0.1:{node.api_port}/v1/chat/completions",
                                  json={"messages": [{"role": "user", "content": "a b"}]})
        assert r.status_code == 200
        node.stop()
    # the console plugin calls this when it builds its app; call it the same way
    routes = pm.hook.meshcore_console_routes(node=node)
    assert "recorder-route" in [r for per_plugin in routes for r in per_plugin]
    cli.build_app(pm)
    calls = recorder.calls
    assert sorted(calls) == HOOKS
    assert calls["meshcore_configure"] == [{"config": config}]
    assert calls["meshcore_plan_changed"][0]["plan"].host_id == "solo"
    assert calls["meshcore_mesh_changed"][0]["view"].self_id == "solo"
    assert isinstance(calls["meshcore_register_commands"][0]["app"], typer.Typer)
    started, finished = (c["event"] for c in calls["meshcore_api_request"])
    assert (started.phase, finished.phase, finished.status) == ("started", "finished", 200)
    assert finished.completion_tokens == 2 and finished.path == "/v1/chat/completions"
    assert (finished.drafted, finished.draft_accepted) == (2, 1)  # the fake's timings
    assert all(callable(calls[h][0]["register"]) for h in HOOKS if "_register_" in h
               and h != "meshcore_register_commands")


def test_configure_is_historic() -> None:
    """A plugin registered after the node configured still gets the config."""
    pm = get_plugin_manager()
    config = NodeConfig(model="m", backend="fake", transport="memory")
    pm.hook.meshcore_configure.call_historic(kwargs={"config": config})
    late = Recorder()
    pm.register(late, name="late")
    assert late.calls["meshcore_configure"] == [{"config": config}]
