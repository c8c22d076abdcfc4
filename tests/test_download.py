"""Downloads through the real huggingface_hub code, against a local stand-in hub."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hf_standin import HubStandIn, serve, tiny_gguf
from meshcore_backend_llamacpp import hub
from meshcore_backend_llamacpp.models import ModelError, resolve, resolve_draft

REPO = "test-org/tiny-GGUF"
DRAFT_REPO = "test-org/tiny-draft-GGUF"
BIG = "big-Q6_K.gguf"
BIG_SIZE = 24 * 1024 * 1024  # over huggingface_hub's 10 MiB read chunk, so a resume shows
SPLIT = [f"Q8_0/tiny-Q8_0-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HubStandIn, str]]:
    tmp = tmp_path_factory.mktemp("hub")
    stand = HubStandIn()
    stand.add(REPO, "tiny-Q4_K_M.gguf", tiny_gguf(tmp / "a.gguf", name="tiny"))
    stand.add(REPO, "tiny-Q5_K_M.gguf", b"GGUF" + os.urandom(3000))
    stand.add(REPO, "tiny-Q5_K_M-imat.gguf", b"GGUF" + os.urandom(3000))
    stand.add(REPO, "mmproj-tiny-F16.gguf", b"GGUF" + os.urandom(100))
    stand.add(REPO, "README.md", b"# tiny\n")
    for i, path in enumerate(SPLIT):
        stand.add(REPO, path, b"GGUF" + os.urandom(1000 * (i + 3)))
    stand.add(REPO, BIG, os.urandom(BIG_SIZE))
    stand.add(DRAFT_REPO, "tiny-draft-Q4_K_M.gguf", tiny_gguf(tmp / "d.gguf", name="draft"))
    stand.plain["plain-Q4_0.gguf"] = b"GGUF" + os.urandom(200_000)
    with serve(stand) as url:
        yield stand, url


@pytest.fixture
def env(standin: tuple[HubStandIn, str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> tuple[HubStandIn, str, Path]:
    """A fresh HF cache and models dir per test, the hub pointed at the stand-in."""
    stand, url = standin
    stand.log.clear()
    stand.cut_once.clear()
    stand.corrupt.clear()
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("MESH_LLM_MODELS", str(tmp_path / "models"))
    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps(catalog_data()))
    monkeypatch.setenv("MESH_LLM_CATALOG", str(catalog))
    return stand, url, tmp_path


def catalog_data(size: int = 1) -> dict[str, object]:
    return {"models": [
        {"name": "Tiny-Test", "repo": REPO, "files": ["tiny-Q4_K_M.gguf"], "size": size,
         "quant": "Q4_K_M", "description": "test model", "draft": "Tiny-Draft"},
        {"name": "Tiny-Draft", "repo": DRAFT_REPO, "files": ["tiny-draft-Q4_K_M.gguf"],
         "size": size, "quant": "Q4_K_M", "description": "test draft"},
        {"name": "Tiny-Split", "repo": REPO, "files": SPLIT, "size": size, "quant": "Q8_0",
         "description": "split test model", "draft": "Tiny-Draft"},
    ]}




def sha(data: bytes | Path) -> str:
    return hashlib.sha256(data.read_bytes() if isinstance(data, Path) else data).hexdigest()


def test_catalog_name_fetches_model_and_its_draft(env: tuple[HubStandIn, str, Path]) -> None:
    stand, _, tmp = env
    model = resolve("tiny-test")  # case-insensitive catalog name
    assert model.name == "Tiny-Test"
    assert model.path.is_relative_to(tmp / "hub" / "models--test-org--tiny-GGUF" / "snapshots")
    assert sha(model.path) == sha(stand.repos[REPO]["tiny-Q4_K_M.gguf"])
    draft = resolve_draft(model)
    assert draft is not None and draft.name == "Tiny-Draft"
    assert sha(draft.path) == sha(stand.repos[DRAFT_REPO]["tiny-draft-Q4_K_M.gguf"])
    assert resolve_draft(model, disabled=True) is None


def test_cached_model_resolves_without_the_network(env: tuple[HubStandIn, str, Path]) -> None:
    stand, _, _ = env
    first = resolve("Tiny-Test")
    stand.log.clear()
    assert resolve("Tiny-Test", download=False) == first
    assert stand.log == []


def test_split_model_fetches_every_shard_and_sums_sizes(
        env: tuple[HubStandIn, str, Path]) -> None:
    stand, _, _ = env
    model = resolve("Tiny-Split")
    assert [p.name for p in model.shards] == [Path(s).name for s in SPLIT]
    assert model.size == sum(len(stand.repos[REPO][s]) for s in SPLIT)


def test_repo_file_form(env: tuple[HubStandIn, str, Path]) -> None:
    stand, _, _ = env
    model = resolve(f"{REPO}/tiny-Q4_K_M.gguf")
    assert model.name == "tiny-Q4_K_M"
    assert sha(model.path) == sha(stand.repos[REPO]["tiny-Q4_K_M.gguf"])
    split = resolve(f"{REPO}/{SPLIT[1]}")  # any shard names the whole split model
    assert len(split.shards) == 3 and split.path.name == Path(SPLIT[0]).name


def test_repo_quant_form(env: tuple[HubStandIn, str, Path]) -> None:
    assert resolve(f"{REPO}:Q4_K_M").path.name == "tiny-Q4_K_M.gguf"
    split = resolve(f"{REPO}:q8_0")  # case-insensitive, a split in a folder
    assert len(split.shards) == 3


def test_repo_quant_errors(env: tuple[HubStandIn, str, Path]) -> None:
    with pytest.raises(ModelError, match=r"ambiguous: it matches tiny-Q5_K_M-imat.gguf, "
                                         r"tiny-Q5_K_M.gguf"):
        resolve(f"{REPO}:Q5_K_M")
    with pytest.raises(ModelError, match=r"has no Q4_K GGUF; available: .*Q4_K_M") as exc:
        resolve(f"{REPO}:Q4_K")
    assert "\n" not in str(exc.value)


def test_hub_url_form(env: tuple[HubStandIn, str, Path]) -> None:
    stand, url, tmp = env
    pin = sha(stand.repos[REPO]["tiny-Q4_K_M.gguf"])  # the stand-in speaks plain http
    model = resolve(f"{url}/{REPO}/resolve/main/tiny-Q4_K_M.gguf#sha256={pin}")
    assert model.path.is_relative_to(tmp / "hub")
    assert sha(model.path) == sha(stand.repos[REPO]["tiny-Q4_K_M.gguf"])


def test_plain_url_form_resumes_a_partial_file(env: tuple[HubStandIn, str, Path]) -> None:
    stand, url, tmp = env
    data = stand.plain["plain-Q4_0.gguf"]
    target = hub.url_target(f"{url}/files/plain-Q4_0.gguf")
    target.parent.mkdir(parents=True)
    target.with_name(target.name + ".partial").write_bytes(data[:50_000])  # an earlier run
    model = resolve(f"{url}/files/plain-Q4_0.gguf#sha256={sha(data)}")
    assert model.path == target and model.path.is_relative_to(tmp / "models")
    assert model.path.read_bytes() == data
    assert stand.gets("plain-Q4_0.gguf") == ["bytes=50000-"]


@pytest.mark.parametrize("path", ["files/plain-Q4_0.gguf", f"{REPO}/resolve/main/tiny-Q4_K_M.gguf",
                                  "files/x-Q8_0-00001-of-00002.gguf"])
def test_plain_http_url_without_a_checksum_is_refused(env: tuple[HubStandIn, str, Path],
                                                      path: str) -> None:
    stand, url, tmp = env
    with pytest.raises(ModelError) as exc:
        resolve(f"{url}/{path}")
    assert str(exc.value) == (
        f"--model {url}/{path}: a plain http:// download can be altered on the way and has no "
        f"checksum; use https://, or pin the file with {url}/{path}#sha256=<its "
        f"64-hex-digit sha256>")
    assert stand.log == [] and not (tmp / "models").exists()  # nothing fetched, nothing kept


def test_pinned_http_url_is_checked(env: tuple[HubStandIn, str, Path]) -> None:
    stand, url, _ = env
    data = stand.plain["plain-Q4_0.gguf"]
    plain = f"{url}/files/plain-Q4_0.gguf"
    target = hub.url_target(plain)
    wrong = "0" * 64
    with pytest.raises(ModelError) as exc:  # the server sends a different file than pinned
        resolve(f"{plain}#sha256={wrong}")
    assert str(exc.value) == (f"checksum mismatch for {plain}: expected sha256 {wrong}, got "
                              f"{sha(data)}; the download was deleted: check the URL and the "
                              f"checksum")
    assert list(target.parent.iterdir()) == []
    stand.corrupt.add("files/plain-Q4_0.gguf")  # altered on the way
    with pytest.raises(ModelError, match="checksum mismatch"):
        resolve(f"{plain}#sha256={sha(data)}")
    assert list(target.parent.iterdir()) == []
    stand.corrupt.clear()
    assert resolve(f"{plain}#sha256={sha(data).upper()}").path.read_bytes() == data
    stand.log.clear()
    assert resolve(f"{plain}#sha256={sha(data)}").path == target  # kept: no new request
    assert stand.log == []
    # a kept copy that is not what a later pin names is deleted, not used
    with pytest.raises(ModelError, match=f"the kept copy {target} is not sha256 {wrong}; it "
                                         f"was deleted"):
        resolve(f"{plain}#sha256={wrong}")
    assert not target.exists()
    # a hub URL: the pin is checked against the (already verified) blob
    hub_url = f"{url}/{REPO}/resolve/main/tiny-Q4_K_M.gguf"
    with pytest.raises(ModelError, match=f"checksum mismatch for {hub_url}: the hub's file"):
        resolve(f"{hub_url}#sha256={wrong}")


@pytest.mark.parametrize(("fragment", "message"), [
    ("#md5=abc", "after '#' give the file's checksum as sha256= and 64 hex digits"),
    ("#sha256=" + "g" * 64, "after '#' give the file's checksum"),
    ("#sha256=" + "a" * 63, "after '#' give the file's checksum"),
])
def test_bad_pin_is_a_clear_error(env: tuple[HubStandIn, str, Path], fragment: str,
                                  message: str) -> None:
    stand, url, _ = env
    with pytest.raises(ModelError, match=message):
        resolve(f"{url}/files/plain-Q4_0.gguf{fragment}")
    assert stand.log == []


def test_split_model_cannot_be_pinned(env: tuple[HubStandIn, str, Path]) -> None:
    _, url, _ = env
    with pytest.raises(ModelError, match="a #sha256= pin covers one file, and this is a split"):
        resolve(f"{url}/files/x-Q8_0-00001-of-00002.gguf#sha256={'a' * 64}")


def test_https_url_needs_no_pin(env: tuple[HubStandIn, str, Path]) -> None:
    """https is unchanged: no pin asked for (here: not downloaded, and no network used)."""
    with pytest.raises(ModelError, match="is not downloaded yet: run `mesh-llm download"):
        resolve("https://models.example.invalid/files/x-Q4_0.gguf", download=False)


def test_interrupted_download_resumes(env: tuple[HubStandIn, str, Path]) -> None:
    stand, _, _ = env
    stand.cut_once[f"{REPO}/{BIG}"] = 15 * 1024 * 1024  # drop the connection at 15 MiB
    model = resolve(f"{REPO}/{BIG}")
    assert sha(model.path) == sha(stand.repos[REPO][BIG])
    # The second GET asks only for the rest, from the last chunk written (10 MiB).
    assert stand.gets(BIG) == [None, f"bytes={10 * 1024 * 1024}-"]


def test_corrupted_download_is_detected_and_removed(env: tuple[HubStandIn, str, Path]) -> None:
    stand, _, tmp = env
    stand.corrupt.add(f"{REPO}/tiny-Q4_K_M.gguf")
    with pytest.raises(ModelError, match=r"checksum mismatch .* run the command again") as exc:
        resolve(f"{REPO}/tiny-Q4_K_M.gguf")
    assert "\n" not in str(exc.value)
    blobs = tmp / "hub" / "models--test-org--tiny-GGUF" / "blobs"
    assert [p for p in blobs.iterdir() if not p.name.endswith(".lock")] == []
    stand.corrupt.clear()
    model = resolve(f"{REPO}/tiny-Q4_K_M.gguf")  # a rerun fetches a good copy
    assert sha(model.path) == sha(stand.repos[REPO]["tiny-Q4_K_M.gguf"])


@pytest.mark.parametrize(("spec", "message"), [
    ("no-org/missing-GGUF/x-Q4_K_M.gguf", r"model repo 'no-org/missing-GGUF' not found on "),
    (f"{REPO}/nope-Q4_K_M.gguf", r"tiny-GGUF/nope-Q4_K_M.gguf not found in test-org/tiny-GGUF"),
    ("no-org/missing-GGUF:Q4_K_M", r"model repo 'no-org/missing-GGUF' not found"),
])
def test_not_found_errors(env: tuple[HubStandIn, str, Path], spec: str, message: str) -> None:
    with pytest.raises(ModelError, match=message) as exc:
        resolve(spec)
    assert "\n" not in str(exc.value)


def test_offline_without_cache_is_a_clear_error(env: tuple[HubStandIn, str, Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    stand, _, _ = env
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for spec in ("Tiny-Test", f"{REPO}/tiny-Q4_K_M.gguf", f"{REPO}:Q4_K_M"):
        with pytest.raises(ModelError, match="HF_HUB_OFFLINE is set") as exc:
            resolve(spec)
        assert "\n" not in str(exc.value)
    assert stand.log == []


def test_offline_with_cache_works(env: tuple[HubStandIn, str, Path],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    stand, _, _ = env
    online = resolve(f"{REPO}:Q8_0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    stand.log.clear()
    assert resolve(f"{REPO}:Q8_0") == online  # listing from the cached snapshot
    assert stand.log == []


def test_unreachable_hub_without_cache(env: tuple[HubStandIn, str, Path],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    with pytest.raises(ModelError, match=r"127.0.0.1:9") as exc:
        resolve(f"{REPO}/tiny-Q4_K_M.gguf")
    assert "\n" not in str(exc.value)


def test_hf_home_is_honoured(env: tuple[HubStandIn, str, Path],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, tmp = env
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp / "hf-home"))
    model = resolve(f"{REPO}/tiny-Q4_K_M.gguf")
    assert model.path.is_relative_to(tmp / "hf-home" / "hub")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    return subprocess.run([sys.executable, "-m", "meshcore_cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_download_and_models_commands(env: tuple[HubStandIn, str, Path]) -> None:
    listing = run_cli("download")
    assert listing.returncode == 0, listing.stderr
    assert "  Tiny-Test " in listing.stdout and "Hermes-3-Llama-3.1-405B" in listing.stdout
    assert run_cli("models").stdout.startswith("no models installed")

    got = run_cli("download", "tiny-split", "--draft")
    assert got.returncode == 0, got.stderr
    assert "Tiny-Split:" in got.stdout and "in 3 file(s)" in got.stdout
    assert "draft Tiny-Draft" in got.stdout

    listing = run_cli("download")
    assert "* Tiny-Split " in listing.stdout and "* Tiny-Draft " in listing.stdout
    assert "  Tiny-Test " in listing.stdout  # not installed: no mark
    models = run_cli("models")
    assert models.returncode == 0, models.stderr
    split_line = next(line for line in models.stdout.splitlines()
                      if line.startswith("Tiny-Split"))
    assert "     3  hf:test-org/tiny-GGUF" in split_line
    assert "2 model(s)" in models.stdout


def test_download_command_errors(env: tuple[HubStandIn, str, Path]) -> None:
    got = run_cli("download", "tiny")
    assert got.returncode == 1
    assert got.stderr.strip().splitlines()[-1] == (
        "error: model name 'tiny' is ambiguous: it matches Tiny-Test, Tiny-Draft, Tiny-Split; "
        "give more of the name")
