"""pytest plugin (``pytest11`` entry point): fixtures for testing meshcore plugins."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from meshcore.testing import run_mesh


@pytest.fixture
def mesh_harness(tmp_path: Path) -> Callable[..., Any]:
    """Factory of in-process meshes: ``async with mesh_harness() as mesh: await mesh.add(8)``."""
    return functools.partial(run_mesh, tmp_path / "nodes")
