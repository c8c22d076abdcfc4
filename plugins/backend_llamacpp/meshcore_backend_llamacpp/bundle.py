"""``mesh-llm bundle OUT``: one archive that installs mesh-llm on another machine, offline.

The archive holds a wheelhouse (the workspace's own wheels, built from the source checkout, plus
every dependency pinned to the version running here), this machine's cached llama.cpp binaries,
and ``install.sh``, which makes a venv, ``pip install --no-index``-es from the wheelhouse and
writes a ``mesh-llm`` launcher that points ``MESH_LLM_BIN_DIR`` at the bundled binaries. The
target needs the same OS, CPU architecture and Python minor version (wheels and binaries are
platform builds); copy it over with scp and run ``./install.sh``.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Annotated

import typer

PROJECT = "mesh-llm"
INSTALL_SH = r"""#!/bin/sh
# Install mesh-llm from this bundle, with no network access.
#   ./install.sh [PREFIX]          default PREFIX: $HOME/.local/share/mesh-llm
#   PYTHON=python3.X ./install.sh  to pick the interpreter (this bundle needs Python @PYVER@)
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
PREFIX=${1:-${MESH_LLM_PREFIX:-$HOME/.local/share/mesh-llm}}
PYTHON=${PYTHON:-python3}
HAVE=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$HAVE" != "@PYVER@" ]; then
  echo "error: this bundle holds wheels for Python @PYVER@ but $PYTHON is $HAVE;" \
       "run it with PYTHON=python@PYVER@ ./install.sh" >&2
  exit 2
fi
case $PREFIX in
  *"
"*) echo "error: the install folder must not contain a newline; pick another" >&2; exit 2 ;;
esac
mkdir -p -- "$PREFIX"
PREFIX=$(CDPATH='' cd -- "$PREFIX" && pwd)
"$PYTHON" -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-index \
  --find-links "$HERE/wheels" mesh-llm
if [ -d "$HERE/bin" ]; then
  mkdir -p "$PREFIX/bin"
  cp "$HERE"/bin/* "$PREFIX/bin/"
fi
# The launcher holds PREFIX as one single-quoted word (each ' written as '\''): a folder name
# with spaces, quotes, $(...) or backticks stays data and never runs.
QUOTED="'$(printf '%s' "$PREFIX" | sed "s/'/'\\\\''/g")'"
{
  printf '%s\n' '#!/bin/sh' "PREFIX=$QUOTED"
  if [ -d "$HERE/bin" ]; then
    printf '%s\n' 'MESH_LLM_BIN_DIR=${MESH_LLM_BIN_DIR:-$PREFIX/bin}' 'export MESH_LLM_BIN_DIR'
  fi
  printf '%s\n' 'exec "$PREFIX/venv/bin/mesh-llm" "$@"'
} > "$PREFIX/mesh-llm"
chmod +x "$PREFIX/mesh-llm"
printf 'mesh-llm installed: %s (put it on PATH, or link it into ~/.local/bin)\n' \
  "$PREFIX/mesh-llm"
"""


def install_script(pyver: str) -> str:
    """``install.sh`` for a wheelhouse of Python ``pyver`` (e.g. ``3.11``)."""
    return INSTALL_SH.replace("@PYVER@", pyver)


class BundleError(RuntimeError):
    """The bundle could not be built; the message says which step failed and what to do."""


def project_root() -> Path:
    """The source checkout this mesh-llm runs from (bundles are built from source)."""
    root = Path(__file__).resolve().parents[3]  # plugins/backend_llamacpp/<package>/
    pyproject = root / "pyproject.toml"
    try:
        name = tomllib.loads(pyproject.read_text())["project"]["name"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        name = None
    if name != PROJECT:
        raise BundleError(f"no mesh-llm source checkout at {root}: `mesh-llm bundle` builds "
                          f"wheels from source; run it from a git clone (./dev.sh sets one up)")
    return root


def workspace_dirs(root: Path) -> list[Path]:
    """The root project and every plugin project of the uv workspace."""
    return [root, *sorted(p.parent for p in root.glob("plugins/*/pyproject.toml"))]


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def pinned_requirements(root: str, exclude: set[str]) -> list[str]:
    """``name==version`` for every installed distribution ``root`` needs (extras followed,
    markers evaluated here), excluding ``exclude`` (the workspace's own packages)."""
    from packaging.requirements import Requirement

    wanted: set[tuple[str, str]] = set()
    queue = [(_norm(root), "")]
    while queue:
        item = queue.pop()
        if item in wanted:
            continue
        wanted.add(item)
        name, extra = item
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError as exc:
            raise BundleError(f"{name} is needed but not installed here; run `uv sync` "
                              f"first") from exc
        for raw in dist.requires or ():
            req = Requirement(raw)
            if req.marker and not req.marker.evaluate({"extra": extra}):
                continue
            queue.extend((_norm(req.name), ex) for ex in ("", *sorted(req.extras)))
    pins = []
    for name in sorted({n for n, _ in wanted}):
        if name in exclude or name == _norm(root):
            continue
        pins.append(f"{name}=={metadata.version(name)}")
    return pins


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    print(f"[bundle] {what}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise BundleError(f"{what} failed (exit {done.returncode}):\n{tail}")


def build_wheels(root: Path, wheels: Path) -> list[str]:
    """Wheels of the workspace packages (uv when present, else pip); returns their names."""
    dirs = workspace_dirs(root)
    names = [tomllib.loads((d / "pyproject.toml").read_text())["project"]["name"] for d in dirs]
    uv = shutil.which("uv")
    if uv:
        _run([uv, "build", "--all-packages", "--wheel", "--out-dir", str(wheels), "-q"],
             "building the workspace's wheels (uv build)", cwd=root)
    else:
        for d in dirs:
            _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels),
                  str(d)], f"building the wheel of {d.name} (pip wheel)")
    return names


def fetch_dependencies(pins: list[str], wheels: Path, find_links: Path | None) -> None:
    """Wheels for the pinned dependencies: downloaded, or built where only an sdist exists."""
    reqs = wheels.parent / "requirements.txt"
    reqs.write_text("\n".join(pins) + "\n")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
           "--disable-pip-version-check", "-w", str(wheels), "-r", str(reqs)]
    if find_links:
        cmd += ["--find-links", str(find_links)]
    _run(cmd, f"fetching {len(pins)} dependency wheels from the package index (pip wheel)")


def default_bin_dir() -> Path | None:
    try:
        from meshcore_backend_llamacpp.build import cached_bin_dir
    except ImportError:
        return None
    found: Path | None = cached_bin_dir()
    return found


def bundle_dirname() -> str:
    """The archive's top folder: project version, OS, CPU and Python it was built for."""
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return f"mesh-llm-bundle-{metadata.version(PROJECT)}-{sys.platform}-{platform.machine()}-{py}"


def make_bundle(out: Path, *, bin_dir: Path | None, binaries: bool,
                find_links: Path | None = None) -> Path:
    """Write the archive; returns its path (``.tar.gz`` appended when missing)."""
    root = project_root()
    if not out.name.endswith((".tar.gz", ".tgz")):
        out = out.with_name(out.name + ".tar.gz")
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    src_bins = (bin_dir or default_bin_dir()) if binaries else None
    if binaries and bin_dir is None and src_bins is None:
        print("[bundle] no cached llama.cpp build found: the bundle will hold no binaries "
              "(build them with `python -m meshcore_backend_llamacpp.build`)", file=sys.stderr)
    if src_bins is not None and not src_bins.is_dir():
        raise BundleError(f"--bin-dir {src_bins} is not a directory; point it at the folder "
                          f"holding llama-server and ggml-rpc-server")
    with tempfile.TemporaryDirectory(prefix="mesh-llm-bundle-") as tmp:
        top = Path(tmp) / bundle_dirname()
        wheels = top / "wheels"
        wheels.mkdir(parents=True)
        names = build_wheels(root, wheels)
        fetch_dependencies(pinned_requirements(PROJECT, {_norm(n) for n in names}), wheels,
                           find_links)
        if src_bins is not None:
            (top / "bin").mkdir()
            for f in sorted(src_bins.iterdir()):
                if f.is_file():
                    shutil.copy2(f, top / "bin" / f.name)
        script = top / "install.sh"
        script.write_text(install_script(pyver))
        script.chmod(0o755)
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"[bundle] writing {out}", file=sys.stderr, flush=True)
        with tarfile.open(out, "w:gz", compresslevel=1) as tar:
            tar.add(top, arcname=top.name)
    return out


def bundle(
    out: Annotated[Path, typer.Argument(help="Archive to write (.tar.gz added if missing).")],
    bin_dir: Annotated[Path | None, typer.Option(
        help="llama.cpp binaries to include (default: this machine's cached build).")] = None,
    no_binaries: Annotated[bool, typer.Option(
        "--no-binaries", help="Leave llama.cpp out (the target builds its own).")] = False,
    find_links: Annotated[Path | None, typer.Option(
        help="Also look for dependency wheels in this folder.")] = None,
) -> None:
    """Write a self-contained archive (wheels + llama.cpp binaries + install.sh) for offline
    installation on another machine of the same platform."""
    try:
        path = make_bundle(out, bin_dir=bin_dir, binaries=not no_binaries,
                           find_links=find_links)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    size = path.stat().st_size / 1e6
    print(f"{path} ({size:.0f} MB). On the other machine: tar xzf {path.name} && "
          f"./{bundle_dirname()}/install.sh")
