"""The node's persistent id, kept in the state dir."""

from __future__ import annotations

import secrets
from pathlib import Path


def load_node_id(state_dir: Path) -> str:
    """Read ``state_dir/node-id``, creating it (12 hex chars) on first start."""
    path = state_dir / "node-id"
    try:
        value = path.read_text().strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    value = secrets.token_hex(6)
    path.write_text(value + "\n")
    return value
