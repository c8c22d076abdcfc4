"""Plugins: a third-party election installed through an entry point, blocking, bad plugins."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from meshcore_cli import cli
from meshcore_testing.pytest_plugin import MeshProcess

from meshcore import hookimpl
from meshcore.plan import Plan, PlanState
from meshcore.plugins import PluginLoadError, describe_plugins, get_plugin_manager
from meshcore.registry import Registry, RegistryError, collect

pytestmark = pytest.mark.anyio

UNDERDOG = '''
"""A third-party election: the node with the LEAST VRAM hosts (the default picks the most)."""
from meshcore import hookimpl
from meshcore.plan import Participant, Plan, PlanState


def elect(view, request):
    candidates = [p for p in view.peers if not p.is_client and p.model]
    if not candidates:
        return Plan(PlanState.WAITING, reason="underdog: nobody can host")
    host = min(candidates, key=lambda p: (p.vram, p.id))
    return Plan(PlanState.SOLO, host_id=host.id, model=host.model,
                model_bytes=host.model_bytes,
                participants=(Participant(host.id, host.vram, 1.0, False),),
                reason="underdog: the smallest node hosts")


@hookimpl
def meshcore_register_elections(register):
    register("underdog", elect)
'''


def install_plugin(site: Path, dist: str, version: str, entry_name: str, module: str,
                   source: str) -> None:
    """Write a minimal installed distribution (module + dist-info with entry_points.txt)."""
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[meshcore]\n{entry_name} = {module}\n")


@pytest.fixture
def third_party(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A site dir on sys.path holding the ``meshcore-underdog`` distribution."""
    site = tmp_path / "site"
    site.mkdir()
    install_plugin(site, "meshcore-underdog", "1.2.3", "underdog", "meshcore_underdog",
                   UNDERDOG)
    monkeypatch.syspath_prepend(str(site))
    try:
        yield site
    finally:
        for name in [m for m in sys.modules if m.startswith("meshcore_underdog")]:
            del sys.modules[name]


# ---------------------------------------------------------------- third-party election


@pytest.mark.usefixtures("third_party")
async def test_third_party_election_is_selected_and_its_plan_used(
        mesh_harness: Callable[..., Any]) -> None:
    listed = {p["name"]: p for p in describe_plugins(get_plugin_manager())}
    assert listed["underdog"] == {"name": "underdog", "version": "1.2.3",
                                  "hooks": ["meshcore_register_elections"]}
    async with mesh_harness(election="underdog") as mesh:
        nodes = [await mesh.add(v) for v in (12, 4, 8)]
        smallest = nodes[1]
        await mesh.wait_for(lambda: all(n.plan.host_id == smallest.id for n in nodes),
                            what="every node adopts the underdog plan")
        assert all(n.plan.reason == "underdog: the smallest node hosts" for n in nodes)
        await mesh.wait_for(lambda: smallest.state.me.role.value == "HOST", what="host role")
        async with httpx.AsyncClient() as client:
            r = await client.post(f"http://127.0.0.1:{nodes[0].api_port}/v1/completions",
                                  json={"prompt": "small wins"})
        assert r.status_code == 200, r.text
        assert r.json()["system_fingerprint"] == smallest.id


def test_third_party_election_from_the_command_line(
        third_party: Path, mesh_process: Callable[..., MeshProcess]) -> None:
    env = {"PYTHONPATH": os.pathsep.join([str(third_party), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "meshcore_cli", "plugins"], env={
        **os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert "underdog" in {p["name"] for p in json.loads(done.stdout)}
    node = mesh_process("--model", "x", "--backend", "fake", "--transport", "memory",
                        "--election", "underdog", env=env)
    for _ in range(400):
        status = httpx.get(f"http://127.0.0.1:{node.api_port}/mesh/status").json()
        if status["plan"]["state"] != "WAITING":
            break
        time.sleep(0.05)
    assert status["plan"]["reason"] == "underdog: the smallest node hosts", node.log()
    assert status["plan"]["host_id"] == status["id"]


def test_unknown_election_lists_the_installed_ones(third_party: Path) -> None:
    regs = collect(get_plugin_manager())
    with pytest.raises(RegistryError, match=r"unknown election 'lowest-rtt'; "
                                            r"known: (.*, )?underdog, (.*, )?vram\b"):
        regs["election"].get("lowest-rtt")


# ---------------------------------------------------------------- blocking and bad plugins


def test_blocking_by_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHCORE_DISABLE_PLUGINS", "console, quic, metrics")
    pm = get_plugin_manager()
    names = {p["name"] for p in describe_plugins(pm)}
    assert names.isdisjoint({"console", "quic", "metrics"}) and "vram" in names
    regs = collect(pm)
    assert regs["ui"].names() == [] and regs["transport"].names() == ["memory"]


def test_blocking_the_testing_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHCORE_DISABLE_PLUGINS", "testing")
    assert "fake" not in collect(get_plugin_manager())["backend"]


def test_duplicate_component_name_is_an_error() -> None:
    class AnotherVram:
        @hookimpl
        def meshcore_register_elections(self, register: Any) -> None:
            register("vram", lambda view, request: Plan(PlanState.WAITING))

    pm = get_plugin_manager()
    pm.register(AnotherVram(), name="another-vram")
    with pytest.raises(RegistryError, match="two plugins register a election named 'vram'"):
        collect(pm)


def test_registry_rejects_bad_registrations() -> None:
    reg = Registry("backend")
    reg.register("a", dict)
    with pytest.raises(RegistryError, match="two plugins"):
        reg.register("a", dict)
    with pytest.raises(RegistryError, match="non-empty strings"):
        reg.register("", dict)
    with pytest.raises(RegistryError, match="must be callable"):
        reg.register("b", "not callable")  # type: ignore[arg-type]
    with pytest.raises(RegistryError, match=r"unknown backend 'c' \(from --backend\); known: a"):
        reg.get("c", "--backend")
    assert reg.names() == ["a"] and "a" in reg


def test_two_distributions_with_one_plugin_name(third_party: Path) -> None:
    install_plugin(third_party, "meshcore-impostor", "0.1", "underdog", "meshcore_impostor",
                   "from meshcore import hookimpl\n")
    with pytest.raises(PluginLoadError, match="two installed plugins are named 'underdog'"):
        get_plugin_manager()


def test_broken_plugin_is_named(third_party: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    install_plugin(third_party, "meshcore-broken", "0.1", "broken", "meshcore_broken",
                   "raise ImportError('needs libfoo')\n")
    with pytest.raises(PluginLoadError, match=r"plugin 'broken' .* failed to load: "
                                              r"ImportError: needs libfoo"):
        get_plugin_manager()
    assert cli.main(["plugins"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "MESHCORE_DISABLE_PLUGINS=broken" in err
    monkeypatch.setenv("MESHCORE_DISABLE_PLUGINS", "broken")
    assert "broken" not in {p["name"] for p in describe_plugins(get_plugin_manager())}
    sys.modules.pop("meshcore_broken", None)


def test_plugin_with_an_unknown_hook_is_rejected(third_party: Path) -> None:
    install_plugin(third_party, "meshcore-typo", "0.1", "typo", "meshcore_typo",
                   "from meshcore import hookimpl\n\n"
                   "@hookimpl\ndef meshcore_register_election(register):\n    pass\n")
    with pytest.raises(PluginLoadError, match="unknown hook"):
        get_plugin_manager()
    sys.modules.pop("meshcore_typo", None)


def test_hook_tracing(monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MESHCORE_TRACE_HOOKS", "1")
    collect(get_plugin_manager())
    err = capsys.readouterr().err
    assert "meshcore_register_elections [hook]" in err and err.startswith("[hooks]")


# ---------------------------------------------------------------- the docs' worked example


def python_block(doc: str, first_line: str) -> str:
    """The fenced python block of ``doc`` that starts with ``first_line``."""
    for block in re.findall(r"```python\n(.*?)```", doc, flags=re.S):
        if block.startswith(first_line):
            return str(block)
    raise AssertionError(f"docs/plugins.md has no python block starting {first_line!r}")


async def test_docs_worked_example_runs(third_party: Path,
                                        mesh_harness: Callable[..., Any]) -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "plugins.md").read_text()
    install_plugin(third_party, "meshcore-lowrtt", "0.1.0", "lowrtt", "meshcore_lowrtt",
                   python_block(doc, "# meshcore_lowrtt.py"))
    (third_party / "doc_lowrtt_tests.py").write_text(python_block(doc, "import pytest"))
    try:
        import doc_lowrtt_tests  # type: ignore[import-not-found]

        assert "lowrtt" in collect(get_plugin_manager())["election"]
        doc_lowrtt_tests.test_closest_helper_is_chosen()
        await doc_lowrtt_tests.test_the_mesh_uses_it(mesh_harness)
    finally:
        for name in ("doc_lowrtt_tests", "meshcore_lowrtt"):
            sys.modules.pop(name, None)
