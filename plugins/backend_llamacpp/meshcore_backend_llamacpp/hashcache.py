"""Pre-seed ggml-rpc-server's tensor hash cache from a local GGUF, so weights never cross.

llama.cpp b11434 (``ggml/src/ggml-rpc/ggml-rpc.cpp``): when the client uploads a weight tensor
whose size is strictly over ``HASH_THRESHOLD = 10 * 1024 * 1024`` bytes, it first sends the
64-bit FNV-1a hash of the tensor's bytes (``RPC_CMD_SET_TENSOR_HASH``). An rpc-server started
with ``-c`` (a flag: the directory is ``$LLAMA_CACHE/rpc``, tools/rpc/rpc-server.cpp) answers
from the file ``<dir>/<hash as %016x>`` (``get_cached_file``) when it exists, and the tensor's
bytes are not sent. llama-server uploads each weight tensor in one
call with exactly the bytes stored in the GGUF, so a worker that has the same model file can
write those cache entries itself before the host loads: only the small tensors cross the wire.

The cache is trusted only for what this node wrote. rpc-server also writes entries itself
(``rpc_server::set_tensor``: a SET_TENSOR with the cache flag from the host is saved under the
FNV of its bytes, overwriting any entry of that name), and FNV-1a is no cryptographic hash: a
host can craft bytes with the FNV of a real tensor, and a later host's load would take them.
So every entry the node writes is recorded in a ledger (name, size, mtime, inode), and
:func:`prune_foreign`, run before each rpc-server start, deletes every entry that is not in
it or whose size, mtime or inode changed: cheap stat calls, no re-hashing.

A per-file index beside the cache directory (``<dir>-index.json``: model file path -> its
size, mtime_ns and tensor name -> entry name) remembers every hash computed, so a restart or
a re-plan never hashes a file again while it is unchanged, even when the earlier pass was cut
short. It only decides what need not be hashed: an indexed entry is used only while the ledger
says it is ours and unchanged (else the tensor is hashed again), and rpc-server finds entries
by the hash the host sends, so a wrong index can cost load time, never give a wrong tensor.

Hashing runs on a thread pool, one tensor per task: FNV-1a is a serial chain over the bytes
(no way to hash a tensor's chunks apart and combine them), but ``fnv-c`` is a cffi call, and
cffi releases the GIL around it, as the entry's write does. Each task hashes its tensor where
it lies in the model file, mapped read-only once for the pool (copying it into a fresh buffer
first cost more than the hash on a 2-core VM), and writes its entry atomically from there;
only the caller's thread touches the ledger and the index, in the spans' order.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import mmap
import os
import shutil
import stat
import struct
import threading
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger("meshcore.backend.hashcache")

HASH_THRESHOLD = 10 * 1024 * 1024  # bytes; llama.cpp hashes tensors strictly larger than this
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MANIFEST_PREFIX = ".seeded-"  # rpc-server only opens 16-hex-digit names, so this is ignored
LEDGER = ".owned.json"  # entry name -> [size, mtime_ns, inode] of every entry this node wrote
INDEX_SUFFIX = "-index.json"  # beside the cache dir: model file -> tensor -> entry name
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF scalars
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class TensorSpan:
    """Where one tensor's bytes live in a GGUF file."""

    name: str
    path: Path
    offset: int
    size: int


def fnv1a_64(data: bytes | memoryview) -> int:
    """FNV-1a 64 as ggml-rpc computes it, through the C extension ``fnv-c`` (~740-950 MB/s
    a core; the GIL is released while it runs). A memoryview (a tensor in the mapped model
    file) is hashed in place: its C function takes any buffer, its Python wrapper only bytes."""
    try:
        from fnv_c.ext._fnv import ffi, lib
    except ImportError:  # another layout of fnv-c: its public function, on a copy
        from fnv_c import fnv1a_64 as fast

        return int(fast(bytes(data)))
    return int(lib.fnv1a_64(ffi.from_buffer(data), len(data)))


def fnv1a_64_reference(data: bytes) -> int:
    """Pure-Python FNV-1a 64, a line-for-line copy of ggml-rpc's ``fnv_hash`` (tests only)."""
    h = FNV_OFFSET
    for byte in data:
        h ^= byte
        h = (h * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


def cache_name(digest: int) -> str:
    """The cache file name rpc-server looks for: the hash as 16 lowercase hex digits."""
    return f"{digest:016x}"


def _skip_value(fh: BinaryIO, vtype: int) -> int | None:
    """Read past one GGUF metadata value; returns it when it is an unsigned int, else None."""
    if vtype in _FIXED:
        size = _FIXED[vtype]
        raw = fh.read(size)
        return int.from_bytes(raw, "little") if vtype in (0, 2, 4, 10) else None
    if vtype == _STRING:
        fh.seek(_U64.unpack(fh.read(8))[0], 1)
        return None
    if vtype == _ARRAY:
        itype, count = struct.unpack("<IQ", fh.read(12))
        if itype in _FIXED:
            fh.seek(count * _FIXED[itype], 1)
        else:
            for _ in range(count):
                _skip_value(fh, itype)
        return None
    raise ValueError(f"unknown GGUF metadata type {vtype}")


def tensor_spans(path: Path) -> list[TensorSpan]:
    """Every tensor's absolute data offset and byte size in one GGUF file, read from the header
    alone (gguf's GGUFReader also parses every metadata array: ~9 s for SmolLM2's vocab)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb", buffering=1 << 20) as fh:
        if fh.read(4) != b"GGUF":
            raise ValueError(f"model file {path} is not a GGUF file; pass a .gguf model")
        _version, n_tensors, n_kv = struct.unpack("<IQQ", fh.read(20))
        alignment = 32
        for _ in range(n_kv):
            key = fh.read(_U64.unpack(fh.read(8))[0])
            (vtype,) = struct.unpack("<I", fh.read(4))
            value = _skip_value(fh, vtype)
            if key == b"general.alignment" and value:
                alignment = value
        infos = []
        for _ in range(n_tensors):
            name = fh.read(_U64.unpack(fh.read(8))[0]).decode(errors="replace")
            (n_dims,) = struct.unpack("<I", fh.read(4))
            dims = struct.unpack(f"<{n_dims}Q", fh.read(8 * n_dims))
            ttype, offset = struct.unpack("<IQ", fh.read(12))
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            infos.append((name, offset, math.prod(dims) * type_size // block))
        data_start = -(-fh.tell() // alignment) * alignment
    return [TensorSpan(name, Path(path), data_start + off, size) for name, off, size in infos]


def all_tensors(model_path: Path) -> Iterator[TensorSpan]:
    """Every tensor in every shard of ``model_path``, in file order."""
    from meshcore_backend_llamacpp.models import shards_of

    for shard in shards_of(Path(model_path)):
        yield from tensor_spans(shard)


def large_tensors(model_path: Path, threshold: int = HASH_THRESHOLD) -> Iterator[TensorSpan]:
    """Tensors over ``threshold`` bytes in every shard of ``model_path``, in file order."""
    return (span for span in all_tensors(model_path) if span.size > threshold)


def _manifest(model_path: Path, cache_dir: Path) -> tuple[Path, str]:
    """The manifest file for this model and the key that says the model is unchanged."""
    stat = Path(model_path).stat()
    key = f"{Path(model_path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return cache_dir / f"{MANIFEST_PREFIX}{Path(model_path).name}.json", key


def _known_hashes(manifest: Path, key: str) -> list[str] | None:
    """Hashes recorded by an earlier seeding of the same, unchanged file (None: unknown)."""
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key:
        return None
    hashes = data.get("hashes")
    return hashes if isinstance(hashes, list) and all(isinstance(h, str) for h in hashes) else None


Stamp = list[int]  # [size, mtime_ns, inode]


def _stamp(st: os.stat_result) -> Stamp:
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def load_ledger(cache_dir: Path) -> dict[str, Stamp]:
    """The entries this node wrote into ``cache_dir`` (empty when there is no ledger)."""
    try:
        data = json.loads((Path(cache_dir) / LEDGER).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {name: stamp for name, stamp in data.items()
            if isinstance(stamp, list) and len(stamp) == 3
            and all(type(x) is int for x in stamp)}


def _save_ledger(cache_dir: Path, ledger: Mapping[str, Stamp]) -> None:
    tmp = cache_dir / f".{LEDGER}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(ledger))
    os.replace(tmp, cache_dir / LEDGER)


def _owned(entry: Path, stamp: Stamp | None, size: int | None = None) -> bool:
    """Whether ``entry`` is still the file this node wrote (and, given ``size``, that big)."""
    if stamp is None or (size is not None and stamp[0] != size):
        return False
    try:
        st = entry.lstat()
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and _stamp(st) == stamp


def prune_foreign(cache_dir: Path) -> list[str]:
    """Delete everything in ``cache_dir`` this node did not write, or that changed since it
    did (see the module doc); call it while no rpc-server runs on the directory. Returns the
    names deleted. The ledger and the per-model manifests (names rpc-server cannot write)
    are kept."""
    cache_dir = Path(cache_dir)
    ledger, kept, removed = load_ledger(cache_dir), {}, []
    try:
        entries = list(cache_dir.iterdir())
    except FileNotFoundError:
        return []
    for entry in entries:
        name = entry.name
        if name == LEDGER or (name.startswith(MANIFEST_PREFIX) and name.endswith(".json")):
            continue
        if _owned(entry, ledger.get(name)):
            kept[name] = ledger[name]
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(name)
    if kept != ledger:
        _save_ledger(cache_dir, kept)
    if removed:
        log.warning("rpc cache %s: deleted %d entries this node did not write or that changed "
                    "since (e.g. saved by rpc-server from a host's upload): %s", cache_dir,
                    len(removed), ", ".join(sorted(removed)[:5]))
    return removed


def index_path(cache_dir: Path) -> Path:
    """The per-file index of ``cache_dir``: beside it, not in it (:func:`prune_foreign` keeps
    only entries there, and rpc-server writes there)."""
    return Path(cache_dir).parent / f"{Path(cache_dir).name}{INDEX_SUFFIX}"


def _file_stamp(path: Path) -> tuple[str, list[int]]:
    st = Path(path).stat()
    return str(Path(path).resolve()), [st.st_size, st.st_mtime_ns]


def _read_index(cache_dir: Path) -> dict[str, dict[str, object]]:
    try:
        data = json.loads(index_path(cache_dir).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


def indexed_hashes(cache_dir: Path, paths: Iterable[Path]) -> dict[str, str]:
    """Tensor name -> entry name recorded for each of ``paths`` whose size and mtime are
    unchanged since (the index of the module doc; {} when there is none)."""
    index, known = _read_index(cache_dir), {}
    for path in paths:
        key, stamp = _file_stamp(path)
        record = index.get(key, {})
        tensors = record.get("tensors")
        if record.get("stamp") == stamp and isinstance(tensors, dict):
            known.update({k: v for k, v in tensors.items()
                          if isinstance(k, str) and isinstance(v, str)})
    return known


def _record_index(cache_dir: Path, spans: Iterable[TensorSpan], hashes: Mapping[str, str]
                  ) -> None:
    """Add ``hashes`` (tensor name -> entry name) of ``spans``' files to the index; a file
    whose size or mtime changed starts a new record."""
    index = _read_index(cache_dir)
    for path in {span.path for span in spans}:
        key, stamp = _file_stamp(path)
        record = index.get(key, {})
        tensors = record.get("tensors") if record.get("stamp") == stamp else None
        merged = dict(tensors) if isinstance(tensors, dict) else {}
        merged.update({s.name: hashes[s.name] for s in spans
                       if s.path == path and s.name in hashes})
        index[key] = {"stamp": stamp, "tensors": merged}
    target = index_path(cache_dir)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(index))
    os.replace(tmp, target)


def _seed_indexed(spans: list[TensorSpan], cache_dir: Path, known: Mapping[str, str],
                  workers: int | None = None) -> tuple[int, dict[str, str]]:
    """:func:`_seed_spans` with the index's hashes of the spans' files added to ``known``;
    records what it hashed (also when cut short: each pass keeps what it learnt)."""
    indexed = indexed_hashes(cache_dir, {span.path for span in spans})
    learnt: dict[str, str] = {}
    try:
        written, hashes = _seed_spans(spans, cache_dir, {**indexed, **known}, learnt,
                                      workers)
    finally:
        if any(indexed.get(k) != v for k, v in learnt.items()):
            _record_index(cache_dir, spans, {**indexed, **learnt})
    return written, hashes


def _write_entry(path: Path, data: bytes | memoryview) -> Stamp:
    """Write atomically (a running rpc-server must never read a half-written entry); returns
    the stamp of the file written, taken before it is visible under its name."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        stamp = _stamp(os.fstat(fh.fileno()))
    os.replace(tmp, path)
    return stamp


def pool_size(workers: int | None, spans: Sequence[TensorSpan]) -> int:
    """Threads to hash ``spans`` with: ``workers`` (None: one per CPU), at most one per CPU
    and per span, never less than one. The threads hold no copies of the tensors (they read
    the mapped file), so memory does not bound them."""
    cpus = os.cpu_count() or 1
    return max(1, min(workers or cpus, cpus, len(spans)))


@contextlib.contextmanager
def _mapped(path: Path) -> Iterator[memoryview]:
    """The whole file, mapped read-only (shared by the pool's threads)."""
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:  # mmap refuses an empty file
            yield memoryview(b"")
            return
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm, memoryview(mm) as view:
            yield view


def _span_view(view: memoryview, span: TensorSpan) -> memoryview:
    """The tensor's bytes in the mapped file (no copy: reading them into fresh buffers cost
    more than hashing them, docs/benchmarks.md, "Issue 13: the split's load step by step")."""
    if span.offset + span.size > len(view):
        raise ValueError(f"model file {span.path}: tensor {span.name} is truncated "
                         f"({max(0, len(view) - span.offset)} of {span.size} bytes); "
                         f"download it again")
    return view[span.offset:span.offset + span.size]


def _seed_spans(spans: Iterable[TensorSpan], cache_dir: Path, known: Mapping[str, str],
                learnt: dict[str, str] | None = None,
                workers: int | None = None) -> tuple[int, dict[str, str]]:
    """Write the cache entry of every span; ``known`` (tensor name -> entry name, from an
    earlier pass over the same file) skips hashing what is already there. An entry counts as
    there only if the ledger says this node wrote it and it is unchanged; anything else of
    that name is replaced. The rest is hashed on ``pool_size(workers, ...)`` threads (module
    doc). Returns the bytes written and the entry name of every span; ``learnt`` receives
    each hash as it is computed."""
    spans, hashes = list(spans), {}
    learnt = {} if learnt is None else learnt
    ledger = load_ledger(cache_dir)
    todo = []
    for span in spans:
        name = known.get(span.name)
        if name is not None and _owned(cache_dir / name, ledger.get(name), span.size):
            hashes[span.name] = name
        else:
            todo.append(span)
    lock, claimed = threading.Lock(), set()

    def hash_and_write(view: memoryview, span: TensorSpan) -> tuple[str, Stamp | None]:
        with _span_view(view, span) as data:
            name = cache_name(fnv1a_64(data))
            with lock:  # two equal tensors: one writes, and only a missing or foreign entry
                fresh = name not in claimed and not _owned(cache_dir / name, ledger.get(name),
                                                           span.size)
                claimed.add(name)
            return name, _write_entry(cache_dir / name, data) if fresh else None

    written = 0
    with contextlib.ExitStack() as stack:
        views = {path: stack.enter_context(_mapped(path)) for path in {s.path for s in todo}}
        pool = ThreadPoolExecutor(pool_size(workers, todo), thread_name_prefix="hashcache")
        # on the way out, before the files are unmapped; a failure stops the queued tasks
        stack.callback(pool.shutdown, wait=True, cancel_futures=True)
        tasks: list[Future[tuple[str, Stamp | None]]] = [
            pool.submit(hash_and_write, views[span.path], span) for span in todo]
        for span, task in zip(todo, tasks, strict=True):
            name, stamp = task.result()
            hashes[span.name] = learnt[span.name] = name
            if stamp is not None:
                with lock:
                    ledger[name] = stamp
                    _save_ledger(cache_dir, ledger)  # after each entry: a cut pass keeps them
                written += span.size
    return written, {span.name: hashes[span.name] for span in spans}


def cache_complete(model_path: Path, cache_dir: Path) -> bool:
    """Whether an earlier :func:`seed_cache` of this unchanged file left every entry, each
    still as this node wrote it."""
    manifest, key = _manifest(model_path, Path(cache_dir))
    recorded = _known_hashes(manifest, key)
    ledger = load_ledger(Path(cache_dir))
    return recorded is not None and all(_owned(Path(cache_dir) / h, ledger.get(h))
                                        for h in recorded)


def seed_cache(model_path: Path, cache_dir: Path, threshold: int = HASH_THRESHOLD,
               known: Mapping[str, str] | None = None, workers: int | None = None) -> int:
    """Write ``cache_dir/<fnv1a64 %016x>`` for every tensor over ``threshold`` bytes of the
    GGUF at ``model_path`` (all shards of a split model). Entries already present are kept;
    ``known`` is what :func:`seed_tensors` returned for this file (those are not hashed
    again). Hashes on up to ``workers`` threads (None: one per CPU; see :func:`pool_size`).
    Blocking (~740-950 MB/s a thread): call it in a worker thread or process.

    :return: bytes written now (0 when the cache was already complete).
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if cache_complete(model_path, cache_dir):
        return 0
    manifest, key = _manifest(model_path, cache_dir)
    spans = list(large_tensors(model_path, threshold))
    written, hashes = _seed_indexed(spans, cache_dir, known or {}, workers)
    manifest.write_text(json.dumps({"key": key, "hashes": list(hashes.values())}))
    log.info("hash cache %s: %d tensors over %d bytes, %d bytes written", cache_dir,
             len(hashes), threshold, written)
    return written


def seed_tensors(model_path: Path, cache_dir: Path, names: Collection[str],
                 threshold: int = HASH_THRESHOLD,
                 workers: int | None = None) -> tuple[int, dict[str, str]]:
    """Like :func:`seed_cache` for the tensors named in ``names`` only (a worker seeds its
    own layers first, starts its rpc-server, then seeds the rest). Writes no manifest.

    :return: bytes written, and tensor name -> entry name (for ``seed_cache(known=...)``).
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    wanted = set(names)
    spans = [s for s in large_tensors(model_path, threshold) if s.name in wanted]
    return _seed_indexed(spans, cache_dir, {}, workers)


def warm() -> int:
    """Import what a seeding pass needs, in the process that will run it (RpcWorker.warm);
    returns that process's id."""
    import fnv_c  # noqa: F401
    import gguf.constants  # noqa: F401
    return os.getpid()


def tensors_of_layers(model_path: Path, layers: Collection[int], n_layer: int,
                      threshold: int = HASH_THRESHOLD) -> list[str]:
    """Names of the hashed tensors (over ``threshold``) that llama.cpp places with ``layers``:
    ``blk.N.*``, and for the output layer (``n_layer``) ``output.weight`` or, when the model
    ties its output to the embeddings, ``token_embd.weight``."""
    spans = list(all_tensors(model_path))
    tied = not any(span.name == "output.weight" for span in spans)
    out = []
    for span in spans:
        name = span.name
        if span.size <= threshold:
            continue
        if name.startswith("blk."):
            index = name.split(".")[1]
            if index.isdigit() and int(index) in layers:
                out.append(name)
        elif n_layer in layers and (name == "output.weight"
                                    or (name == "token_embd.weight" and tied)):
            out.append(name)
    return out
