"""`mesh-llm` refuses a missing model, a non-GGUF file and an RPC-less llama.cpp with one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from test_binaries import fake_bin_dir


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MESH_LLM_HOME": str(tmp_path / "home"), "MESH_LLM_THREADS": "1"}
    env.pop("MESH_LLM_BIN_DIR", None)
    return subprocess.run([sys.executable, "-m", "meshcore_cli", "--port", "0", *args],
                          env=env, capture_output=True, text=True, timeout=120)


def error_lines(out: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in out.stderr.splitlines() if line.startswith("error:")]


def test_missing_model_path(tmp_path: Path) -> None:
    bins = fake_bin_dir(tmp_path / "bin")
    out = run_cli(tmp_path, "--bin-dir", str(bins), "--model", str(tmp_path / "nope.gguf"))
    assert out.returncode != 0
    assert len(error_lines(out)) == 1, out.stderr
    assert "nope.gguf does not exist" in error_lines(out)[0]


def test_non_gguf_model(tmp_path: Path) -> None:
    bins = fake_bin_dir(tmp_path / "bin")
    fake = tmp_path / "model.gguf"
    fake.write_text("definitely not weights\n")
    out = run_cli(tmp_path, "--bin-dir", str(bins), "--model", str(fake))
    assert out.returncode != 0
    assert len(error_lines(out)) == 1, out.stderr
    assert "is not a GGUF file" in error_lines(out)[0]


def test_llama_cpp_without_rpc(tmp_path: Path) -> None:
    bins = fake_bin_dir(tmp_path / "bin", rpc=False)
    out = run_cli(tmp_path, "--bin-dir", str(bins), "--model", "SmolLM2-135M")
    assert out.returncode != 0
    assert len(error_lines(out)) == 1, out.stderr
    assert "without RPC support" in error_lines(out)[0] and "GGML_RPC=ON" in out.stderr


def test_missing_binaries(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    out = run_cli(tmp_path, "--bin-dir", str(tmp_path / "empty"), "--model", "SmolLM2-135M")
    assert out.returncode != 0
    assert len(error_lines(out)) == 1, out.stderr
    assert "no executable llama-server" in error_lines(out)[0]
