"""The fast path's per-connection protocol state, sans I/O: hello, keys, OPEN, records, EOF.

A :class:`RecordSession` is one end of one fast-path connection, dialing or accepting. It is
fed the bytes that arrived (into ``inbox``'s buffer, as an asyncio BufferedProtocol fills it,
or through ``feed``), says what they mean as events, keeps what it must answer in
``data_to_send``, and seals outgoing plaintext (``send``, ``send_eof``). It does no I/O: the
asyncio adapter (:mod:`.adapter`) moves its bytes; the records and why they are safe are in
:mod:`.seal`, whose wire format this follows byte for byte.

Dialing: hello out; the server random in; keys; OPEN (the service) out; then DATA/EOF.
Accepting: the hello in (an unknown key id is an error); its random out; keys; OPEN must come
first; then DATA/EOF. Events are ``(seal.OPEN, service)`` once the tunnel is open (both roles;
the dialer's is its own request), ``(seal.DATA, plaintext)`` and ``(seal.EOF, b"")``. Anything
else (a record that does not open, data before OPEN, a second OPEN, a record after EOF) raises
:class:`.seal.SealError`: the connection must then be reset, never ended cleanly.
"""

from __future__ import annotations

from collections.abc import Mapping

from meshcore_transport_quic import seal
from meshcore_transport_quic.seal import DATA, EOF, OPEN, SealError

PROBE = "probe"  # the service a probe names; the server answers one DATA byte and EOF

Event = tuple[int, bytes]
Record = bytes | bytearray


class RecordSession:
    """One end of a fast-path connection: handshake state, the record keys of both
    directions, and whether each direction has ended (``eof_received``, ``eof_sent``)."""

    __slots__ = ("_key", "_keys", "_out", "_random", "_request", "_sealer", "client",
                 "eof_received", "eof_sent", "inbox", "peer_id", "service")

    def __init__(self, *, client: bool, key: bytes = b"", request: str = "",
                 keys: Mapping[bytes, str] | None = None) -> None:
        self.client = client
        self.peer_id = ""  # accepting: the peer the key was issued to
        self.service: str | None = None  # set once the tunnel is open
        self.eof_received = self.eof_sent = False
        self._key = key  # dialing: the key issued to us
        self._keys: Mapping[bytes, str] = {} if keys is None else keys  # accepting: ours
        self._request = request
        self.inbox = seal.Opener()  # received bytes land in its buffer (get_buffer)
        self._sealer: seal.Sealer | None = None
        self._random = seal.new_random() if client else b""
        self._out: list[bytes] = [seal.hello(key, self._random)] if client else []

    @classmethod
    def dialing(cls, key: bytes, service: str) -> RecordSession:
        """The client end: it will name ``service`` with the key issued to it over QUIC."""
        service.encode("ascii")  # UnicodeEncodeError now, not in the middle of the handshake
        return cls(client=True, key=key, request=service)

    @classmethod
    def accepting(cls, keys: Mapping[bytes, str]) -> RecordSession:
        """The server end; ``keys`` maps each key this node issued to the peer holding it
        (read when the hello arrives, so keys issued meanwhile count)."""
        return cls(client=False, keys=keys)

    # ---------------------------------------------------------------- incoming bytes
    def feed(self, data: bytes) -> None:
        """For callers that receive bytes instead of filling ``inbox``'s buffer."""
        self.inbox.feed(data)

    def receive(self) -> list[Event]:
        """The events of every complete record received so far, in order (none while the
        handshake waits for bytes); SealError on anything the protocol does not allow."""
        opened: list[Event] = []
        if self._sealer is None:
            if not self._handshake():
                return []
            if self.client:
                opened = [(OPEN, self._request.encode("ascii"))]
        records = self.inbox.records()
        for kind, data in records:
            if kind != DATA or self.service is None or self.eof_received:
                self._check(kind, data)
        return opened + records if opened else records

    def _handshake(self) -> bool:
        """Take the peer's clear handshake bytes and key both directions; False until they
        are all there."""
        opener = self.inbox
        if self.client:
            server_random = opener.take_clear(seal.RANDOM_BYTES)
            if server_random is None:
                return False
            key, client_random = self._key, self._random
        else:
            hello = opener.take_clear(seal.HELLO_BYTES)
            if hello is None:
                return False
            ident, client_random = seal.parse_hello(hello)
            found = [(k, p) for k, p in list(self._keys.items()) if seal.key_id(k) == ident]
            if not found:
                raise SealError("unknown key (not issued to a connected peer)")
            key, self.peer_id = found[0]
            server_random = seal.new_random()
            self._out.append(server_random)
        self._sealer = seal.start(opener, key, client_random, server_random,
                                  client=self.client)
        self._key, self._keys, self._random = b"", {}, b""  # not needed any more
        if self.client:
            self.service = self._request
            self._out.append(bytes(self._sealer.seal(OPEN, self._request.encode("ascii"))))
        return True

    def _check(self, kind: int, data: bytes) -> None:
        """A record other than DATA in an open tunnel: OPEN first (accepting), EOF last."""
        if self.eof_received:
            raise SealError(f"a record (kind {kind}) after the sealed EOF")
        if kind == OPEN:
            if self.client or self.service is not None:
                raise SealError("an unexpected OPEN record")
            self.service = data.decode("ascii", "replace")
        elif self.service is None:
            raise SealError("data before the OPEN record")
        elif kind == EOF:
            self.eof_received = True

    # ---------------------------------------------------------------- outgoing bytes
    def data_to_send(self) -> bytes:
        """Handshake bytes this end must send now (hello, server random, OPEN), else b""."""
        if not self._out:
            return b""
        out, self._out = b"".join(self._out), []
        return out

    def send(self, data: bytes | bytearray | memoryview) -> list[Record]:
        """``data`` sealed as DATA records; SealError before the tunnel is open or after
        ``send_eof``."""
        sealer = self._sealer
        if sealer is None or self.service is None or self.eof_sent:
            raise SealError("the tunnel is not open for sending")
        return sealer.seal_data(data)

    def send_eof(self) -> Record:
        """The sealed EOF (this end's half-close); nothing may be sent after it."""
        sealer = self._sealer
        if sealer is None or self.service is None or self.eof_sent:
            raise SealError("the tunnel is not open for sending")
        self.eof_sent = True
        return sealer.seal(EOF)
