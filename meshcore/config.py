"""The node configuration: what the CLI (or a test) asks a node to be."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_API_PORT = 9337
DEFAULT_CONSOLE_PORT = 3131
DEFAULT_DRAFT_MAX = 8
GB = 1024**3


class ConfigError(ValueError):
    """A bad option or combination; the message names it and says what to do."""


def default_state_dir() -> Path:
    """``~/.mesh-llm``, or ``MESH_LLM_HOME`` when set (tests give each node its own)."""
    return Path(os.environ.get("MESH_LLM_HOME") or Path.home() / ".mesh-llm")


@dataclass(frozen=True)
class NodeConfig:
    model: str | None = None
    joins: tuple[str, ...] = ()
    bind_port: int = 0  # QUIC port; 0 = any free port
    split: bool = False
    client: bool = False
    console_port: int | None = None  # None = no console
    api_port: int = DEFAULT_API_PORT  # 0 = any free port
    max_vram_gb: float | None = None
    draft: str | None = None
    no_draft: bool = False
    draft_max: int = DEFAULT_DRAFT_MAX
    election: str = "vram"
    backend: str = "llamacpp"
    transport: str = "quic"
    listen_all: bool = False
    api_key: str | None = None
    state_dir: Path = field(default_factory=default_state_dir)
    bin_dir: Path | None = None
    settle_s: float = 1.0  # debounce: membership bursts give one re-plan
    max_settle_s: float = 3.0  # ... but the election never waits longer than this
    node_id: str | None = None  # None = persisted in state_dir
    options: Mapping[str, Any] = field(default_factory=dict)  # plugin-specific settings
    uis: Mapping[str, int | None] = field(default_factory=dict)  # --ui NAME[=PORT]
    election_options: Mapping[str, str] = field(default_factory=dict)  # --election-opt K=V
    name: str | None = None  # --name: a human name, announced

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.client and self.model:
            raise ConfigError("--client runs no model: drop --model, or drop --client to serve it")
        if self.client and not self.joins:
            raise ConfigError("--client needs --join TOKEN: a client only uses an existing mesh")
        if not self.client and not self.model and not self.joins:
            raise ConfigError(
                "--model is required to start a mesh (e.g. --model SmolLM2-135M), "
                "or give --join TOKEN to join one"
            )
        if self.no_draft and self.draft:
            raise ConfigError("--draft and --no-draft contradict each other: pick one")
        if self.draft_max < 1:
            raise ConfigError(f"--draft-max must be at least 1, got {self.draft_max}")
        if self.max_vram_gb is not None and self.max_vram_gb < 0:
            raise ConfigError(f"--max-vram must be >= 0 GB, got {self.max_vram_gb}")
        if self.name is not None and not (0 < len(self.name) <= 64 and self.name.isprintable()):
            raise ConfigError(f"--name must be 1-64 printable characters, got {self.name!r}")
        ports = [("--port", self.api_port), ("--bind-port", self.bind_port),
                 ("--console", self.console_port or 0)]
        ports += [(f"--ui {ui}", port or 0) for ui, port in self.uis.items()]
        for name, port in ports:
            if not 0 <= port <= 65535:
                raise ConfigError(f"{name} must be a port number 0-65535, got {port}")

    def ui_ports(self) -> dict[str, int | None]:
        """The UIs to start, name -> port (None: the UI's default); ``--console`` included."""
        uis = dict(self.uis)
        if self.console_port is not None:
            uis.setdefault("console", self.console_port)
        return uis

    @property
    def bind_host(self) -> str:
        """Where the API and console listen: loopback unless --listen-all."""
        return "0.0.0.0" if self.listen_all else "127.0.0.1"

    @property
    def max_vram_bytes(self) -> int | None:
        return None if self.max_vram_gb is None else int(self.max_vram_gb * GB)
