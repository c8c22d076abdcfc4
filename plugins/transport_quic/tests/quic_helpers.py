"""Helpers for the QUIC transport tests (a unique module name: every test dir has a conftest)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from anyio.abc import TaskStatus
from meshcore_testing import wait_until

FAST_TIMERS = {"quic_heartbeat_s": 0.2, "quic_dead_after_s": 1.0, "quic_reconnect_s": 1.5,
               "quic_addresses": ["127.0.0.1"]}


wait_for = wait_until  # the harness's poller, under the name these tests use


class QuicMesh:
    """Starts in-process nodes on the quic transport; each joins the first node's token."""

    def __init__(self, tg: Any, root: Path) -> None:
        self.tg, self.root, self.nodes = tg, root, []

    async def add(self, *, joins: tuple[str, ...] | None = None, **options: Any) -> Any:
        from meshcore.config import NodeConfig
        from meshcore.node import Node

        node_id = options.pop("node_id", f"q{len(self.nodes):02d}")
        if joins is None:
            joins = (self.nodes[0].transport.invite_token(),) if self.nodes else ()
        cfg = NodeConfig(model="fake-model", joins=joins, transport="quic", backend="fake",
                         api_port=0, settle_s=0.05, node_id=node_id,
                         state_dir=self.root / node_id, options={**FAST_TIMERS, **options})
        node = Node(cfg)
        await self.tg.start(node.run)
        self.nodes.append(node)
        return node


async def echo_server(*, task_status: TaskStatus[int]) -> None:
    """An echo service on asyncio streams (their close() flushes; anyio's aclose() aborts)."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(1024 * 1024):
                writer.write(chunk)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    async with server:
        task_status.started(server.sockets[0].getsockname()[1])
        await server.serve_forever()
