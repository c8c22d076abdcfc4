"""Control frames: length-prefixed, versioned, size-capped JSON records.

Wire layout of one frame: ``u8 version | u8 kind | u32 length | length bytes of JSON object``.
Each QUIC stream starts with one stream-type byte (:class:`StreamType`); a gossip stream then
carries exactly one frame and ends, so a bad frame costs one stream, never the connection.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

FRAME_VERSION = 1
MAX_FRAME = 256 * 1024  # payload bytes; an announcement is ~1 KB
HEADER = struct.Struct("!BBI")


class StreamType(IntEnum):
    AUTH = 1  # bidirectional: HELLO then WELCOME
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


def decode_frame(data: bytes) -> Frame:
    """Decode exactly one frame; raises :class:`FrameError` (only) on any bad input."""
    kind, length = parse_header(data)
    payload = data[HEADER.size:]
    if len(payload) < length:
        raise FrameError(f"truncated frame: header says {length} bytes, got {len(payload)}")
    if len(payload) > length:
        raise FrameError(f"{len(payload) - length} bytes after the end of the frame")
    try:
        body = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FrameError(f"{kind.name} frame payload is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise FrameError(f"{kind.name} frame payload is not a JSON object")
    return Frame(kind, body)
