"""The fast path as one composed part of the QUIC transport: its control plane.

:class:`FastLinks` owns what the handshake offers (this node's TCP port and a fresh key per
peer, kept in ``keys``), the listening :class:`.fastserver.FastPathServer`, and per link
whether tunnels use the fast path: probed after authentication, retried FAST_RETRY_S after a
failure, ``link()``'s label. The data plane is :mod:`.session` (records), :mod:`.adapter`
(asyncio) and :mod:`.splice` (relays); :mod:`.fastpath` dials, :mod:`.fastserver` listens.
With ``MESH_LLM_RELAY_PROCESS=1`` the spliced host ends run in a child process
(:mod:`.relayproc`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

from anyio.abc import ByteStream, TaskGroup, TaskStatus

from meshcore.relay import Tally
from meshcore_transport_quic.adapter import hot_window
from meshcore_transport_quic.fastpath import FastPathError, open_fast, open_fast_raw, probe
from meshcore_transport_quic.fastserver import FastPathServer, Lookup
from meshcore_transport_quic.links import PeerLink, host_port
from meshcore_transport_quic.relayproc import RelayFailed, RelayProcess, process_wanted
from meshcore_transport_quic.splice import take_raw

log = logging.getLogger("meshcore.transport.quic")

KEY_BYTES = 32
FAST_RETRY_S = 30.0
FAST_LABEL = "TCP+AES-GCM"  # how ``link()`` names a peer reached on the fast path


class FastLinks:
    """The fast path of one transport (``enabled`` False: QUIC only, nothing listens)."""

    def __init__(self, enabled: bool, advertise_port: int | None = None) -> None:
        self.enabled = enabled
        # offered instead of the listening port (``quic_fast_port_advertised``: a port
        # forwarded to this one, e.g. bench/wan.py's delay line)
        self.advertise_port = advertise_port
        self.keys: dict[bytes, str] = {}  # keys we issued -> peer id ("": not proved yet)
        self.port: int | None = None
        self.server: FastPathServer | None = None
        # called when a tunnel to a peer whose port was reached before is refused (membership
        # checks whether the peer's process is gone)
        self.on_refused: Callable[[PeerLink], None] | None = None
        # called with a peer's id when an open tunnel to or from it was cut (splice.was_cut:
        # reset, or no sealed EOF), as a dead process leaves it: membership checks the peer
        # at once, instead of at the next tunnel's refusal or its turn in the heartbeat
        self.on_cut: Callable[[str], None] | None = None
        # where spliced tunnels (``take``) relay: a child process, or this one (None)
        self.relay = RelayProcess() if enabled and process_wanted() else None

    async def start(self, tg: TaskGroup, port: int, lookup: Lookup) -> None:
        """Listen on ``port`` (or any free one); ``lookup`` finds a tunnel's local service."""
        if self.enabled:
            self.server = FastPathServer(self.keys, lookup, on_cut=self._cut)
            self.port = await tg.start(self._serve, port)

    async def _serve(self, port: int, *, task_status: TaskStatus[int]) -> None:
        assert self.server is not None
        try:
            await self.server.serve(port, task_status=task_status)
        finally:
            if self.relay is not None:
                self.relay.stop()

    def _cut(self, peer_id: str) -> None:
        if self.on_cut is not None:
            self.on_cut(peer_id)

    # ---------------------------------------------------------------- keys (handshake)
    @staticmethod
    def new_key() -> bytes:
        return secrets.token_bytes(KEY_BYTES)

    def offer(self, key: bytes) -> dict[str, Any] | None:
        """The handshake's ``fast`` field: where to connect and the key to present."""
        port = self.advertise_port or self.port
        return {"port": port, "key": key.hex()} if self.port else None

    def forget(self, peer_id: str) -> None:
        """The peer's connection is gone: the keys issued to it open nothing any more."""
        for key in [k for k, v in self.keys.items() if v == peer_id]:
            del self.keys[key]

    # ---------------------------------------------------------------- per link
    def adopt(self, link: PeerLink, offered: tuple[int, bytes] | None) -> None:
        if offered is not None and self.enabled:
            link.fast_port, link.fast_key = offered
            if self.relay is not None:  # a mesh formed: tunnels may come (RelayProcess.warm)
                self.relay.warm()

    def label(self, link: PeerLink) -> str:
        return FAST_LABEL if link.fast_ok and self.enabled else "QUIC"

    def usable(self, link: PeerLink) -> bool:
        if not self.enabled or link.fast_port is None or link.fast_key is None:
            return False
        if link.fast_ok is False and time.monotonic() >= link.fast_retry_at:
            link.fast_ok = None  # try again now and then: the path may have come back
        return link.fast_ok is not False

    def failed(self, link: PeerLink, why: str, exc: BaseException | None = None) -> None:
        first, link.fast_tried = not link.fast_tried, True
        if isinstance(exc.__cause__ if exc is not None else None, ConnectionRefusedError):
            if first:  # refused by a peer that has just authenticated
                link.refuses_alive = True
            elif not link.refuses_alive and self.on_refused is not None:
                # a port that answered or timed out before: is the process gone? (A retry
                # after a timeout is no first contact: 50 processes starting on 2 cores time
                # probes out, and taking its refusal for a firewall's hid a dead host.)
                self.on_refused(link)
        if link.fast_ok is not False:
            log.warning("link to %s: fast path unreachable (%s); tunnels use QUIC", link.id, why)
        link.fast_ok, link.fast_why = False, why
        link.fast_retry_at = time.monotonic() + FAST_RETRY_S

    async def check(self, link: PeerLink) -> None:
        """Probe a new link's fast path; its tunnels use it only if that works."""
        if link.fast_port is None or link.fast_key is None or not self.enabled:
            log.info("link to %s: QUIC only (no fast path offered)", link.id)
            return
        try:
            await probe(link.host, link.fast_port, link.fast_key)
        except FastPathError as exc:
            self.failed(link, str(exc), exc)
        else:
            link.fast_ok = link.fast_tried = True
            log.info("link to %s: fast path (sealed TCP) at %s", link.id,
                     host_port(link.host, link.fast_port))

    # ---------------------------------------------------------------- tunnels
    async def connect(self, link: PeerLink, service: str) -> ByteStream | None:
        """A tunnel as an anyio stream, or None when the link has no working fast path."""
        if not self.usable(link):
            return None
        assert link.fast_port is not None and link.fast_key is not None
        try:
            stream = await open_fast(link.host, link.fast_port, link.fast_key, service)
        except FastPathError as exc:
            self.failed(link, str(exc), exc)
            return None
        link.fast_tried = True
        return stream

    async def take(self, link: PeerLink, service: str, conn: socket.socket,
                   tally: Tally | None) -> bool:
        """Splice a local connection to a fast-path tunnel in Protocol callbacks; False (the
        connection untouched) when the link has no working fast path."""
        if not self.usable(link):
            return False
        assert link.fast_port is not None and link.fast_key is not None
        host, port, key = link.host, link.fast_port, link.fast_key

        async def open_raw(factory: Callable[[], asyncio.Protocol]) -> asyncio.Transport | None:
            try:
                transport = await open_fast_raw(host, port, key, service, factory)
            except FastPathError as exc:
                self.failed(link, str(exc), exc)
                return None
            link.fast_tried = True
            return transport

        cut = functools.partial(self._cut, link.id)
        if self.relay is not None:
            try:
                await self.relay.take(conn, host, port, key, service, tally,
                                      hot_window(service), cut)
                return True
            except RelayFailed as exc:
                failure = FastPathError(str(exc))
                failure.__cause__ = ConnectionRefusedError() if exc.refused else None
                self.failed(link, str(exc), failure)
                return False
            except OSError as exc:
                log.warning("fast path: %s; this tunnel relays in the node", exc)
        return await take_raw(conn, open_raw, tally, cut)
