"""Network-namespace helpers for fault tests: hosts joined by a veth pair whose link can be cut.

Needs root (``ip netns add``); :func:`netns_unavailable` says why not, for a clear skip. A node
runs inside a namespace with ``ip netns exec NS ...`` (which execs in place, so the pid and
process group are the node's own); its API listens on the namespace's own 127.0.0.1, which the
test reaches with ``curl`` run inside the namespace (:meth:`Namespace.http_get`).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``; failures raise with ip's own message."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
    return done


def netns_unavailable() -> str | None:
    """Why namespaces cannot be used here (not root, no ip, no curl), or None."""
    name = f"mlprobe{os.getpid()}"
    try:
        done = ip("netns", "add", name, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot run ip: {exc}"
    if done.returncode != 0:
        return f"'ip netns add' fails here (needs root): {done.stderr.strip()}"
    ip("netns", "del", name, check=False)
    if subprocess.run(["sh", "-c", "command -v curl"], capture_output=True).returncode != 0:
        return "curl is missing (the tests reach a namespace's 127.0.0.1 through it)"
    return None


@dataclass(frozen=True)
class Namespace:
    """One namespace: its name, its veth end and the address on it."""

    name: str
    veth: str
    address: str

    def exec_argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def http_get(self, url: str, timeout: float = 5) -> tuple[int, str]:
        """GET ``url`` from inside the namespace: (status code, body); (0, why) on failure."""
        argv = self.exec_argv(["curl", "-s", "-m", str(timeout), "-w", "\n%{http_code}", url])
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 5)
        except subprocess.TimeoutExpired:
            return 0, "curl timed out"
        body, _, code = done.stdout.rpartition("\n")
        return (int(code), body) if code.isdigit() else (0, done.stderr)

    def get_json(self, url: str) -> dict[str, Any] | None:
        code, body = self.http_get(url)
        if code != 200:
            return None
        with contextlib.suppress(ValueError):
            data: dict[str, Any] = json.loads(body)
            return data
        return None

    def link(self, up: bool) -> None:
        """Bring this namespace's veth end up or down (down cuts the pair's only path)."""
        ip("-n", self.name, "link", "set", self.veth, "up" if up else "down")


@contextlib.contextmanager
def veth_pair(subnet: str = "10.77.0") -> Iterator[tuple[Namespace, Namespace]]:
    """Two fresh namespaces joined by a veth pair (``SUBNET.1/24`` and ``SUBNET.2/24``), each
    with loopback up; both deleted afterwards, whatever happened (killing any process still
    inside is the caller's job: do it first)."""
    tag = uuid.uuid4().hex[:6]
    a = Namespace(f"mla{tag}", f"vea{tag}", f"{subnet}.1")
    b = Namespace(f"mlb{tag}", f"veb{tag}", f"{subnet}.2")
    try:
        for ns in (a, b):
            ip("netns", "add", ns.name)
            ip("-n", ns.name, "link", "set", "lo", "up")
        ip("link", "add", a.veth, "netns", a.name, "type", "veth", "peer", "name", b.veth,
           "netns", b.name)
        for ns in (a, b):
            ip("-n", ns.name, "addr", "add", f"{ns.address}/24", "dev", ns.veth)
            ns.link(up=True)
        yield a, b
    finally:
        for ns in (a, b):
            ip("netns", "del", ns.name, check=False)  # takes its veth end (and the pair) along
