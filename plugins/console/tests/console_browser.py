"""Helpers for the console's browser tests and its screenshot: Debian's Chromium through
Playwright (never a downloaded browser).

Run as a script to refresh the README's screenshot of a 3-node mesh: in-process nodes with
the fake backend, or with ``--real`` three ``mesh-llm`` processes serving SmolLM2-135M::

    .venv/bin/python plugins/console/tests/console_browser.py [--real] docs/console.png
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
MISSING = (f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium, "
           "or ./dev.sh test does it)")

CONSOLE_LINE = re.compile(r"console\s+(http://[\d.]+:\d+/)")
JOIN_LINE = re.compile(r"join with: mesh-llm --join (\S+)")
NODE_LINE = re.compile(r"mesh-llm node (\S+)")


def llama_cpp_missing() -> str | None:
    """Why the real backend cannot run here, or None."""
    try:
        from meshcore_backend_llamacpp.build import cached_bin_dir
    except ImportError as exc:
        return f"the llama.cpp backend plugin is not importable: {exc}"
    if cached_bin_dir() is None:
        return "no cached llama.cpp build: run `python -m meshcore_backend_llamacpp.build`"
    return None


class NodeProcess:
    """A ``mesh-llm`` subprocess in its own process group, its output in a log file."""

    def __init__(self, home: Path, *args: str) -> None:
        home.mkdir(parents=True)
        self.log = home / "node.log"
        env = {**os.environ, "MESH_LLM_HOME": str(home), "MESH_LLM_THREADS": "1"}
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "meshcore_cli", *args],
                                         stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    def banner(self, pattern: re.Pattern[str], timeout: float = 180) -> str:
        """The first group of ``pattern`` in the output; fails with the log if the node died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if match := pattern.search(self.log.read_text(errors="replace")):
                return match[1]
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"mesh-llm printed no {pattern.pattern!r} (exit "
                             f"{self.proc.poll()}):\n{self.log.read_text(errors='replace')[-3000:]}")

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    """A headless Chromium browser (Playwright ``Browser``)."""
    from playwright.async_api import async_playwright

    if not CHROMIUM.exists():
        raise FileNotFoundError(MISSING)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


async def shoot(url: str, out: Path, nodes: int, prompt: str) -> None:
    """Open the console at ``url`` once it draws ``nodes`` boxes and its host is ready, chat
    once, and save a full-page screenshot."""
    from playwright.async_api import expect

    async with chromium() as browser:
        page = await browser.new_page(viewport={"width": 1280, "height": 860})
        await page.goto(url)
        await expect(page.locator("#topology g.node")).to_have_count(nodes, timeout=120_000)
        await expect(page.locator("#badge")).to_have_text("Host", timeout=120_000)
        await page.fill("#chat-input", prompt)
        await page.click("#chat-send")
        await expect(page.locator("#chat-stats")).to_contain_text("tok/s", timeout=120_000)
        await expect(page.locator("#chat-send")).to_be_enabled(timeout=120_000)
        await page.screenshot(path=str(out), full_page=True)


async def screenshot_three_nodes(out: Path) -> None:
    """A host and a worker in a split plus a client, all fake-backend nodes in this process."""
    from meshcore_testing import run_mesh

    with tempfile.TemporaryDirectory() as tmp:
        async with run_mesh(Path(tmp)) as mesh:
            host = await mesh.add(16, split=True, model="fake-14B-Q4_K_M",
                                  model_gb=8.4, console_port=0, node_id="gpu-box-a")
            await mesh.add(8, split=True, node_id="gpu-box-b")
            await mesh.add(client=True, node_id="laptop")
            await shoot(f"http://127.0.0.1:{host.uis['console'].port}/", out, 3,
                        "Say hello to the mesh")
            mesh.stop_all()


async def screenshot_real(out: Path) -> None:
    """Three real ``mesh-llm`` processes on this machine (SmolLM2-135M, default transport): a
    host and a worker splitting the model (``--max-vram`` makes them unequal), and a client."""
    if reason := llama_cpp_missing():
        raise RuntimeError(reason)
    with tempfile.TemporaryDirectory() as tmp:
        procs: list[NodeProcess] = []
        try:
            host = NodeProcess(Path(tmp) / "host", "--model", "SmolLM2-135M", "--split",
                               "--max-vram", "8", "--console", "0", "--port", "0")
            procs.append(host)
            url, token = host.banner(CONSOLE_LINE), host.banner(JOIN_LINE)
            for name, extra in (("worker", ["--max-vram", "4"]), ("client", ["--client"])):
                procs.append(NodeProcess(Path(tmp) / name, "--join", token, "--port", "0",
                                         *extra))
                procs[-1].banner(NODE_LINE)
            await shoot(url, out, 3, "Say hello to the mesh in one sentence.")
        finally:
            for proc in procs:
                proc.stop()


if __name__ == "__main__":
    real = "--real" in sys.argv
    paths = [a for a in sys.argv[1:] if a != "--real"]
    anyio.run(screenshot_real if real else screenshot_three_nodes,
              Path(paths[0] if paths else "console.png"))
