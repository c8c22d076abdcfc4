"""The API and the console under hostile HTTP, against real ``mesh-llm`` processes (fake
backend): connection floods, half-sent heads and bodies, huge bodies, missing or odd keys,
foreign Host headers and non-JSON POSTs."""

from __future__ import annotations

import contextlib
import resource
import select
import selectors
import socket
import time
from collections.abc import Callable, Iterator

import httpx
import psutil
import pytest
from meshcore_testing.pytest_plugin import MeshProcess

KEY = "k3y-of-the-node"
AUTH = {"authorization": f"Bearer {KEY}"}
RSS_LIMIT = 200 * 1024 * 1024
FAKE = ("--model", "m", "--backend", "fake", "--console", "0")


def start(mesh_process: Callable[..., MeshProcess], *, nofile: int | None = None
          ) -> tuple[MeshProcess, str, str]:
    """A keyed node (the key from $MESH_LLM_API_KEY) once healthy: (node, API, console)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if nofile is not None:  # the child inherits it: the open-files limit of a default shell
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(nofile, hard), hard))
    try:
        node = mesh_process(*FAKE, env={"MESH_LLM_API_KEY": KEY})
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    api = f"http://127.0.0.1:{node.api_port}"
    for _ in range(400):
        with contextlib.suppress(httpx.HTTPError):
            if node.get("/health").status_code == 200:
                break
        time.sleep(0.05)
    else:
        raise AssertionError(f"node never became healthy:\n{node.log()}")
    return node, api, f"http://127.0.0.1:{node.ui_port('console')}"


def rss(node: MeshProcess) -> int:
    return int(psutil.Process(node.proc.pid).memory_info().rss)


@contextlib.contextmanager
def more_open_files() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def closed_by_peer(sock: socket.socket, wait_s: float = 60) -> bool:
    """Whether the other side closes ``sock`` within ``wait_s`` (a generous bound, not the
    timeout under test); anything it sent first is skipped."""
    sock.settimeout(wait_s)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


def test_a_flood_of_half_open_requests_leaves_the_node_answering(
        mesh_process: Callable[..., MeshProcess]) -> None:
    """1,100 half-sent requests against a node whose open-files limit is 1,024: /health and
    the console still answer and RSS stays under 200 MB."""
    node, api, console = start(mesh_process, nofile=1024)
    port = port_of(api)
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty"
    with more_open_files(), contextlib.ExitStack() as stack:
        flood = []
        for _ in range(1100):
            sock = stack.enter_context(socket.socket())
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            flood.append(sock)
        with selectors.DefaultSelector() as waiting:  # epoll: select() stops at fd 1024
            for sock in flood:
                waiting.register(sock, selectors.EVENT_WRITE)
            deadline = time.monotonic() + 10
            while waiting.get_map() and time.monotonic() < deadline:
                for key, _ in waiting.select(1):
                    waiting.unregister(key.fileobj)
                    with contextlib.suppress(OSError):
                        key.fileobj.send(head)  # type: ignore[union-attr]
        health = httpx.get(f"{api}/health", timeout=5)
        status = httpx.get(f"{console}/api/status", headers=AUTH, timeout=5)
        assert health.status_code == 200, node.log()[-3000:]
        assert status.status_code == 200
        assert rss(node) < RSS_LIMIT
    assert node.proc.poll() is None


@pytest.mark.parametrize("part", ["head", "body"])
def test_a_half_sent_request_is_closed(mesh_process: Callable[..., MeshProcess],
                                       part: str) -> None:
    node, api, console = start(mesh_process)
    body = b'{"messages": []}'
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               b"Authorization: Bearer " + KEY.encode() + b"\r\n"
               b"Content-Type: application/json\r\n"
               b"Content-Length: " + str(len(body) * 10).encode() + b"\r\n")
    request += b"X-Half: " if part == "head" else b"\r\n" + body  # a tenth of the body
    for url in (api, console):
        with socket.create_connection(("127.0.0.1", port_of(url))) as sock:
            sock.sendall(request)
            assert closed_by_peer(sock), f"{url}: a half-sent {part} is still open"
    assert httpx.get(f"{api}/health").status_code == 200
    assert "Traceback" not in node.log(), node.log()


def test_a_300_mb_streamed_body_is_refused_without_reading_it(
        mesh_process: Callable[..., MeshProcess]) -> None:
    node, api, _ = start(mesh_process)
    with socket.create_connection(("127.0.0.1", port_of(api))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                     b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"100000\r\n" + b"x" * 0x100000 + b"\r\n"  # 1 MiB per chunk
        answer, peak = b"", 0
        for _ in range(300):
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                with contextlib.suppress(ConnectionResetError):
                    answer += sock.recv(65536)
                break
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            peak = max(peak, rss(node))
        with contextlib.suppress(OSError):
            sock.settimeout(10)
            answer += sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"request body over 8388608 bytes" in answer
    assert max(peak, rss(node)) < RSS_LIMIT
    with socket.create_connection(("127.0.0.1", port_of(api))) as sock:  # a Content-Length
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # over the
                     b"Authorization: Bearer " + KEY.encode() + b"\r\n"  # cap: refused before
                     b"Content-Type: application/json\r\n"  # a byte of the body is sent
                     b"Content-Length: 300000000\r\n\r\n")
        sock.settimeout(30)
        assert sock.recv(65536).startswith(b"HTTP/1.1 413")


def test_the_key_covers_every_route_but_health(mesh_process: Callable[..., MeshProcess]) -> None:
    node, api, console = start(mesh_process)
    assert node.token is not None
    gets = [f"{api}/v1/models", f"{api}/mesh/status", f"{api}/nowhere", f"{console}/",
            f"{console}/api/status", f"{console}/api/events?max=1",
            f"{console}/static/console.js"]
    posts = [f"{api}/v1/chat/completions", f"{api}/v1/completions", f"{console}/api/chat"]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    wrong: list[list[tuple[bytes, bytes]]] = [
        [], [(b"authorization", b"Bearer wrong")], [(b"authorization", KEY.encode())],
        [(b"authorization", "Bearer ключ".encode())]]  # non-ASCII: a 401, not a 500
    for headers in wrong:
        for url in gets:
            r = httpx.get(url, headers=headers)
            assert r.status_code == 401, (url, headers, r.text)
            assert node.token not in r.text
        for url in posts:
            r = httpx.post(url, headers=headers, json=chat)
            assert r.status_code == 401, (url, headers, r.text)
    assert httpx.get(f"{api}/health").status_code == 200, "liveness stays open"
    for url in gets:
        expected = 404 if url.endswith("/nowhere") else 200
        assert httpx.get(url, headers=AUTH).status_code == expected, url
    for url in posts:
        assert httpx.post(url, headers=AUTH, json=chat).status_code == 200, url
    shown = httpx.get(f"{console}/api/status", headers=AUTH).json()
    assert shown["join_token"] == node.token and not shown["token_hidden"]


def test_foreign_hosts_and_non_json_posts_are_refused(
        mesh_process: Callable[..., MeshProcess]) -> None:
    node, api, console = start(mesh_process)
    for base in (api, console):
        for host in ("evil.example", "evil.example:9337", "127.0.0.1.nip.io"):
            r = httpx.get(f"{base}/health" if base == api else f"{base}/api/status",
                          headers={**AUTH, "host": host})
            assert r.status_code == 421, (base, host, r.text)
            assert "is not this node's" in r.json()["error"]["message"]
        for host in ("localhost", f"127.0.0.1:{port_of(base)}", "[::1]"):
            path = "/health" if base == api else "/api/status"
            assert httpx.get(base + path, headers={**AUTH, "host": host}).status_code == 200
    text = '{"messages": [{"role": "user", "content": "hi"}]}'
    for url in (f"{api}/v1/chat/completions", f"{console}/api/chat"):
        for kind in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {**AUTH, "content-type": kind} if kind else AUTH
            r = httpx.post(url, headers=headers, content=text)
            assert r.status_code == 415, (url, kind, r.text)
            assert "application/json" in r.json()["error"]["message"]
    assert node.proc.poll() is None
