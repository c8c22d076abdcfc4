"""The fast path's sans-IO session (session.py): both roles in memory, no sockets: the
handshake, events, half-close, every protocol violation, and the wire format against a peer
made by hand from seal.py (what an older version of this code sends)."""

from __future__ import annotations

import os

import pytest
from meshcore_transport_quic import seal
from meshcore_transport_quic.seal import DATA, EOF, OPEN, SealError
from meshcore_transport_quic.session import RecordSession

KEY = os.urandom(32)


def wire(records: list[bytes | bytearray]) -> bytes:
    return b"".join(bytes(r) for r in records)


def pair(service: str = "rpc") -> tuple[RecordSession, RecordSession]:
    """A dialing and an accepting session with the handshake done (OPEN delivered)."""
    client = RecordSession.dialing(KEY, service)
    server = RecordSession.accepting({KEY: "peer-a"})
    server.feed(client.data_to_send())
    assert server.receive() == []  # keyed; the OPEN record has not come yet
    client.feed(server.data_to_send())
    assert client.receive() == [(OPEN, service.encode())]
    server.feed(client.data_to_send())
    assert server.receive() == [(OPEN, service.encode())]
    assert (server.peer_id, server.service, client.service) == ("peer-a", service, service)
    return client, server


def test_both_roles_open_a_tunnel_and_half_close_each_direction() -> None:
    client, server = pair()
    server.feed(wire(client.send(b"request")) + bytes(client.send_eof()))
    assert server.receive() == [(DATA, b"request"), (EOF, b"")]
    assert server.eof_received and not server.eof_sent
    client.feed(wire(server.send(b"answer after the EOF")) + bytes(server.send_eof()))
    assert client.receive() == [(DATA, b"answer after the EOF"), (EOF, b"")]
    assert client.data_to_send() == server.data_to_send() == b""


def test_big_writes_are_split_into_records_and_reads_may_cut_anywhere() -> None:
    client, server = pair()
    payload = os.urandom(3 * seal.MAX_RECORD + 5)
    bytes_ = wire(client.send(payload))
    got = b""
    for i in range(0, len(bytes_), 70_001):
        server.feed(bytes_[i:i + 70_001])
        got += b"".join(data for kind, data in server.receive() if kind == DATA)
    assert got == payload


def test_the_handshake_waits_for_whole_handshake_messages() -> None:
    client = RecordSession.dialing(KEY, "rpc")
    server = RecordSession.accepting({KEY: "peer-a"})
    hello = client.data_to_send()
    server.feed(hello[:-1])
    assert server.receive() == [] and server.data_to_send() == b""
    server.feed(hello[-1:])
    assert server.receive() == []
    answer = server.data_to_send()
    assert len(answer) == seal.RANDOM_BYTES
    client.feed(answer[:5])
    assert client.receive() == [] and client.service is None
    client.feed(answer[5:])
    assert client.receive() == [(OPEN, b"rpc")]


def manual_client(server: RecordSession) -> seal.Sealer:
    """A client made from seal.py only (the wire format of any version): hello, keys."""
    client_random = seal.new_random()
    server.feed(seal.hello(KEY, client_random))
    assert server.receive() == []
    server_random = server.data_to_send()
    c2s, _ = seal.derive(KEY, client_random, server_random)
    return seal.Sealer(c2s)


@pytest.mark.parametrize(("first", "then", "words"), [
    ((DATA, b"too early"), None, "data before the OPEN record"),
    ((EOF, b""), None, "data before the OPEN record"),
    ((OPEN, b"rpc"), (OPEN, b"again"), "unexpected OPEN"),
    ((OPEN, b"rpc"), (EOF, b""), None),
])
def test_protocol_violations_raise(first: tuple[int, bytes], then: tuple[int, bytes] | None,
                                   words: str | None) -> None:
    server = RecordSession.accepting({KEY: "peer-a"})
    sealer = manual_client(server)
    server.feed(bytes(sealer.seal(*first)))
    if then is None:
        with pytest.raises(SealError, match=words):
            server.receive()
        return
    server.receive()
    server.feed(bytes(sealer.seal(*then)))
    if words is not None:
        with pytest.raises(SealError, match=words):
            server.receive()
        return
    assert server.receive() == [(EOF, b"")]
    server.feed(bytes(sealer.seal(DATA, b"after the end")))
    with pytest.raises(SealError, match="after the sealed EOF"):
        server.receive()


def test_unknown_keys_and_foreign_hellos_are_refused() -> None:
    server = RecordSession.accepting({KEY: "peer-a"})
    server.feed(seal.hello(os.urandom(32), seal.new_random()))
    with pytest.raises(SealError, match="unknown key"):
        server.receive()
    server = RecordSession.accepting({KEY: "peer-a"})
    server.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(20))
    with pytest.raises(SealError, match="not a mesh-llm fast-path hello"):
        server.receive()


def test_keys_issued_after_the_session_started_count() -> None:
    keys: dict[bytes, str] = {}
    server = RecordSession.accepting(keys)
    keys[KEY] = "late-peer"
    manual_client(server)
    assert server.peer_id == "late-peer"


def test_a_client_refuses_open_and_nothing_is_sent_outside_the_tunnel() -> None:
    client = RecordSession.dialing(KEY, "rpc")
    with pytest.raises(SealError):
        client.send(b"before the keys")
    client_random = seal.parse_hello(client.data_to_send())[1]
    server_random = seal.new_random()
    client.feed(server_random)
    assert client.receive() == [(OPEN, b"rpc")]
    _, s2c = seal.derive(KEY, client_random, server_random)
    client.feed(bytes(seal.Sealer(s2c).seal(OPEN, b"not from a server")))
    with pytest.raises(SealError, match="unexpected OPEN"):
        client.receive()
    client.send_eof()
    with pytest.raises(SealError):
        client.send(b"after the EOF")
    with pytest.raises(SealError):
        client.send_eof()


def test_the_wire_format_is_the_documented_one() -> None:
    """Byte for byte what seal.py (and docs/transport.md) describe, both directions."""
    client = RecordSession.dialing(KEY, "llama")
    hello = client.data_to_send()
    assert hello[:4] == b"MLF2" and hello[4:20] == seal.key_id(KEY) and len(hello) == 36
    client_random, server_random = hello[20:], os.urandom(16)
    client.feed(server_random)
    client.receive()
    c2s, s2c = seal.derive(KEY, client_random, server_random)
    opener = seal.Opener()
    opener.set_key(c2s)
    opener.feed(client.data_to_send() + wire(client.send(b"tokens")) + bytes(client.send_eof()))
    assert opener.records() == [(OPEN, b"llama"), (DATA, b"tokens"), (EOF, b"")]
    server = RecordSession.accepting({KEY: "peer-a"})
    server.feed(hello)
    server.receive()
    assert len(server.data_to_send()) == 16
    assert s2c != c2s
