"""Join token and frame codecs: round trips, clear errors, and fuzzing (only our errors)."""

from __future__ import annotations

import base64
import contextlib
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from meshcore_transport_quic.frames import (
    HEADER,
    MAX_FRAME,
    FrameError,
    Kind,
    decode_frame,
    encode_frame,
)
from meshcore_transport_quic.links import rtt_table_changed
from meshcore_transport_quic.token import JoinToken, TokenError, decode_token

FP, SECRET = os.urandom(32), os.urandom(32)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_token_round_trip_keeps_every_field() -> None:
    token = JoinToken(FP, SECRET, 4433, ("192.168.1.7", "fd00::1", "127.0.0.1"))
    text = token.encode()
    assert set(text) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert decode_token(text) == token
    assert decode_token(f"  {text}\n") == token
    assert token.endpoints[1] == ("fd00::1", 4433)


@pytest.mark.parametrize(("text", "problem"), [
    ("", "it is empty"),
    ("abc$def", "characters outside base64url"),
    (b64(b"\x01" + b"x" * 10), "truncated"),
    (b64(b"\x07" + b"x" * 80), "version 7 is not supported"),
    ("not-a-token", "'not-a-token' is not a mesh-llm join token"),
    (b64(b"\x9e" + b"x" * 80), "is not a mesh-llm join token"),
    (b64(b"\x01" + FP + SECRET + b"\x00\x00\x01\x04" + bytes(4)), "port is 0"),
    (b64(b"\x01" + FP + SECRET + b"\x11\x51\x00"), "no address"),
    (b64(b"\x01" + FP + SECRET + b"\x11\x51\x02\x04" + bytes(4)), "address 2 of 2 missing"),
    (b64(b"\x01" + FP + SECRET + b"\x11\x51\x01\x05" + bytes(4)), "unknown family 5"),
    (b64(b"\x01" + FP + SECRET + b"\x11\x51\x01\x06" + bytes(4)), "cut short"),
    (b64(b"\x01" + FP + SECRET + b"\x11\x51\x01\x04" + bytes(5)), "1 unexpected trailing"),
])
def test_malformed_tokens_say_what_is_wrong(text: str, problem: str) -> None:
    with pytest.raises(TokenError, match=problem):
        decode_token(text)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_token_decoder_fuzz_raises_only_token_errors(raw: bytes) -> None:
    for text in (b64(raw), b64(b"\x01" + raw), raw.decode("latin-1")):
        with contextlib.suppress(TokenError):
            decode_token(text)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.ip_addresses(), min_size=1, max_size=5), st.integers(1, 65535))
def test_token_round_trip_fuzz(addresses: list[object], port: int) -> None:
    token = JoinToken(FP, SECRET, port, tuple(str(a) for a in addresses))
    assert decode_token(token.encode()) == token


def test_frame_round_trip() -> None:
    frame = decode_frame(encode_frame(Kind.ANNOUNCE, {"peer": {"id": "x", "vram": 3}}))
    assert frame.kind is Kind.ANNOUNCE and frame.body == {"peer": {"id": "x", "vram": 3}}


def test_bad_frames_are_named() -> None:
    good = encode_frame(Kind.PING, {"t": 1})
    with pytest.raises(FrameError, match="truncated frame header"):
        decode_frame(good[:3])
    with pytest.raises(FrameError, match="truncated frame"):
        decode_frame(good[:-1])
    with pytest.raises(FrameError, match="after the end"):
        decode_frame(good + b"x")
    with pytest.raises(FrameError, match="version 9"):
        decode_frame(b"\x09" + good[1:])
    with pytest.raises(FrameError, match="unknown frame kind 99"):
        decode_frame(good[:1] + b"\x63" + good[2:])
    with pytest.raises(FrameError, match="exceeds"):
        decode_frame(HEADER.pack(1, Kind.PING, MAX_FRAME + 1))
    with pytest.raises(FrameError, match="exceeds"):
        encode_frame(Kind.PEERS, {"x": "y" * MAX_FRAME})
    with pytest.raises(FrameError, match="not a JSON object"):
        decode_frame(HEADER.pack(1, Kind.PING, 2) + b"[]")
    with pytest.raises(FrameError, match="not JSON"):
        decode_frame(HEADER.pack(1, Kind.PING, 2) + b"\xff{")


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_frame_decoder_fuzz_raises_only_frame_errors(raw: bytes) -> None:
    for data in (raw, HEADER.pack(1, Kind.ANNOUNCE, len(raw)) + raw):
        try:
            frame = decode_frame(data)
        except FrameError:
            continue
        assert isinstance(frame.body, dict)


def test_rtt_table_changes_only_meaningfully() -> None:
    old = {"a": 10.0, "b": 1.0}
    assert not rtt_table_changed(old, {"a": 12.4, "b": 2.9})  # same 10 ms bands
    assert rtt_table_changed(old, {"a": 26.0, "b": 1.0})  # a moved up a band
    assert not rtt_table_changed(old, {"a": 10.0})  # a peer went away: not material
    assert rtt_table_changed({}, {"a": 1.0})  # more in test_quic_quiet.py


def test_state_dir_and_secrets_are_made_private_on_every_start(tmp_path: Path) -> None:
    from meshcore_transport_quic.identity import load_identity, load_mesh_secret

    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    (home / "mesh-secret").write_text("not hex\n")  # regenerated below, over a 0644 file
    (home / "mesh-secret").chmod(0o644)
    load_mesh_secret(home)
    load_identity(home, "n1")
    (home / "quic-key.pem").chmod(0o644)  # loosened by hand (a copy, an old version)
    load_identity(home, "n1")
    assert home.stat().st_mode & 0o777 == 0o700
    assert (home / "mesh-secret").stat().st_mode & 0o777 == 0o600
    assert (home / "quic-key.pem").stat().st_mode & 0o777 == 0o600
