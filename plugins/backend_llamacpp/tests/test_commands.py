"""Command lines and device layouts: solo has no --rpc, splits follow llama.cpp's device order."""

from __future__ import annotations

from pathlib import Path

import pytest
from meshcore_backend_llamacpp import commands
from meshcore_backend_llamacpp.commands import (
    OUTPUT_ON_CPU,
    Layout,
    effective_shares,
    layout,
    llama_server_argv,
)

from meshcore.plan import Participant, Plan, PlanState

BIN = Path("/opt/llama/llama-server")
MODEL = Path("/m/model.gguf")
GB = 1024**3


def solo() -> Plan:
    return Plan(PlanState.SOLO, "host", (Participant("host", 8, 1.0, False),), model="m")


def split(*workers: tuple[str, float], host_share: float) -> Plan:
    parts = (Participant("host", 8, host_share, False),
             *(Participant(w, 4, s, True) for w, s in workers))
    return Plan(PlanState.SPLIT, "host", parts, model="m")


def test_solo_argv_has_no_rpc_and_offloads_everything() -> None:
    lay = layout(solo(), host_has_gpu=True, n_layer=30)
    argv = llama_server_argv(BIN, MODEL, port=1234, threads=1, lay=lay)
    assert "--rpc" not in argv and "--tensor-split" not in argv
    assert argv[:3] == [str(BIN), "-m", str(MODEL)]
    assert argv[argv.index("-ngl") + 1] == "99"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "1234"
    assert argv[argv.index("-t") + 1] == "1"
    assert effective_shares(lay, 30) == (1.0,)


def test_gpu_host_split_puts_rpc_devices_first_then_the_host() -> None:
    plan = split(("w1", 0.25), ("w2", 0.15), host_share=0.6)
    lay = layout(plan, host_has_gpu=True, n_layer=30)
    assert lay.rpc_peers == ("w1", "w2")
    assert lay.tensor_split == (0.25, 0.15, 0.6)  # RPC0, RPC1, then the local GPU
    argv = llama_server_argv(BIN, MODEL, port=1, threads=1, lay=lay,
                             rpc_endpoints=["127.0.0.1:5001", "127.0.0.1:5002"])
    assert argv[argv.index("--rpc") + 1] == "127.0.0.1:5001,127.0.0.1:5002"
    assert argv[argv.index("--tensor-split") + 1] == "0.25,0.15,0.60"
    assert effective_shares(lay, 30) == (0.6, 0.25, 0.15)


def test_cpu_host_keeps_its_share_of_layers_on_the_cpu() -> None:
    plan = split(("w1", 0.33), host_share=0.67)
    lay = layout(plan, host_has_gpu=False, n_layer=30)
    # 31 offloadable layers (30 blocks + output): the worker gets round(0.33 * 31) = 10
    assert lay.ngl == 10 and lay.host_layers_on_cpu == 21
    assert lay.tensor_split == (0.33,)
    host, worker = effective_shares(lay, 30)
    assert abs(host - 0.67) <= 0.02 and abs(worker - 0.33) <= 0.02


def test_cpu_host_two_workers_split_the_offloaded_layers_by_share() -> None:
    lay = layout(split(("a", 0.3), ("b", 0.2), host_share=0.5), host_has_gpu=False, n_layer=30)
    assert lay.ngl == 16 and lay.tensor_split == (0.3, 0.2)
    assert effective_shares(lay, 30) == pytest.approx((0.48, 0.31, 0.21), abs=0.011)


def test_rpc_endpoint_count_must_match_the_workers() -> None:
    lay = Layout(("w1",), (0.5, 0.5), 99, 0)
    with pytest.raises(ValueError, match="1 workers"):
        llama_server_argv(BIN, MODEL, port=1, threads=1, lay=lay, rpc_endpoints=[])


def test_draft_flags_use_b11434_names() -> None:
    lay = layout(solo(), host_has_gpu=False, n_layer=30)
    argv = llama_server_argv(BIN, MODEL, port=1, threads=2, lay=lay, draft=Path("/d.gguf"),
                             draft_max=5, draft_devices="none", no_mmap=True, alias="m")
    text = " ".join(argv)
    assert "-md /d.gguf --spec-type draft-simple --spec-draft-n-max 5 -devd none" in text
    assert "--draft-max" not in text and "--no-mmap" not in argv
    assert argv[argv.index("--load-mode") + 1] == "none"
    assert argv[argv.index("--alias") + 1] == "m"


@pytest.mark.parametrize(("mode", "has_draft", "split", "runs"), [
    ("auto", True, True, "draft"), ("auto", True, False, "draft"),
    ("auto", False, True, "ngram"), ("auto", False, False, None),  # solo: nothing to save
    ("draft", False, True, None), ("draft", True, False, "draft"),
    ("ngram", True, False, "ngram"), ("off", True, True, None),
])
def test_speculation_mode(mode: str, has_draft: bool, split: bool, runs: str | None) -> None:
    assert commands.speculation(mode, has_draft=has_draft, split=split) == runs


def test_unknown_speculation_mode_names_the_choices() -> None:
    with pytest.raises(ValueError, match="auto, draft, ngram, off, got 'eagle'"):
        commands.speculation("eagle", has_draft=False, split=True)


def test_ngram_flags_and_a_draft_wins() -> None:
    lay = Layout(("w1",), (0.5, 0.5), 99, 0)
    argv = llama_server_argv(BIN, MODEL, port=1, threads=1, lay=lay, rpc_endpoints=["a:1"],
                             ngram=True)
    text = " ".join(argv)
    assert ("--spec-type ngram-simple --spec-ngram-simple-size-n 4 "
            "--spec-ngram-simple-size-m 16") in text
    both = llama_server_argv(BIN, MODEL, port=1, threads=1, lay=lay, rpc_endpoints=["a:1"],
                             ngram=True, draft=Path("/d.gguf"))
    assert both[both.index("--spec-type") + 1] == "draft-simple" and "ngram-simple" not in both


def test_local_devices_keep_the_draft_on_the_host() -> None:
    assert commands.local_devices("cpu", 0) == "none"
    assert commands.local_devices("cuda", 2) == "CUDA0,CUDA1"
    assert commands.local_devices("metal", 1) == "MTL0"


def test_rpc_server_argv_binds_loopback_with_the_hash_cache() -> None:
    argv = commands.rpc_server_argv(Path("/b/ggml-rpc-server"), port=7, threads=1)
    assert argv == ["/b/ggml-rpc-server", "-H", "127.0.0.1", "-p", "7", "-t", "1", "-c"]


def test_threads_from_env_then_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_LLM_THREADS", "1")
    assert commands.default_threads({"threads": 4}) == 1
    monkeypatch.delenv("MESH_LLM_THREADS")
    assert commands.default_threads({"threads": 4}) == 4
    assert commands.default_threads({}) >= 1


def test_device_of_layers_gpu_host_rpc_first() -> None:
    # 7 blocks + output = 8 layers, all offloaded; rpc a 0.25, rpc b 0.25, host 0.5
    lay = commands.Layout(("a", "b"), (0.25, 0.25, 0.5), commands.ALL_LAYERS, 0)
    assert commands.device_of_layers(lay, 7) == [0, 0, 1, 1, 2, 2, 2, 2]
    assert commands.worker_layers(lay, 7, "b") == {2, 3}
    assert commands.worker_layers(lay, 7, "host") == set()


def test_device_of_layers_cpu_host_keeps_the_first_layers() -> None:
    # CPU host: the last ngl layers go to the workers, the rest stay on the host's CPU
    lay = commands.Layout(("a",), (1.0,), 3, 5)
    assert commands.device_of_layers(lay, 7) == [-1, -1, -1, -1, -1, 0, 0, 0]
    assert commands.worker_layers(lay, 7, "a") == {5, 6, 7}
    solo = commands.Layout((), (), commands.ALL_LAYERS, 0)
    assert commands.device_of_layers(solo, 3) == [0, 0, 0, 0]


def test_a_cpu_host_keeps_the_output_matrix_so_the_logits_never_cross() -> None:
    workers = [Participant("w", 4 * GB, 0.5, True)]
    cpu = layout(Plan(PlanState.SPLIT, "h", (Participant("h", 4 * GB, 0.5, False), *workers)),
                 host_has_gpu=False, n_layer=30)
    argv = llama_server_argv(BIN, MODEL, port=1, threads=1, lay=cpu, rpc_endpoints=["x:1"])
    assert argv[argv.index("-ot") + 1] == OUTPUT_ON_CPU
    # anchored: "output\.weight" alone would also pull every layer's attn_output.weight back
    assert all(p.startswith("^") and "$=" in p for p in OUTPUT_ON_CPU.split(","))
    gpu = layout(Plan(PlanState.SPLIT, "h", (Participant("h", 4 * GB, 0.5, False), *workers)),
                 host_has_gpu=True, n_layer=30)
    assert "-ot" not in llama_server_argv(BIN, MODEL, port=1, threads=1, lay=gpu,
                                          rpc_endpoints=["x:1"])  # the host's GPU is last
    solo = layout(Plan(PlanState.SOLO, "h", (Participant("h", 4 * GB, 1.0, False),)),
                  host_has_gpu=False, n_layer=30)
    assert "-ot" not in llama_server_argv(BIN, MODEL, port=1, threads=1, lay=solo)
