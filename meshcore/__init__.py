"""meshcore: the small core of mesh-llm (hooks, data model, node lifecycle, API, CLI)."""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

PROJECT = "meshcore"

hookimpl = pluggy.HookimplMarker(PROJECT)
"""Marker for plugin hook implementations: ``@hookimpl def meshcore_register_backends(...)``."""

__all__ = ["PROJECT", "__version__", "hookimpl"]
