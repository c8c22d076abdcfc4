"""How a browser passes a keyed node's ``--api-key`` to the console: once, as ``/?key=KEY``
(or through the key page), which sets an HttpOnly, SameSite=Strict cookie and redirects to
``/``; the page's own requests then carry the cookie. Scripts send ``Authorization: Bearer``.

The cookie holds an HMAC of the key, not the key, and is named after the console's port so
two nodes on one machine do not overwrite each other's.
"""

from __future__ import annotations

import hashlib
import hmac
import html
from urllib.parse import parse_qs

from starlette.requests import cookie_parser
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import Scope

from meshcore.httpguard import error, header

COOKIE_PREFIX = "mesh_llm_console_"


def cookie_name(scope: Scope) -> str:
    server = scope.get("server")
    return f"{COOKIE_PREFIX}{server[1] if server and server[1] else 'key'}"


def cookie_value(api_key: str) -> str:
    return hmac.new(api_key.encode(), b"mesh-llm console cookie", hashlib.sha256).hexdigest()


def query_key(scope: Scope) -> str | None:
    """``?key=`` of a request for the page (``/``) only, the one place it is read."""
    if scope["path"] != "/":
        return None
    keys = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("key")
    return keys[0] if keys else None


def passes_key(scope: Scope, api_key: str) -> bool:
    """Whether the request holds the console's cookie for ``api_key`` or is ``/?key=KEY``
    (compared in constant time, as bytes)."""
    cookies = cookie_parser((header(scope, b"cookie") or b"").decode("latin-1"))
    given = cookies.get(cookie_name(scope), "")
    if hmac.compare_digest(given.encode(), cookie_value(api_key).encode()):
        return True
    key = query_key(scope)
    return key is not None and hmac.compare_digest(key.encode(), api_key.encode())


def enter_with_key(scope: Scope, api_key: str) -> Response:
    """The answer to ``/?key=KEY`` (already checked): the cookie, and the page without the key
    in its address."""
    response = RedirectResponse("/", 303)
    response.set_cookie(cookie_name(scope), cookie_value(api_key), httponly=True,
                        samesite="strict", path="/")
    return response


KEY_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>mesh-llm console: API key</title><style>body{font:14px system-ui,sans-serif;
max-width:520px;margin:40px auto;background:#0f1419;color:#e6e6e6}</style></head><body>
<h2>This node needs its API key</h2>
<p>{why}Enter the key the node was started with (<code>--api-key</code>); the console keeps
it in a cookie for this browser.</p>
<form method="get" action="/" id="key-form"><input id="key-input" name="key" type="password"
autocomplete="current-password" autofocus> <button type="submit">Open</button></form>
</body></html>"""


def key_challenge(scope: Scope) -> Response:
    """A request without the key: the key page for a browser opening ``/``, else JSON 401.
    The static files stay behind the key too, so the page styles itself inline."""
    accept = (header(scope, b"accept") or b"").decode("latin-1")
    if scope["path"] == "/" and "text/html" in accept:
        why = "That key is wrong. " if query_key(scope) is not None else ""
        return HTMLResponse(KEY_PAGE.replace("{why}", html.escape(why)), 401)
    return error(401, "this console needs the node's --api-key: open /?key=KEY in a browser, "
                      "or send 'Authorization: Bearer <key>'", "invalid_api_key")
