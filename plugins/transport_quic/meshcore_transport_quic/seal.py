"""The fast path's record layer: AES-128-GCM records over plain TCP, keyed through QUIC.

Why not TLS over TCP: Python's ``ssl`` moves ~1 GB/s through a MemoryBIO in 16 KiB records
and costs ~13 us per small record, on both tunnel ends. The peers already share an
authenticated, encrypted channel (the pinned QUIC connection with the mesh-secret proof); a
fresh 32-byte key handed over it lets both ends seal records with ``cryptography``'s AES-GCM
directly (one call per record of up to 256 KiB, ~2 us for a small one).

A connection:

1. client -> server, clear: ``MAGIC | key id (16) | client random (16)``. The key id names the
   key the server issued to this peer over QUIC (a hash of it; the key never crosses TCP).
2. server -> client, clear: ``server random (16)``.
3. Both derive one key per direction with HKDF-SHA256 over the issued key, salted with both
   randoms, so every connection has fresh keys and a replayed connection decrypts nothing.
4. Then only records: ``kind (1) | length (3, big-endian) | AES-GCM(plaintext) | tag (16)``;
   the 4 header bytes are the associated data, the nonce is the record's sequence number, so
   records cannot be altered, dropped, reordered or replayed without the next open failing.
   The client's first record is ``OPEN`` (the service name); ``EOF`` is a sealed half-close,
   so a TCP close without it is a truncation, not an end.
"""

from __future__ import annotations

import hashlib
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC = b"MLF2"
RANDOM_BYTES = 16
KEY_ID_BYTES = 16
HELLO_BYTES = len(MAGIC) + KEY_ID_BYTES + RANDOM_BYTES
HEADER = 4
TAG = 16
MAX_RECORD = 256 * 1024  # plaintext bytes per record
BUFFER = 4 * (HEADER + MAX_RECORD + TAG)  # a receiving side's buffer once bulk flows
INITIAL_BUFFER = 64 * 1024
MIN_READ = 16 * 1024

DATA, EOF, OPEN = 0, 1, 2
KINDS = (DATA, EOF, OPEN)

_HEADER = struct.Struct(">I")  # kind << 24 | plaintext length
_NONCE = struct.Struct(">4xQ")  # the record's sequence number
_INTO = 16 * 1024


class SealError(ValueError):
    """A record that does not open: wrong key, altered, reordered, oversized or unknown."""


def key_id(key: bytes) -> bytes:
    """What the client sends to say which issued key it holds (the key itself stays secret)."""
    return hashlib.sha256(b"mesh-llm fast path key id\0" + key).digest()[:KEY_ID_BYTES]


def new_random() -> bytes:
    return os.urandom(RANDOM_BYTES)


def hello(key: bytes, client_random: bytes) -> bytes:
    return MAGIC + key_id(key) + client_random


def parse_hello(data: bytes) -> tuple[bytes, bytes]:
    """``(key id, client random)`` from the client's first bytes; SealError if not ours."""
    if len(data) != HELLO_BYTES or not data.startswith(MAGIC):
        raise SealError("not a mesh-llm fast-path hello")
    return data[len(MAGIC):len(MAGIC) + KEY_ID_BYTES], data[len(MAGIC) + KEY_ID_BYTES:]


def derive(key: bytes, client_random: bytes, server_random: bytes) -> tuple[bytes, bytes]:
    """The (client -> server, server -> client) record keys of one connection."""
    okm = HKDF(hashes.SHA256(), 32, client_random + server_random,
               b"mesh-llm fast path v2 aes-128-gcm").derive(key)
    return okm[:16], okm[16:]


def start(opener: Opener, key: bytes, client_random: bytes, server_random: bytes, *,
          client: bool) -> Sealer:
    """Key one end of a connection: ``opener`` gets the incoming direction's key, the
    returned Sealer seals the outgoing one (client -> server is the client's outgoing)."""
    c2s, s2c = derive(key, client_random, server_random)
    opener.set_key(s2c if client else c2s)
    return Sealer(c2s if client else s2c)


class Sealer:
    """Seals the records of one direction."""

    __slots__ = ("_aead", "_seq")

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._seq = 0

    def seal(self, kind: int, data: bytes | bytearray | memoryview = b"") -> bytes | bytearray:
        """One record; ``data`` is at most MAX_RECORD bytes."""
        size = len(data)
        header = _HEADER.pack(kind << 24 | size)
        nonce = _NONCE.pack(self._seq)
        self._seq += 1
        if size < _INTO:  # one small allocation beats encrypt_into's extra calls
            return header + self._aead.encrypt(nonce, data, header)
        out = bytearray(HEADER + size + TAG)  # big: no second copy of the payload
        out[:HEADER] = header
        self._aead.encrypt_into(nonce, data, header, memoryview(out)[HEADER:])
        return out

    def seal_data(self, data: bytes | bytearray | memoryview) -> list[bytes | bytearray]:
        """``data`` as DATA records (as many as its size needs)."""
        if len(data) <= MAX_RECORD:
            return [self.seal(DATA, data)]
        view = memoryview(data)
        return [self.seal(DATA, view[i:i + MAX_RECORD]) for i in range(0, len(view), MAX_RECORD)]


class Opener:
    """Receives bytes into its own buffer (an asyncio BufferedProtocol's ``get_buffer``) and
    opens the complete records in it; before the keys exist it hands out clear bytes."""

    __slots__ = ("_aead", "_buf", "_end", "_seq", "_start", "_view")

    def __init__(self) -> None:
        self._aead: AESGCM | None = None
        self._seq = 0
        self._buf = bytearray(INITIAL_BUFFER)
        self._view = memoryview(self._buf)
        self._start = self._end = 0

    def set_key(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def get_buffer(self) -> memoryview:
        """Free space for the next read: at least the rest of the record being received (or
        MIN_READ bytes). Starts small, so an idle or chatty connection holds 64 KiB; the
        first big record grows it to BUFFER."""
        start, end, buf = self._start, self._end, self._buf
        if start == end:
            self._start = self._end = start = end = 0
        held = end - start
        need = MIN_READ
        if held >= HEADER:
            (word,) = _HEADER.unpack_from(buf, start)
            record = HEADER + min(word & 0xFFFFFF, MAX_RECORD) + TAG  # records() rejects more
            need = max(need, record - held)
        if len(buf) - end < need:
            if held + need > len(buf):  # a bigger record than ever: grow, keeping its start
                self._buf = bytearray(max(BUFFER, held + need))
                self._view = memoryview(self._buf)
            self._buf[:held] = buf[start:end]  # move the partial record to the front
            self._start, self._end = 0, held
        return self._view[self._end:]

    def buffer_updated(self, size: int) -> None:
        self._end += size

    def feed(self, data: bytes) -> None:
        """For callers that receive bytes instead of filling the buffer."""
        view = memoryview(data)
        while view:
            free = self.get_buffer()
            size = min(len(free), len(view))
            free[:size] = view[:size]
            self.buffer_updated(size)
            view = view[size:]

    @property
    def capacity(self) -> int:
        return len(self._buf)

    @property
    def buffered(self) -> int:
        return self._end - self._start

    def take_clear(self, size: int) -> bytes | None:
        """``size`` clear bytes from the front (handshake), or None until they arrived."""
        if self._end - self._start < size:
            return None
        data = bytes(self._buf[self._start:self._start + size])
        self._start += size
        return data

    def records(self) -> list[tuple[int, bytes]]:
        """Every complete record, opened, in order; SealError on the first bad one."""
        aead = self._aead
        if aead is None:
            raise SealError("records before the keys")
        out: list[tuple[int, bytes]] = []
        buf, view, end = self._buf, self._view, self._end
        start = self._start
        while end - start >= HEADER:
            (word,) = _HEADER.unpack_from(buf, start)
            kind, size = word >> 24, word & 0xFFFFFF
            if kind > OPEN or size > MAX_RECORD:
                raise SealError(f"bad record header (kind {kind}, {size} bytes)")
            stop = start + HEADER + size + TAG
            if stop > end:
                break
            try:
                plain = aead.decrypt(_NONCE.pack(self._seq), view[start + HEADER:stop],
                                     _HEADER.pack(word))
            except InvalidTag:
                raise SealError("a record failed authentication") from None
            self._seq += 1
            self._start = start = stop
            out.append((kind, plain))
        return out
