"""What this node's llama.cpp processes run with: binaries, device, threads, the model's layers.

One mutable object the backend fills in (``detect_vram``, ``prepare``) and its host, worker and
hand-over parts read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from meshcore_backend_llamacpp import binaries, vram


@dataclass
class Machine:
    """The local resources of the llama.cpp backend."""

    state_dir: Path
    threads: int
    capacity: vram.Capacity = field(default_factory=lambda: vram.Capacity(0, "cpu", 0))
    bins: binaries.Binaries | None = None
    n_layer: int = 0  # block count of the node's own model (0: none, or not read yet)

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def rpc_cache(self) -> Path:
        """``$LLAMA_CACHE`` of this node's rpc-server (its hash cache is :attr:`hash_dir`)."""
        return self.state_dir / "rpc-cache"

    @property
    def hash_dir(self) -> Path:
        """Where rpc-server ``-c`` looks entries up (``$LLAMA_CACHE/rpc``): what seeding fills."""
        return self.rpc_cache / "rpc"
