"""Stream and socket plumbing shared by the QUIC transport: frame I/O, UDP sockets, configs."""

from __future__ import annotations

import socket
import ssl

import anyio
from aioquic.quic.configuration import QuicConfiguration
from anyio.abc import ByteStream
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.stapled import StapledByteStream

from meshcore_transport_quic.frames import (
    HEADER,
    Frame,
    FrameError,
    Kind,
    StreamType,
    decode_frame,
    encode_frame,
    parse_header,
)
from meshcore_transport_quic.identity import Identity
from meshcore_transport_quic.quicstream import (
    PRE_AUTH_BYTES,
    MeshProtocol,
    QuicByteStream,
    tune_udp_socket,
)

ALPN = "mesh-llm/1"
IDLE_TIMEOUT_S = 120.0  # a 20+ s model load must never drop a peer
DEFAULT_DATAGRAM = 1350  # fits a 1500-byte MTU with IPv6 and UDP headers
MAX_DATA = 32 * 1024 * 1024  # per connection, once authenticated (MeshProtocol.admit)
MAX_STREAM_DATA = 8 * 1024 * 1024


def quic_config(identity: Identity, *, client: bool, datagram: int) -> QuicConfiguration:
    # The connection's window starts at the pre-handshake allowance: a peer not yet
    # authenticated cannot make aioquic buffer more (the window of each stream is bounded by
    # the connection's). MeshProtocol.admit opens it to MAX_DATA after the handshake.
    cfg = QuicConfiguration(
        is_client=client, alpn_protocols=[ALPN], idle_timeout=IDLE_TIMEOUT_S,
        max_datagram_size=datagram, max_data=PRE_AUTH_BYTES, max_stream_data=MAX_STREAM_DATA,
        verify_mode=ssl.CERT_NONE,  # the peer's certificate is pinned by fingerprint instead
    )
    if not client:
        cfg.certificate = identity.cert
        cfg.private_key = identity.key
    return cfg


def peer_fingerprint(proto: MeshProtocol) -> bytes | None:
    """SHA-256 of the certificate the peer presented in the QUIC handshake."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from meshcore_transport_quic.identity import fingerprint

    cert = getattr(proto.quic.tls, "_peer_certificate", None)  # aioquic keeps it private
    return None if cert is None else fingerprint(cert.public_bytes(Encoding.DER))


def udp_socket(port: int) -> tuple[socket.socket, bool]:
    """A UDP socket on every interface (dual-stack when IPv6 exists); (socket, is_ipv6).

    The mesh port is the one listener that faces the network on purpose: other machines join
    through it, and a connection gets nothing (no gossip, no tunnel) until it passes the pinned
    certificate and mesh-secret checks. The API, console, llama-server and rpc-server stay on
    127.0.0.1 (the first two unless --listen-all).
    """
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", port, 0, 0))
        except OSError:
            sock.close()
            raise
        v6 = True
    except OSError:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            sock.close()
            raise
        v6 = False
    tune_udp_socket(sock)
    sock.setblocking(False)
    return sock, v6


def udp_target(host: str, port: int, v6: bool) -> tuple[str, int] | tuple[str, int, int, int]:
    if v6 and ":" not in host:
        return ("::ffff:" + host, port, 0, 0)
    return (host, port, 0, 0) if v6 else (host, port)


async def read_frame(reader: BufferedByteReceiveStream) -> Frame:
    """Read one frame; FrameError for a bad, oversized or truncated one."""
    try:
        header = await reader.receive_exactly(HEADER.size)
    except anyio.IncompleteRead:
        raise FrameError("truncated frame header (stream ended)") from None
    kind, length = parse_header(header)
    try:
        payload = await reader.receive_exactly(length) if length else b""
    except anyio.IncompleteRead:
        raise FrameError(f"truncated {kind.name} frame: the stream ended before its "
                         f"{length} bytes") from None
    return decode_frame(header + payload)


async def send_gossip(proto: MeshProtocol, kind: Kind, body: dict[str, object]) -> None:
    """One frame on a fresh unidirectional stream (a bad frame never poisons another)."""
    data = bytes([StreamType.GOSSIP]) + encode_frame(kind, body)
    stream = proto.open_stream(unidirectional=True)
    proto.traffic.frames_out[kind.name] += 1
    try:
        await stream.send(data)
    finally:
        await stream.aclose()


def staple(reader: BufferedByteReceiveStream, stream: QuicByteStream) -> ByteStream:
    """A ByteStream reading through ``reader`` (which may hold buffered bytes)."""
    return StapledByteStream(stream, reader)
