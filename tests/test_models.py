"""The catalog, name matching, draft pairing and local ``--model`` forms (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from meshcore_backend_llamacpp import catalog, hub
from meshcore_backend_llamacpp.catalog import CatalogError, human_size
from meshcore_backend_llamacpp.models import (
    DEFAULT_MODEL,
    ModelError,
    ResolvedModel,
    pick_quant,
    resolve,
    resolve_draft,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty HF cache and models dir, offline, built-in catalog only."""
    for var in ("MESH_LLM_CATALOG", "HF_HOME", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("MESH_LLM_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def put_in_hf_cache(cache: Path, repo: str, filename: str, data: bytes = b"GGUF") -> Path:
    """Lay a file out as huggingface_hub's cache does (refs/main -> snapshot -> blob)."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    blob = folder / "blobs" / f"blob-{len(list(folder.glob('blobs/*')))}"
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = folder / "snapshots" / COMMIT / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(blob)
    return link


def test_catalog_covers_the_seed_models() -> None:
    names = {e.name for e in catalog.load().entries}
    for size in ("3B", "7B", "14B", "32B", "72B"):
        assert f"Qwen2.5-{size}-Instruct" in names
    for size in ("3B", "7B", "14B", "32B"):
        assert f"Qwen2.5-Coder-{size}-Instruct" in names
    assert {"Qwen3-8B", "Qwen3-32B", "Llama-3.1-8B-Instruct", "Llama-3.3-70B-Instruct",
            "Gemma-3-27B-it", "Hermes-3-Llama-3.1-405B", DEFAULT_MODEL} <= names


def test_catalog_entries_are_complete() -> None:
    cat = catalog.load()
    for e in cat.entries:
        assert e.files and e.size > 0 and e.quant and e.description, e.name
        assert (e.repo is None) != (e.pypi is None), e.name
        if e.draft:
            draft = cat.get(e.draft)
            assert draft is not None, f"{e.name}: draft {e.draft} missing"
            assert draft.size <= e.size
    hermes = cat.find("hermes")
    assert hermes.quant == "IQ2_M" and len(hermes.files) == 4 and hermes.is_split
    assert hermes.files[0].endswith("-00001-of-00004.gguf")
    assert sum(hermes.file_sizes) == hermes.size


@pytest.mark.parametrize(("model", "draft"), [
    ("Qwen2.5-7B-Instruct", "Qwen2.5-0.5B-Instruct"),
    ("Qwen2.5-Coder-32B-Instruct", "Qwen2.5-0.5B-Instruct"),
    ("Qwen2.5-72B-Instruct", "Qwen2.5-0.5B-Instruct"),
    ("Qwen3-32B", "Qwen3-0.6B"),
    ("Qwen3-30B-A3B", "Qwen3-0.6B"),
    ("Llama-3.3-70B-Instruct", "Llama-3.2-1B-Instruct"),
    ("Hermes-3-Llama-3.1-405B", "Llama-3.2-1B-Instruct"),
    ("Gemma-3-27B-it", "Gemma-3-1B-it"),
])
def test_draft_pairs(model: str, draft: str) -> None:
    paired = catalog.load().draft_for(model)
    assert paired is not None and paired.name == draft



@pytest.mark.parametrize(("file_name", "draft"), [
    ("qwen2.5-coder-1.5b-instruct-q8_0.gguf", "Qwen2.5-0.5B-Instruct"),  # not in the catalog
    ("Qwen3-1.7B-Q4_K_M.gguf", "Qwen3-0.6B"),
    ("Meta-Llama-3.1-70B-Instruct-Q4_K_M.gguf", "Llama-3.2-1B-Instruct"),
    ("gemma-3-4b-it-q4_0.gguf", "Gemma-3-1B-it"),
    ("mistral-7b-instruct-v0.3.Q4_K_M.gguf", None),
    ("Qwen3-0.6B-Q4_K_M.gguf", None),  # the draft itself has none
])
def test_draft_pairs_by_file_name(file_name: str, draft: str | None) -> None:
    paired = catalog.load().draft_for(file_name.removesuffix(".gguf"), file_name)
    assert (paired.name if paired else None) == draft


@pytest.mark.parametrize(("spec", "name"), [
    ("Qwen2.5-7B-Instruct", "Qwen2.5-7B-Instruct"),
    ("qwen2.5-7b", "Qwen2.5-7B-Instruct"),  # case-insensitive unique substring
    ("QWEN2.5-CODER-32B", "Qwen2.5-Coder-32B-Instruct"),
    ("Qwen3-0.6B", "Qwen3-0.6B"),
    ("qwen2.5-7b-instruct-q4_k_m", "Qwen2.5-7B-Instruct"),  # name-QUANT
    ("405b", "Hermes-3-Llama-3.1-405B"),
    ("smollm2", DEFAULT_MODEL),  # an alias
])
def test_catalog_find(spec: str, name: str) -> None:
    assert catalog.load().find(spec).name == name


def test_catalog_find_ambiguous_lists_matches() -> None:
    with pytest.raises(CatalogError) as exc:
        catalog.load().find("qwen3-3")
    assert str(exc.value) == ("model name 'qwen3-3' is ambiguous: it matches Qwen3-32B, "
                              "Qwen3-30B-A3B; give more of the name")


def test_resolve_errors_are_one_line() -> None:
    for spec, message in [
        ("gemma", "ambiguous: it matches Gemma-3-1B-it, Gemma-3-4B-it"),
        ("no-such-model", "unknown model 'no-such-model': not in the catalog"),
        ("./missing.gguf", "model file missing.gguf does not exist"),
        ("missing.gguf", "model file missing.gguf does not exist"),
        ("/nowhere/x.gguf", "model file /nowhere/x.gguf does not exist"),
        ("", "--model is empty"),
    ]:
        with pytest.raises(ModelError, match=message) as exc:
            resolve(spec)
        assert "\n" not in str(exc.value)


def test_local_path_and_split_shards_summed(tmp_path: Path) -> None:
    single = tmp_path / "m.gguf"
    single.write_bytes(b"x" * 10)
    got = resolve(str(single))
    assert got == ResolvedModel(name="m", path=single, shards=(single,)) and got.size == 10
    for i, n in enumerate((100, 200, 300), start=1):
        (tmp_path / f"big-{i:05d}-of-00003.gguf").write_bytes(b"x" * n)
    split = resolve(str(tmp_path / "big-00002-of-00003.gguf"))
    assert split.name == "big" and split.path.name == "big-00001-of-00003.gguf"
    assert split.size == 600 and len(split.shards) == 3
    (tmp_path / "big-00003-of-00003.gguf").unlink()
    with pytest.raises(ModelError, match=r"shard .*big-00003-of-00003.gguf is missing"):
        resolve(str(tmp_path / "big-00001-of-00003.gguf"))


def test_catalog_model_from_the_cache_offline(isolated: Path) -> None:
    link = put_in_hf_cache(isolated / "hub", "bartowski/Qwen2.5-7B-Instruct-GGUF",
                           "Qwen2.5-7B-Instruct-Q4_K_M.gguf", b"weights")
    got = resolve("qwen2.5-7b")
    assert got.name == "Qwen2.5-7B-Instruct" and got.path == link and got.size == 7
    assert resolve_draft(got) is None  # its draft is not downloaded
    draft = put_in_hf_cache(isolated / "hub", "Qwen/Qwen2.5-0.5B-Instruct-GGUF",
                            "qwen2.5-0.5b-instruct-q4_k_m.gguf")
    found = resolve_draft(got)
    assert found is not None and found.name == "Qwen2.5-0.5B-Instruct" and found.path == draft
    assert resolve_draft(got, disabled=True) is None


def test_draft_found_for_a_local_file_by_name(isolated: Path, tmp_path: Path) -> None:
    put_in_hf_cache(isolated / "hub", "unsloth/Qwen3-0.6B-GGUF", "Qwen3-0.6B-Q4_K_M.gguf")
    local = tmp_path / "Qwen3-14B-Q5_K_M.gguf"
    local.write_bytes(b"GGUF")
    found = resolve_draft(resolve(str(local)))
    assert found is not None and found.name == "Qwen3-0.6B"


def test_smollm2_has_no_draft_unless_asked(isolated: Path) -> None:
    """Drafting SmolLM2 with itself halved its speed on CPU (22.6 vs 46.2 tok/s): the default
    run must not do it (issue 13); ``--draft SmolLM2-135M`` still can (the tests that exercise
    the speculative path do)."""
    path = isolated / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF")
    for spec in (DEFAULT_MODEL, "smollm2-135m-instruct", str(path)):
        model = resolve(spec, download=False)
        assert model.path == path
        assert resolve_draft(model) is None
        forced = resolve_draft(model, override=DEFAULT_MODEL)
        assert forced is not None and forced.path == path


def test_draft_override(tmp_path: Path) -> None:
    model_file, draft_file = tmp_path / "a.gguf", tmp_path / "b.gguf"
    model_file.write_bytes(b"a")
    draft_file.write_bytes(b"b")
    model = resolve(str(model_file))
    assert resolve_draft(model, override=str(draft_file)) == resolve(str(draft_file))
    with pytest.raises(ModelError, match="does not exist"):
        resolve_draft(model, override=str(tmp_path / "none.gguf"))


def test_extra_catalog_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    extra = tmp_path / "mine.json"
    extra.write_text(json.dumps({"models": [
        {"name": "My-Model", "repo": "me/my-GGUF", "files": ["my-Q4_K_M.gguf"], "size": 5,
         "quant": "Q4_K_M", "description": "mine", "draft": "Qwen3-0.6B"},
        {"name": "Qwen3-8B", "repo": "me/q3", "files": ["q3.gguf"], "size": 6, "quant": "Q8_0",
         "description": "overrides the built-in entry"},
    ]}))
    monkeypatch.setenv("MESH_LLM_CATALOG", str(extra))
    cat = catalog.load()
    assert cat.find("my-model").draft == "Qwen3-0.6B"
    assert cat.find("qwen3-8b").repo == "me/q3"
    assert cat.find("Qwen2.5-7B").name == "Qwen2.5-7B-Instruct"  # built-ins kept
    monkeypatch.setenv("MESH_LLM_CATALOG", str(tmp_path / "missing.json"))
    with pytest.raises(CatalogError, match=r"MESH_LLM_CATALOG=.*missing.json: cannot read"):
        catalog.load()


def test_pick_quant() -> None:
    files = ["README.md", "m-Q4_K_M.gguf", "m-Q4_K_S.gguf", "mmproj-m-Q4_K_M.gguf",
             "Q8_0/m-Q8_0-00001-of-00002.gguf", "Q8_0/m-Q8_0-00002-of-00002.gguf",
             "m-IQ2_M.gguf"]
    assert pick_quant(files, "q4_k_m", "o/r") == "m-Q4_K_M.gguf"
    assert pick_quant(files, "Q8_0", "o/r") == "Q8_0/m-Q8_0-00001-of-00002.gguf"
    assert pick_quant(files, "IQ2_M", "o/r") == "m-IQ2_M.gguf"
    with pytest.raises(ModelError, match=r"o/r has no Q4_K GGUF; available: IQ2_M, Q4_K_M, "
                                         r"Q4_K_S, Q8_0"):
        pick_quant(files, "Q4_K", "o/r")


def test_hub_url_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:4444")
    assert hub.parse_hub_url("https://huggingface.co/o/r/resolve/main/d/f.gguf") == (
        "o/r", "main", "d/f.gguf")
    assert hub.parse_hub_url("http://127.0.0.1:4444/o/r/blob/v1/f.gguf") == ("o/r", "v1", "f.gguf")
    assert hub.parse_hub_url("https://example.com/o/r/resolve/main/f.gguf") is None


def test_hf_cache_dir_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "h"))
    assert hub.cache_dir() == tmp_path / "h" / "hub"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert hub.cache_dir() == tmp_path / "x" / "huggingface" / "hub"


def test_human_size() -> None:
    assert [human_size(n) for n in (512, 98_000_000, 4_680_000_000, 136_700_000_000)] == [
        "512 B", "98 MB", "4.7 GB", "137 GB"]
