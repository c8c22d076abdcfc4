"""aioquic glue: a QuicConnectionProtocol that hands each QUIC stream out as an anyio ByteStream.

aioquic has no receive-side backpressure (it delivers data as events), so receive buffers are
bounded only by the peer's flow-control window; sends wait while more than ``SEND_HIGH_WATER``
bytes of a stream are unacknowledged, so a fast writer cannot queue gigabytes in aioquic.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import anyio
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.connection import QuicConnection
from anyio.abc import ByteStream

from meshcore_transport_quic.frames import StreamType

SEND_HIGH_WATER = 4 * 1024 * 1024
PRE_AUTH_BYTES = 64 * 1024  # stream bytes a peer may send before its HELLO passes (~2 KB)
STREAMS_AFTER_AUTH = 128  # aioquic's default stream limits, restored once authenticated
UDP_BUFFER = 8 * 1024 * 1024
LOOPBACK_DATAGRAM = 16 * 1024  # loopback MTU is 64 KiB; bigger datagrams mean fewer syscalls


def is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def plain_host(host: str) -> str:
    """``::ffff:1.2.3.4`` -> ``1.2.3.4``; other addresses unchanged."""
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def tune_udp_socket(sock: socket.socket) -> None:
    """Large socket buffers: bursts of a fast stream must not be dropped by the kernel."""
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, UDP_BUFFER)


class QuicByteStream(ByteStream):
    """One QUIC stream as an anyio ByteStream (bytes pass untouched, in order)."""

    def __init__(self, protocol: MeshProtocol, stream_id: int) -> None:
        self.protocol = protocol
        self.stream_id = stream_id
        self._chunks: deque[bytes] = deque()
        self._readable = asyncio.Event()
        self._eof = False
        self._broken: str | None = None
        self._closed = False
        self._fin_sent = False

    # -- fed by the protocol
    def feed(self, data: bytes, end: bool) -> None:
        if data:
            self._chunks.append(data)
        self._eof = self._eof or end
        self._readable.set()

    def feed_broken(self, why: str) -> None:
        self._broken = self._broken or why
        self._readable.set()

    # -- ByteStream
    async def receive(self, max_bytes: int = 65536) -> bytes:
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            if self._chunks:
                chunk = self._chunks.popleft()
                if len(chunk) > max_bytes:
                    self._chunks.appendleft(chunk[max_bytes:])
                    chunk = chunk[:max_bytes]
                return chunk
            if self._eof:
                raise anyio.EndOfStream
            if self._broken:
                raise anyio.BrokenResourceError(self._broken)
            self._readable.clear()
            await self._readable.wait()

    def _write(self, data: bytes, end: bool = False) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        if self._broken or self.protocol.terminated is not None:
            raise anyio.BrokenResourceError(self._broken or "connection closed")
        try:
            self.protocol.quic.send_stream_data(self.stream_id, data, end_stream=end)
        except (ValueError, AssertionError) as exc:  # stream reset or already finished
            raise anyio.BrokenResourceError(str(exc)) from exc
        self.protocol.transmit_soon()

    async def send(self, item: bytes) -> None:
        if self._fin_sent:
            raise anyio.ClosedResourceError
        self._write(bytes(item))
        while self.protocol.unacked(self.stream_id) > SEND_HIGH_WATER:
            if self.protocol.terminated is not None:
                raise anyio.BrokenResourceError("connection closed")
            await self.protocol.wait_progress()

    async def send_eof(self) -> None:
        if not self._fin_sent:
            self._fin_sent = True
            self._write(b"", end=True)

    async def aclose(self) -> None:
        if self._closed:
            return
        if not self._fin_sent and self.protocol.terminated is None and not self._broken:
            self._fin_sent = True
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._write(b"", end=True)
        self._closed = True
        self._readable.set()
        self.protocol.retire(self.stream_id)
        await anyio.lowlevel.checkpoint()


@dataclass
class Traffic:
    """What one transport's QUIC connections sent and received since start (datagrams and
    their bytes, and gossip frames sent by kind): shown in ``/mesh/status``, read by
    ``bench/scale.py`` to measure what an idle mesh costs."""

    datagrams_in: int = 0
    datagrams_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    frames_out: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {"datagrams_in": self.datagrams_in, "datagrams_out": self.datagrams_out,
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "frames_out": dict(sorted(self.frames_out.items()))}


class CountingTransport(asyncio.DatagramTransport):
    """A connection's view of its UDP socket that counts what it sends (aioquic sends
    through ``sendto`` only); everything else is the socket's."""

    def __init__(self, inner: asyncio.DatagramTransport, traffic: Traffic) -> None:
        super().__init__()
        self.inner = inner
        self.traffic = traffic

    def sendto(self, data: Any, addr: Any = None) -> None:
        if self.inner.is_closing():  # a timer that fired after its dial's socket closed:
            return  # dropped like any lost datagram (asyncio would raise on the closed socket)
        self.traffic.datagrams_out += 1
        self.traffic.bytes_out += len(data)
        self.inner.sendto(data, addr)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.inner.get_extra_info(name, default)

    def close(self) -> None:
        self.inner.close()

    def is_closing(self) -> bool:
        return self.inner.is_closing()

    def abort(self) -> None:
        self.inner.abort()


StreamCallback = Callable[["MeshProtocol", QuicByteStream], None]
Guard = Callable[["MeshProtocol", str], None]  # (connection, what it did) -> close it


class MeshProtocol(QuicConnectionProtocol):
    """One peer connection. New peer-initiated streams go to ``on_stream``.

    An inbound connection starts guarded (``guard`` is set) until :meth:`admit`: the peer may
    open one bidirectional stream, the AUTH stream, and send at most PRE_AUTH_BYTES of stream
    data (counted as aioquic's flow control counts them, out-of-order data included); anything
    else goes to ``guard``, which closes the connection. The connection's flow-control window
    starts as small as that (``wire.quic_config``), so aioquic never buffers more for it.
    """

    def __init__(self, quic: QuicConnection, stream_handler: Any = None, *,
                 on_stream: StreamCallback, large_datagrams: bool = True,
                 guard: Guard | None = None, traffic: Traffic | None = None) -> None:
        super().__init__(quic)
        self.guard = guard
        self.traffic = Traffic() if traffic is None else traffic
        self.refused = False  # see refuse()
        if guard is not None:
            # aioquic has no setting for these: its transport parameters are written from
            # them when the client's first flight arrives, which is after this constructor.
            quic._local_max_streams_bidi.value = quic._local_max_streams_bidi.sent = 1
            quic._local_max_streams_uni.value = quic._local_max_streams_uni.sent = 0
        self.on_stream = on_stream
        self.large_datagrams = large_datagrams
        self.streams: dict[int, QuicByteStream] = {}
        self._highest: dict[int, int] = {}  # stream class (id & 3) -> highest id seen
        self.handshake_done = asyncio.Event()
        self.terminated: tuple[int, str] | None = None
        self.peer_addr: tuple[str, int] | None = None
        self._progress = asyncio.Event()
        self.ready = asyncio.Event()  # set once the mesh handshake adopted this connection
        self.peer_id: str | None = None
        self.last_rx = time.monotonic()

    @property
    def quic(self) -> QuicConnection:
        return self._quic

    def set_peer_addr(self, addr: tuple[Any, ...]) -> None:
        self.peer_addr = (plain_host(str(addr[0])), int(addr[1]))
        if self.large_datagrams and is_loopback(self.peer_addr[0]):
            # aioquic has no per-path MTU discovery; loopback carries 64 KiB datagrams.
            self._quic._max_datagram_size = LOOPBACK_DATAGRAM

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(
            CountingTransport(cast(asyncio.DatagramTransport, transport), self.traffic))
        sock = transport.get_extra_info("socket")
        if sock is not None and self._quic.configuration.is_client:
            tune_udp_socket(sock)

    def refuse(self) -> None:
        """Drop this inbound connection before any work (no TLS, no answer): its first
        datagram unregisters it from the QUIC server; the dialer times out and retries."""
        self.refused = True
        self.terminated = (0, "refused")
        self.guard = None

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        if self.refused:
            self._connection_terminated_handler()  # the server forgets this connection
            return
        if self.peer_addr is None:
            self.set_peer_addr(addr)
        self.last_rx = time.monotonic()
        self.traffic.datagrams_in += 1
        self.traffic.bytes_in += len(data)
        super().datagram_received(data, addr)
        if (self.guard is not None and self.terminated is None
                and self._quic._local_max_data.used > PRE_AUTH_BYTES):
            self.guard(self, f"sent more than {PRE_AUTH_BYTES} bytes before the handshake")
        self._wake()

    def admit(self, max_data: int) -> None:
        """The mesh handshake passed: lift the guard and open the windows (aioquic announces
        the new limits with its next packet)."""
        self.guard = None
        quic = self._quic
        quic._local_max_data.value = max(quic._local_max_data.value, max_data)
        for limit in (quic._local_max_streams_bidi, quic._local_max_streams_uni):
            limit.value = max(limit.value, STREAMS_AFTER_AUTH)
        self.transmit_soon()

    def close(self, error_code: int = 0, reason_phrase: str = "") -> None:
        """Close now: aioquic only reports the end after its draining period (which grows
        with backoff when the peer is dead), so streams and ``wait_closed`` end right away."""
        super().close(error_code=error_code, reason_phrase=reason_phrase)
        self._terminate(error_code, reason_phrase)

    def stop_timer(self) -> None:
        """Stop aioquic's timer once the socket is closed (nothing more can be sent)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _terminate(self, error_code: int, reason: str) -> None:
        if self.terminated is None:
            self.terminated = (error_code, reason)
        for stream in list(self.streams.values()):
            stream.feed_broken(f"connection closed: {reason or 'no reason'}")
        self.handshake_done.set()
        self._closed.set()
        self._wake()

    def _wake(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    async def wait_progress(self) -> None:
        await self._progress.wait()

    def transmit_soon(self) -> None:
        self._transmit_soon()

    def unacked(self, stream_id: int) -> int:
        # aioquic has no public "bytes in flight" per stream; read its sender's buffer bounds.
        sender = getattr(self._quic._streams.get(stream_id), "sender", None)
        try:
            return int(sender._buffer_stop - sender._buffer_start)  # type: ignore[union-attr]
        except AttributeError:
            return 0

    def open_stream(self, *, unidirectional: bool = False) -> QuicByteStream:
        sid = self._quic.get_next_available_stream_id(is_unidirectional=unidirectional)
        stream = QuicByteStream(self, sid)
        self.streams[sid] = stream
        self._highest[sid & 3] = max(sid, self._highest.get(sid & 3, -1))
        return stream

    def retire(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)

    def _is_new(self, stream_id: int) -> bool:
        """Stream ids of one class only grow: an unknown id at or below the highest seen is a
        stream we already closed (late data for it is dropped), never a new one."""
        if stream_id <= self._highest.get(stream_id & 3, -1):
            return False
        self._highest[stream_id & 3] = stream_id
        return True

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.HandshakeCompleted):
            self.handshake_done.set()
        elif isinstance(event, events.StreamDataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None:
                if not self._is_new(event.stream_id):
                    return
                if self.guard is not None and (event.stream_id != 0 or (
                        event.data and event.data[0] != StreamType.AUTH)):
                    if self.terminated is None:
                        self.guard(self, "opened a stream other than AUTH before the handshake")
                    return
                stream = QuicByteStream(self, event.stream_id)
                self.streams[event.stream_id] = stream
                stream.feed(event.data, event.end_stream)
                self.on_stream(self, stream)
                return
            stream.feed(event.data, event.end_stream)
        elif isinstance(event, events.StreamReset):
            if (stream := self.streams.get(event.stream_id)) is not None:
                stream.feed_broken(f"stream reset by peer (code {event.error_code})")
        elif isinstance(event, events.ConnectionTerminated):
            if self.guard is not None and self.terminated is None and 0 < event.error_code < 0x100:
                # aioquic closed it for breaking QUIC's rules (e.g. more streams than allowed)
                self.guard(self, f"broke QUIC's rules before the handshake (QUIC error "
                                 f"{event.error_code}: {event.reason_phrase or 'no reason'})")
            self._terminate(event.error_code, event.reason_phrase)
