"""``mesh-llm status``: ask a running node for ``/mesh/status`` and show the mesh.

Imported only when the command runs (httpx and rich stay out of ``mesh-llm --help``).
Rendering is defensive: a field missing from another version's status shows as ``-``,
never as a traceback.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import httpx
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

T = TypeVar("T")
sleep = time.sleep  # between --watch refreshes (tests replace it)
GB = 1024**3
TIMEOUT_S = 5.0


class StatusError(Exception):
    """A one-line reason the status could not be read; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 1, *, auth: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.auth = auth  # the API key was missing or refused


def normalise_url(url: str) -> str:
    """``host:port`` and ``http://host:port/v1`` both mean the node at ``http://host:port``."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    if url.endswith("/v1"):
        url = url[:-3]
    return url


def fetch(client: httpx.Client, url: str, api_key: str | None) -> dict[str, Any]:
    """The node's status JSON, or :class:`StatusError` with a line a human can act on."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = client.get(f"{url}/mesh/status", headers=headers)
    except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
        raise StatusError(f"no mesh-llm node answers at {url}: start one with "
                          "'mesh-llm --model ...', or pass --url") from None
    except httpx.TimeoutException:
        raise StatusError(f"the node at {url} did not answer within {TIMEOUT_S:g} s") from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise StatusError(f"cannot ask {url}: {exc or type(exc).__name__}") from None
    if response.status_code == 401:
        if api_key:
            raise StatusError(f"the node at {url} rejected the API key: pass the one it was "
                              "started with (--api-key KEY or MESH_LLM_API_KEY)", auth=True)
        raise StatusError(f"the node at {url} requires an API key: pass --api-key KEY or "
                          "set MESH_LLM_API_KEY", auth=True)
    if response.status_code != 200:
        raise StatusError(f"{url}/mesh/status answered HTTP {response.status_code}; is it a "
                          "mesh-llm node?")
    try:
        data = response.json()
    except ValueError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("plan"), dict):
        raise StatusError(f"{url}/mesh/status did not answer a mesh-llm status (JSON object "
                          "with a plan); is it a mesh-llm node?")
    return data


# ---------------------------------------------------------------- rendering


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None


def gb(value: Any) -> str:
    n = _num(value)
    return "-" if n is None else f"{n / GB:.1f}"


def human_bytes(value: Any) -> str:
    n = _num(value)
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover - unreachable


def _text(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, Mapping) and "error" in value:
        return f"error: {value['error']}"
    return str(value)


def label(peer: Mapping[str, Any]) -> str:
    """``id (name)`` when the node announced a human name."""
    pid = _text(peer.get("id"))
    name = _dict(peer.get("extra")).get("name")
    return f"{pid} ({name})" if isinstance(name, str) and name and name != pid else pid


def render(data: Mapping[str, Any], url: str) -> RenderableType:
    """The whole screen: header, peers, tunnels and API counters."""
    plan = _dict(data.get("plan"))
    me = _dict(data.get("me")) or {"id": data.get("id"), "role": data.get("role")}
    peers = [p for p in _list(data.get("peers")) if isinstance(p, Mapping)]
    names = {p.get("id"): label(p) for p in [me, *peers]}
    host_id = plan.get("host_id")
    host = names.get(host_id, _text(host_id)) if host_id else "none"
    shares = {p.get("peer_id"): p for p in _list(plan.get("participants"))
              if isinstance(p, Mapping)}

    header = Text()
    header.append("node ", style="dim").append(label(me), style="bold")
    header.append(f"  {_text(data.get('role'))}", style="bold cyan")
    header.append(f"  at {url}  (mesh-llm {_text(data.get('version'))})\n", style="dim")
    header.append("model ", style="dim").append(_text(data.get("model")))
    header.append("  draft ", style="dim").append(_text(data.get("draft")) if data.get("draft")
                                                   else "none")
    backend = _dict(data.get("backend"))
    if backend:
        header.append("  backend ", style="dim").append(
            _text(backend.get("name") or backend.get("error")))
    header.append("\nplan ", style="dim")
    state = _text(plan.get("state"))
    header.append(state, style="bold green" if state in ("SOLO", "SPLIT") else "bold yellow")
    header.append("  host ", style="dim").append(host, style="bold")
    if plan.get("reason"):
        header.append(f"  ({plan['reason']})", style="italic")
    split = [s for s in _list(plan.get("tensor_split")) if _num(s) is not None]
    if len(split) > 1:
        header.append("\ntensor split ", style="dim").append(
            " / ".join(f"{float(s):.2f}" for s in split))
    header.append("\nmesh ", style="dim").append(
        f"{1 + len(peers)} nodes, {gb(data.get('total_vram'))} GB VRAM, generation "
        f"{_text(data.get('generation'))}")

    table = Table(title="peers", title_justify="left")
    for column, justify in (("node", "left"), ("role", "left"), ("VRAM GB", "right"),
                            ("RTT ms", "right"), ("link", "left"), ("state", "left"),
                            ("share", "right")):
        table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for peer in [me, *peers]:
        is_me = peer is me
        rtt = _num(peer.get("rtt_ms"))
        share = _dict(shares.get(peer.get("id")))
        share_text = "-" if _num(share.get("share")) is None else f"{share['share']:.2f}"
        if share.get("rpc"):
            share_text += " rpc"
        table.add_row(
            label(peer) + (" *" if is_me else ""), _text(peer.get("role")), gb(peer.get("vram")),
            "-" if rtt is None else f"{rtt:.1f}",
            "this node" if is_me else _text(peer.get("link")), _text(peer.get("serving")),
            share_text, style="bold" if peer.get("id") == host_id else None,
        )

    parts: list[RenderableType] = [header, Text(""), table]
    tunnels = [t for t in _list(data.get("tunnels")) if isinstance(t, Mapping)]
    if tunnels:
        tt = Table(title="tunnels", title_justify="left")
        for column, justify in (("peer", "left"), ("service", "left"), ("port", "right"),
                                ("path", "left"), ("to peer", "right"), ("from peer", "right"),
                                ("connections", "right")):
            tt.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
        for t in tunnels:
            tt.add_row(names.get(t.get("peer"), _text(t.get("peer"))), _text(t.get("service")),
                       _text(t.get("port")), _text(t.get("link")),
                       human_bytes(t.get("bytes_to_peer")),
                       human_bytes(t.get("bytes_from_peer")), _text(t.get("connections")))
        parts += [Text(""), tt]
    else:
        parts += [Text("tunnels: none", style="dim")]

    api = _dict(data.get("api"))
    line = Text("API ", style="dim")
    line.append(f"requests {_text(api.get('requests'))}, errors {_text(api.get('errors'))}, "
                f"prompt tokens {_text(api.get('prompt_tokens'))}, completion tokens "
                f"{_text(api.get('completion_tokens'))}")
    by_status = _dict(api.get("by_status"))
    if by_status:
        line.append("  (" + ", ".join(f"{k}: {v}" for k, v in by_status.items()) + ")")
    parts += [line]
    return Group(*parts)


# ---------------------------------------------------------------- the command


def run_status(url: str, *, as_json: bool, watch: bool, interval: float,
               api_key: str | None) -> int:
    """Print the status once (or every ``interval`` seconds with ``watch``); exit code."""
    url = normalise_url(url)
    console = Console(file=sys.stdout, highlight=False)
    try:
        with httpx.Client(timeout=TIMEOUT_S) as client:
            data = fetch(client, url, api_key)  # the first read fails loudly
            if not watch:
                if as_json:
                    print(json.dumps(data, indent=2))
                else:
                    console.print(render(data, url))
                return 0
            if as_json:  # one JSON object a line, for scripts
                print(json.dumps(data), flush=True)
                while True:
                    sleep(interval)
                    print(json.dumps(_watched(client, url, api_key, lambda d: d,
                                              lambda e: {"error": e, "time": time.time()})),
                          flush=True)
            with Live(render(data, url), console=console, auto_refresh=False) as live:
                while True:
                    sleep(interval)
                    live.update(_watched(
                        client, url, api_key, lambda d: render(d, url),
                        lambda e: Text(f"{time.strftime('%H:%M:%S')} {e}; retrying every "
                                       f"{interval:g} s", style="bold red")), refresh=True)
    except StatusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 0


def _watched(client: httpx.Client, url: str, api_key: str | None,
             shown: Callable[[dict[str, Any]], T], failed: Callable[[str], T]) -> T:
    """One refresh of ``--watch``: a node that went away (or restarts) is shown and retried;
    a refused API key ends the watch, as it will not fix itself."""
    try:
        return shown(fetch(client, url, api_key))
    except StatusError as exc:
        if exc.auth:
            raise
        return failed(str(exc))
