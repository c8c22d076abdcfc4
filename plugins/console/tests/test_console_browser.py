"""The console page in a real Chromium (Playwright): roles, live updates over SSE without
reloads, the client's API tunnel, and the chat panel (fake backend; see test_console_real for
SmolLM2)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from console_browser import CHROMIUM, MISSING, chromium, screenshot_three_nodes

from meshcore.state import Serving

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=MISSING),
]


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with chromium() as b:
        yield b


async def open_console(browser: Any, node: Any) -> Any:
    from playwright.async_api import expect

    page = await browser.new_page()
    await page.goto(f"http://127.0.0.1:{node.uis['console'].port}/")
    await expect(page.locator("#conn")).to_have_text("live")
    return page


async def test_solo_host_then_a_worker_joins_and_leaves_live(browser: Any,
                                                             mesh_harness: Any) -> None:
    from playwright.async_api import expect

    async with mesh_harness() as mesh:
        host = await mesh.add(8, console_port=0)
        await mesh.wait_for(lambda: host.state.me.serving is Serving.READY, what="host ready")
        page = await open_console(browser, host)
        await expect(page.locator("#badge")).to_have_text("Host")
        await expect(page.locator("#peer-count")).to_have_text("0 peers")
        await expect(page.locator(f'#topology g.node[data-id="{host.id}"] .role')
                     ).to_have_text("HOST")
        load_id = await page.evaluate("window.meshConsole.loadId")
        updates = await page.evaluate("window.meshConsole.updates")

        worker = await mesh.add(4)
        box = page.locator(f'#topology g.node[data-id="{worker.id}"]')
        await expect(box).to_be_visible(timeout=2000)
        await expect(box.locator(".role")).to_have_text("WORKER")
        await expect(page.locator("#peer-count")).to_have_text("1 peer")
        await expect(page.locator("#total-vram")).to_contain_text("12.0 GB")

        await mesh.remove(worker)
        await expect(box).to_have_count(0, timeout=5000)
        await expect(page.locator("#peer-count")).to_have_text("0 peers")
        assert await page.evaluate("window.meshConsole.loadId") == load_id  # no reload
        assert await page.evaluate("window.meshConsole.updates") > updates
        assert "mesh-llm --join memory:" in await page.locator("#join-command").inner_text()


async def test_client_page_shows_client_and_the_api_tunnel(browser: Any,
                                                           mesh_harness: Any) -> None:
    from playwright.async_api import expect

    async with mesh_harness() as mesh:
        host = await mesh.add(8)
        client = await mesh.add(client=True, console_port=0)
        await mesh.wait_for(lambda: client.plan.host_id == host.id, what="client sees host")
        page = await open_console(browser, client)
        await expect(page.locator("#badge")).to_have_text("Client")
        await expect(page.locator(f'#topology g.node[data-id="{client.id}"] .role')
                     ).to_have_text("CLIENT")
        await expect(page.locator("#topology .link-label")).to_have_text("API tunnel (memory)")
        await expect(page.locator("#topology")).to_contain_text("API tunnel")


async def test_split_shows_shares_and_rpc_links(browser: Any, mesh_harness: Any) -> None:
    from playwright.async_api import expect

    async with mesh_harness() as mesh:
        host = await mesh.add(8, split=True, console_port=0)
        worker = await mesh.add(4, console_port=0)
        await mesh.wait_for(lambda: worker.state.me.serving is Serving.RPC, what="split")
        page = await open_console(browser, worker)
        await expect(page.locator("#badge")).to_have_text("Worker in split")
        await expect(page.locator(f'#topology g.node[data-id="{host.id}"] .share')
                     ).to_have_text("share 67%")
        await expect(page.locator(f'#topology g.node[data-id="{worker.id}"] .share')
                     ).to_have_text("share 33%")
        await expect(page.locator("#topology .link-label")).to_have_text("RPC (memory)")


async def test_chat_panel_streams_and_shows_speed(browser: Any, mesh_harness: Any) -> None:
    from playwright.async_api import expect

    async with mesh_harness() as mesh:
        host = await mesh.add(8, console_port=0)
        await mesh.wait_for(lambda: host.state.me.serving is Serving.READY, what="host ready")
        page = await open_console(browser, host)
        await page.fill("#chat-input", "hello from chromium")
        await page.click("#chat-send")
        await expect(page.locator(".msg.assistant")).to_have_text(" hello from chromium")
        stats = page.locator("#chat-stats")
        await expect(stats).to_contain_text("200.0 tok/s")
        await expect(stats).to_contain_text("draft 2/3 accepted (67%)")
        # the node's running count (its API relayed the reply), pushed with the next status
        await expect(page.locator("#speculation")).to_have_text(
            "off · 2/3 drafted tokens accepted (67%) in replies through this node")


async def test_screenshot_of_a_three_node_mesh(tmp_path: Path) -> None:
    out = tmp_path / "console.png"
    await screenshot_three_nodes(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


HOSTILE_MODEL = "m'; touch PWNED; echo '$(touch PWNED2)\"`touch PWNED3`"


async def test_a_hostile_model_name_pastes_as_plain_text(browser: Any, mesh_harness: Any,
                                                         tmp_path: Path) -> None:
    """The curl snippet, run by a real POSIX shell (curl stubbed to print its arguments),
    passes the model name as data and runs nothing."""
    import json
    import subprocess

    from playwright.async_api import expect

    async with mesh_harness() as mesh:
        host = await mesh.add(8, model=HOSTILE_MODEL, console_port=0)
        await mesh.wait_for(lambda: host.state.me.serving is Serving.READY, what="host ready")
        page = await open_console(browser, host)
        await expect(page.locator("#snippet-curl")).to_contain_text("touch PWNED")
        snippet = await page.locator("#snippet-curl").inner_text()
    script = 'curl() { for a in "$@"; do printf "%s\\0" "$a"; done; }\n' + snippet
    out = subprocess.run(["sh", "-c", script], cwd=tmp_path, capture_output=True, check=True)
    args = out.stdout.decode().split("\0")[:-1]
    assert not list(tmp_path.iterdir()), "pasting the snippet ran a command"
    assert args[0] == f"http://127.0.0.1:{host.api_port}/v1/chat/completions"
    assert json.loads(args[args.index("-d") + 1])["model"] == HOSTILE_MODEL


async def test_a_long_client_id_stays_inside_its_box(browser: Any, mesh_harness: Any) -> None:
    from playwright.async_api import expect

    long_id = "client-" + "0123456789abcdef" * 4
    async with mesh_harness() as mesh:
        host = await mesh.add(8, console_port=0)
        await mesh.add(client=True, node_id=long_id)
        await mesh.wait_for(lambda: len(host.view().peers) == 2, what="client joined")
        page = await open_console(browser, host)
        node = page.locator(f'#topology g.node[data-id="{long_id}"]')
        await expect(node).to_be_visible()
        box = await node.locator(".box").bounding_box()
        label = await node.locator("text").nth(1).bounding_box()  # role, id, VRAM
        assert box and label and label["width"] <= box["width"], (label, box)
        assert await node.locator("title").text_content() == long_id
        cell = page.locator(f'#peers tr[data-id="{long_id}"] td').first
        span = await cell.locator(".cell").bounding_box()
        td = await cell.bounding_box()
        assert span and td and span["width"] <= td["width"]
        assert await cell.locator(".cell").get_attribute("title") == long_id


async def test_a_keyed_console_asks_for_the_key_once(browser: Any, mesh_harness: Any) -> None:
    from playwright.async_api import expect

    async with mesh_harness() as mesh:
        host = await mesh.add(8, console_port=0, api_key="k3y")
        await mesh.wait_for(lambda: host.state.me.serving is Serving.READY, what="host ready")
        base = f"http://127.0.0.1:{host.uis['console'].port}/"
        page = await browser.new_page()
        first = await page.goto(base)
        assert first is not None and first.status == 401
        await page.fill("#key-input", "wrong")
        await page.click("#key-form button")
        await expect(page.locator("h2")).to_have_text("This node needs its API key")
        assert "That key is wrong" in await page.content()
        await page.fill("#key-input", "k3y")
        await page.click("#key-form button")
        await expect(page.locator("#conn")).to_have_text("live")
        assert page.url == base, "the key does not stay in the address"
        await expect(page.locator("#join-command")).to_contain_text("mesh-llm --join")
        cookie = (await page.context.cookies())[0]
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert "k3y" not in cookie["value"]
        await page.fill("#chat-input", "keyed chat")
        await page.click("#chat-send")
        await expect(page.locator(".msg.assistant")).to_have_text(" keyed chat")
