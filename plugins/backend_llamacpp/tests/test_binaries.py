"""Finding llama.cpp binaries: --bin-dir, the cached build, clear errors with the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from meshcore_backend_llamacpp import binaries
from meshcore_backend_llamacpp.binaries import BackendError


def fake_bin_dir(root: Path, *, rpc: bool = True, names: tuple[str, ...] | None = None) -> Path:
    """Executables that look like a llama.cpp build (with or without the RPC client)."""
    root.mkdir(parents=True, exist_ok=True)
    body = b"#!/bin/sh\nexit 0\n# " + (binaries.RPC_MARKER if rpc else b"no rpc here") + b"\n"
    for name in names or ("llama-server", "ggml-rpc-server"):
        path = root / name
        path.write_bytes(body)
        path.chmod(0o755)
    return root


def test_bin_dir_with_both_binaries_is_used(tmp_path: Path) -> None:
    found = binaries.locate(fake_bin_dir(tmp_path / "bin"))
    assert found.llama_server == tmp_path / "bin" / "llama-server"
    binaries.check_rpc(found)


def test_env_bin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_LLM_BIN_DIR", str(fake_bin_dir(tmp_path / "env")))
    assert binaries.locate().bin_dir == tmp_path / "env"


def test_missing_binary_names_it_and_the_fix(tmp_path: Path) -> None:
    d = fake_bin_dir(tmp_path / "half", names=("llama-server",))
    with pytest.raises(BackendError, match=r"no executable ggml-rpc-server.*dev\.sh run"):
        binaries.locate(d)


def test_no_build_at_all_says_how_to_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESH_LLM_BIN_DIR", raising=False)
    monkeypatch.setattr(binaries, "cached_bin_dir", lambda: None)
    with pytest.raises(BackendError, match=r"not built yet.*meshcore_backend_llamacpp\.build"):
        binaries.locate()


def test_binary_without_rpc_is_refused(tmp_path: Path) -> None:
    found = binaries.locate(fake_bin_dir(tmp_path / "norpc", rpc=False))
    with pytest.raises(BackendError, match=r"without RPC support.*GGML_RPC=ON"):
        binaries.check_rpc(found)


def test_shared_build_with_libggml_rpc_counts_as_rpc(tmp_path: Path) -> None:
    found = binaries.locate(fake_bin_dir(tmp_path / "shared" / "bin", rpc=False))
    (tmp_path / "shared" / "lib").mkdir()
    (tmp_path / "shared" / "lib" / "libggml-rpc.so").write_bytes(b"")
    binaries.check_rpc(found)


def test_the_real_cached_build_has_rpc() -> None:
    if binaries.cached_bin_dir() is None:
        pytest.skip("llama.cpp is not built on this machine (./dev.sh run builds it)")
    binaries.check_rpc(binaries.locate())
