"""Byte relays: pipe two streams together, and local TCP listeners that open tunnels."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

import anyio
from anyio.abc import ByteStream, SocketAttribute, TaskStatus

CHUNK = 256 * 1024

Opener = Callable[[], Awaitable[ByteStream]]


async def _pump(src: ByteStream, dst: ByteStream) -> None:
    try:
        async for chunk in src:
            await dst.send(chunk)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass
    closed = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)
    try:
        await dst.send_eof()
    except (NotImplementedError, TypeError):
        # No half-close on TLS (anyio raises NotImplementedError, or TypeError once the
        # session is gone): close fully, or the peer never learns this side ended and e.g. a
        # sequential rpc-server keeps serving a dead connection forever.
        with contextlib.suppress(*closed), anyio.move_on_after(5):
            await dst.aclose()
    except closed:
        pass


async def relay(a: ByteStream, b: ByteStream) -> None:
    """Copy bytes both ways until both directions end; closes both streams."""
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_pump, a, b)
            tg.start_soon(_pump, b, a)
    finally:
        with anyio.CancelScope(shield=True):
            await a.aclose()
            await b.aclose()


async def serve_forward(open_remote: Opener, *, host: str = "127.0.0.1",
                        task_status: TaskStatus[int]) -> None:
    """Listen on ``host`` at a free port (reported through task_status); each accepted
    connection is relayed to a fresh stream from ``open_remote``."""

    async def handle(client: ByteStream) -> None:
        try:
            remote = await open_remote()
        except Exception:
            await client.aclose()
            return
        await relay(client, remote)

    listener = await anyio.create_tcp_listener(local_host=host, local_port=0)
    async with listener:
        task_status.started(listener.extra(SocketAttribute.local_port))
        await listener.serve(handle)
