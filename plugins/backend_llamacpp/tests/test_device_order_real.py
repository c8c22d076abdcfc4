"""llama.cpp b11434's device order, proven on real processes (CPU, SmolLM2, -t 1).

``--tensor-split`` follows the ``--rpc`` order (RPC devices come first, before any local
GPU), and on a CPU-only host the layout from :func:`commands.layout` keeps exactly the host's
share of layers on its CPU. llama-server's ``-v`` log says where each layer went.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
from meshcore_backend_llamacpp import binaries, commands
from meshcore_backend_llamacpp.build import cached_bin_dir
from meshcore_backend_llamacpp.process import (
    free_port,
    supervised,
    wait_healthy,
    wait_listening,
)

from meshcore.plan import Participant, Plan, PlanState

pytestmark = [pytest.mark.real, pytest.mark.anyio]
LAYER_RE = re.compile(r"layer\s+(\d+) assigned to device (\w+)")


@pytest.fixture
def bins() -> binaries.Binaries:
    if cached_bin_dir() is None:
        pytest.skip("llama.cpp is not built; run ./dev.sh run first")
    return binaries.locate()


@pytest.fixture
def model() -> Path:
    from meshcore_backend_llamacpp.models import smollm2_path

    return smollm2_path()


async def layers_per_device(bins: binaries.Binaries, model: Path, tmp_path: Path,
                            lay: commands.Layout) -> dict[int, str]:
    """Start one rpc-server per worker and llama-server with ``lay``; where each layer went
    (layer -> device name), checked against :func:`commands.device_of_layers`."""
    async with supervised("rpc-a", commands.rpc_server_argv(
            bins.rpc_server, port=(pa := free_port()), threads=1, cache=False), tmp_path) as a, \
            supervised("rpc-b", commands.rpc_server_argv(
                bins.rpc_server, port=(pb := free_port()), threads=1, cache=False),
                tmp_path) as b:
        await wait_listening(a, pa, 30)
        await wait_listening(b, pb, 30)
        endpoints = [f"127.0.0.1:{p}" for p in (pa, pb)][:len(lay.rpc_peers)]
        port = free_port()
        argv = commands.llama_server_argv(bins.llama_server, model, port=port, threads=1,
                                          lay=lay, rpc_endpoints=endpoints, extra=["-v"])
        async with supervised("llama-server", argv, tmp_path) as server:
            await wait_healthy(server, port, 120)
    text = (tmp_path / "llama-server.log").read_text(errors="replace")
    # llama-server may place layers twice (a --fit dry run, then the load): the last wins
    final = {int(layer): dev for layer, dev in LAYER_RE.findall(text)}
    from meshcore_backend_llamacpp.gguf_info import block_count

    predicted = commands.device_of_layers(lay, block_count(model))
    names = {-1: "CPU", **{i: f"RPC{i}" for i in range(len(lay.rpc_peers))}}
    assert final == {layer: names[dev] for layer, dev in enumerate(predicted)}, \
        "llama.cpp placed layers differently from commands.device_of_layers"
    return final


async def test_tensor_split_follows_the_rpc_order(bins: binaries.Binaries, model: Path,
                                                  tmp_path: Path) -> None:
    lay = commands.Layout(("a", "b"), (0.75, 0.25), commands.ALL_LAYERS, 0)
    placed = Counter((await layers_per_device(bins, model, tmp_path, lay)).values())
    assert set(placed) == {"RPC0", "RPC1"}  # no local device on a CPU host
    assert placed["RPC0"] > 2 * placed["RPC1"]  # the first --rpc entry got 0.75
    assert abs(placed["RPC0"] / sum(placed.values()) - 0.75) < 0.06


async def test_cpu_host_runs_the_plans_shares(bins: binaries.Binaries, model: Path,
                                              tmp_path: Path) -> None:
    from meshcore_backend_llamacpp.gguf_info import block_count

    n_layer = block_count(model)
    plan = Plan(PlanState.SPLIT, "host", (Participant("host", 8, 0.67, False),
                                          Participant("w", 4, 0.33, True)), model="m")
    lay = commands.layout(plan, host_has_gpu=False, n_layer=n_layer)
    placed = Counter((await layers_per_device(bins, model, tmp_path, lay)).values())
    print(f"layers per device: {dict(placed)} for shares 0.67/0.33 (ngl {lay.ngl})")
    assert placed["CPU"] == lay.host_layers_on_cpu == n_layer + 1 - lay.ngl
    assert placed["RPC0"] == lay.ngl  # llama.cpp also logs the output layer (n_layer + 1)
    assert sum(placed.values()) == n_layer + 1
    host_share = placed["CPU"] / (n_layer + 1)
    assert abs(host_share - 0.67) < 0.05, placed
