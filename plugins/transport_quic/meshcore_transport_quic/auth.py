"""The mesh handshake run on the first QUIC stream, after TLS pinned the server's certificate.

The server speaks first: CHALLENGE, a fresh random nonce of this connection. The client
answers HELLO: its id, a per-process boot id, its certificate, its own nonce, the challenge, a
signature over the context by its own key (so the server can bind the node id to a
certificate) and an HMAC of the context with the mesh secret. The server checks both, then
answers WELCOME with its own HMAC. The context hashes both fingerprints and both nonces, so a
proof made for one server is useless against any other, and a HELLO captured on one
connection is useless on the next (its challenge is stale). Nothing else is accepted on a
connection before this succeeds.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import secrets
from dataclasses import dataclass
from typing import Any

from meshcore_transport_quic.identity import Identity, fingerprint, verify_signature

LABEL = b"mesh-llm/2 auth\x00"  # /2: the server's challenge is in the context


class AuthError(Exception):
    """The peer failed the handshake; ``str()`` is the reason sent in the close."""


def _context(client_fp: bytes, server_fp: bytes, nonce: bytes, challenge: bytes,
             client_id: str, client_boot: str) -> bytes:
    ids = json.dumps([client_id, client_boot]).encode()
    return hashlib.sha256(LABEL + client_fp + server_fp + nonce + challenge + ids).digest()


def _mac(secret: bytes, role: bytes, context: bytes, extra: str = "") -> bytes:
    return hmac.new(secret, role + context + extra.encode(), hashlib.sha256).digest()


@dataclass(frozen=True)
class PeerInfo:
    """What a node says of itself in its HELLO or WELCOME, checked: where its QUIC port
    answers, its fast-path offer, and its first announcement (checked later, as gossip)."""

    port: int = 0
    addrs: tuple[str, ...] = ()
    fast: tuple[int, bytes] | None = None  # (TCP port, the key to present there)
    peer: Any = None
    env: Any = None  # the same announcement, signed (records.py): passed on to others


@dataclass(frozen=True)
class Hello:
    """A checked HELLO: who the client is and what else it said."""

    node_id: str
    boot: str
    fingerprint: bytes
    context: bytes
    info: PeerInfo


def new_challenge() -> tuple[dict[str, Any], bytes]:
    """The server's CHALLENGE body and its nonce (fresh per connection)."""
    nonce = secrets.token_bytes(NONCE)
    return {"nonce": nonce.hex()}, nonce


def check_challenge(body: dict[str, Any]) -> bytes:
    """The nonce of a server's CHALLENGE; :class:`AuthError` when malformed."""
    return _hex(body, "nonce", "CHALLENGE", NONCE)


def make_hello(identity: Identity, secret: bytes, server_fp: bytes, challenge: bytes,
               node_id: str, boot: str, info: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """The HELLO body answering ``challenge`` and the context the WELCOME must answer."""
    nonce = secrets.token_bytes(NONCE)
    ctx = _context(identity.fingerprint, server_fp, nonce, challenge, node_id, boot)
    body = {"id": node_id, "boot": boot, "nonce": nonce.hex(), "challenge": challenge.hex(),
            "cert": base64.b64encode(identity.cert_der).decode(),
            "sig": identity.sign(ctx).hex(), "mac": _mac(secret, b"client", ctx).hex(),
            "info": info}
    return body, ctx


MAX_ID = 128  # node ids and boot ids: printable ASCII, bounded
NONCE = 16
MAX_CERT = 8192


def _text(body: dict[str, Any], key: str, what: str, limit: int = MAX_ID) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value or len(value) > limit or not (
            value.isascii() and value.isprintable()):
        raise AuthError(f"malformed {what}: '{key}' must be 1-{limit} printable ASCII "
                        "characters (the peer runs another mesh-llm version, or is hostile)")
    return value


def _hex(body: dict[str, Any], key: str, what: str, size: int) -> bytes:
    text = _text(body, key, what, 2 * size)
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise AuthError(f"malformed {what}: '{key}' must be {size} bytes of hex")
    return raw


def _port(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536


def _info(body: dict[str, Any], what: str) -> PeerInfo:
    info = body.get("info", {})
    if not isinstance(info, dict):
        raise AuthError(f"malformed {what}: 'info' must be an object")
    port, addrs, fast = info.get("port"), info.get("addrs") or [], info.get("fast")
    if port is not None and not _port(port):
        raise AuthError(f"malformed {what}: 'port' must be a port number, got {port!r:.40}")
    try:
        if not isinstance(addrs, list) or len(addrs) > 32:
            raise ValueError("'addrs' must be a list of at most 32 addresses")
        checked = tuple(str(ipaddress.ip_address(str(a)[:64])) for a in addrs)
        offer = None
        if fast is not None:
            if not isinstance(fast, dict) or not _port(fast.get("port")):
                raise ValueError("'fast' must hold a TCP port and a key")
            offer = (int(fast["port"]), _hex(fast, "key", what, 32))
    except ValueError as exc:
        raise AuthError(f"malformed {what}: {exc}") from None
    return PeerInfo(port or 0, checked if port else (), offer, info.get("peer"), info.get("env"))


def check_hello(body: dict[str, Any], secret: bytes, server_fp: bytes,
                challenge: bytes) -> Hello:
    """Verify a HELLO as the server, on the connection it sent ``challenge`` on; raises
    :class:`AuthError` with the reason to send (and nothing else, whatever the body holds: it
    comes from a peer not yet authenticated)."""
    node_id, boot = _text(body, "id", "HELLO"), _text(body, "boot", "HELLO")
    if "challenge" not in body:
        raise AuthError("the HELLO answers no challenge: the joining node runs an older "
                        "mesh-llm; upgrade it to this node's version")
    if not hmac.compare_digest(_hex(body, "challenge", "HELLO", NONCE), challenge):
        raise AuthError("the HELLO answers another connection's challenge (a replayed HELLO)")
    nonce = _hex(body, "nonce", "HELLO", NONCE)
    mac = _hex(body, "mac", "HELLO", 32)
    sig = _text(body, "sig", "HELLO", 1024)
    try:
        cert = base64.b64decode(_text(body, "cert", "HELLO", MAX_CERT), validate=True)
        signature = bytes.fromhex(sig)
    except ValueError:
        raise AuthError("malformed HELLO: 'cert' is not base64 or 'sig' is not hex") from None
    info = _info(body, "HELLO")
    fp = fingerprint(cert)
    ctx = _context(fp, server_fp, nonce, challenge, node_id, boot)
    if not hmac.compare_digest(mac, _mac(secret, b"client", ctx)):
        raise AuthError("mesh secret proof failed: the joining node's token carries another "
                        "mesh's secret; get a fresh token from a node of this mesh")
    if not verify_signature(cert, ctx, signature):
        raise AuthError("certificate proof failed: the HELLO was not signed by the "
                        "certificate's key")
    return Hello(node_id, boot, fp, ctx, info)


def make_welcome(secret: bytes, hello: Hello, node_id: str, boot: str,
                 info: dict[str, Any]) -> dict[str, Any]:
    return {"id": node_id, "boot": boot, "info": info,
            "mac": _mac(secret, b"server", hello.context, f"{node_id}\x00{boot}").hex()}


def check_welcome(body: dict[str, Any], secret: bytes,
                  context: bytes) -> tuple[str, str, PeerInfo]:
    """Verify a WELCOME as the client; returns (server id, boot, info)."""
    node_id, boot = _text(body, "id", "WELCOME"), _text(body, "boot", "WELCOME")
    mac = _hex(body, "mac", "WELCOME", 32)
    info = _info(body, "WELCOME")
    if not hmac.compare_digest(mac, _mac(secret, b"server", context, f"{node_id}\x00{boot}")):
        raise AuthError("the node does not know this mesh's secret (its WELCOME proof failed)")
    return node_id, boot, info
