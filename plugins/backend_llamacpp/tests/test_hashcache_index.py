"""The per-file index of the rpc hash cache: a restart or a re-plan never hashes again."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from meshcore_backend_llamacpp import hashcache
from meshcore_backend_llamacpp.hashcache import HASH_THRESHOLD, cache_name, seed_cache
from test_hashcache import layered_model, write_gguf


def count_hashes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of everything hashed from now on."""
    hashed: list[int] = []
    real = hashcache.fnv1a_64

    def counted(data: bytes) -> int:
        hashed.append(len(data))
        return real(data)

    monkeypatch.setattr(hashcache, "fnv1a_64", counted)
    return hashed


def test_a_restart_does_not_hash_the_workers_layers_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = layered_model(tmp_path, tied=False)
    cache = tmp_path / "cache"
    names = hashcache.tensors_of_layers(path, {2, 3}, 3)
    written, known = hashcache.seed_tensors(path, cache, names)
    assert written > 0
    # the worker restarts before its background pass wrote the manifest
    assert not hashcache.cache_complete(path, cache)
    assert hashcache.prune_foreign(cache) == []
    hashed = count_hashes(monkeypatch)
    assert hashcache.seed_tensors(path, cache, names) == (0, known)
    assert hashed == []
    # a re-plan gives it other layers: only those are hashed
    hashcache.seed_tensors(path, cache, hashcache.tensors_of_layers(path, {1, 2}, 3))
    assert len(hashed) == 1


def test_a_pass_cut_short_keeps_what_it_hashed(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = layered_model(tmp_path, tied=False)
    cache = tmp_path / "cache"
    real = hashcache.fnv1a_64
    calls: list[int] = []

    def dies_on_the_third(data: bytes) -> int:
        calls.append(len(data))
        if len(calls) == 3:
            raise KeyboardInterrupt  # the worker process is stopped mid-pass
        return real(data)

    monkeypatch.setattr(hashcache, "fnv1a_64", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):  # one thread: "two hashed before the stop" holds
        seed_cache(path, cache, workers=1)  # (a second thread may finish a third meanwhile)
    hashed = count_hashes(monkeypatch)
    seed_cache(path, cache)
    assert len(hashed) == 5 - 2  # five big tensors, two hashed before the stop
    assert hashcache.cache_complete(path, cache)


def test_a_changed_file_is_hashed_again(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.gguf"
    cache = tmp_path / "cache"
    write_gguf(path, {"blk.0.w": HASH_THRESHOLD + 4}, seed=1)
    hashcache.seed_tensors(path, cache, ["blk.0.w"])
    second = write_gguf(path, {"blk.0.w": HASH_THRESHOLD + 4}, seed=2)
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse clocks
    hashed = count_hashes(monkeypatch)
    _, known = hashcache.seed_tensors(path, cache, ["blk.0.w"])
    assert len(hashed) == 1
    assert known["blk.0.w"] == cache_name(hashcache.fnv1a_64(second["blk.0.w"]))
    assert (cache / known["blk.0.w"]).read_bytes() == second["blk.0.w"]


def test_an_indexed_entry_that_is_no_longer_ours_is_rewritten(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, contents = layered_model(tmp_path, tied=True)
    cache = tmp_path / "cache"
    _, known = hashcache.seed_tensors(path, cache, ["blk.0.attn_q.weight"])
    entry = cache / known["blk.0.attn_q.weight"]
    entry.write_bytes(b"x" * entry.stat().st_size)  # someone else's bytes under that name
    os.utime(entry, ns=(1, 1))
    hashed = count_hashes(monkeypatch)
    assert hashcache.seed_tensors(path, cache, ["blk.0.attn_q.weight"])[0] > 0
    assert len(hashed) == 1 and entry.read_bytes() == contents["blk.0.attn_q.weight"]


def test_the_index_lives_beside_the_cache_and_survives_pruning(tmp_path: Path) -> None:
    path, _ = layered_model(tmp_path, tied=True)
    cache = tmp_path / "cache"
    seed_cache(path, cache)
    index = hashcache.index_path(cache)
    assert index.parent == tmp_path and index.is_file()
    assert hashcache.prune_foreign(cache) == [] and index.is_file()
    assert set(hashcache.indexed_hashes(cache, [path])) == {
        "token_embd.weight", "blk.0.attn_q.weight", "blk.1.attn_q.weight",
        "blk.2.attn_q.weight"}
    index.write_text("not json")  # a broken index only costs hashing again
    assert hashcache.indexed_hashes(cache, [path]) == {}
    assert seed_cache(path, cache) == 0
