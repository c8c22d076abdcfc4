"""The llama.cpp build's CPU options: AMX is compiled out where the CPU advertises it (ggml's
AMX matmul crashed every llama-server start on a Sapphire Rapids VM), and the option is part
of the cache key, so a build made with AMX is not reused."""

from __future__ import annotations

import subprocess

import pytest
from meshcore_backend_llamacpp.build import NO_AMX, BuildSpec, cpu_options

AMX_CPU = "avx2 avx512f amx_bf16 amx_int8 amx_tile fma"


def test_amx_is_compiled_out_only_where_the_cpu_has_it() -> None:
    assert cpu_options("avx2 avx512f fma") == ()
    opts = cpu_options(AMX_CPU)
    assert f"-DCMAKE_C_FLAGS={NO_AMX}" in opts and f"-DCMAKE_CXX_FLAGS={NO_AMX}" in opts


def test_the_cpu_options_change_the_cache_key() -> None:
    with_amx = BuildSpec("b1", ("-DGGML_RPC=ON",), AMX_CPU)
    without = BuildSpec("b1", ("-DGGML_RPC=ON", *cpu_options(AMX_CPU)), AMX_CPU)
    assert with_amx.key != without.key


def test_gcc_drops_amx_even_with_march_native() -> None:
    """The flags must win over ``-march=native`` whatever their order on the command line
    (ggml adds -march=native after CMAKE_C_FLAGS)."""
    try:
        out = subprocess.run(["gcc", *NO_AMX.split(), "-march=sapphirerapids", "-dM", "-E",
                              "-"], input="", capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("no gcc on this machine")
    assert out.returncode == 0, out.stderr
    assert "__AVX512F__" in out.stdout and "__AMX" not in out.stdout
