"""The fast path's record layer (seal.py): what goes in comes out, in any read pattern, and
anything altered, reordered, replayed, oversized or under the wrong key fails loudly."""

from __future__ import annotations

import contextlib
import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from meshcore_transport_quic import seal

KEY = os.urandom(16)


def opener(key: bytes = KEY) -> seal.Opener:
    o = seal.Opener()
    o.set_key(key)
    return o


def feed_all(o: seal.Opener, wire: bytes, cuts: list[int]) -> list[tuple[int, bytes]]:
    """Feed ``wire`` in pieces split at ``cuts``, opening records as they complete."""
    out: list[tuple[int, bytes]] = []
    edges = sorted({0, len(wire), *(c % (len(wire) + 1) for c in cuts)})
    for lo, hi in itertools.pairwise(edges):
        o.feed(wire[lo:hi])
        out += o.records()
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=3000), max_size=8), st.lists(st.integers(0, 10**6)),
       st.integers(0, 3))
def test_records_round_trip_whatever_the_read_boundaries(chunks: list[bytes], cuts: list[int],
                                                         big: int) -> None:
    chunks = [*chunks, os.urandom(seal.MAX_RECORD + 1000)] if big == 3 else chunks
    s = seal.Sealer(KEY)
    wire = b"".join(bytes(r) for c in chunks for r in s.seal_data(c)) + bytes(s.seal(seal.EOF))
    got = feed_all(opener(), wire, cuts)
    assert got[-1] == (seal.EOF, b"")
    assert b"".join(data for kind, data in got[:-1]) == b"".join(chunks)
    assert all(kind == seal.DATA and len(data) <= seal.MAX_RECORD for kind, data in got[:-1])


def test_a_long_stream_of_big_records_reuses_the_buffer() -> None:
    s, o = seal.Sealer(KEY), opener()
    payload = os.urandom(3 * seal.MAX_RECORD + 17)
    out = bytearray()
    for _ in range(12):  # several times the buffer's size, in odd-sized reads
        wire = b"".join(bytes(r) for r in s.seal_data(payload))
        for i in range(0, len(wire), 100_003):
            o.feed(wire[i:i + 100_003])
            out += b"".join(data for _, data in o.records())
    assert out == payload * 12
    assert o.buffered == 0
    assert o.capacity == seal.BUFFER


def test_a_chatty_connection_keeps_a_small_buffer() -> None:
    s, o = seal.Sealer(KEY), opener()
    for i in range(5000):  # ~100 bytes each, like rpc commands and tokens
        o.feed(bytes(s.seal(seal.DATA, b"token %d" % i + bytes(90))))
        assert o.records()[0][1].startswith(b"token %d" % i)
    assert o.capacity == seal.INITIAL_BUFFER


@pytest.mark.parametrize("where", [0, 1, 3, 4, 20, -17, -1], ids=lambda w: f"byte{w}")
def test_any_altered_byte_fails_authentication(where: int) -> None:
    wire = bytearray(seal.Sealer(KEY).seal(seal.DATA, b"generate the next token" * 3))
    wire[where] ^= 0x01
    with pytest.raises(seal.SealError):
        o = opener()
        o.feed(bytes(wire))
        if not o.records():  # a length made larger only waits for more bytes
            o.feed(os.urandom(seal.MAX_RECORD + 64))
            o.records()


def test_reordered_replayed_and_dropped_records_fail() -> None:
    s = seal.Sealer(KEY)
    first, second, third = (bytes(s.seal(seal.DATA, b"%d" % i)) for i in range(3))
    for wire in (second + first, first + first, first + third):
        o = opener()
        o.feed(wire)
        with pytest.raises(seal.SealError, match="authentication"):
            o.records()


def test_wrong_key_and_direction_mix_up_fail() -> None:
    c2s, s2c = seal.derive(KEY, b"c" * 16, b"s" * 16)
    assert c2s != s2c and len(c2s) == len(s2c) == 16
    assert seal.derive(KEY, b"c" * 16, b"t" * 16) != (c2s, s2c)  # a fresh server random
    assert seal.derive(os.urandom(32), b"c" * 16, b"s" * 16) != (c2s, s2c)
    record = bytes(seal.Sealer(c2s).seal(seal.DATA, b"hello"))
    for key in (s2c, KEY):
        o = opener(key)
        o.feed(record)
        with pytest.raises(seal.SealError):
            o.records()


@pytest.mark.parametrize(("kind", "size"), [(7, 10), (0, seal.MAX_RECORD + 1), (255, 0)])
def test_bad_headers_are_named_before_any_decryption(kind: int, size: int) -> None:
    o = opener()
    o.feed(bytes([kind]) + size.to_bytes(3, "big"))
    with pytest.raises(seal.SealError, match="bad record header"):
        o.records()


def test_records_need_keys_and_the_hello_is_checked() -> None:
    with pytest.raises(seal.SealError):
        seal.Opener().records()
    client_random = os.urandom(16)
    hello = seal.hello(KEY, client_random)
    assert seal.parse_hello(hello) == (seal.key_id(KEY), client_random)
    assert KEY not in hello
    for bad in (b"", hello[:-1], b"XXXX" + hello[4:], hello + b"!"):
        with pytest.raises(seal.SealError, match="hello"):
            seal.parse_hello(bad)


def test_clear_bytes_come_before_records() -> None:
    o = seal.Opener()
    o.feed(b"0123456789abcdef" + b"tail")
    assert o.take_clear(21) is None
    assert o.take_clear(16) == b"0123456789abcdef"
    assert o.buffered == 4


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_opener_fuzz_raises_only_seal_errors(raw: bytes) -> None:
    o = opener()
    o.feed(raw)
    with contextlib.suppress(seal.SealError):
        o.records()


def test_both_ends_keyed_by_start_talk_to_each_other() -> None:
    client_random, server_random = os.urandom(16), os.urandom(16)
    client_in, server_in = seal.Opener(), seal.Opener()
    to_server = seal.start(client_in, KEY, client_random, server_random, client=True)
    to_client = seal.start(server_in, KEY, client_random, server_random, client=False)
    server_in.feed(bytes(to_server.seal(seal.OPEN, b"rpc")))
    client_in.feed(bytes(to_client.seal(seal.DATA, b"\x00")))
    assert server_in.records() == [(seal.OPEN, b"rpc")]
    assert client_in.records() == [(seal.DATA, b"\x00")]
    looped = seal.Opener()  # a client's own records never open with its incoming key
    seal.start(looped, KEY, client_random, server_random, client=True)
    looped.feed(bytes(to_server.seal(seal.DATA, b"x")))
    with pytest.raises(seal.SealError):
        looped.records()
