"""Fixtures for the QUIC transport tests: in-process nodes on loopback with short timers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from quic_helpers import QuicMesh


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def quic_mesh(tmp_path: Path) -> AsyncIterator[QuicMesh]:
    async with anyio.create_task_group() as tg:
        mesh = QuicMesh(tg, tmp_path)
        try:
            yield mesh
        finally:
            for node in mesh.nodes:
                node.stop()
            await anyio.sleep(0.1)  # let nodes say goodbye, then end helpers like echo servers
            tg.cancel_scope.cancel()
