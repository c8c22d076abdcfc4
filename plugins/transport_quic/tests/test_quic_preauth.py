"""An outsider before the mesh handshake, against a real ``mesh-llm`` process: stream data on
many streams and on the AUTH stream, a flood of connections that never authenticate, and a
HELLO captured on one connection replayed on another. The victim's memory stays bounded, it
keeps answering /health, and a legitimate node still joins."""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import httpx
import psutil
import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from anyio.streams.buffered import BufferedByteReceiveStream
from meshcore_transport_quic.auth import check_challenge, make_hello
from meshcore_transport_quic.frames import HEADER, MAX_FRAME, Kind, StreamType, encode_frame
from meshcore_transport_quic.identity import load_identity
from meshcore_transport_quic.quicstream import PRE_AUTH_BYTES, MeshProtocol, QuicByteStream
from meshcore_transport_quic.state import ERR_AUTH, ERR_PROTOCOL
from meshcore_transport_quic.token import decode_token
from meshcore_transport_quic.wire import ALPN, MAX_DATA, read_frame
from test_quic_processes import Proc, poll, spawn

__all__ = ["spawn"]  # the fixture, imported for the tests below

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="real processes on loopback")

RSS_LIMIT = 200 * 1024 * 1024  # the bound for a node under any flood
CHUNK = 256 * 1024


async def outsider(port: int, *, disobey: bool = False,
                   wait: float = 10) -> tuple[MeshProtocol, asyncio.DatagramTransport]:
    """A QUIC connection to a node's mesh port that passed TLS (any certificate is accepted)
    and has not started the mesh handshake; the attacker's windows are wide open, and with
    ``disobey`` it ignores the node's stream limits (opens streams QUIC forbids it)."""
    cfg = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE,
                            max_data=MAX_DATA)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    udp, proto = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: MeshProtocol(QuicConnection(configuration=cfg), on_stream=lambda p, s: None),
        sock=sock)
    assert isinstance(proto, MeshProtocol)
    proto.connect(("127.0.0.1", port))
    try:
        with anyio.fail_after(wait):
            await proto.handshake_done.wait()
        assert proto.terminated is None, proto.terminated
    except BaseException:
        proto.close()
        udp.close()
        raise
    if disobey:
        proto.quic._remote_max_streams_bidi = proto.quic._remote_max_streams_uni = 128
    return proto, udp


async def push(stream: QuicByteStream, first: bytes, total: int) -> int:
    """Send ``first`` then zeros, up to ``total`` bytes or until the node closes on us;
    returns the bytes handed to QUIC (the sender waits above 4 MiB unacknowledged)."""
    sent, data = 0, first + bytes(CHUNK - len(first))
    with anyio.move_on_after(10):
        while sent < total and stream.protocol.terminated is None:
            try:
                await stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                break
            sent, data = sent + len(data), bytes(CHUNK)
    return sent


@contextmanager
def peak_rss(pid: int) -> Iterator[list[int]]:
    """Sample a process's RSS every 20 ms while the block runs; yields [peak]."""
    peak, done = [0], threading.Event()
    proc = psutil.Process(pid)

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            done.wait(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join(5)


def still_serving(victim: Proc, spawn: Callable[..., Proc], name: str) -> None:
    """The victim is up, answers /health, and a newcomer joins it."""
    assert victim.popen.poll() is None, victim.log
    r = httpx.get(f"http://127.0.0.1:{victim.api_port}/health", timeout=5)
    assert r.status_code in (200, 503), r.text
    assert "Traceback" not in victim.log, victim.log
    newcomer = spawn(name, "--join", victim.token)
    new_id = newcomer.node_id()
    poll(lambda: new_id in victim.peers(), 30, f"{name} to join after the attack")


# ---------------------------------------------------------------- stream data before the HELLO


async def flood_streams(port: int, connections: int, streams: int, each: int) -> list[
        tuple[int, str]]:
    """``connections`` outsiders each push ``each`` bytes on ``streams`` gossip streams;
    returns how each connection ended (code, reason)."""
    ends: list[tuple[int, str]] = []

    async def one() -> None:
        proto, udp = await outsider(port, disobey=True)
        try:
            async with anyio.create_task_group() as tg:
                for i in range(streams):
                    stream = proto.open_stream(unidirectional=i % 2 == 0)
                    tg.start_soon(push, stream, bytes([StreamType.GOSSIP]), each)
            ends.append(proto.terminated or (0, "still open"))
        finally:
            proto.close()
            udp.close()

    async with anyio.create_task_group() as tg:
        for _ in range(connections):
            tg.start_soon(one)
    return ends


def test_stream_data_before_the_handshake_is_capped(spawn: Callable[..., Proc]) -> None:
    victim = spawn("victim")
    port = decode_token(victim.token).port
    with peak_rss(victim.popen.pid) as peak:
        ends = anyio.run(flood_streams, port, 8, 4, 8 * 1024 * 1024)
    print(f"victim peak RSS {peak[0] / 2**20:.0f} MiB; ends {ends[:2]}")
    # closed for a protocol error: by the node's guard, or by QUIC for too many streams
    assert all(code == ERR_PROTOCOL or 0 < code < 0x100 for code, _ in ends), ends
    poll(lambda: victim.log.count("before the handshake") >= len(ends), 5, "one log line each")
    assert peak[0] < RSS_LIMIT, f"victim RSS peaked at {peak[0] / 2**20:.0f} MiB"
    still_serving(victim, spawn, "newcomer")


async def stuff_auth_stream(port: int) -> tuple[int, tuple[int, str] | None]:
    """Announce a maximal HELLO on the AUTH stream and send most of it (never completing
    it), so a node that reads it waits; returns (bytes sent, how the connection ended)."""
    proto, udp = await outsider(port)
    try:
        stream = proto.open_stream()
        first = bytes([StreamType.AUTH]) + HEADER.pack(1, Kind.HELLO, MAX_FRAME)
        sent = await push(stream, first, MAX_FRAME - CHUNK // 2)
        with anyio.move_on_after(3):
            await proto.wait_closed()
        return sent, proto.terminated
    finally:
        proto.close()
        udp.close()


async def stuff_auth_streams(port: int, count: int) -> list[tuple[int, tuple[int, str] | None]]:
    return list(await asyncio.gather(*(stuff_auth_stream(port) for _ in range(count))))


def test_the_auth_stream_carries_no_more_than_the_pre_handshake_allowance(
        spawn: Callable[..., Proc]) -> None:
    victim = spawn("victim")
    port = decode_token(victim.token).port
    with peak_rss(victim.popen.pid) as peak:
        results = anyio.run(stuff_auth_streams, port, 32)
    for sent, end in results:
        assert sent > PRE_AUTH_BYTES
        assert end is not None and end[0] == ERR_PROTOCOL, (end, victim.log)
        assert f"more than {PRE_AUTH_BYTES} bytes before the handshake" in end[1]
    assert peak[0] < RSS_LIMIT, f"victim RSS peaked at {peak[0] / 2**20:.0f} MiB"
    still_serving(victim, spawn, "newcomer")


# ---------------------------------------------------------------- connections that never speak


async def idle_outsiders(port: int, count: int) -> list[tuple[int, str] | None]:
    """``count`` connections that pass TLS and say nothing; how each ended after 1 s."""
    made = await asyncio.gather(*(outsider(port, wait=4) for _ in range(count)),
                                return_exceptions=True)
    await anyio.sleep(1)
    ends = [m[0].terminated if isinstance(m, tuple) else (-1, repr(m)) for m in made]
    for m in made:
        if isinstance(m, tuple):
            m[0].close()
            m[1].close()
    return ends


def test_unauthenticated_connections_are_capped(spawn: Callable[..., Proc]) -> None:
    victim = spawn("victim")
    port = decode_token(victim.token).port
    with peak_rss(victim.popen.pid) as peak:
        ends = anyio.run(idle_outsiders, port, 100)
    # the surplus gets no answer at all (no TLS work is spent on it): its handshake times out
    unanswered = [e for e in ends if e is not None and "TimeoutError" in e[1]]
    assert len(unanswered) >= 100 - 64, (collections.Counter(map(str, ends)), victim.log)
    assert sum(e is None for e in ends) <= 64, ends
    assert "refusing inbound connections" in victim.log, victim.log
    assert peak[0] < RSS_LIMIT
    still_serving(victim, spawn, "newcomer")


# ---------------------------------------------------------------- a replayed HELLO


async def capture_and_replay(port: int, token: str, home: Path) -> tuple[int, str] | None:
    """Join as a real member on one connection (recording its HELLO frame), then send that
    same HELLO on a second connection; returns how the second connection ended."""
    parsed = decode_token(token)
    ident = load_identity(home, "replayed")
    proto, udp = await outsider(port)
    try:
        stream = proto.open_stream()
        await stream.send(bytes([StreamType.AUTH]))
        reader = BufferedByteReceiveStream(stream)
        challenge = check_challenge((await read_frame(reader)).body)
        info = {"port": udp.get_extra_info("sockname")[1], "addrs": ["127.0.0.1"]}
        body, _ = make_hello(ident, parsed.secret, parsed.fingerprint, challenge, "replayed",
                             "boot1", info)
        captured = encode_frame(Kind.HELLO, body)
        await stream.send(captured)
        welcome = await read_frame(reader)
        assert welcome.kind is Kind.WELCOME, welcome  # the original was accepted
    finally:
        proto.close()
        udp.close()
    proto, udp = await outsider(port)
    try:
        stream = proto.open_stream()
        await stream.send(bytes([StreamType.AUTH]) + captured)
        with anyio.move_on_after(8):
            await proto.wait_closed()
        return proto.terminated
    finally:
        proto.close()
        udp.close()


def test_a_captured_hello_replayed_on_another_connection_is_refused(
        spawn: Callable[..., Proc], tmp_path: Path) -> None:
    victim = spawn("victim")
    port = decode_token(victim.token).port
    end = anyio.run(capture_and_replay, port, victim.token, tmp_path / "member")
    assert end is not None and end[0] == ERR_AUTH and "replayed" in end[1], (end, victim.log)
    poll(lambda: "replayed HELLO" in victim.log, 5, "the refusal in the victim's log")
    assert "peer replayed connected" in victim.log  # the original, once
    assert victim.log.count("peer replayed connected") == 1, victim.log
    still_serving(victim, spawn, "newcomer")

