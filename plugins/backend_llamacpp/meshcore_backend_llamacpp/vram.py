"""How much accelerator memory this node can offer: NVIDIA (NVML), Apple unified, else CPU RAM.

- NVIDIA: the sum of free memory of the visible GPUs (``CUDA_VISIBLE_DEVICES`` honoured).
- Apple silicon: ``APPLE_FRACTION`` of total RAM (macOS lets the GPU wire about that much).
- Otherwise the CPU runs the model from RAM: ``CPU_FRACTION`` of total RAM, never more than
  what is available right now.
``--max-vram GB`` caps the result (the Node applies the cap).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import sys
from dataclasses import dataclass

import psutil

log = logging.getLogger("meshcore.llamacpp")

APPLE_FRACTION = 0.75
CPU_FRACTION = 0.5


@dataclass(frozen=True)
class Capacity:
    bytes: int
    kind: str  # "cuda", "metal" or "cpu"
    devices: int  # GPUs counted; 0 for cpu

    @property
    def has_gpu(self) -> bool:
        return self.kind != "cpu"


def visible_indices(count: int, env: str | None) -> list[int]:
    """Indices of GPUs that CUDA_VISIBLE_DEVICES lets us use (all when unset)."""
    if env is None:
        return list(range(count))
    picked: list[int] = []
    for item in env.split(","):
        item = item.strip()
        if not item.isdigit():  # UUIDs or MIG names: we cannot map them; trust all GPUs
            return list(range(count)) if item else picked
        if int(item) < count:
            picked.append(int(item))
    return picked


def nvidia_free_bytes() -> tuple[int, int] | None:
    """(free bytes summed, GPU count) over visible NVIDIA GPUs, or None without NVML/GPUs."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound / DriverNotLoaded: no NVIDIA here
        return None
    try:
        indices = visible_indices(pynvml.nvmlDeviceGetCount(),
                                  os.environ.get("CUDA_VISIBLE_DEVICES"))
        free = sum(int(pynvml.nvmlDeviceGetMemoryInfo(
            pynvml.nvmlDeviceGetHandleByIndex(i)).free) for i in indices)
        return (free, len(indices)) if indices else None
    except Exception as exc:
        log.warning("NVML reported an error (%s); falling back to RAM", exc)
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def cpu_bytes() -> int:
    mem = psutil.virtual_memory()
    return int(min(mem.total * CPU_FRACTION, mem.available))


def detect() -> Capacity:
    """The node's capacity before ``--max-vram``."""
    nvidia = nvidia_free_bytes()
    if nvidia is not None:
        return Capacity(nvidia[0], "cuda", nvidia[1])
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return Capacity(int(psutil.virtual_memory().total * APPLE_FRACTION), "metal", 1)
    return Capacity(cpu_bytes(), "cpu", 0)
