"""rpc tunnels keep their event loop polling for a window after each record (adapter.hot_window,
RecordTransport.keep_hot), on both ends, and stop once the traffic stops; other tunnels never
poll. The bytes are the same either way."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import anyio
import pytest
from meshcore_transport_quic.adapter import HOT_MIN_CPUS, HOT_RPC_S, RecordTransport, hot_window
from meshcore_transport_quic.fastpath import open_tunnel
from meshcore_transport_quic.fastserver import FastPathServer
from quic_helpers import echo_server

pytestmark = pytest.mark.anyio
KEY = os.urandom(32)


@pytest.fixture(params=[pytest.param("asyncio", id="asyncio"),
                        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop")])
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


def test_only_rpc_tunnels_on_machines_with_cores_to_spare_poll_by_default() -> None:
    assert hot_window("rpc", cpus=HOT_MIN_CPUS, env={}) == HOT_RPC_S > 0
    assert hot_window("rpc", cpus=HOT_MIN_CPUS - 1, env={}) == 0.0
    assert hot_window("api", cpus=64, env={}) == 0.0
    assert hot_window("probe", cpus=64, env={"MESH_LLM_HOT_US": "5000"}) == 0.0


def test_the_environment_sets_the_window_of_rpc_tunnels() -> None:
    assert hot_window("rpc", cpus=2, env={"MESH_LLM_HOT_US": "2500"}) == 0.0025
    assert hot_window("rpc", cpus=64, env={"MESH_LLM_HOT_US": "0"}) == 0.0
    assert hot_window("rpc", cpus=64, env={"MESH_LLM_HOT_US": " "}) == HOT_RPC_S


class Collect(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()

    def data_received(self, data: bytes) -> None:
        self.data += data


async def exchange(service: str, window_us: str, monkeypatch: pytest.MonkeyPatch
                   ) -> tuple[list[bool], list[bool]]:
    """Dial a fast-path server whose ``service`` is an echo, send 64 KiB and read it back;
    whether the dialing and the accepting connection poll right after, and 1 s later."""
    monkeypatch.setenv("MESH_LLM_HOT_US", window_us)
    async with anyio.create_task_group() as tg:
        echo = await tg.start(echo_server)
        server = FastPathServer({KEY: "peer"}, lambda peer, name: ("127.0.0.1", echo)
                                if name == service else None)
        port = await tg.start(server.serve, 0)
        conn, got = await open_tunnel("127.0.0.1", port, KEY, service, Collect)
        payload = os.urandom(65536)
        conn.write(payload)
        with anyio.fail_after(10):
            while len(got.data) < len(payload):
                await anyio.sleep(0.001)
        assert got.data == payload
        (accepted,) = server.live
        assert isinstance(accepted, RecordTransport)
        right_after = [conn.polling, accepted.polling]
        await anyio.sleep(1.0)
        later = [conn.polling, accepted.polling]
        conn.close()
        tg.cancel_scope.cancel()
    return right_after, later


async def test_an_rpc_tunnel_polls_on_both_ends_while_traffic_flows_then_sleeps(
        monkeypatch: pytest.MonkeyPatch) -> None:
    right_after, later = await exchange("rpc", "300000", monkeypatch)  # a 300 ms window
    assert right_after == [True, True]
    assert later == [False, False]


async def test_a_tunnel_without_a_window_never_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    assert await exchange("rpc", "0", monkeypatch) == ([False, False], [False, False])
    assert await exchange("api", "100000", monkeypatch) == ([False, False], [False, False])
