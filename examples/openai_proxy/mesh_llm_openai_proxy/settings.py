"""The backend's settings, read from ``NodeConfig.options`` (``MESH_LLM_OPTIONS`` on the CLI).

Every key starts with ``proxy_`` so it cannot collide with another plugin's options:

- ``proxy_url``: base URL of an existing OpenAI-compatible server (``http://127.0.0.1:8000``;
  a trailing ``/v1`` is accepted). Absent: the backend answers with its built-in echo model.
- ``proxy_model``: the model name announced to the mesh (default: ``--model``).
- ``proxy_upstream_model``: rewrite the ``model`` field of forwarded JSON requests to this
  (when the upstream server knows the model under another name).
- ``proxy_api_key``: sent upstream as ``Authorization: Bearer ...`` (replacing the client's).
- ``proxy_vram_gb``: the VRAM this node reports to the election (default 16).
- ``proxy_model_gb``: the model size reported to the election (default 1).
- ``proxy_timeout_s``: upstream connect/read timeout per request (default 600).
- ``proxy_ready_timeout_s``: how long to wait for the upstream at start before reporting
  ``error`` (it keeps retrying after that; default 30).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from meshcore.config import ConfigError

GB = 1024**3
DEFAULT_VRAM_GB = 16.0
DEFAULT_MODEL_GB = 1.0


def _number(options: Mapping[str, Any], key: str, default: float, *,
            positive: bool = False) -> float:
    """``options[key]`` as a finite float (numbers or numeric strings); ConfigError otherwise."""
    raw = options.get(key)
    if raw is None:
        return default
    try:
        if isinstance(raw, bool):
            raise TypeError
        value = float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"option {key} must be a number, got {raw!r:.60}") from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        need = "> 0" if positive else ">= 0"
        raise ConfigError(f"option {key} must be a finite number {need}, got {raw!r:.60}")
    return value


def _text(options: Mapping[str, Any], key: str) -> str | None:
    raw = options.get(key)
    if raw is None:
        return None
    if not isinstance(raw, str) or not raw.strip() or not raw.isprintable():
        raise ConfigError(f"option {key} must be a non-empty printable string, got {raw!r:.60}")
    return raw.strip()


def normalize_url(url: str) -> str:
    """``http://host:port`` from what a user may type (trailing ``/``, ``/v1``)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"option proxy_url must be an http(s) URL such as "
                          f"http://127.0.0.1:8000, got {url!r:.80}")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return f"{parts.scheme}://{parts.netloc}{path}"


@dataclass(frozen=True)
class ProxySettings:
    """What the ``openai-proxy`` backend was asked to do."""

    proxy_url: str | None
    model: str | None
    upstream_model: str | None
    api_key: str | None
    vram_bytes: int
    model_bytes: int
    timeout_s: float
    ready_timeout_s: float

    @property
    def mode(self) -> str:
        """``proxy`` (forwarding to ``proxy_url``) or ``echo`` (the built-in model)."""
        return "echo" if self.proxy_url is None else "proxy"

    @classmethod
    def from_options(cls, options: Mapping[str, Any], config_model: str | None) -> ProxySettings:
        """Parse and check the options; raises :class:`meshcore.config.ConfigError`."""
        url = _text(options, "proxy_url")
        return cls(
            proxy_url=None if url is None else normalize_url(url),
            model=_text(options, "proxy_model") or config_model,
            upstream_model=_text(options, "proxy_upstream_model"),
            api_key=_text(options, "proxy_api_key"),
            vram_bytes=int(_number(options, "proxy_vram_gb", DEFAULT_VRAM_GB) * GB),
            model_bytes=max(1, int(_number(options, "proxy_model_gb", DEFAULT_MODEL_GB) * GB)),
            timeout_s=_number(options, "proxy_timeout_s", 600.0, positive=True),
            ready_timeout_s=_number(options, "proxy_ready_timeout_s", 30.0),
        )
