"""Prebuilt llama.cpp from its GitHub release: choose, download (resumable), verify, unpack, check.

llama.cpp's release workflow (``.github/workflows/release.yml`` in the pinned sdist) publishes, per
tag, ``llama-<tag>-bin-<platform>.tar.gz``: one folder ``llama-<tag>/`` holding ``llama-server``,
``ggml-rpc-server`` and the shared ggml libraries they load from beside themselves (built with
``-DGGML_RPC=ON -DGGML_BACKEND_DL=ON``, rpath ``$ORIGIN`` / ``@loader_path``). An archive is used
only when its sha256 is pinned in :data:`PINNED_SHA256`; otherwise, or when anything goes wrong,
build.py falls back to the source build and says why. Nothing here imports build.py: the cache
layout, binary names and CPU flags are handed in.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

RELEASES_URL = "https://github.com/ggml-org/llama.cpp/releases/download"
# This machine (sys.platform-machine) -> the release's name for its CPU build (Metal on macOS
# arm64). CUDA archives need a separate cudart archive and a matching driver: CUDA builds from
# source.
PLATFORMS = {
    "linux-x86_64": "ubuntu-x64",
    "linux-aarch64": "ubuntu-arm64",
    "darwin-arm64": "macos-arm64",
    "darwin-x86_64": "macos-x64",
}
# The sha256 of each archive as GitHub serves it, by file name. Only someone who can reach GitHub
# can fill these in (docs/backend.md, "Release binaries", has the one-line command); an archive
# without a pin is never downloaded.
PINNED_SHA256: dict[str, str] = {
    # "llama-b11434-bin-ubuntu-x64.tar.gz": "<sha256>",
    # "llama-b11434-bin-ubuntu-arm64.tar.gz": "<sha256>",
    # "llama-b11434-bin-macos-arm64.tar.gz": "<sha256>",
    # "llama-b11434-bin-macos-x64.tar.gz": "<sha256>",
}
# The x86 CPU variant ggml builds with AMX (GGML_CPU_ALL_VARIANTS). ggml's AMX matmul crashed every
# start on an AMX Xeon VM (build.NO_AMX); without this file ggml loads its next best variant.
AMX_VARIANTS = ("libggml-cpu-sapphirerapids.so",)
MAX_ARCHIVE_BYTES = 512 << 20  # the CPU archives are ~30 MB; a server sending more is refused
MODES = ("release", "source")


class ReleaseError(RuntimeError):
    """The release archive cannot be used; the message says why and what happens instead."""


@dataclass(frozen=True)
class Archive:
    """One release archive: its file name, URL, pinned sha256 (None: not pinned) and folder."""

    name: str
    url: str
    sha256: str | None
    folder: str


@dataclass(frozen=True)
class Choice:
    """Use ``archive``, or build from source (``archive`` None) because of ``reason``."""

    archive: Archive | None
    reason: str


def platform_key(system: str = sys.platform, machine: str = platform.machine()) -> str:
    """``linux-x86_64``, ``darwin-arm64``, ...: the keys of :data:`PLATFORMS`."""
    machine = machine.lower()
    machine = {"amd64": "x86_64", "x64": "x86_64"}.get(machine, machine)
    if system == "linux" and machine == "arm64":
        machine = "aarch64"
    return f"{system}-{machine}"


def archive_for(version: str, key: str) -> Archive | None:
    """The release archive of ``version`` for platform ``key``, or None when none is published."""
    tag = PLATFORMS.get(key)
    if tag is None:
        return None
    name = f"llama-{version}-bin-{tag}.tar.gz"
    return Archive(name, f"{RELEASES_URL}/{version}/{name}", PINNED_SHA256.get(name),
                   f"llama-{version}")


def choose(mode: str | None, archive: Archive | None, *, key: str, cuda: bool) -> Choice:
    """Release or source, from ``MESH_LLM_LLAMA`` (``mode``) and what is available.

    Raises :class:`ReleaseError` for an unknown mode, or when the release is forced but unusable.
    """
    if mode not in (None, "", *MODES):
        raise ReleaseError(f"MESH_LLM_LLAMA={mode!r} is not one of {', '.join(MODES)}; set it to "
                           f"release or source, or unset it to let mesh-llm choose")
    if mode == "source":
        return Choice(None, "MESH_LLM_LLAMA=source")
    why = None
    if cuda:
        why = "CUDA is wanted and the release archives used here are CPU/Metal builds"
    elif archive is None:
        why = f"llama.cpp publishes no release archive for this platform ({key})"
    elif archive.sha256 is None:
        why = f"no pinned checksum for this platform's release archive ({archive.name})"
    if why is None and archive is not None:
        return Choice(archive, f"release archive {archive.name}")
    if mode == "release":
        raise ReleaseError(f"MESH_LLM_LLAMA=release, but {why}; unset MESH_LLM_LLAMA (or set it "
                           f"to source) to build llama.cpp from source")
    return Choice(None, str(why))


def sha256_of(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _show(name: str, have: int, total: int | None, shown: list[int]) -> None:
    """A one-line progress bar on stderr, redrawn when the percentage changes."""
    if not total:
        return
    pct = min(100, 100 * have // total)
    if shown and shown[-1] == pct:
        return
    shown.append(pct)
    bar = "#" * (pct // 4)
    print(f"\r[llama.cpp] {name} [{bar:<25}] {pct:>3}% of {total / 1e6:.1f} MB", end="",
          file=sys.stderr, flush=True)


def _fetch(client: httpx.Client, archive: Archive, part: Path, shown: list[int]) -> None:
    """One GET of the archive into ``part``, resumed with Range from what it already holds."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with client.stream("GET", archive.url, headers=headers) as resp:
        if resp.status_code == 416:  # nothing left to send: the checksum decides
            return
        if resp.status_code == 206 and resp.headers.get("content-range", "").startswith(
                f"bytes {have}-"):
            mode = "ab"
        elif resp.status_code == 200:  # the server ignored Range: start again
            have, mode = 0, "wb"
        else:
            raise ReleaseError(f"{archive.url} answered HTTP {resp.status_code}")
        length = resp.headers.get("content-length")
        total = have + int(length) if length and length.isdigit() else None
        with part.open(mode) as fh:
            for chunk in resp.iter_bytes(1 << 20):
                have += len(chunk)
                if have > MAX_ARCHIVE_BYTES:
                    raise ReleaseError(f"{archive.url} sent more than {MAX_ARCHIVE_BYTES >> 20} "
                                       f"MiB; refused")
                fh.write(chunk)
                _show(archive.name, have, total, shown)
    if total is not None and have < total:
        raise ReleaseError(f"{archive.url} stopped at {have} of {total} bytes")


def download(archive: Archive, dest: Path, *, client: httpx.Client | None = None,
             attempts: int = 3) -> Path:
    """The archive in ``dest``, checked against its pin; a cut transfer is resumed (Range)."""
    if archive.sha256 is None:
        raise ReleaseError(f"no pinned checksum for {archive.name}; it will not be downloaded")
    dest.mkdir(parents=True, exist_ok=True)
    part = dest / f"{archive.name}.part"
    own = client is None
    http = client or httpx.Client(follow_redirects=True, timeout=httpx.Timeout(30, connect=10))
    shown: list[int] = []
    try:
        for attempt in range(1, attempts + 1):
            try:
                _fetch(http, archive, part, shown)
                break
            except httpx.ConnectError as exc:
                raise ReleaseError(f"cannot reach {archive.url} ({exc}); no internet?") from None
            except (httpx.TransportError, ReleaseError) as exc:
                if isinstance(exc, ReleaseError) and "stopped at" not in str(exc):
                    raise
                if attempt == attempts:
                    raise ReleaseError(f"download of {archive.url} failed {attempts} times "
                                       f"({exc}); what arrived is kept in {part} and resumed "
                                       f"next time") from None
    finally:
        if shown:
            print(file=sys.stderr)
        if own:
            http.close()
    got = sha256_of(part)
    if got != archive.sha256:
        part.unlink()
        raise ReleaseError(f"{archive.url} has sha256 {got}, not the pinned {archive.sha256}: "
                           f"corrupt or tampered with; deleted, not used")
    target = dest / archive.name
    os.replace(part, target)
    return target


def unpack(path: Path, archive: Archive, bin_dir: Path, *, binaries: tuple[str, ...],
           cpu_flags: str) -> None:
    """Unpack the archive's folder as ``bin_dir`` (libraries included: they load from there)."""
    bin_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="unpack-", dir=bin_dir.parent) as tmp:
        try:
            with tarfile.open(path) as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise ReleaseError(f"cannot unpack {path}: {exc}") from None
        folder = Path(tmp) / archive.folder
        missing = [b for b in binaries if not (folder / b).is_file()]
        if missing:
            raise ReleaseError(f"{archive.name} has no {' or '.join(missing)} in "
                               f"{archive.folder}/ (mesh-llm needs {' and '.join(binaries)})")
        if "amx" in cpu_flags:  # amx_tile, amx_int8, amx_bf16
            for variant in AMX_VARIANTS:
                (folder / variant).unlink(missing_ok=True)
        if bin_dir.exists():
            shutil.rmtree(bin_dir)
        os.replace(folder, bin_dir)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def self_check(bin_dir: Path, binaries: tuple[str, ...], log: Path, timeout: float = 20) -> None:
    """``llama-server --version`` exits 0, and the rpc server listens on loopback (then stops)."""
    server, rpc = (bin_dir / name for name in binaries)
    try:
        out = subprocess.run([str(server), "--version"], capture_output=True, text=True,
                             timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ReleaseError(f"{server} --version failed: {exc}") from None
    if out.returncode != 0:
        raise ReleaseError(f"{server} --version exited {out.returncode}: "
                           f"{(out.stderr or out.stdout).strip()[-400:]}")
    port = _free_port()
    with log.open("wb") as fh:
        try:
            proc = subprocess.Popen([str(rpc), "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
                                    stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            raise ReleaseError(f"{rpc} does not start: {exc}") from None
    try:
        deadline = time.monotonic() + timeout
        while not _listening(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace").strip()[-400:]
                raise ReleaseError(f"{rpc} did not listen on 127.0.0.1:{port} (exit "
                                   f"{proc.poll()}); its output: {tail}")
            time.sleep(0.05)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def install(archive: Archive, bin_dir: Path, *, downloads: Path, binaries: tuple[str, ...],
            cpu_flags: str, say: Callable[[str], None],
            client: httpx.Client | None = None) -> Path:
    """Download, verify, unpack and self-check ``archive`` into ``bin_dir``; marks it complete
    with ``BUILD_OK`` beside it (as the source build does) only when every step passed."""
    root = bin_dir.parent
    ok = root / "BUILD_OK"
    ok.unlink(missing_ok=True)
    say(f"downloading {archive.url}")
    path = download(archive, downloads, client=client)
    started = time.monotonic()
    try:
        unpack(path, archive, bin_dir, binaries=binaries, cpu_flags=cpu_flags)
        self_check(bin_dir, binaries, root / "selfcheck.log")
    except ReleaseError:
        shutil.rmtree(bin_dir, ignore_errors=True)
        raise
    finally:
        path.unlink(missing_ok=True)
    ok.write_text(f"{archive.name}\nsha256 {archive.sha256}\n")
    say(f"release {archive.name} unpacked and checked in {time.monotonic() - started:.1f} s "
        f"-> {bin_dir}")
    return bin_dir
