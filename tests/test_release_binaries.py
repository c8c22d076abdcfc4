"""llama.cpp release archives (meshcore_backend_llamacpp.release): the whole path of build()
against a stand-in web server serving archives made here from the cached real binaries, with the
pin injected. Nothing compiles llama.cpp: the source build is a recording fake."""

from __future__ import annotations

import hashlib
import io
import shutil
import socket
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hf_standin import CHUNK, HubStandIn, serve
from meshcore_backend_llamacpp import binaries, build, release
from meshcore_backend_llamacpp.build import BINARIES, LLAMACPP_VERSION, BuildError, BuildSpec

KEY = release.platform_key()
ARCHIVE = release.archive_for(LLAMACPP_VERSION, KEY)
FOLDER = f"llama-{LLAMACPP_VERSION}"


@pytest.fixture(scope="module")
def real() -> Path:
    """The cached real binaries (looked up before a test moves the cache)."""
    found = build.cached_bin_dir(build.default_spec())
    if found is None:
        pytest.skip("llama.cpp is not built (python -m meshcore_backend_llamacpp.build)")
    return found


def make_archive(files: dict[str, Path | bytes]) -> bytes:
    """A tar.gz laid out as llama.cpp's release: everything under ``llama-<tag>/``."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz", compresslevel=1) as tar:
        for name, content in files.items():
            data = content.read_bytes() if isinstance(content, Path) else content
            info = tarfile.TarInfo(f"{FOLDER}/{name}")
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.fixture(scope="module")
def good_archive(real: Path) -> bytes:
    return make_archive({name: real / name for name in BINARIES} | {"LICENSE": b"MIT\n"})


@dataclass
class Setup:
    hub: HubStandIn
    url: str
    built: list[BuildSpec] = field(default_factory=list)  # calls of the fake source build

    def serve_archive(self, data: bytes, pin: bytes | None = None) -> str:
        """Serve ``data`` as this platform's archive, pinned to sha256(``pin`` or ``data``)."""
        assert ARCHIVE is not None
        self.hub.plain[f"{LLAMACPP_VERSION}/{ARCHIVE.name}"] = data
        release.PINNED_SHA256[ARCHIVE.name] = hashlib.sha256(pin or data).hexdigest()
        return f"files/{LLAMACPP_VERSION}/{ARCHIVE.name}"

    def source(self, spec: BuildSpec, jobs: int | None) -> Path:
        self.built.append(spec)
        return Path("/source-build-was-chosen")


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Setup]:
    if ARCHIVE is None:
        pytest.skip(f"llama.cpp publishes no release archive for {KEY}")
    monkeypatch.setenv("MESH_LLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MESH_LLM_CUDA", "0")
    monkeypatch.delenv("MESH_LLM_LLAMA", raising=False)
    monkeypatch.delenv("MESH_LLM_BIN_DIR", raising=False)
    monkeypatch.setattr(release, "PINNED_SHA256", {})
    hub = HubStandIn()
    with serve(hub) as url:
        monkeypatch.setattr(release, "RELEASES_URL", f"{url}/files")
        yield Setup(hub, url)


def run_build(s: Setup, capsys: pytest.CaptureFixture[str]) -> tuple[Path, str]:
    got = build.build(source=s.source)
    return got, capsys.readouterr().err


def assert_fell_back(s: Setup, err: str, why: str) -> None:
    assert s.built == [build.default_spec()], "the source build was not chosen"
    line = next(x for x in err.splitlines() if "building from source" in x)
    assert line.startswith("[llama.cpp] building from source: the release archive was not used: ")
    assert why in line
    assert build.cached_bin_dir() is None
    assert not (build.release_spec().bin_dir.parent / "BUILD_OK").exists()
    assert not build.release_spec().bin_dir.exists()


def test_a_good_archive_is_installed_checked_and_found(
        setup: Setup, good_archive: bytes, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = setup.serve_archive(good_archive)
    got, err = run_build(setup, capsys)
    spec = build.release_spec()
    assert got == spec.bin_dir and setup.built == []
    assert spec.key != build.default_spec().key  # its own cache entry
    assert (spec.bin_dir / "LICENSE").read_bytes() == b"MIT\n"  # the whole folder, libs included
    assert f"release {ARCHIVE and ARCHIVE.name} unpacked and checked" in err
    assert "100% of" in err  # the progress bar ran to the end
    assert setup.hub.gets(path) == [None]
    assert not list((build.cache_root() / "downloads").iterdir())  # the archive is not kept
    # the rest of the code finds it: the cache lookup, the backend's locate(), the RPC check
    assert build.cached_bin_dir() == spec.bin_dir
    found = binaries.locate()
    assert found.llama_server == spec.bin_dir / "llama-server"
    binaries.check_rpc(found)
    assert build.build(source=setup.source) == spec.bin_dir and setup.hub.gets(path) == [None]
    monkeypatch.setenv("MESH_LLM_LLAMA", "source")  # forcing the source build hides it
    assert build.cached_bin_dir() is None


def test_a_wrong_checksum_is_refused(setup: Setup, good_archive: bytes,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    setup.serve_archive(good_archive, pin=b"another archive")
    _, err = run_build(setup, capsys)
    assert_fell_back(setup, err, "not the pinned")
    assert "corrupt or tampered with; deleted, not used" in err
    assert not list((build.cache_root() / "downloads").iterdir())


def test_a_cut_download_is_resumed(setup: Setup, good_archive: bytes,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = setup.serve_archive(good_archive)
    cut = 3 * CHUNK + 12345
    setup.hub.cut_once[path] = cut
    got, _ = run_build(setup, capsys)
    assert got == build.release_spec().bin_dir and setup.built == []
    first, resumed = setup.hub.gets(path)  # the rest only, not all again
    assert first is None and resumed is not None
    assert 0 < int(resumed.removeprefix("bytes=").rstrip("-")) <= cut


def test_a_truncated_archive_is_refused(setup: Setup, good_archive: bytes,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The server says the short file is whole: only the checksum can tell."""
    setup.serve_archive(good_archive[:len(good_archive) // 2], pin=good_archive)
    _, err = run_build(setup, capsys)
    assert_fell_back(setup, err, "not the pinned")


def test_an_archive_without_the_rpc_server_is_refused(
        setup: Setup, real: Path, capsys: pytest.CaptureFixture[str]) -> None:
    setup.serve_archive(make_archive({"llama-server": real / "llama-server"}))
    _, err = run_build(setup, capsys)
    assert_fell_back(setup, err, f"{ARCHIVE and ARCHIVE.name} has no ggml-rpc-server in {FOLDER}/")


@pytest.mark.parametrize(("server", "rpc", "why"), [
    (b"#!/bin/sh\necho broken >&2\nexit 3\n", None, "--version exited 3: broken"),
    (None, b"#!/bin/sh\nexit 0\n", "did not listen on 127.0.0.1:"),
])
def test_a_failed_self_check_is_refused(setup: Setup, real: Path,
                                        capsys: pytest.CaptureFixture[str],
                                        server: bytes | None, rpc: bytes | None,
                                        why: str) -> None:
    setup.serve_archive(make_archive({"llama-server": server or real / "llama-server",
                                      "ggml-rpc-server": rpc or real / "ggml-rpc-server"}))
    _, err = run_build(setup, capsys)
    assert_fell_back(setup, err, why)


def test_offline_falls_back_and_a_forced_release_fails(
        setup: Setup, good_archive: bytes, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    setup.serve_archive(good_archive)
    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    monkeypatch.setattr(release, "RELEASES_URL", f"http://127.0.0.1:{dead}/files")
    _, err = run_build(setup, capsys)
    assert_fell_back(setup, err, f"cannot reach http://127.0.0.1:{dead}/files/")
    assert "no internet?" in err
    monkeypatch.setenv("MESH_LLM_LLAMA", "release")
    with pytest.raises(BuildError, match=r"cannot reach .*no internet\?"):
        build.build(source=setup.source)
    assert len(setup.built) == 1  # the forced release never fell back


def test_without_a_pin_the_archive_is_never_fetched(
        setup: Setup, good_archive: bytes, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = setup.serve_archive(good_archive)
    monkeypatch.setattr(release, "PINNED_SHA256", {})
    _, err = run_build(setup, capsys)
    assert setup.built == [build.default_spec()] and setup.hub.gets(path) == []
    assert "no pinned checksum for this platform's release archive" in err
    monkeypatch.setenv("MESH_LLM_LLAMA", "release")
    with pytest.raises(BuildError, match="MESH_LLM_LLAMA=release, but no pinned checksum"):
        build.build(source=setup.source)


def test_the_amx_cpu_variant_is_left_out(tmp_path: Path) -> None:
    """ggml's AMX matmul crashed here; on an AMX CPU its variant library is not unpacked."""
    data = make_archive({"llama-server": b"", "ggml-rpc-server": b"",
                         "libggml-cpu-sapphirerapids.so": b"", "libggml-cpu-icelake.so": b""})
    (tmp_path / "a.tar.gz").write_bytes(data)
    archive = release.Archive("a.tar.gz", "unused", None, FOLDER)
    for flags, kept in [("avx512f amx_tile fpu", False), ("avx512f fpu", True)]:
        bin_dir = tmp_path / flags / "bin"
        release.unpack(tmp_path / "a.tar.gz", archive, bin_dir, binaries=BINARIES,
                       cpu_flags=flags)
        assert (bin_dir / "libggml-cpu-sapphirerapids.so").exists() == kept
        assert (bin_dir / "libggml-cpu-icelake.so").exists()


# -- the choice itself: a pure function --------------------------------------------------------

PINNED = release.Archive("x.tar.gz", "https://example.invalid/x.tar.gz", "0" * 64, FOLDER)


@pytest.mark.parametrize(("mode", "archive", "cuda", "why"), [
    ("source", PINNED, False, "MESH_LLM_LLAMA=source"),
    (None, PINNED, True, "CUDA is wanted"),
    (None, None, False, "no release archive for this platform (plan9-vax)"),
    (None, release.Archive("y.tar.gz", "u", None, FOLDER), False,
     "no pinned checksum for this platform's release archive (y.tar.gz)"),
])
def test_choose_says_why_it_builds_from_source(mode: str | None, archive: release.Archive | None,
                                               cuda: bool, why: str) -> None:
    choice = release.choose(mode, archive, key="plan9-vax", cuda=cuda)
    assert choice.archive is None and why in choice.reason
    if mode is None:  # forcing the release then is an error naming the reason and the fix
        with pytest.raises(release.ReleaseError, match="unset MESH_LLM_LLAMA") as err:
            release.choose("release", archive, key="plan9-vax", cuda=cuda)
        assert why in str(err.value)


def test_choose_takes_a_pinned_archive_and_refuses_a_bad_mode() -> None:
    assert release.choose(None, PINNED, key="k", cuda=False).archive == PINNED
    assert release.choose("release", PINNED, key="k", cuda=False).archive == PINNED
    with pytest.raises(release.ReleaseError, match=r"MESH_LLM_LLAMA='fast' is not one of"):
        release.choose("fast", PINNED, key="k", cuda=False)


def test_the_release_table_names_the_real_archives() -> None:
    """The URL scheme of llama.cpp's release workflow at the pinned tag; no made-up pins."""
    linux = release.archive_for("b11434", "linux-x86_64")
    assert linux is not None and linux.url == (
        "https://github.com/ggml-org/llama.cpp/releases/download/b11434/"
        "llama-b11434-bin-ubuntu-x64.tar.gz")
    assert linux.folder == "llama-b11434"
    assert release.archive_for("b11434", "windows-x86_64") is None
    assert release.platform_key("linux", "AMD64") == "linux-x86_64"
    assert release.platform_key("linux", "arm64") == "linux-aarch64"
    assert all(len(v) == 64 and int(v, 16) >= 0 for v in release.PINNED_SHA256.values())


def test_cached_release_builds_are_ignored_when_cuda_is_wanted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_LLM_CACHE", str(tmp_path))
    monkeypatch.delenv("MESH_LLM_LLAMA", raising=False)
    monkeypatch.setenv("MESH_LLM_CUDA", "0")
    spec = build.release_spec()
    spec.bin_dir.mkdir(parents=True)
    for name in BINARIES:
        (spec.bin_dir / name).write_bytes(b"")
    (spec.bin_dir.parent / "BUILD_OK").write_text("test\n")
    assert build.cached_bin_dir() == spec.bin_dir
    monkeypatch.setenv("MESH_LLM_CUDA", "1")
    assert build.cached_bin_dir() is None
    shutil.rmtree(tmp_path / "llama.cpp")
