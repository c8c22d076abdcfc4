"""The rpc-server hash cache seeding: names, contents, threshold and idempotence."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from meshcore_backend_llamacpp import hashcache
from meshcore_backend_llamacpp.hashcache import (
    HASH_THRESHOLD,
    cache_name,
    fnv1a_64,
    fnv1a_64_reference,
    large_tensors,
    seed_cache,
    tensor_spans,
)

MIB = 1024 * 1024


def write_gguf(path: Path, sizes: dict[str, int], seed: int = 0) -> dict[str, bytes]:
    """A GGUF of float32 tensors with the given byte sizes (multiples of 4), random values.

    Returns each tensor's bytes as stored in the file."""
    import gguf

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, "llama")
    contents = {}
    for name, size in sizes.items():
        array = rng.standard_normal(size // 4).astype(np.float32)
        writer.add_tensor(name, array)
        contents[name] = array.tobytes()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return contents


@pytest.fixture
def model(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    path = tmp_path / "tiny.gguf"
    contents = write_gguf(path, {
        "big.weight": HASH_THRESHOLD + 64,  # over the threshold: hashed by llama.cpp
        "exact.weight": HASH_THRESHOLD,  # equal: llama.cpp sends it (size > threshold only)
        "small.weight": 4096,
        "bigger.weight": 12 * MIB,
    })
    return path, contents


def test_reference_vectors() -> None:
    # Published FNV-1a 64 test vectors (Landon Curt Noll's fnv test suite).
    assert fnv1a_64_reference(b"") == 0xCBF29CE484222325
    assert fnv1a_64_reference(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a_64_reference(b"foobar") == 0x85944171F73967E8


@given(st.binary(max_size=512))
@settings(max_examples=200)
def test_fnv_c_matches_reference(data: bytes) -> None:
    assert fnv1a_64(data) == fnv1a_64_reference(data)


def test_cache_name_is_16_lowercase_hex_digits() -> None:
    assert cache_name(0xAB) == "00000000000000ab"
    assert cache_name(0xAF63DC4C8601EC8C) == "af63dc4c8601ec8c"


def reader_spans(path: Path) -> list[tuple[str, int, int]]:
    from gguf import GGUFReader

    return [(t.name, int(t.data_offset), int(t.n_bytes)) for t in GGUFReader(path).tensors]


def test_header_parser_matches_gguf_reader(model: tuple[Path, dict[str, bytes]],
                                           tmp_path: Path) -> None:
    import gguf

    path, _ = model
    assert [(t.name, t.offset, t.size) for t in tensor_spans(path)] == reader_spans(path)
    # quantized types, metadata of every kind (string arrays too) and a custom alignment
    other = tmp_path / "q.gguf"
    writer = gguf.GGUFWriter(other, "llama")
    writer.add_uint32("general.alignment", 64)
    writer.add_token_list(["a", "bb", "ccc"])
    writer.add_array("x.ints", [1, 2, 3])
    writer.add_string("x.s", "hello")
    writer.add_float32("x.f", 1.5)
    q8 = np.zeros((4, 34 * 2), dtype=np.uint8)  # 4 rows of 64 Q8_0 values, raw blocks
    writer.add_tensor("q8.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("f16.weight", np.ones(100, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert [(t.name, t.offset, t.size) for t in tensor_spans(other)] == reader_spans(other)


def test_only_tensors_strictly_over_threshold(model: tuple[Path, dict[str, bytes]]) -> None:
    path, _ = model
    assert sorted(t.name for t in large_tensors(path)) == ["big.weight", "bigger.weight"]


def test_seed_writes_exact_tensor_bytes(model: tuple[Path, dict[str, bytes]],
                                        tmp_path: Path) -> None:
    path, contents = model
    cache = tmp_path / "cache"
    written = seed_cache(path, cache)
    assert written == len(contents["big.weight"]) + len(contents["bigger.weight"])
    entries = sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))
    expected = sorted(cache_name(fnv1a_64(contents[n])) for n in ("big.weight", "bigger.weight"))
    assert entries == expected
    for name in ("big.weight", "bigger.weight"):
        entry = cache / cache_name(fnv1a_64(contents[name]))
        assert entry.read_bytes() == contents[name]
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]


def record_writes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The cache entries written from now on, in order."""
    writes: list[Path] = []
    real_write = hashcache._write_entry

    def write(path: Path, data: bytes) -> list[int]:
        writes.append(path)
        stamp: list[int] = real_write(path, data)
        return stamp

    monkeypatch.setattr(hashcache, "_write_entry", write)
    return writes


def test_seed_is_idempotent_and_skips_existing(model: tuple[Path, dict[str, bytes]],
                                               tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path, contents = model
    cache = tmp_path / "cache"
    seed_cache(path, cache)
    assert seed_cache(path, cache) == 0  # manifest says complete: nothing hashed or written

    # Without the manifest it re-hashes but keeps entries that are already there.
    for manifest in cache.glob(".seeded-*"):
        manifest.unlink()
    big = cache / cache_name(fnv1a_64(contents["big.weight"]))
    before = big.stat().st_mtime_ns
    writes = record_writes(monkeypatch)
    assert seed_cache(path, cache) == 0
    assert writes == [] and big.stat().st_mtime_ns == before

    # A missing entry is rewritten, and only that one.
    big.unlink()
    assert seed_cache(path, cache) == len(contents["big.weight"])
    assert writes == [big] and big.read_bytes() == contents["big.weight"]


def test_changed_model_file_is_rehashed(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    cache = tmp_path / "cache"
    first = write_gguf(path, {"w": HASH_THRESHOLD + 4}, seed=1)
    seed_cache(path, cache)
    second = write_gguf(path, {"w": HASH_THRESHOLD + 4}, seed=2)
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse clocks
    assert seed_cache(path, cache) == HASH_THRESHOLD + 4
    for data in (first["w"], second["w"]):
        assert (cache / cache_name(fnv1a_64(data))).read_bytes() == data


def test_split_gguf_seeds_every_shard(tmp_path: Path) -> None:
    first = write_gguf(tmp_path / "m-00001-of-00002.gguf", {"a": HASH_THRESHOLD + 4}, seed=3)
    second = write_gguf(tmp_path / "m-00002-of-00002.gguf", {"b": HASH_THRESHOLD + 8}, seed=4)
    cache = tmp_path / "cache"
    assert seed_cache(tmp_path / "m-00001-of-00002.gguf", cache) == 2 * HASH_THRESHOLD + 12
    assert (cache / cache_name(fnv1a_64(first["a"]))).is_file()
    assert (cache / cache_name(fnv1a_64(second["b"]))).is_file()


@pytest.mark.real
def test_smollm2_token_embedding_is_seeded(tmp_path: Path) -> None:
    from meshcore_backend_llamacpp.models import smollm2_path

    path = smollm2_path()
    assert [(t.name, t.offset, t.size) for t in tensor_spans(path)] == reader_spans(path)
    spans = list(large_tensors(path))
    assert [s.name for s in spans] == ["token_embd.weight"]  # every other tensor is < 10 MiB
    cache = tmp_path / "cache"
    assert seed_cache(path, cache) == spans[0].size
    with open(path, "rb") as f:
        f.seek(spans[0].offset)
        data = f.read(spans[0].size)
    assert (cache / cache_name(fnv1a_64(data))).read_bytes() == data


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate: Any, what: str, procs: list[Any], timeout: float = 180) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise AssertionError(f"{dead[0].args[0]} exited with {dead[0].returncode} "
                                 f"while waiting for {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _load_through_rpc(model: Path, cache_root: Path, logs: Path) -> None:
    """Load ``model`` in llama-server with every layer on one ggml-rpc-server started with
    ``-c`` and ``LLAMA_CACHE=cache_root``; stop both once llama-server is healthy."""
    import signal
    import subprocess

    import httpx
    from meshcore_backend_llamacpp.build import cached_bin_dir
    from meshcore_testing.pytest_plugin import http_client

    bins = cached_bin_dir()
    if bins is None:
        pytest.skip("llama.cpp binaries are not built: "
                    "run python -m meshcore_backend_llamacpp.build")
    rpc_port, http_port = _free_port(), _free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with open(logs / "rpc.log", "wb") as rpc_log, open(logs / "server.log", "wb") as srv_log:
            procs.append(subprocess.Popen(
                [str(bins / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(rpc_port), "-t", "1",
                 "-c"], env={**os.environ, "LLAMA_CACHE": str(cache_root)},
                stdout=rpc_log, stderr=subprocess.STDOUT, start_new_session=True))

            def listening() -> bool:
                import socket

                with socket.socket() as s:
                    return s.connect_ex(("127.0.0.1", rpc_port)) == 0

            _wait(listening, "ggml-rpc-server to listen", procs)
            procs.append(subprocess.Popen(
                [str(bins / "llama-server"), "-m", str(model), "--rpc", f"127.0.0.1:{rpc_port}",
                 "-ngl", "99", "-t", "1", "-c", "256", "--host", "127.0.0.1",
                 "--port", str(http_port)],
                stdout=srv_log, stderr=subprocess.STDOUT, start_new_session=True))

            def healthy() -> bool:
                try:
                    return http_client().get(f"http://127.0.0.1:{http_port}/health"
                                             ).status_code == 200
                except httpx.HTTPError:
                    return False

            _wait(healthy, "llama-server to load the model", procs)
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.mark.real
def test_rpc_server_writes_what_seed_cache_writes(tmp_path: Path) -> None:
    """The definitive check of threshold, hash and layout: an empty cache filled by a real
    ggml-rpc-server during a load holds exactly the files seed_cache writes, byte for byte."""
    from meshcore_backend_llamacpp.models import smollm2_path

    model = smollm2_path()
    real_root = tmp_path / "real"
    _load_through_rpc(model, real_root, tmp_path)
    by_rpc = {p.name: p for p in (real_root / "rpc").iterdir()}
    seeded = tmp_path / "seeded"
    seed_cache(model, seeded)
    by_seed = {p.name: p for p in seeded.iterdir() if not p.name.startswith(".")}
    assert by_rpc and set(by_rpc) == set(by_seed), (sorted(by_rpc), sorted(by_seed))
    for name, path in by_rpc.items():
        assert path.read_bytes() == by_seed[name].read_bytes()


def layered_model(tmp_path: Path, *, tied: bool) -> tuple[Path, dict[str, bytes]]:
    """Three blocks of big and small tensors, and an output (or tied embeddings)."""
    big = HASH_THRESHOLD + 4
    sizes = {"token_embd.weight": big, "output_norm.weight": 64}
    for i in range(3):
        sizes |= {f"blk.{i}.attn_q.weight": big, f"blk.{i}.attn_norm.weight": 64}
    if not tied:
        sizes["output.weight"] = big
    path = tmp_path / ("tied.gguf" if tied else "untied.gguf")
    return path, write_gguf(path, sizes)


def test_tensors_of_layers_follow_llama_cpp_placement(tmp_path: Path) -> None:
    untied, _ = layered_model(tmp_path, tied=False)
    tied, _ = layered_model(tmp_path, tied=True)
    # n_layer = 3 blocks; layer 3 is the output layer
    assert hashcache.tensors_of_layers(untied, {1}, 3) == ["blk.1.attn_q.weight"]
    assert hashcache.tensors_of_layers(untied, {2, 3}, 3) == ["blk.2.attn_q.weight",
                                                              "output.weight"]
    # tied output: the output layer's matrix is the embeddings' copy on that device
    assert hashcache.tensors_of_layers(tied, {3}, 3) == ["token_embd.weight"]
    assert hashcache.tensors_of_layers(tied, {0}, 3) == ["blk.0.attn_q.weight"]


def test_seeding_a_workers_layers_first_then_the_rest(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path, contents = layered_model(tmp_path, tied=False)
    cache = tmp_path / "cache"
    names = hashcache.tensors_of_layers(path, {2, 3}, 3)
    written, known = hashcache.seed_tensors(path, cache, names)
    assert written == sum(len(contents[n]) for n in names)
    assert sorted(known) == sorted(names)
    assert {p.name for p in cache.iterdir() if p.name != hashcache.LEDGER} == set(known.values())
    assert not hashcache.cache_complete(path, cache)
    hashed: list[int] = []
    real = hashcache.fnv1a_64

    def counting(data: bytes) -> int:
        hashed.append(len(data))
        return int(real(data))

    monkeypatch.setattr(hashcache, "fnv1a_64", counting)
    rest = seed_cache(path, cache, known=known)
    assert rest == sum(len(b) for n, b in contents.items() if len(b) > HASH_THRESHOLD
                       and n not in names)
    assert len(hashed) == 3  # token_embd, blk.0, blk.1: the first pass's are not re-read
    assert hashcache.cache_complete(path, cache)
    for data in contents.values():
        if len(data) > HASH_THRESHOLD:
            assert (cache / cache_name(fnv1a_64(data))).read_bytes() == data


# ---------------------------------------------------------------- only our own entries are used


def past_clock_tick(stamp_ns: int, probe: Path) -> None:
    """Return once the file clock has moved past ``stamp_ns`` (file times are coarse: a write
    in the same tick as ours would keep the mtime; see the module doc of hashcache)."""
    while True:
        probe.write_bytes(b"")
        if probe.stat().st_mtime_ns > stamp_ns:
            probe.unlink()
            return


def test_foreign_and_changed_entries_are_pruned(model: tuple[Path, dict[str, bytes]],
                                                tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """What rpc-server saved for a host (a colliding copy over our entry, or a new one) and
    anything else left in the directory is deleted before the next start; ours stay."""
    path, contents = model
    cache = tmp_path / "cache"
    seed_cache(path, cache)
    big = cache / cache_name(fnv1a_64(contents["big.weight"]))
    bigger = cache / cache_name(fnv1a_64(contents["bigger.weight"]))
    past_clock_tick(big.stat().st_mtime_ns, tmp_path / "probe")
    with open(big, "wb") as fh:  # as rpc-server's std::ofstream does: same name, same size
        fh.write(os.urandom(len(contents["big.weight"])))
    (cache / "0123456789abcdef").write_bytes(os.urandom(HASH_THRESHOLD + 64))  # a new entry
    outside = tmp_path / "outside"
    outside.write_bytes(b"not in the cache")
    (cache / "fedcba9876543210").symlink_to(outside)
    (cache / "00000000000000aa").mkdir()
    hashed: list[int] = []

    def counting(data: bytes) -> int:
        hashed.append(len(data))
        return 0

    monkeypatch.setattr(hashcache, "fnv1a_64", counting)
    removed = hashcache.prune_foreign(cache)
    assert sorted(removed) == sorted([big.name, "0123456789abcdef", "fedcba9876543210",
                                      "00000000000000aa"])
    assert hashed == [] and outside.read_bytes() == b"not in the cache"
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == [bigger.name]
    assert bigger.read_bytes() == contents["bigger.weight"]
    assert set(hashcache.load_ledger(cache)) == {bigger.name}
    assert not hashcache.cache_complete(path, cache)
    monkeypatch.undo()
    assert seed_cache(path, cache) == len(contents["big.weight"])  # only the deleted one
    assert big.read_bytes() == contents["big.weight"]
    assert hashcache.prune_foreign(cache) == []


def test_own_entries_survive_without_rehashing(model: tuple[Path, dict[str, bytes]],
                                               tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = model
    cache = tmp_path / "cache"
    seed_cache(path, cache)
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()
              if not p.name.startswith(".")}
    monkeypatch.setattr(hashcache, "fnv1a_64", lambda data: pytest.fail("re-hashed"))
    assert hashcache.prune_foreign(cache) == []
    assert hashcache.cache_complete(path, cache) and seed_cache(path, cache) == 0
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()
            if not p.name.startswith(".")} == before


def test_an_entry_we_did_not_write_is_replaced_not_trusted(
        model: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    """Seeding does not take an entry of the right name and size on trust (the size-only
    check did): one a host left under our tensor's name is overwritten with our bytes."""
    path, contents = model
    cache = tmp_path / "cache"
    cache.mkdir()
    big = cache / cache_name(fnv1a_64(contents["big.weight"]))
    big.write_bytes(os.urandom(len(contents["big.weight"])))  # there before our first seed
    seed_cache(path, cache)
    assert big.read_bytes() == contents["big.weight"]


@pytest.mark.real
def test_what_a_real_rpc_server_saved_is_pruned(tmp_path: Path) -> None:
    """A real ggml-rpc-server -c saves the host's big upload (SmolLM2's token_embd) itself:
    that entry is deleted by the next prune; once we seed it, it stays."""
    from meshcore_backend_llamacpp.models import smollm2_path

    model = smollm2_path()
    root = tmp_path / "root"
    _load_through_rpc(model, root, tmp_path)
    saved = sorted(p.name for p in (root / "rpc").iterdir())
    (span,) = large_tensors(model)
    with open(model, "rb") as f:
        f.seek(span.offset)
        name = cache_name(fnv1a_64(f.read(span.size)))
    assert saved == [name]
    assert hashcache.prune_foreign(root / "rpc") == [name]
    seed_cache(model, root / "rpc")
    assert hashcache.prune_foreign(root / "rpc") == [] and (root / "rpc" / name).is_file()


@pytest.mark.real
def test_worker_prunes_a_poisoned_cache_before_its_rpc_server_starts(
        mesh_process: Any, tmp_path: Path) -> None:
    """Real nodes: B's rpc cache holds, before B starts, a poisoned entry under the name of
    SmolLM2's token_embd (same size, other bytes: what a colliding upload leaves) and a
    stray entry. Once B serves A's split, the first holds the real bytes, the second is gone,
    and the split answers."""
    import time

    import httpx
    from meshcore_backend_llamacpp.build import cached_bin_dir
    from meshcore_backend_llamacpp.models import smollm2_path

    if cached_bin_dir() is None:
        pytest.skip("llama.cpp binaries are not built")
    model = smollm2_path()
    (span,) = large_tensors(model)
    with open(model, "rb") as f:
        f.seek(span.offset)
        real = f.read(span.size)
    cache = tmp_path / "node1" / "rpc-cache" / "rpc"  # the second node's home (mesh_process)
    cache.mkdir(parents=True)
    poisoned = cache / cache_name(fnv1a_64(real))
    poisoned.write_bytes(os.urandom(span.size))
    stray = cache / "0123456789abcdef"
    stray.write_bytes(os.urandom(HASH_THRESHOLD + 4))
    env = {"MESH_LLM_THREADS": "1"}
    a = mesh_process("--model", str(model), "--max-vram", "8", "--split", "--no-draft",
                     env=env, timeout=240)
    b = mesh_process("--model", str(model), "--max-vram", "4", "--join", a.token,
                     "--no-draft", env=env, timeout=240)
    assert b.home == tmp_path / "node1"
    deadline = time.monotonic() + 240
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            status = a.get("/mesh/status").json()
            if status["plan"]["state"] == "SPLIT" and status["backend"].get("rpc"):
                break
        time.sleep(0.2)
    else:
        raise AssertionError(f"no split: {status}\n{a.log()}\n{b.log()}")
    while time.monotonic() < deadline:  # the split plan is out: wait for its server to load
        with contextlib.suppress(httpx.HTTPError):
            if a.get("/health").status_code == 200:
                break
        time.sleep(0.2)
    reply = httpx.post(f"{a.url}/completions", json={"prompt": "The capital of France is",
                       "max_tokens": 4, "temperature": 0}, timeout=120)
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"], reply.text
    while "seeded the rest" not in b.log():  # after A's load (rpc_loaded): the real entry
        assert time.monotonic() < deadline, b.log()
        time.sleep(0.2)
    assert poisoned.read_bytes() == real, "the poisoned entry survived B's rpc-server start"
    assert not stray.exists(), b.log()
    assert "deleted 2 entries this node did not write" in b.log()


# ---------------------------------------------------------------- hashing on a thread pool


def cache_contents(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in cache.iterdir() if not p.name.startswith(".")}


def test_parallel_seeding_writes_what_sequential_seeding_writes(tmp_path: Path) -> None:
    """Entries, names, index and bytes written are the same on one thread and on a pool, and
    are the tensors' own bytes (hashed and written from the mapped file): every hash must
    land on its own tensor."""
    sizes = {f"blk.{i}.w": HASH_THRESHOLD + 4 * (i + 1) for i in range(6)} | {"small": 64}
    path = tmp_path / "m.gguf"
    contents = write_gguf(path, sizes, seed=5)
    expected = {cache_name(fnv1a_64(data)): data for data in contents.values()
                if len(data) > HASH_THRESHOLD}
    results = []
    for workers in (1, 4):
        cache = tmp_path / f"cache-{workers}"
        written, hashes = hashcache.seed_tensors(path, cache, list(sizes), workers=workers)
        assert cache_contents(cache) == expected
        assert hashes == {n: cache_name(fnv1a_64(contents[n])) for n in sizes if n != "small"}
        index = hashcache.indexed_hashes(cache, [path])
        results.append((written, hashes, index, set(hashcache.load_ledger(cache))))
    assert results[0] == results[1]
    assert results[0][0] == sum(len(data) for data in expected.values())


def test_equal_tensors_are_written_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gguf

    path = tmp_path / "twins.gguf"
    array = np.random.default_rng(6).standard_normal((HASH_THRESHOLD + 4) // 4)
    writer = gguf.GGUFWriter(path, "llama")
    for name in ("a", "b", "c"):
        writer.add_tensor(name, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    writes = record_writes(monkeypatch)
    cache = tmp_path / "cache"
    assert seed_cache(path, cache, workers=3) == HASH_THRESHOLD + 4
    assert len(writes) == 1 and list(cache_contents(cache)) == [writes[0].name]
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]


def test_a_truncated_model_file_is_named_not_hashed(tmp_path: Path) -> None:
    """A file cut short after its header (an interrupted download) is reported with what to
    do, and no entry is written for the missing tensor."""
    sizes = {"blk.0.w": HASH_THRESHOLD + 8, "blk.1.w": HASH_THRESHOLD + 16}
    path = tmp_path / "m.gguf"
    write_gguf(path, sizes, seed=9)
    with path.open("r+b") as fh:
        fh.truncate(path.stat().st_size - 1000)  # into the last tensor, past its padding
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"m\.gguf: tensor blk\.1\.w is truncated .*download"):
        hashcache.seed_tensors(path, cache, list(sizes), workers=2)
    assert all(p.stat().st_size == HASH_THRESHOLD + 8 for p in cache.iterdir()
               if not p.name.startswith("."))


def test_pool_size_is_bounded_by_cpus_and_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    spans = [hashcache.TensorSpan(f"t{i}", Path("m"), 0, 100 * MIB) for i in range(8)]
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert hashcache.pool_size(None, spans) == 8  # one per span
    assert hashcache.pool_size(3, spans) == 3  # MESH_LLM_THREADS / threads option
    assert hashcache.pool_size(64, spans * 4) == 16  # one per CPU
    assert hashcache.pool_size(None, []) == 1  # always one
