"""Signed announcements: a node's record that any member can pass on and any member can check.

A member learns the records of the nodes it holds no connection to from the ones it does
(:mod:`.overlay`), so a record must prove who wrote it whoever delivers it. Its envelope:

``{"r": record JSON text, "b": boot id, "t": boot time (ms since the epoch), "c": certificate
(base64 DER), "s": signature (hex)}``

The signature is the node's certificate key (the one its QUIC handshake proves, pinned by
fingerprint) over ``CONTEXT + boot + NUL + boot time + NUL + record text``: the exact bytes,
so nothing is re-serialized before checking. A record replaces another of the same node when
its (boot time, ``seq``) is higher: a restarted node's ``seq`` starts again, its boot time
does not go back (both are its own machine's clock). A receiver refuses a record of an id
bound to another certificate by a handshake, and (:mod:`.overlay`) one signed by another
certificate than the record it holds; a record never binds an id itself, so a member cannot
claim a future node's id before that node's handshake. What a signature cannot stop: a
member minting a record for an id no node holds yet, or claiming resources it lacks (the
mesh secret is what admits a member). Checking costs one ECDSA verification (~0.1 ms), done
only for a record newer than the one held.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshcore.state import Peer
from meshcore_transport_quic.auth import MAX_CERT
from meshcore_transport_quic.frames import FrameError, loads_bounded
from meshcore_transport_quic.identity import Identity, fingerprint, verify_signature

CONTEXT = b"mesh-llm record v1\0"
MAX_RECORD = 64 * 1024  # record JSON text, bytes (an RTT table of 1,000 peers is ~21 KB)
MAX_TEXT = 64


class RecordError(ValueError):
    """A record envelope that is malformed, badly signed or bound to another certificate."""


@dataclass(frozen=True)
class Record:
    """A checked envelope: who, which boot and announcement, and the envelope to pass on."""

    peer: Peer
    boot: str
    started: int  # boot time, ms
    fp: bytes
    env: Mapping[str, Any]

    @property
    def id(self) -> str:
        return self.peer.id

    @property
    def seq(self) -> int:
        return self.peer.seq

    @property
    def version(self) -> tuple[int, int]:
        """What orders two records of one node: (boot time, seq)."""
        return (self.started, self.peer.seq)


def _signed(boot: str, started: int, text: str) -> bytes:
    return CONTEXT + boot.encode() + b"\0" + str(started).encode() + b"\0" + text.encode()


def seal_record(identity: Identity, boot: str, started: int, peer: Peer) -> Record:
    """This node's own record, signed."""
    text = _dumps(peer.to_dict())
    env = {"r": text, "b": boot, "t": started,
           "c": base64.b64encode(identity.cert_der).decode(),
           "s": identity.sign(_signed(boot, started, text)).hex()}
    return Record(peer, boot, started, identity.fingerprint, env)


def _dumps(data: Mapping[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"), sort_keys=True)


def peek(env: Any) -> tuple[str, str, tuple[int, int]]:
    """(id, boot, (boot time, seq)) of an envelope without checking its signature (to skip
    one already held before paying for the check); raises :class:`RecordError`."""
    data, boot, started = _parse(env)
    return data["id"], boot, (started, data.get("seq", 0))


def _parse(env: Any) -> tuple[dict[str, Any], str, int]:
    """The record (parsed, with a text id and an integer seq), boot id and boot time of an
    envelope, unchecked; raises :class:`RecordError`."""
    if not isinstance(env, dict):
        raise RecordError("a record envelope must be an object")
    text, boot, started = env.get("r"), env.get("b"), env.get("t")
    if isinstance(started, bool) or not isinstance(started, int) or started < 0:
        raise RecordError("'t' must be the boot time")
    if not isinstance(text, str) or len(text) > MAX_RECORD:
        raise RecordError(f"'r' must be the record's JSON text, at most {MAX_RECORD} bytes")
    if not isinstance(boot, str) or not 0 < len(boot) <= MAX_TEXT:
        raise RecordError("'b' must be the boot id")
    try:
        data = loads_bounded(text.encode())
    except FrameError as exc:
        raise RecordError(f"record: {exc}") from None
    if not isinstance(data, dict):
        raise RecordError("the record is not a JSON object")
    peer_id, seq = data.get("id"), data.get("seq", 0)
    if not isinstance(peer_id, str) or isinstance(seq, bool) or not isinstance(seq, int):
        raise RecordError("the record has no id or seq")
    return data, boot, started


def open_record(env: Any, bindings: Mapping[str, bytes]) -> Record:
    """Check an envelope: its signature, and that its id is not bound to another certificate
    in ``bindings`` (node id -> fingerprint); the record as a :class:`Record`."""
    data, boot, started = _parse(env)
    cert_text, sig = env.get("c"), env.get("s")
    if not isinstance(cert_text, str) or len(cert_text) > MAX_CERT:
        raise RecordError("'c' must be the base64 certificate")
    if not isinstance(sig, str) or len(sig) > 1024:
        raise RecordError("'s' must be the hex signature")
    try:
        cert = base64.b64decode(cert_text, validate=True)
        signature = bytes.fromhex(sig)
    except (binascii.Error, ValueError):
        raise RecordError("'c' is not base64 or 's' is not hex") from None
    text = env["r"]
    try:
        peer = Peer.from_dict(data)
    except (ValueError, TypeError) as exc:
        raise RecordError(f"record: {exc}") from None
    fp = fingerprint(cert)
    bound = bindings.get(peer.id)
    if bound is not None and bound != fp:
        raise RecordError(f"node id {peer.id} is bound to another certificate")
    if not verify_signature(cert, _signed(boot, started, text), signature):
        raise RecordError(f"the record of {peer.id} is not signed by its certificate")
    return Record(dataclasses.replace(peer, rtt_ms=None), boot, started, fp,
                  {"r": text, "b": boot, "t": started, "c": cert_text, "s": sig})
