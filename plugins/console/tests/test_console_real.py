"""The console of real ``mesh-llm`` processes (llama.cpp, SmolLM2-135M, the default
transport) in Chromium: the chat panel streams a reply from the real model and shows tok/s; a
second process joining shows up live and goes away after it is killed."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from console_browser import CHROMIUM, MISSING, chromium

pytestmark = [pytest.mark.anyio, pytest.mark.real, pytest.mark.browser,
              pytest.mark.skipif(not CHROMIUM.exists(), reason=MISSING)]

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
            self.proc = subprocess.Popen([sys.executable, "-m", "meshcore.cli", *args],
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


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[NodeProcess]]:
    """Started node processes; every one is stopped (its process group) at the end."""
    if reason := llama_cpp_missing():
        pytest.skip(reason)
    started: list[NodeProcess] = []
    try:
        yield started
    finally:
        for node in started:
            node.stop()


def start(nodes: list[NodeProcess], home: Path, *args: str) -> NodeProcess:
    node = NodeProcess(home, *args, "--console", "0", "--port", "0")
    nodes.append(node)
    return node


async def test_chat_with_smollm2_streams_and_shows_speed(nodes: list[NodeProcess],
                                                         tmp_path: Path) -> None:
    from playwright.async_api import expect

    host = start(nodes, tmp_path / "host", "--model", "SmolLM2-135M")
    async with chromium() as browser:
        page: Any = await browser.new_page()
        await page.goto(host.banner(CONSOLE_LINE))
        await expect(page.locator("#badge")).to_have_text("Host", timeout=120_000)
        await expect(page.locator("#model")).to_have_text("SmolLM2-135M")
        await expect(page.locator("#peer-count")).to_have_text("0 peers")
        await page.fill("#chat-input", "What is the capital of France?")
        await page.click("#chat-send")
        await expect(page.locator("#chat-send")).to_be_enabled(timeout=120_000)
        reply = page.locator(".msg.assistant")  # not .msg.error
        await expect(reply).not_to_have_text("")
        stats = await page.locator("#chat-stats").inner_text()
        assert re.search(r"\d+ tokens · \d+\.\d tok/s", stats), stats


async def test_joining_process_appears_live_and_goes_after_kill(nodes: list[NodeProcess],
                                                                tmp_path: Path) -> None:
    from playwright.async_api import expect

    host = start(nodes, tmp_path / "host", "--model", "SmolLM2-135M")
    url, token = host.banner(CONSOLE_LINE), host.banner(JOIN_LINE)
    async with chromium() as browser:
        page: Any = await browser.new_page()
        await page.goto(url)
        await expect(page.locator("#peer-count")).to_have_text("0 peers", timeout=60_000)
        load_id = await page.evaluate("window.meshConsole.loadId")
        worker = start(nodes, tmp_path / "worker", "--join", token)
        worker_id = worker.banner(NODE_LINE)
        box = page.locator(f'#topology g.node[data-id="{worker_id}"]')
        await expect(box).to_be_visible(timeout=2000)
        row = page.locator(f'#peers tr[data-id="{worker_id}"]')
        await expect(row).to_contain_text("WORKER")
        worker.kill()
        await expect(box).to_have_count(0, timeout=150_000)
        await expect(page.locator("#peer-count")).to_have_text("0 peers")
        assert await page.evaluate("window.meshConsole.loadId") == load_id  # never reloaded
