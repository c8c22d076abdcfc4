"""Helpers for the console's browser tests and its screenshot: Debian's Chromium through
Playwright (never a downloaded browser).

Run as a script to refresh the README's screenshot of a 3-node mesh (fake backend)::

    .venv/bin/python plugins/console/tests/console_browser.py docs/console.png
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
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


async def screenshot_three_nodes(out: Path) -> None:
    """A host and a worker in a split plus a client, all fake-backend nodes in this process."""
    from meshcore.state import Serving
    from meshcore.testing import run_mesh

    with tempfile.TemporaryDirectory() as tmp:
        async with run_mesh(Path(tmp)) as mesh:
            host = await mesh.add(16, split=True, model="fake-14B-Q4_K_M",
                                  model_gb=8.4, console_port=0, node_id="gpu-box-a")
            worker = await mesh.add(8, split=True, node_id="gpu-box-b")
            client = await mesh.add(client=True, node_id="laptop")
            await mesh.wait_for(lambda: host.state.me.serving is Serving.READY, what="host")
            await mesh.wait_for(lambda: worker.state.me.serving is Serving.RPC, what="worker")
            await mesh.wait_for(lambda: len(client.view().peers) == 3, what="client")
            async with chromium() as browser:
                page = await browser.new_page(viewport={"width": 1280, "height": 860})
                await page.goto(f"http://127.0.0.1:{host.uis['console'].port}/")
                await page.locator("g.node").nth(2).wait_for()
                await page.fill("#chat-input", "Say hello to the mesh")
                await page.click("#chat-send")
                await page.locator("#chat-stats", has_text="tok/s").wait_for()
                await page.screenshot(path=str(out), full_page=True)
            mesh.stop_all()


if __name__ == "__main__":
    anyio.run(screenshot_three_nodes, Path(sys.argv[1] if len(sys.argv) > 1 else "console.png"))
