"""VRAM detection: NVML when present, Apple unified memory, else a fraction of RAM."""

from __future__ import annotations

import sys
import types
from typing import Any

import psutil
import pytest
from meshcore_backend_llamacpp import vram


def test_visible_indices_honours_cuda_visible_devices() -> None:
    assert vram.visible_indices(4, None) == [0, 1, 2, 3]
    assert vram.visible_indices(4, "2,0") == [2, 0]
    assert vram.visible_indices(4, "1,7") == [1]
    assert vram.visible_indices(4, "") == []


def test_cpu_fallback_is_a_fraction_of_ram(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vram, "nvidia_free_bytes", lambda: None)
    monkeypatch.setattr(vram.sys, "platform", "linux")
    cap = vram.detect()
    mem = psutil.virtual_memory()
    assert cap.kind == "cpu" and not cap.has_gpu
    assert 0 < cap.bytes <= mem.total * vram.CPU_FRACTION


def test_apple_silicon_uses_unified_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vram, "nvidia_free_bytes", lambda: None)
    monkeypatch.setattr(vram.sys, "platform", "darwin")
    monkeypatch.setattr(vram.platform, "machine", lambda: "arm64")
    cap = vram.detect()
    assert cap.kind == "metal" and cap.has_gpu
    assert cap.bytes == int(psutil.virtual_memory().total * vram.APPLE_FRACTION)


def fake_pynvml(free: list[int], fail_init: bool = False) -> Any:
    mod = types.ModuleType("pynvml")

    def init() -> None:
        if fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    mod.nvmlInit = init  # type: ignore[attr-defined]
    mod.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    mod.nvmlDeviceGetCount = lambda: len(free)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    mod.nvmlDeviceGetMemoryInfo = (  # type: ignore[attr-defined]
        lambda h: types.SimpleNamespace(free=free[h], total=2 * free[h]))
    return mod


def test_nvidia_sums_free_memory_of_visible_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([10, 20, 40]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,2")
    cap = vram.detect()
    assert (cap.bytes, cap.kind, cap.devices) == (50, "cuda", 2)


def test_nvml_without_driver_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([10], fail_init=True))
    assert vram.nvidia_free_bytes() is None
