"""The console of real ``mesh-llm`` processes (llama.cpp, SmolLM2-135M, the default
transport) in Chromium: the chat panel streams a reply from the real model and shows tok/s; a
second process joining shows up live and goes away after it is killed."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from console_browser import (
    CHROMIUM,
    CONSOLE_LINE,
    JOIN_LINE,
    MISSING,
    NODE_LINE,
    NodeProcess,
    chromium,
    llama_cpp_missing,
)

pytestmark = [pytest.mark.anyio, pytest.mark.real, pytest.mark.browser,
              pytest.mark.skipif(not CHROMIUM.exists(), reason=MISSING)]

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


async def join_and_watch(nodes: list[NodeProcess], tmp_path: Path, browser: Any
                         ) -> tuple[Any, NodeProcess, Any]:
    """A host's console page, then a second process joins: (page, worker, worker's box)."""
    from playwright.async_api import expect

    host = start(nodes, tmp_path / "host", "--model", "SmolLM2-135M")
    url, token = host.banner(CONSOLE_LINE), host.banner(JOIN_LINE)
    page: Any = await browser.new_page()
    await page.goto(url)
    await expect(page.locator("#peer-count")).to_have_text("0 peers", timeout=60_000)
    await page.evaluate("window.meshConsole.firstLoad = window.meshConsole.loadId")
    worker = start(nodes, tmp_path / "worker", "--join", token)
    worker_id = worker.banner(NODE_LINE)
    box = page.locator(f'#topology g.node[data-id="{worker_id}"]')
    await expect(box).to_be_visible(timeout=2000)
    await expect(page.locator(f'#peers tr[data-id="{worker_id}"]')).to_contain_text("WORKER")
    return page, worker, box


async def test_joining_process_appears_live(nodes: list[NodeProcess], tmp_path: Path) -> None:
    from playwright.async_api import expect

    async with chromium() as browser:
        page, _, _ = await join_and_watch(nodes, tmp_path, browser)
        await expect(page.locator("#peer-count")).to_have_text("1 peer")
        await expect(page.locator("#topology .link-label")).to_contain_text("QUIC · HTTP")
        # the marker set before the join survives: the page was never reloaded
        assert await page.evaluate("window.meshConsole.firstLoad") is not None


async def test_killed_process_goes_away(nodes: list[NodeProcess], tmp_path: Path) -> None:
    from playwright.async_api import expect

    async with chromium() as browser:
        page, worker, box = await join_and_watch(nodes, tmp_path, browser)
        worker.kill()
        await expect(box).to_have_count(0, timeout=60_000)
        await expect(page.locator("#peer-count")).to_have_text("0 peers")
        assert await page.evaluate("window.meshConsole.firstLoad") is not None
