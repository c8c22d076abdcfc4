"""Installed as a tool, without a checkout: the workspace's distributions build as wheels, and
`uv tool install mesh-llm --find-links WHEELS` gives a `mesh-llm` that runs from anywhere with the
default plugins (the fake backend added from meshcore-testing for a node without llama.cpp).

Marked `real`: it builds wheels and installs them with uv (third-party dependencies from uv's
cache or PyPI), about 10-20 s with a warm uv cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import tomllib
from pathlib import Path

import httpx
import pytest
from meshcore_backend_llamacpp import build
from meshcore_testing.pytest_plugin import API_LINE, MeshProcess

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PLUGINS = {"quic", "vram", "llamacpp", "console"}


def uv() -> str:
    found = shutil.which("uv") or str(Path.home() / ".local" / "bin" / "uv")
    if not os.access(found, os.X_OK):
        pytest.skip("uv is not installed (./dev.sh installs it)")
    return found


def distributions() -> list[str]:
    """mesh-llm and every workspace distribution it depends on, plus the test kit."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    workspace = {name for name, src in project["tool"]["uv"]["sources"].items()
                 if src.get("workspace")}
    wanted = {dep for dep in project["project"]["dependencies"] if dep in workspace}
    return ["mesh-llm", *sorted(wanted), "meshcore-testing"]


def run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> str:
    out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} exited {out.returncode}:\n{out.stderr}"
    return out.stdout


def start_node(exe: Path, home: Path, env: dict[str, str], timeout: float = 60) -> MeshProcess:
    home.mkdir()
    log_path = home / "mesh-llm.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([str(exe), "--backend", "fake", "--model", "fake-model",
                                 "--port", "0"], env={**env, "MESH_LLM_HOME": str(home)},
                                cwd=home, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    node = MeshProcess(proc, log_path, 0, None, home)
    deadline = time.monotonic() + timeout
    while (found := API_LINE.search(node.log())) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            node.kill()
            raise AssertionError(f"the installed mesh-llm gave no banner:\n{node.log()}")
        time.sleep(0.05)
    node.api_port = int(found.group(2))
    return node


def test_uv_tool_install_from_the_wheels_gives_a_working_mesh_llm(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "MESH_LLM_BIN_DIR")}
    env |= {"UV_TOOL_DIR": str(tmp_path / "tools"), "UV_TOOL_BIN_DIR": str(tmp_path / "bin"),
            "NO_COLOR": "1"}
    wheels = tmp_path / "wheels"  # the README's command
    run([uv(), "build", "--all-packages", "--wheel", "-o", str(wheels), "-q"], env, ROOT)
    built = {w.name.split("-")[0] for w in wheels.glob("*.whl")}
    assert built >= {name.replace("-", "_") for name in distributions()}, built

    elsewhere = tmp_path / "elsewhere"  # nothing of the checkout is importable from here
    elsewhere.mkdir()
    run([uv(), "tool", "install", "mesh-llm", "--find-links", str(wheels),
         "--with", "meshcore-testing"], env, elsewhere)
    exe = tmp_path / "bin" / "mesh-llm"
    assert exe.is_file()

    python = tmp_path / "tools" / "mesh-llm" / "bin" / "python"
    where = json.loads(run([str(python), "-c", "import json, meshcore, meshcore_console, "
                            "meshcore_backend_llamacpp.release as r; print(json.dumps("
                            "[meshcore.__file__, meshcore_console.__file__, r.__file__]))"],
                           env, elsewhere))
    assert all(p.startswith(str(tmp_path / "tools")) for p in where), where  # not the checkout

    cached = build.cached_bin_dir()
    if cached is not None:  # the README's llama.cpp step finds the build already cached
        got = run([str(python), "-m", "meshcore_backend_llamacpp.build"], env, elsewhere)
        assert got.strip() == str(cached)

    assert "Pool the GPUs" in run([str(exe), "--help"], env, elsewhere)
    plugins = {p["name"] for p in json.loads(run([str(exe), "plugins"], env, elsewhere))}
    assert plugins >= DEFAULT_PLUGINS | {"testing"}, plugins

    node = start_node(exe, tmp_path / "home", env)
    try:
        base = f"http://127.0.0.1:{node.api_port}"
        deadline = time.monotonic() + 60  # 503 until the fake model is "loaded"
        while (health := node.get("/health")).status_code != 200:
            assert time.monotonic() < deadline, f"/health {health.status_code}:\n{node.log()}"
            time.sleep(0.2)
        r = httpx.post(f"{base}/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"]
        assert node.stop(signal.SIGTERM, timeout=20) == 0, node.log()
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.stop(signal.SIGTERM, timeout=10)
        node.kill()
