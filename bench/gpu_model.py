"""Random-weight llama GGUFs of real models' shapes, for GPU speed tests (bench/gpu.py).

Speed depends on shapes and types, not values, so a random model of Llama-3-8B's shape loads
and generates as fast as the real one. The weights are Q8_0 (or F16) with zero-mean values
scaled like 1/sqrt(fan_in), so activations stay finite and greedy decoding yields tokens; each
tensor gets its own random bytes (identical tensors would share a hash and make the rpc hash
cache look better than it is). The vocabulary is SmolLM2's byte-level BPE (tokens, merges and
chat template, exported here once to a small JSON) padded with plain ASCII tokens to the
shape's vocabulary size, so llama-server tokenizes prompts, applies the chat template and
streams text for every generated token.

    python bench/gpu_model.py tokenizer SMOLLM2.gguf .gpu/tokenizer.json.gz   # here, once
    python bench/gpu_model.py write OUT.gguf --tokenizer .gpu/tokenizer.json.gz \
        [--shape llama3-8b] [--type q8_0|f16]
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Shape:
    n_layer: int
    d_model: int
    d_ff: int
    n_head: int
    n_kv_head: int
    vocab: int
    ctx: int
    rope_base: float


SHAPES = {
    "llama3-8b": Shape(32, 4096, 14336, 32, 8, 128256, 8192, 500000.0),
    "llama3-3b": Shape(28, 3072, 8192, 24, 8, 128256, 8192, 500000.0),  # Llama-3.2-3B, untied
    "llama3-70b": Shape(80, 8192, 28672, 64, 8, 128256, 8192, 500000.0),
    "tiny": Shape(2, 256, 512, 4, 2, 50000, 2048, 10000.0),  # for a CPU smoke test
}

Q8_BLOCK = 32  # values per Q8_0 block: a float16 scale, then 32 int8


def export_tokenizer(src: Path, dest: Path) -> None:
    """Write ``src``'s tokenizer (tokens, types, merges, special ids, template) as JSON.gz."""
    import gguf

    reader = gguf.GGUFReader(src)
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            out[key] = field.contents()
    with gzip.open(dest, "wt") as fh:
        json.dump(out, fh)


def tensor_specs(s: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """(name, ggml shape ne0-first) of every tensor of a llama model, in file order."""
    kv = s.d_model // s.n_head * s.n_kv_head
    specs: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (s.d_model, s.vocab))]
    for i in range(s.n_layer):
        b = f"blk.{i}."
        specs += [(b + "attn_norm.weight", (s.d_model,)),
                  (b + "attn_q.weight", (s.d_model, s.d_model)),
                  (b + "attn_k.weight", (s.d_model, kv)),
                  (b + "attn_v.weight", (s.d_model, kv)),
                  (b + "attn_output.weight", (s.d_model, s.d_model)),
                  (b + "ffn_norm.weight", (s.d_model,)),
                  (b + "ffn_gate.weight", (s.d_model, s.d_ff)),
                  (b + "ffn_up.weight", (s.d_model, s.d_ff)),
                  (b + "ffn_down.weight", (s.d_ff, s.d_model))]
    specs += [("output_norm.weight", (s.d_model,)), ("output.weight", (s.d_model, s.vocab))]
    return specs


POOL_WORDS = 1 << 23  # 64 MiB of random uint64, drawn once


def random_bytes(n: int, rng: np.random.Generator) -> np.ndarray[Any, Any]:
    """``n`` uniformly random-looking bytes, fast: a 64 MiB random pool XORed with a fresh
    random key per pool-sized chunk (numpy's generators make ~0.1-0.5 GB/s, this ~GB/s), so
    no two chunks of any tensor are equal."""
    global _POOL
    if _POOL is None:
        _POOL = rng.integers(0, 2**64 - 1, POOL_WORDS, dtype=np.uint64, endpoint=True)
    words = -(-n // 8)
    out = np.empty(words, dtype=np.uint64)
    for off in range(0, words, POOL_WORDS):
        chunk = min(POOL_WORDS, words - off)
        key = rng.integers(0, 2**64 - 1, dtype=np.uint64, endpoint=True)
        np.bitwise_xor(_POOL[:chunk], key, out=out[off:off + chunk])
    return out.view(np.uint8)[:n]


_POOL: np.ndarray[Any, Any] | None = None


def random_q8_0(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray[Any, Any]:
    """Q8_0 bytes (rows x blocks*34): uniform int8 quants, one scale for the whole tensor so
    that each weight has standard deviation ~0.5/sqrt(fan_in)."""
    fan_in, rows = shape
    blocks = rows * fan_in // Q8_BLOCK
    data = random_bytes(blocks * 34, rng).reshape(blocks, 34)
    scale = np.float16(0.5 / np.sqrt(fan_in) / 74.0)  # 74 ~ std of a uniform int8
    data[:, 0:2] = np.frombuffer(scale.tobytes(), dtype=np.uint8)
    return data.reshape(rows, fan_in // Q8_BLOCK * 34)


def random_f16(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray[Any, Any]:
    fan_in, rows = shape
    values = rng.standard_normal((rows, fan_in), dtype=np.float32)
    return (values * (0.5 / np.sqrt(fan_in))).astype(np.float16)


def add_metadata(writer: Any, s: Shape, tok: dict[str, Any], file_type: int) -> None:
    writer.add_name(f"random {s.n_layer}-layer llama (speed tests only)")
    writer.add_block_count(s.n_layer)
    writer.add_context_length(s.ctx)
    writer.add_embedding_length(s.d_model)
    writer.add_feed_forward_length(s.d_ff)
    writer.add_head_count(s.n_head)
    writer.add_head_count_kv(s.n_kv_head)
    writer.add_rope_freq_base(s.rope_base)
    writer.add_rope_dimension_count(s.d_model // s.n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(s.vocab)
    writer.add_file_type(file_type)
    tokens: list[str] = list(tok["tokenizer.ggml.tokens"])
    types: list[int] = list(tok["tokenizer.ggml.token_type"])
    known = set(tokens)
    pad = (f"<pad{i}>" for i in range(10**7))
    while len(tokens) < s.vocab:
        name = next(pad)
        if name not in known:
            tokens.append(name)
            types.append(1)  # NORMAL: detokenizes to its own ASCII text
    del tokens[s.vocab:], types[s.vocab:]
    for key, value in tok.items():
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
            continue
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.token_type", types)


def write_model(out: Path, tokenizer: Path, shape: str, qtype: str, seed: int = 0) -> int:
    """Write the model, streaming one tensor at a time; returns the file size."""
    import gguf

    s = SHAPES[shape]
    with gzip.open(tokenizer, "rt") as fh:
        tok = json.load(fh)
    quant = qtype == "q8_0"
    file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if quant else gguf.LlamaFileType.MOSTLY_F16
    writer = gguf.GGUFWriter(str(out), "llama")
    add_metadata(writer, s, tok, int(file_type))
    specs = tensor_specs(s)
    for name, dims in specs:
        if len(dims) == 1:
            writer.add_tensor_info(name, dims, np.dtype(np.float32), dims[0] * 4)
        elif quant:
            nbytes = dims[1] * dims[0] // Q8_BLOCK * 34
            writer.add_tensor_info(name, (dims[1], dims[0] // Q8_BLOCK * 34), np.dtype(np.uint8),
                                   nbytes, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor_info(name, dims[::-1], np.dtype(np.float16), dims[0] * dims[1] * 2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for _, dims in specs:
        if len(dims) == 1:
            writer.write_tensor_data(np.ones(dims, dtype=np.float32))
        else:
            writer.write_tensor_data(random_q8_0(dims, rng) if quant else random_f16(dims, rng))
    writer.close()
    return out.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokenizer", help="export a GGUF's tokenizer to JSON.gz")
    t.add_argument("src", type=Path)
    t.add_argument("dest", type=Path)
    w = sub.add_parser("write", help="write a random-weight model")
    w.add_argument("out", type=Path)
    w.add_argument("--tokenizer", type=Path, required=True)
    w.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    w.add_argument("--type", choices=("q8_0", "f16"), default="q8_0")
    args = ap.parse_args()
    if args.cmd == "tokenizer":
        export_tokenizer(args.src, args.dest)
        return
    start = time.monotonic()
    size = write_model(args.out, args.tokenizer, args.shape, args.type)
    print(f"wrote {args.out} ({size / 2**30:.2f} GiB, {args.shape}, {args.type}) "
          f"in {time.monotonic() - start:.1f} s")


if __name__ == "__main__":
    main()
