"""Join tokens: base64url of a small versioned binary record.

Layout (version 1)::

    u8 version | 32 B certificate fingerprint | 32 B mesh secret | u16 port
    | u8 address count | count x (u8 family 4|6, 4|16 address bytes)

Every address shares the port (``--bind-port``). Tokens are secrets: whoever holds one can join.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import struct
from dataclasses import dataclass

TOKEN_VERSION = 1
FP_BYTES = 32
SECRET_BYTES = 32
MAX_ADDRESSES = 32
_FIXED = struct.Struct("!B32s32sHB")
_B64URL = re.compile(r"^[A-Za-z0-9_-]*$")


class TokenError(ValueError):
    """A join token that cannot be used; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class JoinToken:
    fingerprint: bytes
    secret: bytes
    port: int
    addresses: tuple[str, ...]  # IP literals, tried in this order

    def encode(self) -> str:
        if not self.addresses:
            raise TokenError("a join token needs at least one address")
        parts = [_FIXED.pack(TOKEN_VERSION, self.fingerprint, self.secret, self.port,
                             len(self.addresses[:MAX_ADDRESSES]))]
        for addr in self.addresses[:MAX_ADDRESSES]:
            ip = ipaddress.ip_address(addr)
            parts.append(bytes([ip.version]) + ip.packed)
        return base64.urlsafe_b64encode(b"".join(parts)).rstrip(b"=").decode("ascii")

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return [(a, self.port) for a in self.addresses]


def _fail(problem: str) -> TokenError:
    return TokenError(f"bad join token: {problem}; copy the whole token printed by a "
                      "running node ('join with: mesh-llm --join TOKEN')")


def decode_token(text: str) -> JoinToken:
    """Parse a token; raises :class:`TokenError` naming the problem (never anything else)."""
    text = text.strip()
    if not text:
        raise _fail("it is empty")
    if not _B64URL.match(text):
        raise _fail("it contains characters outside base64url (A-Z a-z 0-9 - _)")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise _fail(f"it is not valid base64url ({exc})") from None
    if raw[:1] != bytes([TOKEN_VERSION]) and not (raw and raw[0] < 16
                                                  and len(raw) >= _FIXED.size):
        raise TokenError(f"{text[:20]!r}{'...' if len(text) > 20 else ''} is not a mesh-llm "
                         "join token; copy the whole token printed by a running node "
                         "('join with: mesh-llm --join TOKEN')")
    if raw[0] != TOKEN_VERSION:
        raise TokenError(f"join token version {raw[0]} is not supported (this mesh-llm reads "
                         f"version {TOKEN_VERSION}): use the same mesh-llm version on every node")
    if len(raw) < _FIXED.size:
        raise _fail(f"it is truncated ({len(raw)} bytes, at least {_FIXED.size} needed)")
    _, fp, secret, port, count = _FIXED.unpack_from(raw)
    if port == 0:
        raise _fail("its port is 0")
    if count == 0:
        raise _fail("it lists no address")
    addresses: list[str] = []
    offset = _FIXED.size
    for i in range(count):
        if offset >= len(raw):
            raise _fail(f"it is truncated (address {i + 1} of {count} missing)")
        family = raw[offset]
        size = {4: 4, 6: 16}.get(family)
        if size is None:
            raise _fail(f"address {i + 1} has unknown family {family}")
        packed = raw[offset + 1:offset + 1 + size]
        if len(packed) != size:
            raise _fail(f"it is truncated (address {i + 1} of {count} cut short)")
        addresses.append(str(ipaddress.ip_address(packed)))
        offset += 1 + size
    if offset != len(raw):
        raise _fail(f"it has {len(raw) - offset} unexpected trailing bytes")
    return JoinToken(fp, secret, port, tuple(addresses))
