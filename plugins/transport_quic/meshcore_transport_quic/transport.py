"""QuicTransport: the mesh over aioquic: join, authenticate, gossip, liveness and tunnels.

One QUIC connection per peer pair carries control frames and, as a fallback, tunnels; tunnels
prefer the direct TLS-over-TCP fast path (see :mod:`.fastpath`). Timings can be overridden via
``NodeConfig.options``: ``quic_heartbeat_s`` (1), ``quic_dead_after_s`` (5),
``quic_reconnect_s`` (10), ``quic_fast_path`` (True), ``quic_addresses`` (advertised IPs),
``quic_max_datagram`` (1350; loopback peers use 16 KiB).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import secrets
import time
from typing import Any

import anyio
from aioquic.asyncio.server import QuicServer
from aioquic.quic.connection import QuicConnection
from anyio.abc import ByteStream, TaskGroup, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from meshcore.state import Peer
from meshcore_transport_quic.auth import (
    AuthError,
    check_hello,
    check_welcome,
    make_hello,
    make_welcome,
)
from meshcore_transport_quic.fastpath import FastPathError, FastPathServer, open_fast, probe
from meshcore_transport_quic.frames import Frame, FrameError, Kind, StreamType, encode_frame
from meshcore_transport_quic.identity import Identity, load_identity, load_mesh_secret
from meshcore_transport_quic.links import (
    PeerLink,
    host_port,
    local_addresses,
    merge_addrs,
    parse_hint,
    rtt_table_changed,
)
from meshcore_transport_quic.quicstream import MeshProtocol, QuicByteStream
from meshcore_transport_quic.token import JoinToken, decode_token
from meshcore_transport_quic.wire import (
    DEFAULT_DATAGRAM,
    peer_fingerprint,
    quic_config,
    read_frame,
    send_gossip,
    staple,
    udp_socket,
    udp_target,
)

log = logging.getLogger("meshcore.transport.quic")

ERR_AUTH, ERR_DUPLICATE, ERR_TIMEOUT, ERR_LEAVING = 0x101, 0x102, 0x103, 0x104
LEAVING = "node leaving the mesh"
AUTH_TIMEOUT = 5.0
HANDSHAKE_TIMEOUT = 3.0
HINT_DELAY = 1.5  # the larger id waits this long for the smaller one to dial
FAST_RETRY_S = 30.0


class DialError(ConnectionError):
    """Nobody answered (or the handshake timed out): worth retrying."""


class JoinRefused(ConnectionError):
    """The node answered and refused us (or is not the pinned node): retrying will not help."""


class QuicTransport:
    """The default transport (entry point ``quic``)."""

    def __init__(self, node: Any) -> None:
        self.node = node
        opts = node.config.options
        self.heartbeat_s = float(opts.get("quic_heartbeat_s", 1.0))
        self.dead_after_s = float(opts.get("quic_dead_after_s", 5.0))
        self.reconnect_s = float(opts.get("quic_reconnect_s", 10.0))
        self.fast_enabled = bool(opts.get("quic_fast_path", True))
        self.datagram = int(opts.get("quic_max_datagram", DEFAULT_DATAGRAM))
        self.advertise: list[str] | None = opts.get("quic_addresses")
        self.boot = secrets.token_hex(8)
        self.identity: Identity | None = None
        self.secret = b""
        self.port: int | None = None
        self.fast_port: int | None = None
        self.v6 = True
        self.links: dict[str, PeerLink] = {}
        self.bindings: dict[str, bytes] = {}  # node id -> certificate fingerprint
        self.boots: dict[str, str] = {}
        self.lost: dict[str, float] = {}  # peer id -> reconnect deadline
        self.dialing: set[str] = set()
        self.fast_keys: dict[bytes, str] = {}  # keys we issued -> peer id
        self._published_rtt: dict[str, float] = {}
        self._tg: TaskGroup | None = None
        self._client_udp: set[asyncio.BaseTransport] = set()

    # ------------------------------------------------------------------ Transport API

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        cfg = self.node.config
        tokens = [decode_token(t) for t in cfg.joins]
        self.identity = load_identity(cfg.state_dir, self.node.id)
        self.secret = tokens[0].secret if tokens else load_mesh_secret(cfg.state_dir)
        if any(t.secret != self.secret for t in tokens):
            log.warning("the --join tokens carry different mesh secrets; using the first one's")
        sock, self.v6 = udp_socket(cfg.bind_port)
        self.port = sock.getsockname()[1]
        loop = asyncio.get_running_loop()
        server_cfg = quic_config(self.identity, client=False, datagram=self.datagram)
        udp, _ = await loop.create_datagram_endpoint(
            lambda: QuicServer(configuration=server_cfg, create_protocol=self._server_protocol),
            sock=sock)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                if self.fast_enabled:
                    server = FastPathServer(self.identity, self.fast_keys, self._fast_inbound)
                    self.fast_port = await tg.start(server.serve, self.port)
                addrs = self._my_addresses()
                self.node.state.update_me(addresses=tuple(host_port(a, self.port) for a in addrs))
                log.info("QUIC on UDP %s, fast path on TCP %s, addresses %s", self.port,
                         self.fast_port, ", ".join(addrs))
                task_status.started()
                tg.start_soon(self._heartbeat_loop)
                try:
                    if tokens:
                        await self._join(tokens)
                    await anyio.sleep_forever()
                finally:
                    with anyio.CancelScope(shield=True):
                        await self._leave()
        finally:
            for transport in [udp, *self._client_udp]:
                transport.close()

    def invite_token(self) -> str | None:
        if self.identity is None or self.port is None:
            return None
        return JoinToken(self.identity.fingerprint, self.secret, self.port,
                         tuple(self._my_addresses())).encode()

    async def announce(self) -> None:
        body = {"peer": self.node.state.me.to_dict()}
        for link in list(self.links.values()):
            await self._send(link, Kind.ANNOUNCE, body)

    async def connect(self, peer_id: str, service: str) -> ByteStream:
        link = self.links.get(peer_id)
        if link is None:
            raise ConnectionError(f"peer {peer_id} is not connected")
        if self._use_fast(link):
            assert link.fast_port is not None and link.fast_key is not None
            try:
                return await open_fast(link.host, link.fast_port, link.fp, link.fast_key, service)
            except FastPathError as exc:
                self._fast_failed(link, str(exc))
        stream = link.proto.open_stream()
        name = service.encode("ascii")
        await stream.send(bytes([StreamType.TUNNEL, len(name)]) + name)
        return stream

    def link(self, peer_id: str) -> str:
        link = self.links.get(peer_id)
        if link is None:
            return "QUIC (reconnecting)" if peer_id in self.lost else "none"
        return "TLS-TCP" if link.fast_ok and self.fast_enabled else "QUIC"

    # ------------------------------------------------------------------ helpers

    def _my_addresses(self) -> list[str]:
        return list(self.advertise) if self.advertise else local_addresses(self.v6)

    @property
    def tg(self) -> TaskGroup:
        assert self._tg is not None
        return self._tg

    def _info(self, fast_key: bytes) -> dict[str, Any]:
        fast = {"port": self.fast_port, "key": fast_key.hex()} if self.fast_port else None
        return {"addrs": self._my_addresses(), "port": self.port, "fast": fast,
                "peer": self.node.state.me.to_dict()}

    async def _send(self, link: PeerLink, kind: Kind, body: dict[str, Any]) -> None:
        try:
            await send_gossip(link.proto, kind, body)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, FrameError) as exc:
            log.debug("could not send %s to %s: %s", kind.name, link.id, exc)

    def _use_fast(self, link: PeerLink) -> bool:
        if not self.fast_enabled or link.fast_port is None or link.fast_key is None:
            return False
        if link.fast_ok is False and time.monotonic() >= link.fast_retry_at:
            link.fast_ok = None  # try again now and then: the path may have come back
        return link.fast_ok is not False

    def _fast_failed(self, link: PeerLink, why: str) -> None:
        if link.fast_ok is not False:
            log.warning("link to %s: fast path unreachable (%s); tunnels use QUIC", link.id, why)
        link.fast_ok, link.fast_why = False, why
        link.fast_retry_at = time.monotonic() + FAST_RETRY_S

    # ------------------------------------------------------------------ connections

    def _server_protocol(self, quic: QuicConnection, stream_handler: Any = None) -> MeshProtocol:
        proto = MeshProtocol(quic, on_stream=self._on_stream)
        self.tg.start_soon(self._serve_connection, proto)
        return proto

    async def _serve_connection(self, proto: MeshProtocol) -> None:
        """Watch an inbound connection: it must authenticate in time, then it is a link."""
        with anyio.move_on_after(AUTH_TIMEOUT + HANDSHAKE_TIMEOUT):
            await proto.ready.wait()
        if not proto.ready.is_set() and proto.terminated is None:
            log.warning("closing a connection from %s: no mesh handshake in time",
                        proto.peer_addr)
            proto.close(ERR_AUTH, "no mesh handshake in time")

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
                    f"{host_port(host, port)} presented certificate {(got or b'').hex()[:16]}, "
                    f"but {fp.hex()[:16]} was expected: it is another node (wrong or stale "
                    "token); get a fresh token from a running node")
            link = await self._client_auth(proto, fp, host, port)
        except BaseException:
            proto.close(ERR_AUTH, "dial aborted")
            udp.close()
            self._client_udp.discard(udp)
            raise
        self.tg.start_soon(self._watch, link, udp)
        return link

    @property
    def identity_(self) -> Identity:
        assert self.identity is not None
        return self.identity

    async def _client_auth(self, proto: MeshProtocol, fp: bytes, host: str,
                           port: int) -> PeerLink:
        fast_key = secrets.token_bytes(32)
        body, ctx = make_hello(self.identity_, self.secret, fp, self.node.id, self.boot,
                               self._info(fast_key))
        stream = proto.open_stream()
        reader = BufferedByteReceiveStream(stream)
        where = host_port(host, port)
        try:
            await stream.send(bytes([StreamType.AUTH]) + encode_frame(Kind.HELLO, body))
            with anyio.fail_after(AUTH_TIMEOUT):
                frame = await read_frame(reader)
            if frame.kind is not Kind.WELCOME:
                raise AuthError(f"expected WELCOME, got {frame.kind.name}")
            peer_id, boot, info = check_welcome(frame.body, self.secret, ctx)
            self._check_binding(peer_id, fp)
        except AuthError as exc:
            proto.close(ERR_AUTH, str(exc))
            raise JoinRefused(f"{where}: {exc}") from None
        except (anyio.BrokenResourceError, anyio.EndOfStream, FrameError, TimeoutError) as exc:
            if proto.terminated is not None and proto.terminated[0] == ERR_AUTH:
                raise JoinRefused(f"{where} refused this node: {proto.terminated[1]}") from None
            raise DialError(f"{where}: mesh handshake failed ({exc!r})") from None
        finally:
            await stream.aclose()
        self.fast_keys[fast_key] = peer_id
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
        fast_key = secrets.token_bytes(32)
        welcome = make_welcome(self.secret, hello, self.node.id, self.boot, self._info(fast_key))
        try:
            await stream.send(encode_frame(Kind.WELCOME, welcome))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return
        finally:
            await stream.aclose()
        self.fast_keys[fast_key] = hello.node_id
        self._adopt(proto, hello.node_id, hello.fingerprint, hello.boot, hello.info, dialed=False)

    def _check_binding(self, peer_id: str, fp: bytes) -> None:
        bound = self.bindings.get(peer_id)
        if bound is not None and bound != fp:
            raise AuthError(f"node id {peer_id} already belongs to another certificate in this "
                            "mesh; give the new node its own state dir (MESH_LLM_HOME)")

    # ------------------------------------------------------------------ membership

    def _adopt(self, proto: MeshProtocol, peer_id: str, fp: bytes, boot: str,
               info: dict[str, Any], *, dialed: bool) -> PeerLink:
        old = self.links.get(peer_id)
        if old is not None and old.proto is not proto and old.proto.terminated is None:
            old_dialer = self.node.id if old.dialed else peer_id
            new_dialer = self.node.id if dialed else peer_id
            if old.boot == boot and old_dialer != new_dialer and old_dialer > new_dialer:
                proto.close(ERR_DUPLICATE, "duplicate connection")
                return old
            old.proto.close(ERR_DUPLICATE, "replaced by a newer connection")
        port = int(info.get("port") or 0)
        advertised = [(str(a), port) for a in info.get("addrs") or [] if port][:32]
        seen = [(proto.peer_addr[0], port)] if proto.peer_addr and port else []
        if dialed and proto.peer_addr:
            seen.insert(0, proto.peer_addr)
        link = PeerLink(peer_id, fp, boot, proto, dialed, merge_addrs(seen, advertised))
        fast = info.get("fast")
        if isinstance(fast, dict) and self.fast_enabled:
            try:
                link.fast_port, link.fast_key = int(fast["port"]), bytes.fromhex(fast["key"])
            except (KeyError, TypeError, ValueError):
                log.warning("peer %s sent a malformed fast-path offer; using QUIC", peer_id)
        self.bindings[peer_id] = fp
        if self.boots.get(peer_id, boot) != boot:
            self.node.state.remove(peer_id)  # restarted: its announcement counter restarted too
        self.boots[peer_id] = boot
        self.links[peer_id] = link
        self.lost.pop(peer_id, None)
        proto.peer_id = peer_id
        proto.ready.set()
        self._accept_record(link, info.get("peer"))
        log.info("peer %s connected (%s, %s)", peer_id, host_port(*link.addrs[0]),
                 "dialed" if dialed else "accepted")
        self.tg.start_soon(self._after_connect, link)
        return link

    async def _after_connect(self, link: PeerLink) -> None:
        others = [x.hint() for x in self.links.values() if x.id != link.id]
        if others:
            await self._send(link, Kind.PEERS, {"peers": others})
        for other in list(self.links.values()):
            if other.id != link.id:
                await self._send(other, Kind.PEERS, {"peers": [link.hint()]})
        if link.fast_port is not None and link.fast_key is not None and self.fast_enabled:
            try:
                await probe(link.host, link.fast_port, link.fp, link.fast_key)
            except FastPathError as exc:
                self._fast_failed(link, str(exc))
            else:
                link.fast_ok = True
                log.info("link to %s: TLS-TCP fast path at %s", link.id,
                         host_port(link.host, link.fast_port))
        else:
            log.info("link to %s: QUIC only (no fast path offered)", link.id)

    async def _watch(self, link: PeerLink, udp: asyncio.BaseTransport | None = None) -> None:
        await link.proto.wait_closed()
        if udp is not None:
            udp.close()
            self._client_udp.discard(udp)
        if self.links.get(link.id) is not link:
            return
        del self.links[link.id]
        for key in [k for k, v in self.fast_keys.items() if v == link.id]:
            del self.fast_keys[key]
        code, reason = link.proto.terminated or (0, "")
        if link.left or code == ERR_LEAVING:
            log.info("peer %s left the mesh", link.id)
            self.node.state.remove(link.id)
            return
        await self._reconnect(link, reason)

    async def _reconnect(self, link: PeerLink, reason: str) -> None:
        deadline = time.monotonic() + self.reconnect_s
        self.lost[link.id] = deadline
        log.warning("lost the connection to %s (%s); reconnecting for up to %.0f s",
                    link.id, reason or "closed", self.reconnect_s)
        while time.monotonic() < deadline and link.id not in self.links:
            for host, port in link.addrs:
                if link.id in self.links or link.id in self.dialing:
                    break
                self.dialing.add(link.id)
                try:
                    with anyio.move_on_after(max(0.1, deadline - time.monotonic())):
                        await self._dial(host, port, link.fp)
                except (DialError, JoinRefused, OSError) as exc:
                    log.debug("reconnect to %s at %s failed: %s", link.id, host, exc)
                finally:
                    self.dialing.discard(link.id)
            await anyio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        if link.id not in self.links and self.lost.get(link.id) == deadline:
            del self.lost[link.id]
            log.warning("peer %s removed: no connection for %.0f s", link.id, self.reconnect_s)
            self.node.state.remove(link.id)

    # ------------------------------------------------------------------ inbound streams

    def _on_stream(self, proto: MeshProtocol, stream: QuicByteStream) -> None:
        self.tg.start_soon(self._handle_stream, proto, stream)

    async def _handle_stream(self, proto: MeshProtocol, stream: QuicByteStream) -> None:
        reader = BufferedByteReceiveStream(stream)
        try:
            kind = (await reader.receive_exactly(1))[0]
        except (anyio.IncompleteRead, anyio.BrokenResourceError):
            await stream.aclose()
            return
        if kind == StreamType.AUTH and not proto.ready.is_set():
            await self._accept_auth(proto, stream, reader)
            return
        with anyio.move_on_after(AUTH_TIMEOUT):
            await proto.ready.wait()
        link = self.links.get(proto.peer_id or "")
        if link is None or link.proto is not proto:
            await stream.aclose()
            return
        if kind == StreamType.TUNNEL:
            await self._tunnel_inbound(link, stream, reader)
        elif kind == StreamType.GOSSIP:
            try:
                with anyio.fail_after(10):
                    frame = await read_frame(reader)
            except (FrameError, TimeoutError, anyio.BrokenResourceError) as exc:
                log.warning("rejected a frame from %s: %s", link.id, exc)
                return
            finally:
                await stream.aclose()
            await self._handle_frame(link, frame)
        else:
            log.warning("peer %s opened a stream of unknown type %d; ignored", link.id, kind)
            await stream.aclose()

    async def _tunnel_inbound(self, link: PeerLink, stream: QuicByteStream,
                              reader: BufferedByteReceiveStream) -> None:
        try:
            size = (await reader.receive_exactly(1))[0]
            service = (await reader.receive_exactly(size)).decode("ascii", "replace")
        except (anyio.IncompleteRead, anyio.BrokenResourceError):
            await stream.aclose()
            return
        await self.node.serve_inbound(service, staple(reader, stream))

    async def _fast_inbound(self, peer_id: str, service: str, stream: ByteStream) -> None:
        if peer_id not in self.links:
            await stream.aclose()
            return
        await self.node.serve_inbound(service, stream)

    async def _handle_frame(self, link: PeerLink, frame: Frame) -> None:
        body = frame.body
        if frame.kind is Kind.ANNOUNCE:
            self._accept_record(link, body.get("peer"))
        elif frame.kind is Kind.PING:
            await self._send(link, Kind.PONG, {"t": body.get("t")})
        elif frame.kind is Kind.PONG:
            sent = body.get("t")
            if isinstance(sent, (int, float)) and not isinstance(sent, bool):
                ms = (time.monotonic() - sent) * 1000
                if 0 <= ms < 60_000:
                    self.node.state.set_rtt(link.id, link.sample_rtt(ms))
        elif frame.kind is Kind.PEERS:
            for hint in (body.get("peers") or [])[:256]:
                self._on_hint(link, hint)
        elif frame.kind is Kind.LEAVE:
            link.left = True
            self.node.state.remove(link.id)
        else:
            log.warning("peer %s sent an unexpected %s frame; ignored", link.id, frame.kind.name)

    def _accept_record(self, link: PeerLink, data: Any) -> None:
        try:
            peer = Peer.from_dict(data)
        except (ValueError, TypeError) as exc:
            log.warning("rejected an announcement from %s: %s", link.id, exc)
            return
        if peer.id != link.id:
            log.warning("rejected an announcement for %s sent by %s: a node may only announce "
                        "itself", peer.id, link.id)
            return
        self.node.state.upsert(dataclasses.replace(peer, rtt_ms=None))

    def _on_hint(self, via: PeerLink, data: Any) -> None:
        parsed = parse_hint(data)
        if parsed is None:
            log.warning("ignored a malformed peer hint from %s", via.id)
            return
        peer_id, fp, addrs = parsed
        if peer_id == self.node.id or peer_id in self.links or peer_id in self.dialing:
            return
        if self.bindings.get(peer_id, fp) != fp:
            log.warning("ignored a hint from %s: %s has another certificate", via.id, peer_id)
            return
        self.tg.start_soon(self._dial_hint, peer_id, fp, addrs)

    async def _dial_hint(self, peer_id: str, fp: bytes, addrs: list[tuple[str, int]]) -> None:
        if self.node.id > peer_id:
            await anyio.sleep(HINT_DELAY)  # the smaller id dials first; avoid duplicates
        for host, port in addrs:
            if peer_id in self.links or peer_id in self.dialing:
                return
            self.dialing.add(peer_id)
            try:
                await self._dial(host, port, fp)
                return
            except (DialError, JoinRefused, OSError) as exc:
                log.debug("dialing %s at %s failed: %s", peer_id, host, exc)
            finally:
                self.dialing.discard(peer_id)
        log.warning("could not reach peer %s at %s", peer_id,
                    ", ".join(host_port(*a) for a in addrs))

    # ------------------------------------------------------------------ join, liveness, leave

    async def _join(self, tokens: list[JoinToken]) -> None:
        """Dial the tokens' addresses in turn until one node lets us in."""
        while True:
            refused: list[str] = []
            unreachable: list[str] = []
            for token in tokens:
                for host, port in token.endpoints:
                    if self.links:
                        return
                    try:
                        await self._dial(host, port, token.fingerprint)
                        return
                    except JoinRefused as exc:
                        refused.append(str(exc))
                    except (DialError, OSError) as exc:
                        unreachable.append(str(exc))
            if refused and not unreachable:
                raise JoinRefused("the mesh refused this node: " + "; ".join(refused))
            log.warning("could not join the mesh (%s); retrying in 2 s",
                        "; ".join(refused + unreachable))
            await anyio.sleep(2)

    async def _heartbeat_loop(self) -> None:
        while True:
            await anyio.sleep(self.heartbeat_s)
            now = time.monotonic()
            for link in list(self.links.values()):
                silent = now - link.proto.last_rx
                if silent > self.dead_after_s:
                    log.warning("peer %s silent for %.1f s: dropping its connection",
                                link.id, silent)
                    link.proto.close(ERR_TIMEOUT, "heartbeat timeout")
                    continue
                await self._send(link, Kind.PING, {"t": now})
            self._publish_rtt()

    def _publish_rtt(self) -> None:
        table = {k: round(v.rtt_ms, 2) for k, v in self.links.items() if v.rtt_ms is not None}
        if rtt_table_changed(self._published_rtt, table):
            self._published_rtt = table
            me = self.node.state.me
            self.node.state.update_me(extra={**me.extra, "rtt_ms": table})

    async def _leave(self) -> None:
        links = list(self.links.values())
        for link in links:
            await self._send(link, Kind.LEAVE, {})
        for link in links:
            with contextlib.suppress(Exception):  # best effort: the socket may be gone
                link.proto.close(ERR_LEAVING, LEAVING)
        if links:
            await anyio.sleep(0.05)  # let the close datagrams leave
