"""The relay process (relayproc.py): the host ends of spliced fast-path tunnels in a child
process. It starts on first use, relays, counts, reports a refused peer like the node would,
is replaced when it dies, and ends with the node (or when the node dies)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import anyio
import psutil
import pytest
from meshcore_transport_quic.relayproc import RelayProcess, process_wanted
from quic_helpers import echo_server, wait_for

pytestmark = pytest.mark.anyio


def test_on_where_cores_allow_unless_told() -> None:
    assert process_wanted(env={}, cpus=2) is False  # a small machine: relays in the node
    assert process_wanted(env={}, cpus=16) is True  # a GPU host: a core to spare
    assert process_wanted(env={"MESH_LLM_RELAY_PROCESS": "1"}, cpus=2) is True
    assert process_wanted(env={"MESH_LLM_RELAY_PROCESS": "0"}, cpus=16) is False


async def echo_once(port: int, payload: bytes) -> bytes:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(payload)
        got = b""
        with anyio.fail_after(10):
            while len(got) < len(payload):
                got += await stream.receive()
        return got


async def pair(quic_mesh: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any, int]:
    monkeypatch.setenv("MESH_LLM_RELAY_PROCESS", "1")
    a = await quic_mesh.add()
    b = await quic_mesh.add()
    await wait_for(lambda: a.transport.link(b.id) == "TCP+AES-GCM", 10, "fast path link")
    b.services["echo"] = ("127.0.0.1", await quic_mesh.tg.start(echo_server))
    return a, b, await a.forward_port(b.id, "echo")


async def test_starts_with_the_mesh_and_is_replaced_when_it_dies(
        quic_mesh: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node alone starts no child; once it has a fast-path link it starts one before any
    tunnel needs it (a split host's first tunnel would wait for its Python start), and the
    first tunnel uses that one."""
    monkeypatch.setenv("MESH_LLM_RELAY_PROCESS", "1")
    alone = await quic_mesh.add()
    await anyio.sleep(0.5)
    assert alone.transport.fast.relay.proc is None, "a node alone started a relay process"
    a, _, port = await pair(quic_mesh, monkeypatch)
    relay: RelayProcess = a.transport.fast.relay
    assert relay.proc is not None, "not started when the mesh formed"
    first = relay.proc.pid
    assert await echo_once(port, b"first") == b"first"
    assert relay.proc.pid == first and relay.taken == 1
    os.kill(first, signal.SIGKILL)
    await wait_for(lambda: relay.proc is None, 5, "the node to notice its relay died")
    assert await echo_once(port, b"second") == b"second"  # a new child took it
    assert relay.proc is not None and relay.proc.pid != first and relay.taken == 2


async def test_ends_with_the_node(quic_mesh: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    a, _, port = await pair(quic_mesh, monkeypatch)
    assert await echo_once(port, b"x") == b"x"
    pid = a.transport.fast.relay.proc.pid
    a.stop()
    await wait_for(lambda: not psutil.pid_exists(pid)
                   or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 10,
                   "the relay process to end with its node")


async def test_a_refused_peer_is_reported_and_the_tunnel_uses_quic(
        quic_mesh: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The child's dial is refused (the peer's fast-path port closed): the node is told it
    was refused, as if it had dialed itself (membership's port check hangs on that), marks
    the link's fast path failed and carries the connection over QUIC instead."""
    a, b, port = await pair(quic_mesh, monkeypatch)
    refused: list[str] = []
    a.transport.fast.on_refused = lambda link: refused.append(link.id)
    link = a.transport.mesh.links[b.id]
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    link.fast_port = closed.getsockname()[1]  # nothing listens there
    closed.close()
    assert await echo_once(port, b"over quic") == b"over quic"
    assert link.fast_ok is False and "cannot reach" in link.fast_why
    assert refused == [b.id]
    assert a.transport.link(b.id) == "QUIC"


def test_the_child_exits_when_its_node_dies_without_a_word() -> None:
    """The socketpair's end is the child's only signal when the node is SIGKILLed."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    child = subprocess.Popen([sys.executable, "-m", "meshcore_transport_quic.relayproc",
                              str(theirs.fileno())], pass_fds=(theirs.fileno(),))
    theirs.close()
    try:
        time.sleep(0.5)
        assert child.poll() is None, "the child should wait for work"
        ours.close()  # what the kernel does when the node dies
        assert child.wait(timeout=10) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
