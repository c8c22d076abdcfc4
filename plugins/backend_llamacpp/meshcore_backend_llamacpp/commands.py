"""Pure decisions: llama-server / ggml-rpc-server command lines and the device layout of a plan.

llama.cpp b11434 orders devices as: every ``--rpc`` entry first (in the order given), then
local GPUs (src/llama.cpp, "add RPC servers at the front of the list"); ``--tensor-split``
follows that order. The CPU is never a split device: layers that are not offloaded (the first
``n_layer + 1 - ngl`` of them) stay on the CPU. So:

- GPU host (``cuda``/``metal``): ``-ngl 99``, ``--rpc w1,w2``, ``--tensor-split s_w1,s_w2,s_host``.
- CPU host: the host's share stays on its CPU by offloading only the workers' share of layers
  (``-ngl round(workers_share * (n_layer + 1))``) and splitting those among the workers.
  Measured against giving the host's share to a local rpc-server: see docs/backend.md.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from meshcore.plan import Plan

ALL_LAYERS = 99
# A CPU host offloads the *last* layers, the output layer with them, so the last worker would
# send the logits back every token (SmolLM2: 196,616 B, vocabulary x 4 bytes) and receive a
# copy of a tied embedding at load (30 MB). Overriding the output matrix (or the tied
# embedding it duplicates) to the host's CPU buffer makes the last hidden state cross
# instead (2,312 B a token, one round trip as before; 33.6 MB loaded instead of 63.7). The
# patterns are anchored: ``output\.weight`` alone also matches every ``attn_output.weight``,
# which cost 16 round trips a token.
OUTPUT_ON_CPU = r"^token_embd\.weight$=CPU,^output\.weight$=CPU"
# llama.cpp's draft-free speculation: look the last 4 tokens up in the context and propose the
# 16 that followed them there. A split pays a network round trip per decode step, so every
# accepted token is a round trip saved; where nothing matches, nothing is drafted. llama.cpp's
# default lookup of 12 tokens hardly ever matches. Measured in docs/benchmarks.md.
NGRAM = ("--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "4",
         "--spec-ngram-simple-size-m", "16")
SPECULATION_MODES = ("auto", "draft", "ngram", "off")


def speculation(mode: str, *, has_draft: bool, split: bool) -> str | None:
    """The speculative decoding a host runs: ``"draft"``, ``"ngram"`` or None. ``auto`` (the
    default): the draft model when there is one, else n-gram lookup on split plans only (a
    round trip saved per accepted token; solo gains nothing measurable on prose)."""
    if mode not in SPECULATION_MODES:
        raise ValueError(f"speculation must be one of {', '.join(SPECULATION_MODES)}, "
                         f"got {mode!r}")
    if mode == "off":
        return None
    if mode == "ngram":
        return "ngram"
    if has_draft:
        return "draft"
    return "ngram" if mode == "auto" and split else None


def default_threads(options: Mapping[str, Any] | None = None) -> int:
    """Threads per llama.cpp process: MESH_LLM_THREADS, else ``options["threads"]``, else the
    number of physical cores (tests pass MESH_LLM_THREADS=1)."""
    value = os.environ.get("MESH_LLM_THREADS") or (options or {}).get("threads")
    if value:
        return max(1, int(value))
    return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)


@dataclass(frozen=True)
class Layout:
    """How a plan maps onto llama-server's devices."""

    rpc_peers: tuple[str, ...]  # peer ids, in --rpc (= device) order
    tensor_split: tuple[float, ...]  # in device order; () when solo
    ngl: int
    host_layers_on_cpu: int  # CPU host: layers the host keeps; 0 on GPU hosts
    output_on_host: bool = False  # CPU host with workers: the output matrix stays on its CPU

    def to_dict(self) -> dict[str, Any]:
        return {"rpc_peers": list(self.rpc_peers), "tensor_split": list(self.tensor_split),
                "ngl": self.ngl, "host_layers_on_cpu": self.host_layers_on_cpu,
                "output_on_host": self.output_on_host}


def layout(plan: Plan, *, host_has_gpu: bool, n_layer: int) -> Layout:
    """The device layout that makes llama-server run exactly the plan's shares."""
    workers = plan.workers
    if not workers:
        return Layout((), (), ALL_LAYERS, 0)
    ids = tuple(w.peer_id for w in workers)
    host = next((p for p in plan.participants if not p.rpc), None)
    host_share = host.share if host is not None else 0.0
    if host_has_gpu:
        split = (*(w.share for w in workers), host_share)
        return Layout(ids, split, ALL_LAYERS, 0)
    blocks = n_layer + 1  # llama.cpp counts the output layer as one more offloadable layer
    ngl = min(blocks, max(1, round((1.0 - host_share) * blocks)))
    return Layout(ids, tuple(w.share for w in workers), ngl, blocks - ngl, output_on_host=True)


def effective_shares(lay: Layout, n_layer: int) -> tuple[float, ...]:
    """Layer fractions per participant as llama-server will place them, host first."""
    blocks = n_layer + 1
    if not lay.rpc_peers:
        return (1.0,)
    if lay.host_layers_on_cpu or lay.ngl < blocks:
        gpu_part = lay.ngl / blocks
        total = sum(lay.tensor_split) or 1.0
        return (round(lay.host_layers_on_cpu / blocks, 2),
                *(round(gpu_part * s / total, 2) for s in lay.tensor_split))
    *workers, host = lay.tensor_split
    return (host, *workers)


def device_of_layers(lay: Layout, n_layer: int) -> list[int]:
    """Where llama.cpp b11434 puts each of the ``n_layer + 1`` layers (the last one is the
    output layer): -1 for the host's CPU, else the index into ``lay.tensor_split`` (``--rpc``
    entries first). Its rule: the last ``ngl`` layers are offloaded, and offloaded layer
    ``i`` goes to the first device whose cumulative split share exceeds ``i / offloaded``
    (``test_device_order_real.py`` checks this against llama-server's own log)."""
    blocks = n_layer + 1
    offloaded = min(lay.ngl, blocks)
    first = blocks - offloaded
    split = lay.tensor_split or (1.0,)
    total = sum(split) or 1.0
    bounds, acc = [], 0.0
    for share in split:
        acc += share
        bounds.append(acc / total)
    out = []
    for layer in range(blocks):
        if layer < first:
            out.append(-1)
            continue
        where = bisect.bisect_right(bounds, (layer - first) / offloaded)
        out.append(min(where, len(split) - 1))
    return out


def worker_layers(lay: Layout, n_layer: int, peer_id: str) -> set[int]:
    """The layers the worker ``peer_id`` will hold under ``lay`` (empty when it holds none)."""
    if peer_id not in lay.rpc_peers:
        return set()
    index = lay.rpc_peers.index(peer_id)
    return {layer for layer, dev in enumerate(device_of_layers(lay, n_layer)) if dev == index}


def local_devices(kind: str, count: int) -> str:
    """The host's own device names for ``-devd`` (``none`` keeps the draft on the CPU)."""
    if kind == "cuda":
        return ",".join(f"CUDA{i}" for i in range(max(1, count)))
    if kind == "metal":
        return "MTL0"
    return "none"


def fmt_split(values: Sequence[float]) -> str:
    return ",".join(f"{v:.2f}" for v in values)


def llama_server_argv(
    binary: Path, model: Path, *, port: int, threads: int, lay: Layout,
    rpc_endpoints: Sequence[str] = (), draft: Path | None = None, draft_max: int = 8,
    draft_devices: str | None = None, no_mmap: bool = False, alias: str | None = None,
    ngram: bool = False, extra: Sequence[str] = (),
) -> list[str]:
    """llama-server's command line. Solo plans get no ``--rpc`` at all. ``ngram`` turns on
    n-gram speculation (:data:`NGRAM`) when there is no ``draft``.

    ``draft_devices`` (``-devd``) keeps the draft on the host in a split: ``none`` (CPU) or
    the host's own GPUs; by default the draft would follow the main model onto RPC devices.
    """
    if len(rpc_endpoints) != len(lay.rpc_peers):
        raise ValueError(f"{len(rpc_endpoints)} rpc endpoints for {len(lay.rpc_peers)} workers")
    argv = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
            "-ngl", str(lay.ngl), "-t", str(threads)]
    if alias:
        argv += ["--alias", alias]
    if no_mmap:  # b11434 replaced --no-mmap (now rejected) with --load-mode
        argv += ["--load-mode", "none"]
    if rpc_endpoints:
        argv += ["--rpc", ",".join(rpc_endpoints), "--tensor-split", fmt_split(lay.tensor_split)]
        if lay.output_on_host:
            argv += ["-ot", OUTPUT_ON_CPU]
    if draft is not None:
        argv += ["-md", str(draft), "--spec-type", "draft-simple",
                 "--spec-draft-n-max", str(draft_max)]
        if draft_devices:
            argv += ["-devd", draft_devices]
    elif ngram:
        argv += NGRAM
    return [*argv, *extra]


def rpc_server_argv(binary: Path, *, port: int, threads: int, cache: bool = True) -> list[str]:
    """ggml-rpc-server's command line; ``-c`` caches tensors under $LLAMA_CACHE/rpc."""
    argv = [str(binary), "-H", "127.0.0.1", "-p", str(port), "-t", str(threads)]
    return [*argv, "-c"] if cache else argv
