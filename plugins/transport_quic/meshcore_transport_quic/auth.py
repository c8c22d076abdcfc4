"""The mesh handshake run on the first QUIC stream, after TLS pinned the server's certificate.

The client sends HELLO: its id, a per-process boot id, its certificate, a nonce, a signature
over the context by its own key (so the server can bind the node id to a certificate) and an
HMAC of the context with the mesh secret. The server checks both, then answers WELCOME with its
own HMAC. The context hashes both fingerprints, so a proof made for one server is useless
against any other. Nothing else is accepted on a connection before this succeeds.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from typing import Any

from meshcore_transport_quic.identity import Identity, fingerprint, verify_signature

LABEL = b"mesh-llm/1 auth\x00"


class AuthError(Exception):
    """The peer failed the handshake; ``str()`` is the reason sent in the close."""


def _context(client_fp: bytes, server_fp: bytes, nonce: bytes, client_id: str,
             client_boot: str) -> bytes:
    ids = json.dumps([client_id, client_boot]).encode()
    return hashlib.sha256(LABEL + client_fp + server_fp + nonce + ids).digest()


def _mac(secret: bytes, role: bytes, context: bytes, extra: str = "") -> str:
    return hmac.new(secret, role + context + extra.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Hello:
    """A checked HELLO: who the client is and what else it said."""

    node_id: str
    boot: str
    fingerprint: bytes
    context: bytes
    info: dict[str, Any]


def make_hello(identity: Identity, secret: bytes, server_fp: bytes, node_id: str, boot: str,
               info: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """The HELLO body and the context the WELCOME must answer."""
    nonce = secrets.token_bytes(16)
    ctx = _context(identity.fingerprint, server_fp, nonce, node_id, boot)
    body = {"id": node_id, "boot": boot, "nonce": nonce.hex(),
            "cert": base64.b64encode(identity.cert_der).decode(),
            "sig": identity.sign(ctx).hex(), "mac": _mac(secret, b"client", ctx), "info": info}
    return body, ctx


def check_hello(body: dict[str, Any], secret: bytes, server_fp: bytes) -> Hello:
    """Verify a HELLO as the server; raises :class:`AuthError` with the reason to send."""
    try:
        node_id, boot = str(body["id"]), str(body["boot"])
        nonce = bytes.fromhex(str(body["nonce"]))
        cert = base64.b64decode(str(body["cert"]), validate=True)
        sig, mac = bytes.fromhex(str(body["sig"])), str(body["mac"])
        info = body.get("info") or {}
    except (KeyError, ValueError, TypeError) as exc:
        raise AuthError(f"malformed HELLO ({exc!r}): the peer runs another mesh-llm "
                        "version") from None
    if not node_id or not isinstance(info, dict):
        raise AuthError("malformed HELLO: empty node id or bad info")
    fp = fingerprint(cert)
    ctx = _context(fp, server_fp, nonce, node_id, boot)
    if not hmac.compare_digest(mac, _mac(secret, b"client", ctx)):
        raise AuthError("mesh secret proof failed: the joining node's token carries another "
                        "mesh's secret; get a fresh token from a node of this mesh")
    if not verify_signature(cert, ctx, sig):
        raise AuthError("certificate proof failed: the HELLO was not signed by the "
                        "certificate's key")
    return Hello(node_id, boot, fp, ctx, info)


def make_welcome(secret: bytes, hello: Hello, node_id: str, boot: str,
                 info: dict[str, Any]) -> dict[str, Any]:
    return {"id": node_id, "boot": boot, "info": info,
            "mac": _mac(secret, b"server", hello.context, f"{node_id}\x00{boot}")}


def check_welcome(body: dict[str, Any], secret: bytes, context: bytes) -> tuple[str, str,
                                                                                 dict[str, Any]]:
    """Verify a WELCOME as the client; returns (server id, boot, info)."""
    try:
        node_id, boot, mac = str(body["id"]), str(body["boot"]), str(body["mac"])
        info = body.get("info") or {}
    except (KeyError, TypeError) as exc:
        raise AuthError(f"malformed WELCOME ({exc!r})") from None
    if not isinstance(info, dict) or not node_id:
        raise AuthError("malformed WELCOME: empty node id or bad info")
    if not hmac.compare_digest(mac, _mac(secret, b"server", context, f"{node_id}\x00{boot}")):
        raise AuthError("the node does not know this mesh's secret (its WELCOME proof failed)")
    return node_id, boot, info
