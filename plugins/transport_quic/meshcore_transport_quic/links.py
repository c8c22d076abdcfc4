"""Per-peer bookkeeping of the QUIC transport: the live link, its addresses, RTT and fast path."""

from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from meshcore_transport_quic.quicstream import MeshProtocol

RTT_ALPHA = 0.2  # EWMA weight of a new RTT sample


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
    fast_ok: bool | None = None  # None = not probed yet
    fast_why: str = ""
    fast_retry_at: float = 0.0
    rtt_ms: float | None = None
    left: bool = False
    connected_at: float = field(default_factory=time.monotonic)

    @property
    def host(self) -> str:
        """The peer's IP as this connection reaches it (fast-path connections go there)."""
        return self.proto.peer_addr[0] if self.proto.peer_addr else self.addrs[0][0]

    def sample_rtt(self, ms: float) -> float:
        self.rtt_ms = ms if self.rtt_ms is None else (1 - RTT_ALPHA) * self.rtt_ms + RTT_ALPHA * ms
        return self.rtt_ms

    def hint(self) -> dict[str, Any]:
        return {"id": self.id, "fp": self.fp.hex(), "addrs": [list(a) for a in self.addrs]}


def rtt_table_changed(old: dict[str, float], new: dict[str, float], *, ratio: float = 0.25,
                      floor_ms: float = 2.0) -> bool:
    """Whether a new RTT table is worth announcing: peers differ, or one moved by more than
    ``ratio`` of its old value and more than ``floor_ms`` (every announcement may re-plan)."""
    if old.keys() != new.keys():
        return True
    return any(abs(new[k] - old[k]) > max(floor_ms, ratio * old[k]) for k in new)


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
