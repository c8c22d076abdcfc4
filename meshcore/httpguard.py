"""The ASGI guard in front of the node's API and console: Host allow-list, API key, JSON-only
POSTs and a body cap counted while the body streams in.

A web page the user visits cannot drive a local node: a DNS-rebound name fails the Host
check, and a cross-site form POST (no CORS preflight) is never ``application/json``.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable, Collection

from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def error(status: int, message: str, kind: str) -> JSONResponse:
    """An OpenAI-style error body."""
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status)


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case), raw."""
    return next((v for k, v in scope["headers"] if k == name), None)


def bearer_ok(scope: Scope, api_key: str) -> bool:
    """Whether ``Authorization: Bearer <api_key>`` was sent (compared as bytes, in constant
    time; any bytes, non-ASCII included, are just a wrong key)."""
    given = header(scope, b"authorization") or b""
    scheme, _, token = given.partition(b" ")
    return hmac.compare_digest(scheme.lower() + b" " + token.strip(),
                               b"bearer " + api_key.encode())


def host_name(scope: Scope) -> str | None:
    """The Host header's name without the port (``[::1]:9337`` -> ``::1``); None when the
    header is absent, ``""`` when it is not ASCII."""
    raw = header(scope, b"host")
    if raw is None:
        return None
    try:
        text = raw.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        return ""
    if text.startswith("["):
        return text[1:text.find("]")] if "]" in text else ""
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


def bound_everywhere(bind_host: str) -> bool:
    """Whether the server listens on every interface (``--listen-all``: an unspecified
    address, or no host at all)."""
    try:
        return not bind_host or ipaddress.ip_address(bind_host).is_unspecified
    except ValueError:  # a name: one interface
        return False


def host_allowed(name: str | None, bind_host: str) -> bool:
    """Local names, the bound address, and any IP literal when bound to every interface. A
    request without Host (HTTP/1.0) names nothing that could be rebound."""
    if name is None or name in LOCAL_NAMES or name == bind_host.lower():
        return True
    if not bound_everywhere(bind_host):
        return False
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class BodyTooLarge(Exception):
    """Raised from ``receive()`` once a request body passes the cap."""


class HttpGuard:
    """ASGI middleware; install it inside the Starlette app (``Middleware(HttpGuard, ...)``) so
    that an over-long body becomes a 413, not the server's 500. ``authorized(scope)`` is an
    extra way to pass the key (the console's cookie); ``challenge(scope)`` answers a request
    without the key instead of the JSON 401 (the console's key page)."""

    def __init__(self, app: ASGIApp, *, bind_host: str, api_key: str | None, max_body: int,
                 open_paths: Collection[str] = ("/health",),
                 authorized: Callable[[Scope], bool] | None = None,
                 challenge: Callable[[Scope], Response] | None = None) -> None:
        self.app, self.bind_host, self.api_key = app, bind_host, api_key
        self.max_body, self.open_paths = max_body, frozenset(open_paths)
        self.authorized, self.challenge = authorized, challenge

    def key_passed(self, scope: Scope) -> bool:
        return not self.api_key or bearer_ok(scope, self.api_key) or bool(
            self.authorized and self.authorized(scope))

    def refusal(self, scope: Scope) -> Response | None:
        name = host_name(scope)
        if not host_allowed(name, self.bind_host):
            return error(421, f"Host {name!r} is not this node's: call it as localhost, "
                              f"127.0.0.1 or [::1] (or its IP with --listen-all)",
                         "invalid_host")
        if scope["path"] not in self.open_paths and not self.key_passed(scope):
            if self.challenge is not None:
                return self.challenge(scope)
            return error(401, "missing or wrong API key: send 'Authorization: Bearer <key>' "
                              "(the node's --api-key)", "invalid_api_key")
        if scope["method"] in BODY_METHODS:
            kind = (header(scope, b"content-type") or b"").split(b";")[0].strip().lower()
            if kind != b"application/json":
                return error(415, f"{scope['method']} {scope['path']} needs 'Content-Type: "
                                  f"application/json', got {kind.decode(errors='replace')!r}",
                             "invalid_request_error")
            length = header(scope, b"content-length") or b"0"
            if length.isdigit() and int(length) > self.max_body:
                return self.too_large()
        return None

    def too_large(self) -> Response:
        return error(413, f"request body over {self.max_body} bytes: send a smaller one",
                     "invalid_request_error")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused = self.refusal(scope)
        if refused is not None:
            refused.headers["connection"] = "close"  # the unread body is not drained
            await refused(scope, receive, send)
            return
        seen, started = 0, False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise BodyTooLarge
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except ClientDisconnect:  # left (or was closed for being slow) mid-body: no one to tell
            return
        except BodyTooLarge:
            if started:
                raise
            response = self.too_large()
            response.headers["connection"] = "close"
            await response(scope, receive, send)
