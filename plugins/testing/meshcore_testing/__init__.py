"""meshcore's test kit, for plugin authors and our own tests (distribution meshcore-testing).

A plugin (entry point ``testing``) registering the ``fake`` backend and the ``memory``
transport; the in-process harness (:class:`MeshHarness`, :func:`run_mesh`); pollers; and the
pytest plugin (``pytest11``) with the ``mesh_harness`` and ``mesh_process`` fixtures. Nothing
of it is loaded by a production node unless the user names ``--backend fake`` or
``--transport memory``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshcore_testing.fakes import (
    FakeBackend,
    MemoryByteStream,
    MemoryHub,
    MemoryTransport,
    build_fake_openai,
    fake_reply,
    meshcore_register_backends,
    meshcore_register_transports,
)

if TYPE_CHECKING:
    from meshcore_testing.harness import (
        HealthPoller,
        MeshHarness,
        election_request,
        port_open,
        run_mesh,
        wait_until,
    )

_HARNESS = {"HealthPoller", "MeshHarness", "election_request", "port_open", "run_mesh",
            "wait_until"}


def __getattr__(name: str) -> object:
    """The harness names, imported on first use: the plugin itself (the fakes) must stay
    light, since ``mesh-llm --help`` loads every plugin (and the harness imports the Node)."""
    if name in _HARNESS:
        from meshcore_testing import harness

        return getattr(harness, name)
    raise AttributeError(f"module 'meshcore_testing' has no attribute {name!r}")

__all__ = [
    "FakeBackend",
    "HealthPoller",
    "MemoryByteStream",
    "MemoryHub",
    "MemoryTransport",
    "MeshHarness",
    "build_fake_openai",
    "election_request",
    "fake_reply",
    "meshcore_register_backends",
    "meshcore_register_transports",
    "port_open",
    "run_mesh",
    "wait_until",
]
