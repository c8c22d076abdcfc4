"""The handshake part of the QUIC transport: dial and accept, TLS pinning, HELLO and WELCOME.

:class:`Handshake` turns a QUIC connection into an :class:`Authenticated` peer, or closes it
with the reason. It makes no link itself: membership adopts what it returns.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
from aioquic.quic.connection import QuicConnection
from anyio.streams.buffered import BufferedByteReceiveStream

from meshcore_transport_quic.auth import (
    AuthError,
    PeerInfo,
    check_challenge,
    check_hello,
    check_welcome,
    make_hello,
    make_welcome,
    new_challenge,
)
from meshcore_transport_quic.frames import FrameError, Kind, StreamType, encode_frame
from meshcore_transport_quic.links import host_port
from meshcore_transport_quic.quicstream import MeshProtocol, QuicByteStream, StreamCallback
from meshcore_transport_quic.state import (
    AUTH_TIMEOUT,
    ERR_AUTH,
    ERR_PROTOCOL,
    HANDSHAKE_TIMEOUT,
    DialError,
    JoinRefused,
    Mesh,
    log,
)
from meshcore_transport_quic.wire import (
    MAX_DATA,
    peer_fingerprint,
    quic_config,
    read_frame,
    udp_socket,
    udp_target,
)


@dataclass(frozen=True)
class Authenticated:
    """A connection that passed the mesh handshake: who is at the other end, and what it said."""

    proto: MeshProtocol
    peer_id: str
    fp: bytes
    boot: str
    info: PeerInfo
    dialed: bool  # this node opened the connection


MAX_PENDING = 64  # inbound connections not yet authenticated (the fast path's cap too)
BUSY_LOG_S = 10.0  # a flood is logged once per this many seconds, not once per connection


class Handshake:
    """Dials and accepts connections for one :class:`.state.Mesh`; every connection it makes
    hands the streams its peer opens to ``on_stream``."""

    def __init__(self, mesh: Mesh, on_stream: StreamCallback) -> None:
        self.mesh = mesh
        self.on_stream = on_stream
        self.pending: set[MeshProtocol] = set()  # inbound, not yet authenticated
        self._busy_logged = -BUSY_LOG_S
        self.record: Callable[[], dict[str, str]] | None = None  # this node's signed record

    def protocol(self, quic: QuicConnection) -> MeshProtocol:
        """The protocol of an inbound connection (it authenticates on its AUTH stream,
        guarded until then); beyond MAX_PENDING such connections a new one is dropped
        unanswered (the dialer times out and retries; no TLS work is spent on it)."""
        proto = MeshProtocol(quic, on_stream=self.on_stream, guard=self._violation,
                             traffic=self.mesh.traffic)
        self.pending = {p for p in self.pending if p.guard is not None and p.terminated is None}
        if len(self.pending) < MAX_PENDING:
            self.pending.add(proto)
            return proto
        now = time.monotonic()
        if now - self._busy_logged >= BUSY_LOG_S:
            self._busy_logged = now
            log.warning("refusing inbound connections: %d are authenticating already "
                        "(a flood, or many nodes joining at once; they retry)", MAX_PENDING)
        proto.refuse()
        return proto

    @staticmethod
    def _violation(proto: MeshProtocol, what: str) -> None:
        """A connection not yet authenticated broke the pre-handshake rules: close it."""
        if proto.terminated is None:
            log.warning("refused a node at %s: it %s", proto.peer_addr, what)
            proto.close(ERR_PROTOCOL, f"protocol error: {what}")

    async def dial(self, host: str, port: int,
                   fp: bytes) -> tuple[Authenticated, asyncio.BaseTransport]:
        """Connect to ``host``, pin ``fp`` and authenticate; the peer and the UDP socket (kept
        in ``mesh.client_udp`` until the caller's watch closes it)."""
        mesh = self.mesh
        loop = asyncio.get_running_loop()
        sock, v6 = udp_socket(0)
        quic = QuicConnection(configuration=quic_config(mesh.ident, client=True,
                                                        datagram=mesh.datagram))
        udp, proto = await loop.create_datagram_endpoint(
            functools.partial(MeshProtocol, quic, on_stream=self.on_stream,
                              traffic=mesh.traffic), sock=sock)
        assert isinstance(proto, MeshProtocol)
        mesh.client_udp.add(udp)
        try:
            proto.set_peer_addr((host, port))
            proto.connect(udp_target(host, port, v6))
            with anyio.move_on_after(HANDSHAKE_TIMEOUT):
                await proto.handshake_done.wait()
            if not proto.handshake_done.is_set() or proto.terminated is not None:
                why = proto.terminated[1] if proto.terminated else "no answer"
                raise DialError(f"{host_port(host, port)}: {why or 'QUIC handshake failed'}")
            got = peer_fingerprint(proto)
            if got != fp:
                proto.close(ERR_AUTH, "certificate does not match the pinned fingerprint")
                raise JoinRefused(
                    f"{host_port(host, port)}: the node there presented certificate "
                    f"{(got or b'').hex()[:16]}, but the token pins {fp.hex()[:16]}: it is "
                    "another node (wrong or stale token); get a fresh token from a running node")
            peer = await self._client_auth(proto, fp, host_port(host, port))
        except BaseException:
            proto.close(ERR_AUTH, "dial aborted")
            udp.close()
            mesh.client_udp.discard(udp)
            raise
        return peer, udp

    async def _client_auth(self, proto: MeshProtocol, fp: bytes, where: str) -> Authenticated:
        mesh, fast = self.mesh, self.mesh.fast
        fast_key = fast.new_key()
        stream = proto.open_stream()
        reader = BufferedByteReceiveStream(stream)
        # Valid before the HELLO leaves: the server probes our fast path once its WELCOME is
        # sent, which may be before we read it. Until then the key names no peer, so it
        # opens nothing but a probe (no service is looked up for ""); a failure withdraws it.
        fast.keys[fast_key] = ""
        welcomed = False
        try:
            await stream.send(bytes([StreamType.AUTH]))
            with anyio.fail_after(AUTH_TIMEOUT):
                frame = await read_frame(reader)
            if frame.kind is not Kind.CHALLENGE:
                raise AuthError(f"expected CHALLENGE, got {frame.kind.name}")
            body, ctx = make_hello(mesh.ident, mesh.secret, fp, check_challenge(frame.body),
                                   mesh.node.id, mesh.boot, self._offer(fast_key))
            await stream.send(encode_frame(Kind.HELLO, body))
            with anyio.fail_after(AUTH_TIMEOUT):
                frame = await read_frame(reader)
            if frame.kind is not Kind.WELCOME:
                raise AuthError(f"expected WELCOME, got {frame.kind.name}")
            peer_id, boot, info = check_welcome(frame.body, mesh.secret, ctx)
            self._check_binding(peer_id, fp)
            welcomed = True
            proto.admit(MAX_DATA)
        except AuthError as exc:
            proto.close(ERR_AUTH, str(exc))
            raise JoinRefused(f"{where}: {exc}") from None
        except (anyio.BrokenResourceError, anyio.EndOfStream, FrameError, TimeoutError) as exc:
            if proto.terminated is not None and proto.terminated[0] == ERR_AUTH:
                raise JoinRefused(f"{where}: {proto.terminated[1]}") from None
            raise DialError(f"{where}: mesh handshake failed ({exc!r})") from None
        finally:
            if not welcomed:
                fast.keys.pop(fast_key, None)
            await stream.aclose()
        fast.keys[fast_key] = peer_id
        return Authenticated(proto, peer_id, fp, boot, info, dialed=True)

    async def accept(self, proto: MeshProtocol, stream: QuicByteStream,
                     reader: BufferedByteReceiveStream) -> Authenticated | None:
        """Answer the HELLO on an inbound AUTH stream; None (the connection closed, or
        closing, with the reason) when the node is refused or the WELCOME could not leave."""
        mesh = self.mesh
        challenge, nonce = new_challenge()
        try:
            await stream.send(encode_frame(Kind.CHALLENGE, challenge))
            with anyio.fail_after(AUTH_TIMEOUT):
                frame = await read_frame(reader)
            if frame.kind is not Kind.HELLO:
                raise AuthError(f"expected HELLO, got {frame.kind.name}")
            hello = check_hello(frame.body, mesh.secret, mesh.ident.fingerprint, nonce)
            if hello.node_id == mesh.node.id:
                raise AuthError(f"node id {hello.node_id} is this node's own id")
            self._check_binding(hello.node_id, hello.fingerprint)
        except (AuthError, FrameError, TimeoutError, anyio.BrokenResourceError,
                anyio.ClosedResourceError, anyio.EndOfStream) as exc:
            reason = str(exc) or type(exc).__name__
            log.warning("refused a node at %s: %s", proto.peer_addr, reason)
            proto.close(ERR_AUTH, reason)
            return None
        proto.admit(MAX_DATA)  # before the WELCOME: the peer's gossip may follow it at once
        fast_key = mesh.fast.new_key()
        welcome = make_welcome(mesh.secret, hello, mesh.node.id, mesh.boot,
                               self._offer(fast_key))
        mesh.fast.keys[fast_key] = hello.node_id  # before the WELCOME: the dialer probes at once
        try:
            await stream.send(encode_frame(Kind.WELCOME, welcome))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            mesh.fast.keys.pop(fast_key, None)
            return None
        finally:
            await stream.aclose()
        return Authenticated(proto, hello.node_id, hello.fingerprint, hello.boot, hello.info,
                             dialed=False)

    def _offer(self, fast_key: bytes) -> dict[str, Any]:
        """What this node says of itself in its HELLO or WELCOME (the auth ``info``)."""
        mesh = self.mesh
        return {"addrs": mesh.my_addresses(), "port": mesh.port,
                "fast": mesh.fast.offer(fast_key),
                "peer": mesh.node.state.me.to_dict(),
                **({"env": self.record()} if self.record is not None else {})}

    def _check_binding(self, peer_id: str, fp: bytes) -> None:
        bound = self.mesh.bindings.get(peer_id)
        if bound is not None and bound != fp:
            raise AuthError(f"node id {peer_id} already belongs to another certificate in this "
                            "mesh; give the new node its own state dir (MESH_LLM_HOME)")
