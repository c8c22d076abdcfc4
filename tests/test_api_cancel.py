"""A client that leaves cancels its request upstream (issue 14), streaming or not, whether the
host is the node itself or reached through a tunnel; the request finishes as 499."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from test_api import CHAT, api, ready_mesh

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("vrams", [(8,), (8, 4)], ids=["host", "tunnel"])
async def test_a_client_that_leaves_cancels_the_upstream_request(
        mesh_harness: Any, vrams: tuple[float, ...], stream: bool) -> None:
    async with mesh_harness() as mesh:
        nodes = await ready_mesh(mesh, *vrams, options={"fake_delay_s": 5})  # 15 s to answer
        host, entry = nodes[0], nodes[-1]
        url = f"{api(entry)}/v1/chat/completions"
        async with httpx.AsyncClient(timeout=0.5) as client:
            with pytest.raises(httpx.TimeoutException):  # like `curl -m`: it gives up
                async with client.stream("POST", url, json={**CHAT, "stream": stream}) as r:
                    async for _ in r.aiter_raw():
                        pass
        left = time.monotonic()
        await mesh.wait_for(lambda: len(host.backend.cancelled) == 1, timeout=5,
                            what="the host's server seeing the request cancelled")
        assert time.monotonic() - left < 5
        assert host.backend.cancelled[0]["stream"] is stream
        await mesh.wait_for(lambda: entry.counters.by_status == {499: 1}, timeout=5,
                            what="the request finishing as 499, once")
        assert entry.counters.requests == 1
