"""Hostile plugins: each hook kind raising, an election returning garbage, a factory and a UI
that fail. The node keeps serving, or refuses to start naming the plugin; never a traceback."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from meshcore_testing.pytest_plugin import MeshProcess
from test_plugins import install_plugin

from meshcore.plan import PlanState

pytestmark = pytest.mark.anyio

HOSTILE = '''
"""Every hook it implements misbehaves (observers raise; elections raise or lie)."""
from meshcore import hookimpl
from meshcore.plan import Participant, Plan, PlanState

CALLS = {"flaky": 0}


def flaky(view, request):
    """A good plan the first time, then in turn an exception and garbage."""
    CALLS["flaky"] += 1
    host = max((p for p in view.peers if p.model), key=lambda p: p.id, default=None)
    if CALLS["flaky"] > 1 and CALLS["flaky"] % 2:
        raise RuntimeError("flaky election broke")
    if CALLS["flaky"] > 1:
        return "not a plan"
    if host is None:
        return Plan(PlanState.WAITING, reason="flaky: nobody")
    return Plan(PlanState.SOLO, host_id=host.id, model=host.model,
                participants=(Participant(host.id, host.vram, 1.0, False),), reason="flaky")


def raises(view, request):
    raise ValueError("this election always raises")


class Boom:
    def __init__(self, node, *args):
        raise OSError("no such device: /dev/boom")


class BrokenUI:
    port = None

    def __init__(self, node, port=None):
        pass

    async def run(self, *, task_status):
        raise RuntimeError("cannot bind the broken UI")


@hookimpl
def meshcore_register_elections(register):
    register("flaky", flaky)
    register("raises", raises)


@hookimpl
def meshcore_register_backends(register):
    register("boom", Boom)


@hookimpl
def meshcore_register_uis(register):
    register("broken", BrokenUI)


@hookimpl
def meshcore_mesh_changed(node, view):
    raise RuntimeError("observer of mesh changes broke")


@hookimpl
def meshcore_plan_changed(node, plan):
    raise KeyError("observer of plans broke")


@hookimpl
def meshcore_api_request(node, event):
    raise ZeroDivisionError("API observer broke")


@hookimpl
def meshcore_console_routes(node):
    raise RuntimeError("console routes broke")
'''

BAD_REGISTRATION = '''
from meshcore import hookimpl


@hookimpl
def meshcore_register_backends(register):
    raise RuntimeError("registration broke")
'''


@pytest.fixture
def hostile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    site = tmp_path / "site"
    site.mkdir()
    install_plugin(site, "meshcore-hostile", "6.6.6", "hostile", "meshcore_hostile", HOSTILE)
    monkeypatch.syspath_prepend(str(site))
    try:
        yield site
    finally:
        sys.modules.pop("meshcore_hostile", None)


def env_with(site: Path) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


async def chat(port: int) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                 json={"messages": [{"role": "user", "content": "still here"}]})


@pytest.mark.usefixtures("hostile")
async def test_raising_observers_are_named_and_skipped(mesh_harness: Callable[..., Any],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    async with mesh_harness() as mesh:
        a = await mesh.add(8, console_port=0)
        b = await mesh.add(4)
        await mesh.wait_for(lambda: a.plan.host_id == a.id and b.plan.host_id == a.id,
                            what="one plan despite the raising observers")
        await mesh.wait_for(lambda: a.service_address("api") is not None, what="host ready")
        r = await chat(b.api_port)
        assert r.status_code == 200 and "still here" in r.text
        async with httpx.AsyncClient() as client:  # the console started, without those routes
            page = await client.get(f"http://127.0.0.1:{a.uis['console'].port}/api/status")
        assert page.status_code == 200
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for hook in ("meshcore_mesh_changed", "meshcore_plan_changed", "meshcore_api_request",
                 "meshcore_console_routes"):
        assert f"plugin hostile, hook {hook}:" in logged, hook
    assert b.counters.requests == 1 and b.counters.errors == 0


@pytest.mark.usefixtures("hostile")
async def test_an_election_that_raises_or_lies_keeps_the_plan_in_force(
        mesh_harness: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    async with mesh_harness(election="flaky") as mesh:
        a = await mesh.add(8)
        await mesh.wait_for(lambda: a.plan.state is PlanState.SOLO, what="the first plan")
        good = a.plan
        for i in range(4):  # every change makes it elect again: it raises, then lies
            a.announce(name=f"round-{i}")
            await mesh.wait_for(lambda i=i: sum("keeping the current plan" in r.getMessage()
                                                for r in caplog.records) > i, what="failure")
        assert a.plan == good
        assert (await chat(a.api_port)).status_code == 200
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "plugin hostile, election 'flaky': RuntimeError: flaky election broke" \
        in logged
    assert "returned str, not a Plan; keeping the current plan" in logged


@pytest.mark.usefixtures("hostile")
async def test_an_election_that_always_raises_leaves_the_node_up(
        mesh_harness: Callable[..., Any]) -> None:
    async with mesh_harness(election="raises") as mesh:
        a = await mesh.add(8)
        time.sleep(0.2)
        r = await chat(a.api_port)
        assert r.status_code == 503  # no plan ever, but the API answers and says why
        assert "election in progress" in r.json()["error"]["message"]


@pytest.mark.parametrize(("args", "message"), [
    (["--backend", "boom"], "error: plugin hostile, backend 'boom': could not be created: "
                            "OSError: no such device: /dev/boom"),
    (["--backend", "fake", "--ui", "broken"], "error: plugin hostile, ui 'broken': failed to "
                                              "start: cannot bind the broken UI"),
])
def test_a_failing_factory_or_ui_stops_the_start_naming_the_plugin(
        hostile: Path, tmp_path: Path, args: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "meshcore_cli", "--model", "m", "--transport", "memory",
         "--port", "0", *args], env={**os.environ, **env_with(hostile),
                                     "MESH_LLM_HOME": str(tmp_path / "home")},
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 1, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_a_raising_registration_hook_is_named(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    site.mkdir()
    install_plugin(site, "meshcore-badreg", "1.0", "badreg", "meshcore_badreg",
                   BAD_REGISTRATION)
    try:
        for argv in (["plugins"], ["--model", "m", "--backend", "fake"]):
            done = subprocess.run([sys.executable, "-m", "meshcore_cli", *argv],
                                  env={**os.environ, **env_with(site),
                                       "MESH_LLM_HOME": str(tmp_path / "home")},
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode != 0
            assert ("error: plugin badreg, hook meshcore_register_backends: RuntimeError: "
                    "registration broke") in done.stderr, done.stderr
            assert "Traceback" not in done.stderr
    finally:
        sys.modules.pop("meshcore_badreg", None)


def test_a_real_node_with_hostile_observers_serves(
        hostile: Path, mesh_process: Callable[..., MeshProcess]) -> None:
    node = mesh_process("--model", "m", "--backend", "fake", "--transport", "quic",
                        "--console", "0", env=env_with(hostile))
    for _ in range(200):
        r = httpx.post(f"{node.url}/chat/completions", timeout=10,
                       json={"messages": [{"role": "user", "content": "still here"}]})
        if r.status_code == 200:
            break
        time.sleep(0.05)
    assert r.status_code == 200, node.log()
    assert httpx.get(f"http://127.0.0.1:{node.api_port}/health").status_code == 200
    log = node.log()
    assert "plugin hostile, hook meshcore_api_request: ZeroDivisionError" in log
    assert "plugin hostile, hook meshcore_plan_changed: KeyError" in log
    assert "Traceback" not in log
