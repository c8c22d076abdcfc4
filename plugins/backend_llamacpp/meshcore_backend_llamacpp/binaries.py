"""Find the llama.cpp binaries (llama-server, ggml-rpc-server) and check they support RPC."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from meshcore_backend_llamacpp.build import BINARIES, cached_bin_dir

SETUP_HINT = ("run `./dev.sh run` (or `python -m meshcore_backend_llamacpp.build`) once to build "
              "them, or pass --bin-dir / MESH_LLM_BIN_DIR pointing at your own llama.cpp build "
              "(cmake -DGGML_RPC=ON)")

RPC_MARKER = b"RPC handshake failed for"  # a string of ggml-rpc.cpp's client side


class BackendError(RuntimeError):
    """The backend cannot run; the message names the input, the problem and the fix."""


@dataclass(frozen=True)
class Binaries:
    bin_dir: Path
    llama_server: Path
    rpc_server: Path

    def to_dict(self) -> dict[str, str]:
        return {"bin_dir": str(self.bin_dir), "llama_server": str(self.llama_server),
                "rpc_server": str(self.rpc_server)}


def locate(bin_dir: Path | None = None) -> Binaries:
    """Binaries from ``bin_dir`` (--bin-dir / MESH_LLM_BIN_DIR) or the cached build."""
    if bin_dir is None and (env := os.environ.get("MESH_LLM_BIN_DIR")):
        bin_dir = Path(env)
    source = "--bin-dir" if bin_dir is not None else "the cached build"
    if bin_dir is None:
        bin_dir = cached_bin_dir()
        if bin_dir is None:
            raise BackendError(f"llama.cpp binaries are not built yet; {SETUP_HINT}")
    bin_dir = bin_dir.expanduser()
    found = {}
    for name in BINARIES:
        path = bin_dir / name
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise BackendError(f"{source} {bin_dir} has no executable {name} (a llama.cpp "
                               f"build with RPC has both {' and '.join(BINARIES)}); "
                               f"{SETUP_HINT}")
        found[name] = path
    return Binaries(bin_dir, found["llama-server"], found["ggml-rpc-server"])


def has_rpc(binary: Path) -> bool:
    """True when ``binary`` contains llama.cpp's RPC client (static builds), or a shared
    ``libggml-rpc`` sits beside it or in ``../lib`` (shared builds)."""
    import mmap

    with binary.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data.find(RPC_MARKER) >= 0:
            return True
    return any(any(d.glob("libggml-rpc*")) for d in (binary.parent, binary.parent.parent / "lib")
               if d.is_dir())


def check_rpc(binaries: Binaries) -> None:
    """Fail with the fix unless llama-server was built with RPC (cmake -DGGML_RPC=ON).

    Asking llama-server itself does not work: ``--rpc`` connects at once and aborts."""
    if not has_rpc(binaries.llama_server):
        raise BackendError(f"{binaries.llama_server} was built without RPC support, which "
                           f"mesh-llm needs; rebuild llama.cpp with -DGGML_RPC=ON, or "
                           f"{SETUP_HINT}")
