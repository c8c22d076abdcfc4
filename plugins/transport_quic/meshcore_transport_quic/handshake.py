"""The connection side of the QUIC transport: accept and dial, TLS pinning, mesh handshake."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import anyio
from aioquic.quic.connection import QuicConnection
from anyio.streams.buffered import BufferedByteReceiveStream

from meshcore_transport_quic.auth import (
    AuthError,
    check_hello,
    check_welcome,
    make_hello,
    make_welcome,
)
from meshcore_transport_quic.base import (
    AUTH_TIMEOUT,
    ERR_AUTH,
    HANDSHAKE_TIMEOUT,
    DialError,
    JoinRefused,
    TransportBase,
    log,
)
from meshcore_transport_quic.frames import FrameError, Kind, StreamType, encode_frame
from meshcore_transport_quic.links import PeerLink, host_port
from meshcore_transport_quic.quicstream import MeshProtocol, QuicByteStream
from meshcore_transport_quic.wire import (
    peer_fingerprint,
    quic_config,
    read_frame,
    udp_socket,
    udp_target,
)


class Handshakes(TransportBase):
    """Turns QUIC connections into authenticated peer links (or closes them with a reason)."""

    def _server_protocol(self, quic: QuicConnection, stream_handler: Any = None) -> MeshProtocol:
        proto = MeshProtocol(quic, on_stream=self._on_stream)
        self._spawn(proto, "an inbound connection", self._serve_connection, proto)
        return proto

    async def _serve_connection(self, proto: MeshProtocol) -> None:
        """Watch an inbound connection: it must authenticate in time, then it is a link."""
        with anyio.move_on_after(AUTH_TIMEOUT + HANDSHAKE_TIMEOUT):
            await proto.ready.wait()
        if not proto.ready.is_set():
            if proto.terminated is None:
                log.warning("closing a connection from %s: no mesh handshake in time",
                            proto.peer_addr)
                proto.close(ERR_AUTH, "no mesh handshake in time")
            return
        link = self.links.get(proto.peer_id or "")
        if link is not None and link.proto is proto:
            await self._watch(link)

    async def _dial(self, host: str, port: int, fp: bytes) -> PeerLink:
        loop = asyncio.get_running_loop()
        sock, v6 = udp_socket(0)
        quic = QuicConnection(configuration=quic_config(self.identity_, client=True,
                                                        datagram=self.datagram))
        udp, proto = await loop.create_datagram_endpoint(
            functools.partial(MeshProtocol, quic, on_stream=self._on_stream), sock=sock)
        assert isinstance(proto, MeshProtocol)
        self._client_udp.add(udp)
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
            link = await self._client_auth(proto, fp, host, port)
        except BaseException:
            proto.close(ERR_AUTH, "dial aborted")
            udp.close()
            self._client_udp.discard(udp)
            raise
        self._spawn(proto, "watching the connection", self._watch, link, udp)
        return link

    async def _client_auth(self, proto: MeshProtocol, fp: bytes, host: str,
                           port: int) -> PeerLink:
        fast_key = self.fast.new_key()
        body, ctx = make_hello(self.identity_, self.secret, fp, self.node.id, self.boot,
                               self._info(fast_key))
        stream = proto.open_stream()
        reader = BufferedByteReceiveStream(stream)
        where = host_port(host, port)
        # Valid before the HELLO leaves: the server probes our fast path once its WELCOME is
        # sent, which may be before we read it. Until then the key names no peer, so it
        # opens nothing but a probe (no service is looked up for ""); a failure withdraws it.
        self.fast.keys[fast_key] = ""
        welcomed = False
        try:
            await stream.send(bytes([StreamType.AUTH]) + encode_frame(Kind.HELLO, body))
            with anyio.fail_after(AUTH_TIMEOUT):
                frame = await read_frame(reader)
            if frame.kind is not Kind.WELCOME:
                raise AuthError(f"expected WELCOME, got {frame.kind.name}")
            peer_id, boot, info = check_welcome(frame.body, self.secret, ctx)
            self._check_binding(peer_id, fp)
            welcomed = True
        except AuthError as exc:
            proto.close(ERR_AUTH, str(exc))
            raise JoinRefused(f"{where}: {exc}") from None
        except (anyio.BrokenResourceError, anyio.EndOfStream, FrameError, TimeoutError) as exc:
            if proto.terminated is not None and proto.terminated[0] == ERR_AUTH:
                raise JoinRefused(f"{where}: {proto.terminated[1]}") from None
            raise DialError(f"{where}: mesh handshake failed ({exc!r})") from None
        finally:
            if not welcomed:
                self.fast.keys.pop(fast_key, None)
            await stream.aclose()
        self.fast.keys[fast_key] = peer_id
        return self._adopt(proto, peer_id, fp, boot, info, dialed=True)

    async def _accept_auth(self, proto: MeshProtocol, stream: QuicByteStream,
                           reader: BufferedByteReceiveStream) -> None:
        try:
            with anyio.fail_after(AUTH_TIMEOUT):
                frame = await read_frame(reader)
            if frame.kind is not Kind.HELLO:
                raise AuthError(f"expected HELLO, got {frame.kind.name}")
            hello = check_hello(frame.body, self.secret, self.identity_.fingerprint)
            if hello.node_id == self.node.id:
                raise AuthError(f"node id {hello.node_id} is this node's own id")
            self._check_binding(hello.node_id, hello.fingerprint)
        except (AuthError, FrameError, TimeoutError, anyio.BrokenResourceError,
                anyio.EndOfStream) as exc:
            reason = str(exc) or type(exc).__name__
            log.warning("refused a node at %s: %s", proto.peer_addr, reason)
            proto.close(ERR_AUTH, reason)
            return
        fast_key = self.fast.new_key()
        welcome = make_welcome(self.secret, hello, self.node.id, self.boot, self._info(fast_key))
        self.fast.keys[fast_key] = hello.node_id  # before the WELCOME: the dialer probes at once
        try:
            await stream.send(encode_frame(Kind.WELCOME, welcome))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self.fast.keys.pop(fast_key, None)
            return
        finally:
            await stream.aclose()
        self._adopt(proto, hello.node_id, hello.fingerprint, hello.boot, hello.info, dialed=False)

    def _check_binding(self, peer_id: str, fp: bytes) -> None:
        bound = self.bindings.get(peer_id)
        if bound is not None and bound != fp:
            raise AuthError(f"node id {peer_id} already belongs to another certificate in this "
                            "mesh; give the new node its own state dir (MESH_LLM_HOME)")

