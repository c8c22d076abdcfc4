"""The impairment relay (meshcore_testing.impair): UDP and TCP forwarding with delay and loss."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from meshcore_testing.impair import Impairment, start_relay


def udp_echo() -> tuple[socket.socket, threading.Thread]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.1)  # close() does not wake a blocked recvfrom: poll instead

    def serve() -> None:
        while sock.fileno() != -1:
            try:
                data, addr = sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            sock.sendto(data, addr)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return sock, thread


def test_udp_relay_delays_both_ways_and_drops() -> None:
    echo, thread = udp_echo()
    try:
        with start_relay("udp", echo.getsockname(), Impairment(delay_ms=40), seed=1) as relay:
            client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            client.settimeout(5)
            start = time.monotonic()
            client.sendto(b"ping", ("127.0.0.1", relay.port))
            data, _ = client.recvfrom(100)
            rtt = time.monotonic() - start
            assert data == b"ping" and rtt >= 0.08  # 40 ms each way: a floor, not a timing
            assert relay.forwarded == 2 and relay.dropped == 0

            relay.impairment = Impairment(loss=0.5)
            client.settimeout(0.1)
            answered = 0
            for i in range(30):
                client.sendto(b"x%d" % i, ("127.0.0.1", relay.port))
                try:
                    client.recvfrom(100)
                    answered += 1
                except TimeoutError:
                    pass
            assert relay.dropped > 5 and 0 < answered < 30, (relay.dropped, answered)
            client.close()
    finally:
        echo.close()
        thread.join(5)


def test_tcp_relay_keeps_order_and_half_close() -> None:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            got = b""
            while chunk := conn.recv(65536):
                got += chunk
            conn.sendall(got[::-1])  # answer only after the client's EOF

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    payload = bytes(range(256)) * 4000
    impairment = Impairment(delay_ms=5, jitter_ms=5)
    with start_relay("tcp", server.getsockname(), impairment) as relay, \
            socket.create_connection(("127.0.0.1", relay.port), timeout=10) as conn:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        back = b""
        while chunk := conn.recv(65536):
            back += chunk
    thread.join(5)
    server.close()
    assert back == payload[::-1]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="probability"):
        Impairment(loss=2)
    with pytest.raises(ValueError, match="unknown"), \
            start_relay("sctp", ("127.0.0.1", 1)):  # type: ignore[arg-type]
        pass


def test_tcp_relay_delays_a_message_in_pieces_once_not_per_piece() -> None:
    """The relay keeps reading while earlier chunks wait out their delay (several in flight
    at once); before, it slept per chunk before reading the next, so a message written in k
    pieces paid k delays (raw llama.cpp RPC looked like 3.4 round trips per token)."""
    server = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            while chunk := conn.recv(65536):
                got.append(chunk)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with start_relay("tcp", server.getsockname(), Impairment(delay_ms=300)) as relay, \
            socket.create_connection(("127.0.0.1", relay.port), timeout=10) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(10):
            conn.sendall(b"piece %d;" % i)
            time.sleep(0.01)  # separate reads at the relay
        conn.shutdown(socket.SHUT_WR)
        thread.join(30)
        assert conn.recv(1) == b""  # the server's EOF came back through the relay
        in_flight = relay.most_in_flight
    server.close()
    assert b"".join(got) == b"".join(b"piece %d;" % i for i in range(10))
    assert in_flight > 1, in_flight
