"""Control frames: length-prefixed, versioned, size-capped JSON records.

Wire layout of one frame: ``u8 version | u8 kind | u32 length | length bytes of JSON object``.
Each QUIC stream starts with one stream-type byte (:class:`StreamType`); a gossip stream then
carries exactly one frame and ends, so a bad frame costs one stream, never the connection.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

FRAME_VERSION = 1
MAX_FRAME = 256 * 1024  # payload bytes; an announcement is ~1 KB
MAX_INT = 2**63 - 1  # any JSON integer beyond this is hostile (vram, seq, ports all fit)
HEADER = struct.Struct("!BBI")


class StreamType(IntEnum):
    AUTH = 1  # bidirectional: CHALLENGE (server), HELLO (client), WELCOME (server)
    GOSSIP = 2  # unidirectional: one frame
    TUNNEL = 3  # bidirectional: u8 name length, service name, then raw bytes


class Kind(IntEnum):
    HELLO = 1
    WELCOME = 2
    ANNOUNCE = 3
    PEERS = 4
    PING = 5
    PONG = 6
    LEAVE = 7
    CHALLENGE = 8
    GONE = 9  # {"id", "boot", "seq", "left"}: that member is gone (overlay.py)
    RECORD = 10  # {"env": signed record}: a member's announcement, passed on (records.py)
    RECORDS = 11  # {"envs": [signed record, ...]}: what a node knows, to one that joined
    SUMMARY = 12  # {"have": {id: [boot time, seq]}, "reply": bool}: which records a node holds
    DIGEST = 13  # {"d": hash of a SUMMARY}: compared now and then, SUMMARY on a difference
    PROBE = 14  # {"id": member}: have you heard from it lately? (before reporting it gone)
    PROBED = 15  # {"id": member, "alive": bool}: the answer


class FrameError(ValueError):
    """A frame that is malformed, oversized, truncated or of an unknown version or kind."""


@dataclass(frozen=True)
class Frame:
    kind: Kind
    body: dict[str, Any]


def encode_frame(kind: Kind, body: dict[str, Any]) -> bytes:
    payload = json.dumps(body, separators=(",", ":")).encode()
    if len(payload) > MAX_FRAME:
        raise FrameError(f"{kind.name} frame of {len(payload)} bytes exceeds the "
                         f"{MAX_FRAME}-byte cap")
    return HEADER.pack(FRAME_VERSION, kind, len(payload)) + payload


def parse_header(header: bytes) -> tuple[Kind, int]:
    """Check a frame header; returns (kind, payload length)."""
    if len(header) < HEADER.size:
        raise FrameError(f"truncated frame header ({len(header)} of {HEADER.size} bytes)")
    version, kind, length = HEADER.unpack_from(header)
    if version != FRAME_VERSION:
        raise FrameError(f"frame version {version} is not supported (expected "
                         f"{FRAME_VERSION}): the peer runs another mesh-llm version")
    try:
        parsed = Kind(kind)
    except ValueError:
        raise FrameError(f"unknown frame kind {kind}") from None
    if length > MAX_FRAME:
        raise FrameError(f"frame of {length} bytes exceeds the {MAX_FRAME}-byte cap")
    return parsed, length


def _bounded_int(text: str) -> int:
    # The length goes first: int() of 5,000 digits raises a bare ValueError.
    value = int(text) if len(text) <= 20 else MAX_INT + 1
    if abs(value) > MAX_INT:
        raise FrameError(f"integer {text[:24]} is out of range")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise FrameError(f"number {text[:24]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise FrameError(f"{name} is not a JSON value")


def loads_bounded(payload: bytes) -> Any:
    """``json.loads`` that admits only finite numbers and integers within +-2**63 (so no
    handler meets an overflow); raises :class:`FrameError` (only) on anything else."""
    try:
        return json.loads(payload.decode("utf-8"), parse_int=_bounded_int,
                          parse_float=_finite_float, parse_constant=_no_constant)
    except FrameError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError too
        raise FrameError(f"payload is not JSON: {exc}") from None


def decode_frame(data: bytes) -> Frame:
    """Decode exactly one frame; raises :class:`FrameError` (only) on any bad input."""
    kind, length = parse_header(data)
    payload = data[HEADER.size:]
    if len(payload) < length:
        raise FrameError(f"truncated frame: header says {length} bytes, got {len(payload)}")
    if len(payload) > length:
        raise FrameError(f"{len(payload) - length} bytes after the end of the frame")
    try:
        body = loads_bounded(payload)
    except FrameError as exc:
        raise FrameError(f"{kind.name} frame: {exc}") from None
    if not isinstance(body, dict):
        raise FrameError(f"{kind.name} frame payload is not a JSON object")
    return Frame(kind, body)
