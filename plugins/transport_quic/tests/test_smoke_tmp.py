from __future__ import annotations
import pytest
from conftest import wait_for
pytestmark = pytest.mark.anyio

async def test_two(quic_mesh) -> None:
    a = await quic_mesh.add()
    b = await quic_mesh.add()
    await wait_for(lambda: len(a.view().peers) == 2 and len(b.view().peers) == 2, 5, "peers")
    await wait_for(lambda: a.transport.link(b.id) == "TLS-TCP", 5, "fast")
    print(a.status()["peers"])
