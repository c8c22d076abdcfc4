"""Embed uvicorn in a task group: bind, report the port, stop on cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
from anyio.abc import TaskStatus


async def serve_asgi(app: Any, host: str, port: int, *,
                     task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
                     on_stop: Callable[[], Awaitable[None]] | None = None) -> None:
    """Serve ``app`` on ``host:port`` (0 = a free port) until cancelled; reports the port.
    ``on_stop`` runs first when cancelled, before the graceful shutdown (to end requests).

    Connections are capped and must send their requests in time (:mod:`meshcore.httplimits`).
    The socket is bound here, before uvicorn starts, so a taken port fails fast with a clear
    OSError and the caller learns the real port number.
    """
    import uvicorn  # heavy: imported when a server starts, not with the CLI

    from meshcore.httplimits import KEEP_ALIVE_S, LimitedH11Protocol  # imports uvicorn

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:  # the node owns signals
            yield

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}; "
                                 f"pick another port") from None
    sock.listen(128)
    bound = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False,
                            timeout_graceful_shutdown=1, http=LimitedH11Protocol, ws="none",
                            timeout_keep_alive=KEEP_ALIVE_S)
    server = _Server(config)
    # uvicorn is asyncio-only; run it as its own task so a cancelled caller can still ask it
    # to shut down gracefully (close connections) instead of abandoning it mid-flight.
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    task_status.started(bound)
    try:
        await asyncio.shield(serving)
    finally:
        if not serving.done():
            with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                if on_stop is not None:
                    await on_stop()
            server.should_exit = True
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(2):
                    await asyncio.wait([serving])
                if not serving.done():
                    server.force_exit = True
                    serving.cancel()
                    await asyncio.wait([serving])
        sock.close()
