"""Per-peer bookkeeping of the QUIC transport: the live link, its addresses, RTT and fast path."""

from __future__ import annotations

import ipaddress
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from meshcore_transport_quic.quicstream import MeshProtocol

RTT_ALPHA = 0.2  # EWMA weight of a new RTT sample above the current estimate


@dataclass
class PeerLink:
    """One authenticated peer connection (the only one kept per peer)."""

    id: str
    fp: bytes
    boot: str
    proto: MeshProtocol
    dialed: bool  # this node opened the connection
    addrs: list[tuple[str, int]]  # where the peer's QUIC port answers, best first
    fast_port: int | None = None
    fast_key: bytes | None = None  # what we present to the peer's fast-path listener
    fast_ok: bool | None = None  # None = not probed yet (or again, after FAST_RETRY_S)
    fast_tried: bool = False  # a probe or tunnel got an answer or an error from its port
    fast_why: str = ""
    fast_retry_at: float = 0.0
    # its fast-path port refused a connection while the peer was alive (a firewall that
    # rejects TCP): a refusal there says nothing about the process
    refuses_alive: bool = False
    rtt_ms: float | None = None
    rtt_samples: int = 0
    pings: deque[float] = field(default_factory=lambda: deque(maxlen=4))  # unanswered, sent at
    probe_at: float | None = None  # when the oldest still unanswered PING went out
    left: bool = False
    gone: bool = False  # its process is gone (its port refused): removed without reconnecting
    checking: bool = False  # a check whether its process is gone is under way
    connected_at: float = field(default_factory=time.monotonic)

    @property
    def host(self) -> str:
        """The peer's IP as this connection reaches it (fast-path connections go there)."""
        return self.proto.peer_addr[0] if self.proto.peer_addr else self.addrs[0][0]

    def sample_rtt(self, ms: float) -> float:
        """Fold a PONG's round trip in: a lower sample is taken at once (delays only add to a
        path's RTT, so a fast answer proves the path is that fast; a first sample inflated by
        a busy start is forgotten with the next good one), a higher one through the EWMA (one
        slow answer from a busy peer moves it by RTT_ALPHA only)."""
        old = self.rtt_ms
        self.rtt_samples += 1
        self.rtt_ms = ms if old is None or ms < old else (1 - RTT_ALPHA) * old + RTT_ALPHA * ms
        return self.rtt_ms

    def hint(self) -> dict[str, Any]:
        return {"id": self.id, "fp": self.fp.hex(), "addrs": [list(a) for a in self.addrs]}


RTT_BAND_MS = 10.0  # announced RTTs change only across bands (the election's band too)
RTT_HYSTERESIS_MS = 5.0  # ...and only once this far past the band's edge (half a band)


def rtt_moved(old: float, new: float) -> bool:
    """Whether an RTT moved to another band: beyond the published value's band by more than
    the hysteresis, so a value wobbling around an edge is not re-announced each round."""
    low = (old // RTT_BAND_MS) * RTT_BAND_MS
    return new < low - RTT_HYSTERESIS_MS or new >= low + RTT_BAND_MS + RTT_HYSTERESIS_MS


def rtt_table_changed(old: dict[str, float], new: dict[str, float]) -> bool:
    """Whether a new RTT table is a material change worth announcing (each announcement may
    re-plan on every node): a peer measured for the first time, or one whose RTT moved to
    another band. A peer that is gone is not: its entry leaves with the next change, and an
    idle mesh announces nothing."""
    return any(k not in old or rtt_moved(old[k], v) for k, v in new.items())


RTT_HOLD_ROUNDS = 3  # a band change is announced once it held this many heartbeat rounds
RTT_QUIET_S = 120.0  # ...and by a node that is not the host at most this often


def rtt_update_due(old: dict[str, float], new: dict[str, float], held: int, host: bool,
                   since: float) -> bool:
    """Whether to announce ``new`` now, ``old`` being the table last announced, ``since``
    seconds ago, the material change (:func:`rtt_table_changed`) having held ``held``
    rounds. Only the host's table is read by the election, so the host announces a newly
    measured peer at once (the election waits for it) and a band change once it held
    RTT_HOLD_ROUNDS (one slow answer from a busy peer is not news); any other node sends its
    changes, new peers included, at most every RTT_QUIET_S and once they held as long. A
    join used to make every node announce its table to every peer (N^2 frames of N entries
    each): 50 processes on 2 cores took 22 s to form a mesh, and re-announcing each RTT
    wobble kept the cores busy enough to make the RTTs wobble more."""
    if not rtt_table_changed(old, new):
        return False
    if host:
        return held >= RTT_HOLD_ROUNDS or any(k not in old for k in new)
    return held >= RTT_HOLD_ROUNDS and since >= RTT_QUIET_S


def parse_hint(data: Any) -> tuple[str, bytes, list[tuple[str, int]]] | None:
    """A gossiped peer hint (id, fingerprint, addresses), or None when malformed."""
    try:
        peer_id, fp = str(data["id"]), bytes.fromhex(str(data["fp"]))
        addrs = [(str(ipaddress.ip_address(str(h))), int(p)) for h, p in data["addrs"]][:32]
    except (KeyError, TypeError, ValueError):
        return None
    if not peer_id or len(fp) != 32 or not addrs or not all(0 < p < 65536 for _, p in addrs):
        return None
    return peer_id, fp, addrs


def merge_addrs(*groups: list[tuple[str, int]]) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for group in groups:
        for addr in group:
            if addr not in out:
                out.append(addr)
    return out


def local_addresses(ipv6: bool) -> list[str]:
    """This machine's interface addresses: routable ones first, loopback last."""
    import psutil

    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET or (ipv6 and a.family == socket.AF_INET6):
                try:
                    ip = ipaddress.ip_address(a.address.split("%")[0])
                except ValueError:
                    continue
                if ip.is_link_local or ip.is_unspecified or ip in found:
                    continue
                found.append(ip)
    found.sort(key=lambda ip: (ip.is_loopback, ip.version))
    return [str(ip) for ip in found] or ["127.0.0.1"]


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(text: str) -> tuple[str, int] | None:
    """``host:port`` or ``[v6]:port`` (:func:`host_port`'s text, as records carry their
    addresses) as a (host, port) pair; None when malformed."""
    host, sep, port = text.rpartition(":")
    if not sep:
        return None
    try:
        addr = str(ipaddress.ip_address(host.strip("[]")))
        number = int(port)
    except ValueError:
        return None
    return (addr, number) if 0 < number < 65536 else None
