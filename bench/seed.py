"""Benchmark: seeding a worker's rpc hash cache on one thread against a thread pool.

Run: ``.venv/bin/python bench/seed.py [--shape llama3-3b] [--model M.gguf] [--workers N]
[--runs 3] [--cold]``. Writes a random-weight GGUF of a real model's shape (bench/gpu_model.py,
Q8_0; llama3-3b is 3.84 GB) into a temporary directory and deletes it after (``--model`` takes an
existing GGUF instead and keeps it). Then, alternately with one thread and with ``--workers``
(default: every CPU), each time with a new cache directory and so a cold per-file index, and
the model in the page cache (read and seeded once first, untimed): what a worker does before its
rpc-server starts (``seed_tensors`` of its layers, the second half of the blocks and the
output), then the background pass (``seed_cache`` of the rest). Prints each run, the
medians and the ratio one thread / pool. ``--cold`` drops the model file's pages from the
page cache before each run (``posix_fadvise``, that file only), as for a worker whose model
was not read lately. Caches are deleted and flushed (``os.sync``) between runs, so one
run's write-back does not slow the next. Nothing here is asserted by the test suite.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from meshcore_backend_llamacpp import hashcache

sys.path.insert(0, str(Path(__file__).parent))
import gpu_model


def write_model(tmp: Path, shape: str) -> Path:
    """A random-weight Q8_0 model of ``shape``, with SmolLM2's tokenizer (as bench/gpu.py)."""
    from meshcore_backend_llamacpp.models import smollm2_path

    tokenizer, model = tmp / "tokenizer.json.gz", tmp / f"{shape}.gguf"
    gpu_model.export_tokenizer(smollm2_path(), tokenizer)
    started = time.monotonic()
    size = gpu_model.write_model(model, tokenizer, shape, "q8_0")
    print(f"wrote {model} ({size / 1e9:.2f} GB) in {time.monotonic() - started:.1f} s")
    return model


def warm_up(model: Path, root: Path, names: list[str]) -> None:
    """Flush pending writes (the model's own, if just written), read the model once and seed
    once, untimed, so every timed run starts from the same state: file in the page cache,
    nothing dirty (the first pass of a process was 2.5-3x slower than the next ones here)."""
    os.sync()
    started = time.perf_counter()
    with open(model, "rb", buffering=0) as fh:
        while fh.read(64 << 20):
            pass
    print(f"warm-up: flushed, read {model.stat().st_size / 1e9:.2f} GB in "
          f"{time.perf_counter() - started:.1f} s, then one run (not counted): "
          f"{sum(one_run(model, root, names, 1)):.2f} s")


def one_run(model: Path, root: Path, names: list[str], workers: int,
            cold: bool = False) -> tuple[float, float]:
    """Seconds for the worker's layers, then for the rest, from an empty cache and index
    (``cold``: the model file's pages dropped from the page cache first)."""
    cache = root / "rpc"
    if cold:
        fd = os.open(model, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # this file only
        os.close(fd)
    started = time.perf_counter()
    hashcache.prune_foreign(cache)
    _, known = hashcache.seed_tensors(model, cache, names, workers=workers)
    first = time.perf_counter() - started
    started = time.perf_counter()
    hashcache.seed_cache(model, cache, known=known, workers=workers)
    rest = time.perf_counter() - started
    shutil.rmtree(root)
    os.sync()
    return first, rest


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--shape", choices=sorted(gpu_model.SHAPES), default="llama3-3b")
    ap.add_argument("--model", type=Path, help="an existing GGUF (kept) instead of a new one")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cold", action="store_true",
                    help="drop the model file from the page cache before each run")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-seed-"))
    try:
        model = args.model or write_model(tmp, args.shape)
        n_layer = gpu_model.SHAPES[args.shape].n_layer
        names = hashcache.tensors_of_layers(model, set(range(n_layer // 2, n_layer + 1)),
                                            n_layer)
        spans = list(hashcache.large_tensors(model))
        mine = sum(s.size for s in spans if s.name in names)
        print(f"{len(spans)} tensors over 10 MiB, {sum(s.size for s in spans) / 1e9:.2f} GB; "
              f"the worker's layers {n_layer // 2}..{n_layer}: {len(names)} tensors, "
              f"{mine / 1e9:.2f} GB; {os.cpu_count()} CPUs, pool of "
              f"{hashcache.pool_size(args.workers, spans)} threads")
        warm_up(model, tmp / "cache-warm-up", names)
        times: dict[int, list[tuple[float, float]]] = {1: [], args.workers: []}
        for run in range(args.runs):
            for workers in times:
                first, rest = one_run(model, tmp / f"cache-{run}-{workers}", names, workers,
                                      args.cold)
                times[workers].append((first, rest))
                print(f"run {run + 1}, {workers:2} thread(s): worker's layers {first:6.2f} s "
                      f"({mine / first / 1e6:5.0f} MB/s), the rest {rest:6.2f} s")
        med = {w: (statistics.median(f for f, _ in t), statistics.median(r for _, r in t))
               for w, t in times.items()}
        one, pool = med[1], med[args.workers]
        print(f"median, 1 thread: layers {one[0]:.2f} s, rest {one[1]:.2f} s; "
              f"{args.workers} threads: layers {pool[0]:.2f} s, rest {pool[1]:.2f} s")
        print(f"ratio 1 thread / {args.workers} threads: worker's layers "
              f"{one[0] / pool[0]:.2f}x, whole model {sum(one) / sum(pool):.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
