"""A fast-path tunnel cut by the other side (its TCP end without the sealed EOF, or a reset: what
the tunnels of a process that died look like) is reported at the end that saw it:
``splice.take_raw``'s ``on_cut`` on the dialing side, ``FastPathServer``'s ``on_cut(peer id)``
on the accepting side. The membership then checks that peer at once (``Membership.cut``). A
tunnel that ends cleanly, or that this side cut itself, is not reported."""

from __future__ import annotations

import asyncio
import functools
import os
import socket
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream, TaskGroup
from meshcore_transport_quic.adapter import RecordTransport
from meshcore_transport_quic.fastpath import open_fast_raw
from meshcore_transport_quic.fastserver import FastPathServer
from meshcore_transport_quic.relayproc import RelayProcess
from meshcore_transport_quic.splice import take_raw
from quic_helpers import echo_server

pytestmark = pytest.mark.anyio
KEY = os.urandom(32)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def local_pair() -> tuple[SocketStream, socket.socket]:
    """A client stream and the accepted socket of its connection (what a forward port takes)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        client = await anyio.connect_tcp("127.0.0.1", listener.getsockname()[1])
        conn, _ = await asyncio.get_running_loop().sock_accept(listener)
    return client, conn


class Ends:
    """A fast-path server to an echo service and tunnels to it, the cuts each side reports."""

    def __init__(self, tg: TaskGroup, echo: int) -> None:
        self.tg = tg
        self.accept_cuts: list[str] = []
        self.dial_cuts = 0
        self.dialed: list[RecordTransport] = []
        self.server = FastPathServer({KEY: "peer-a"}, lambda peer, name: ("127.0.0.1", echo),
                                     on_cut=self.accept_cuts.append)
        self.port = 0

    async def open_raw(self, factory: Callable[[], asyncio.Protocol]) -> Any:
        transport = await open_fast_raw("127.0.0.1", self.port, KEY, "rpc", factory)
        self.dialed.append(transport)
        return transport

    def cut(self) -> None:
        self.dial_cuts += 1

    async def tunnel(self) -> tuple[SocketStream, asyncio.Task[bool]]:
        """A local connection spliced to a new tunnel (as FastLinks.take does), echo checked."""
        client, conn = await local_pair()
        task = asyncio.get_running_loop().create_task(
            take_raw(conn, self.open_raw, None, self.cut))
        await client.send(b"ping")
        assert await client.receive() == b"ping"
        return client, task


async def until(predicate: Callable[[], bool]) -> None:
    with anyio.fail_after(5):
        while not predicate():
            await anyio.sleep(0.01)


async def test_a_cut_is_reported_where_it_is_seen_and_a_clean_end_is_not() -> None:
    async with anyio.create_task_group() as tg:
        ends = Ends(tg, await tg.start(echo_server))
        ends.port = await tg.start(ends.server.serve, 0)

        # a clean end: the client closes, both directions end with the sealed EOF
        client, task = await ends.tunnel()
        await client.aclose()
        with anyio.fail_after(5):
            assert await task
        await until(lambda: not ends.server.live)
        assert (ends.dial_cuts, ends.accept_cuts) == (0, [])

        # the accepting side's process "dies": its TCP ends without the sealed EOF
        client, task = await ends.tunnel()
        for conn in list(ends.server.live):
            assert conn.tcp is not None
            conn.tcp.abort()
        with anyio.fail_after(5):
            assert await task
        assert (ends.dial_cuts, ends.accept_cuts) == (1, []), "reported by the dialing side"
        await client.aclose()

        # the dialing side's process "dies": the server reports the peer its key names
        client, task = await ends.tunnel()
        dialed = ends.dialed[-1]
        assert dialed.tcp is not None
        dialed.tcp.abort()
        await until(lambda: bool(ends.accept_cuts))
        with anyio.fail_after(5):
            assert await task
        assert (ends.dial_cuts, ends.accept_cuts) == (1, ["peer-a"])
        await client.aclose()
        tg.cancel_scope.cancel()


async def test_a_server_stopping_reports_no_cut() -> None:
    """The node stopping fails its own tunnels (ConnectionAbortedError): not a peer's death."""
    cuts: list[str] = []
    async with anyio.create_task_group() as tg:
        echo = await tg.start(echo_server)
        server = FastPathServer({KEY: "peer-a"}, lambda peer, name: ("127.0.0.1", echo),
                                on_cut=cuts.append)
        with anyio.CancelScope() as scope:
            serving = anyio.CancelScope()

            async def serve(*, task_status: Any) -> None:
                with serving:
                    await server.serve(0, task_status=task_status)

            port = await tg.start(serve)
            opener = functools.partial(open_fast_raw, "127.0.0.1", port, KEY, "rpc")
            client, conn = await local_pair()
            task = asyncio.get_running_loop().create_task(take_raw(conn, opener, None))
            await client.send(b"ping")
            assert await client.receive() == b"ping"
            serving.cancel()  # the server stops: its live tunnels fail
            with anyio.fail_after(5):
                await task
            await client.aclose()
            scope.cancel()
        assert cuts == []
        tg.cancel_scope.cancel()


async def test_the_relay_process_reports_a_cut_too() -> None:
    """Where the host's tunnels run in the relay process (8 CPUs or more), the child's
    ``end`` message says ``cut`` and the node's callback runs."""
    cuts: list[int] = []
    relay = RelayProcess()
    try:
        async with anyio.create_task_group() as tg:
            echo = await tg.start(echo_server)
            server = FastPathServer({KEY: "peer-a"}, lambda peer, name: ("127.0.0.1", echo))
            port = await tg.start(server.serve, 0)
            client, conn = await local_pair()
            await relay.take(conn, "127.0.0.1", port, KEY, "rpc", None, 0.0,
                             lambda: cuts.append(1))
            await client.send(b"ping")
            assert await client.receive() == b"ping"
            for accepted in list(server.live):
                assert accepted.tcp is not None
                accepted.tcp.abort()
            await until(lambda: cuts == [1])
            await client.aclose()
            tg.cancel_scope.cancel()
    finally:
        relay.stop()
