"""The node's HTTP limits (``meshcore.httplimits``) against a real uvicorn server
(``serve_asgi``, in a thread) and real sockets: a trickled body is answered 408 and closed
within its deadline, an honest slow but steady body passes, a body the app leaves unread is
not blamed on the client, and trickles on every slot do not lock new clients out.

The limits are shortened (module attributes) so each test takes a second or two; the
bounds waited on are generous, and no test asserts how fast anything was."""

from __future__ import annotations

import contextlib
import json
import logging
import select
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from urllib.parse import parse_qs

import anyio
import pytest
from starlette.types import Receive, Scope, Send

from meshcore import httplimits
from meshcore.server import serve_asgi

WAIT_S = 10.0  # a generous bound on any one wait, not the timeout under test


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """Reads the body (after ``?wait=SECONDS``) and answers its size."""
    if scope["type"] != "http":
        return
    await anyio.sleep(float(parse_qs(scope["query_string"].decode()).get("wait", ["0"])[0]))
    size, more = 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size, more = size + len(message.get("body", b"")), message.get("more_body", False)
    body = json.dumps({"size": size}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
def port(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """A real server on a free port, limits shortened (a test may shorten them more)."""
    for name, value in {"HEAD_TIMEOUT_S": 5.0, "BODY_IDLE_TIMEOUT_S": 1.0, "BODY_GRACE_S": 1.0,
                        "MIN_BODY_RATE": 1000, "PAUSED_POLL_S": 0.05}.items():
        monkeypatch.setattr(httplimits, name, value)
    ready, stop, bound = threading.Event(), threading.Event(), [0]

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            bound[0] = await tg.start(serve_asgi, app, "127.0.0.1", 0)
            ready.set()
            await anyio.to_thread.run_sync(stop.wait)
            tg.cancel_scope.cancel()

    thread = threading.Thread(target=lambda: anyio.run(main), daemon=True)
    thread.start()
    assert ready.wait(30), "the server did not start"
    yield bound[0]
    stop.set()
    thread.join(10)


def head(path: str, length: int | None = None, *extra: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *extra]
    lines += ["Transfer-Encoding: chunked"] if length is None else [f"Content-Length: {length}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_all(sock: socket.socket) -> bytes:
    """What the server sends until it closes (or WAIT_S passes)."""
    sock.settimeout(WAIT_S)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return got


def upload(port: int, total: int, chunk: int, every_s: float, *, path: str = "/",
           chunked: bool = False) -> tuple[bytes, int]:
    """POST a ``total``-byte body, ``chunk`` bytes every ``every_s``, until it is sent or the
    server answers: (the answer, the body bytes sent)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head(path, None if chunked else total))
        sent, ends = 0, time.monotonic() + WAIT_S
        while sent < total and time.monotonic() < ends:
            if select.select([sock], [], [], every_s)[0]:  # answered (or closed) early
                break
            piece = min(chunk, total - sent)
            data = b"x" * piece
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (piece, data) if chunked else data)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += piece
        if sent == total and chunked:
            sock.sendall(b"0\r\n\r\n")
        return read_all(sock), sent


def status(port: int, path: str = "/health") -> bytes:
    """A GET on a new connection: the answer's status line."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        try:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                         .encode())
        except (BrokenPipeError, ConnectionResetError):  # refused at once
            return b""
        return read_all(sock).split(b"\r\n", 1)[0]


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "meshcore.http" and r.levelno == logging.WARNING]


def test_a_trickled_body_is_answered_408_within_its_deadline(
        port: int, caplog: pytest.LogCaptureFixture) -> None:
    """A byte every 50 ms never trips the 1 s idle timeout, but falls behind 1,000 bytes/s:
    408 after the 1 s grace, long before the body is whole; the server serves meanwhile."""
    caplog.set_level(logging.WARNING, logger="meshcore.http")
    with ThreadPoolExecutor(2) as pool:
        trickles = [pool.submit(upload, port, 1000, 1, 0.05) for _ in range(2)]
        time.sleep(0.3)
        assert status(port) == b"HTTP/1.1 200 OK"
        answers = [t.result() for t in trickles]
    for answer, sent in answers:
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
        assert b"its body came too slowly" in answer
        assert sent < 1000
    assert status(port) == b"HTTP/1.1 200 OK"
    logged = [m for m in warnings_of(caplog) if "its body came too slowly" in m]
    assert len(logged) == 2, warnings_of(caplog)  # once per connection
    assert all("closing the request of 127.0.0.1:" in m for m in logged)


@pytest.mark.parametrize("chunked", [False, True])
def test_an_honest_slow_steady_body_passes(port: int, chunked: bool) -> None:
    """8,000 bytes at ~4,000 bytes/s: past the 1 s grace, always ahead of 1,000 bytes/s."""
    answer, sent = upload(port, 8000, 400, 0.1, chunked=chunked)
    assert sent == 8000
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
    assert answer.endswith(b'{"size": 8000}')


def test_a_body_the_app_leaves_unread_is_not_blamed_on_the_client(
        port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The app reads the body only after 1.5 s: uvicorn stops reading (64 KiB wait) and the
    client is stalled, four times the grace and the idle timeout, yet the body passes."""
    monkeypatch.setattr(httplimits, "BODY_GRACE_S", 0.3)
    monkeypatch.setattr(httplimits, "BODY_IDLE_TIMEOUT_S", 0.3)
    monkeypatch.setattr(httplimits, "MIN_BODY_RATE", 10_000_000)  # 1 MB: 0.1 s of credit
    body = b"x" * 1_000_000  # more than uvicorn reads before it stops
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head("/?wait=1.5", len(body)) + body)
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:300]
    assert answer.endswith(b'{"size": 1000000}')


def test_a_client_waiting_for_100_continue_is_not_blamed(
        port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """``Expect: 100-continue``: the client sends nothing until the app asks for the body
    (here after 1.5 s, five times the grace and the idle timeout), then sends it in two parts."""
    monkeypatch.setattr(httplimits, "BODY_GRACE_S", 0.3)
    monkeypatch.setattr(httplimits, "BODY_IDLE_TIMEOUT_S", 0.3)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head("/?wait=1.5", 100, "Expect: 100-continue"))
        sock.settimeout(WAIT_S)
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue\r\n")
        for _ in range(2):
            sock.sendall(b"x" * 50)
            time.sleep(0.1)
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
    assert answer.endswith(b'{"size": 100}')


def test_stalled_bodies_on_every_slot_do_not_lock_new_clients_out(
        port: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """4 connections at most: 3 stalled bodies and a steady upload fill them (deadlines far
    off). Each new client, which then keeps its connection, evicts the stalled body furthest
    behind (a 408), never the steady one; the fourth evicts the oldest idle keep-alive."""
    caplog.set_level(logging.WARNING, logger="meshcore.http")
    monkeypatch.setattr(httplimits, "MAX_CONNECTIONS", 4)
    monkeypatch.setattr(httplimits, "BODY_GRACE_S", 60.0)
    monkeypatch.setattr(httplimits, "BODY_IDLE_TIMEOUT_S", 60.0)
    monkeypatch.setattr(httplimits, "MIN_BODY_RATE", 1000)
    with ThreadPoolExecutor(1) as pool, contextlib.ExitStack() as stack:
        # 4,000 bytes/s for 6 s: ahead of the minimum rate, still sending at the fourth client
        steady: Future[tuple[bytes, int]] = pool.submit(upload, port, 24000, 400, 0.1)
        stalled = [stack.enter_context(socket.create_connection(("127.0.0.1", port)))
                   for _ in range(3)]
        for sock in stalled:
            sock.sendall(head("/", 1000) + b"x")
        time.sleep(0.5)  # the stalled ones fall behind 1,000 bytes/s
        kept = []
        for _ in range(4):  # one after the other, each keeps its connection (keep-alive)
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", port)))
            kept.append(sock)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            sock.settimeout(WAIT_S)
            reply = b""
            while not reply.endswith(b'{"size": 0}'):  # the whole answer, not just its head
                chunk = sock.recv(65536)
                assert chunk, reply
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
        answers = [read_all(sock) for sock in stalled]
        assert read_all(kept[0]) == b""  # the oldest keep-alive, evicted by the fourth
        answer, sent = steady.result()
    assert all(a.startswith(b"HTTP/1.1 408 Request Timeout\r\n") for a in answers), answers
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and sent == 24000, answer
    evicted = [m for m in warnings_of(caplog) if "evicted for a new connection" in m]
    assert len(evicted) == 3, warnings_of(caplog)


def test_a_newcomer_is_refused_when_no_body_is_behind(
        port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httplimits, "MAX_CONNECTIONS", 2)
    with ThreadPoolExecutor(2) as pool:
        steady = [pool.submit(upload, port, 8000, 400, 0.1) for _ in range(2)]
        time.sleep(0.5)
        assert status(port) == b""  # closed unanswered
        answers = [s.result() for s in steady]
    assert all(a.startswith(b"HTTP/1.1 200 OK\r\n") and n == 8000 for a, n in answers), answers
    assert status(port) == b"HTTP/1.1 200 OK"


def test_a_pipelined_half_sent_body_is_closed(port: int) -> None:
    """The second request of a pipeline, its body half-sent: uvicorn parses it after the
    first response, with no data_received to arm a deadline."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                     + head("/", 100).replace(b"Connection: close\r\n", b"") + b"x" * 10)
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
    assert b"HTTP/1.1 408 Request Timeout\r\n" in answer, answer


def test_a_pipelined_request_the_app_answers_slowly_is_not_closed(
        port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second request of a pipeline is whole: only the app is slow (three times the head
    timeout), so it is answered."""
    monkeypatch.setattr(httplimits, "HEAD_TIMEOUT_S", 0.3)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                     b"GET /?wait=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = read_all(sock)
    assert answer.count(b"HTTP/1.1 200 OK\r\n") == 2, answer
