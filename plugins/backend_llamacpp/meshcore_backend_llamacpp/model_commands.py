"""The ``mesh-llm download`` and ``mesh-llm models`` commands: the catalog and what is installed.

``download`` with no name lists the catalog (installed entries marked, sizes); with a name (any
``--model`` form) it fetches the model, and its draft with ``--draft``. ``models`` lists the GGUF
models found locally (Hugging Face cache and the mesh-llm models dir) and their sizes, split
files counted once with their shards summed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from meshcore_backend_llamacpp.catalog import CatalogEntry


@dataclass(frozen=True)
class Installed:
    """One model on disk: a single GGUF or a set of split shards."""

    name: str  # catalog name when known, else the file's stem
    source: str  # "hf:org/repo" or "local"
    shards: tuple[Path, ...]

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.shards)


def entry_installed(entry: CatalogEntry) -> bool:
    """Whether every file of a catalog entry is on disk (no network)."""
    from meshcore_backend_llamacpp import hub
    from meshcore_backend_llamacpp.models import models_dir

    if entry.pypi:
        return (models_dir() / entry.file_name).is_file()
    assert entry.repo is not None
    return all(hub.cached(entry.repo, f) is not None for f in entry.files)


def _group(paths: list[Path], source: str) -> list[Installed]:
    from meshcore_backend_llamacpp.catalog import load
    from meshcore_backend_llamacpp.models import SHARD_RE, model_name, shard_names

    catalog = load()
    out: list[Installed] = []
    for path in sorted(paths):
        m = SHARD_RE.match(path.name)
        if m and int(m["idx"]) != 1:
            continue  # counted with its first shard
        shards = tuple(path.with_name(n) for n in shard_names(path.name))
        shards = tuple(p for p in shards if p.is_file())
        entry = catalog.by_file(path.name)
        out.append(Installed(entry.name if entry else model_name(path.name), source, shards))
    return out


def installed_models() -> list[Installed]:
    """GGUF models in the HF cache (every snapshot, blobs counted once) and the models dir."""
    from meshcore_backend_llamacpp import hub
    from meshcore_backend_llamacpp.models import models_dir

    found: list[Installed] = []
    seen: set[Path] = set()
    for repo_dir in sorted(hub.cache_dir().glob("models--*")):
        repo = "/".join(repo_dir.name.split("--", 2)[1:])
        paths = []
        for path in sorted((repo_dir / "snapshots").glob("*/**/*.gguf")):
            blob = path.resolve()
            if path.is_file() and blob not in seen:
                seen.add(blob)
                paths.append(path)
        found.extend(_group(paths, f"hf:{repo}"))
    local = models_dir()
    if local.is_dir():
        found.extend(_group([p for p in local.rglob("*.gguf") if p.is_file()], "local"))
    return found


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(1)


def list_catalog() -> None:
    from meshcore_backend_llamacpp.catalog import human_size, load

    entries = load().entries
    print(f"  {'NAME':<30} {'QUANT':<7} {'SIZE':>12}  {'DRAFT':<22} DESCRIPTION")
    for e in entries:
        mark = "*" if entry_installed(e) else " "
        size = human_size(e.size) + (f" in {len(e.files)}" if e.is_split else "")
        draft = "(itself)" if e.draft == e.name else (e.draft or "-")
        print(f"{mark} {e.name:<30} {e.quant:<7} {size:>12}  {draft:<22} {e.description}")
    print("\n* installed.  Fetch one: mesh-llm download NAME [--draft]; any --model form "
          "(org/repo:QUANT, org/repo/file.gguf, URL) works too.")


def download(
    name: Annotated[str | None, typer.Argument(
        help="Catalog name (unique part is enough), org/repo:QUANT, org/repo/file.gguf or "
             "URL. Omit to list the catalog.")] = None,
    draft: Annotated[bool, typer.Option(
        "--draft", help="Also fetch the draft model the catalog pairs with it.")] = False,
) -> None:
    """List the model catalog, or download a model (and its draft) into the local cache."""
    if name is None:
        list_catalog()
        return
    from meshcore_backend_llamacpp.catalog import human_size, load
    from meshcore_backend_llamacpp.models import ModelError, resolve, resolve_entry

    try:
        model = resolve(name, download=True, draft=draft)
        print(f"{model.name}: {human_size(model.size)} in {len(model.shards)} file(s), "
              f"{model.path}")
        if draft:
            pair = load().draft_for(model.name, model.path.name)
            if pair is None:
                print(f"no draft is paired with {model.name}")
            elif pair.file_name != model.path.name:
                got = resolve_entry(pair, download=True, draft=False)
                print(f"draft {got.name}: {human_size(got.size)}, {got.path}")
    except ModelError as exc:
        _fail(str(exc))


def models() -> None:
    """Show the models installed on this machine and how big they are."""
    from meshcore_backend_llamacpp import hub
    from meshcore_backend_llamacpp.catalog import human_size
    from meshcore_backend_llamacpp.models import models_dir

    found = installed_models()
    if not found:
        print(f"no models installed (looked in {hub.cache_dir()} and {models_dir()}); "
              f"see `mesh-llm download`")
        return
    print(f"{'MODEL':<36} {'SIZE':>9}  {'FILES':>5}  SOURCE / PATH")
    for item in found:
        print(f"{item.name:<36} {human_size(item.size):>9}  {len(item.shards):>5}  "
              f"{item.source}  {item.shards[0]}")
    total = sum(item.size for item in found)
    print(f"{len(found)} model(s), {human_size(total)} in all")
