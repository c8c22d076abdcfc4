"""Hugging Face downloads: files into the HF cache layout, checked, with resume and progress.

Everything goes through ``huggingface_hub`` (``hf_hub_download``: HF cache layout, locking,
resume of a dropped connection with an HTTP Range request, a tqdm progress bar). Its settings are
read here at call time rather than at its import time, so ``HF_ENDPOINT``, ``HF_HOME``,
``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` set by a caller (or a test) are honoured. After a fresh
download the file's sha256 is checked against the hub's LFS ETag: ``hf_hub_download`` itself only
checks the size. ``huggingface_hub`` is imported inside the functions: it is slow to import.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

from meshcore_backend_llamacpp.models import ModelError, models_dir

DEFAULT_ENDPOINT = "https://huggingface.co"
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
PINNED_RE = re.compile(r"^sha256=(?P<hex>[0-9a-fA-F]{64})$")
HF_URL_RE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/(?:resolve|blob)/(?P<rev>[^/]+)/(?P<file>.+)$")


def endpoint() -> str:
    """The hub to talk to: ``HF_ENDPOINT`` (a mirror, or a test's stand-in) or huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def cache_dir() -> Path:
    """The HF hub cache, found the way huggingface_hub finds it (HF_HUB_CACHE, HF_HOME, XDG)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if value := os.environ.get(var):
            return Path(value).expanduser()
    if home := os.environ.get("HF_HOME"):
        return Path(home).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for no network."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _say(msg: str) -> None:
    print(f"[models] {msg}", file=sys.stderr, flush=True)


def cached(repo: str, filename: str, revision: str = "main") -> Path | None:
    """The cached copy of a hub file, without any network access; None when absent."""
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo, filename, cache_dir=str(cache_dir()), revision=revision)
    return Path(hit) if isinstance(hit, str) and Path(hit).is_file() else None


def _not_local(what: str, hint: str) -> ModelError:
    if offline():
        return ModelError(f"{what} is not in the Hugging Face cache ({cache_dir()}) and "
                          f"HF_HUB_OFFLINE is set: download it on a connected machine with "
                          f"`mesh-llm download`, or unset HF_HUB_OFFLINE")
    return ModelError(f"{what} is not downloaded yet: {hint}")


@contextmanager
def _hub_errors(repo: str, what: str) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one-line ModelErrors that say what to do."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import constants, errors

    # huggingface_hub reads HF_HUB_OFFLINE once, at import: follow the environment of now.
    constants.HF_HUB_OFFLINE = offline()
    try:
        yield
    except errors.GatedRepoError as exc:
        raise ModelError(f"{repo} is gated on {endpoint()}: accept its licence on the website "
                         f"and set HF_TOKEN") from exc
    except errors.RepositoryNotFoundError as exc:
        raise ModelError(f"model repo {repo!r} not found on {endpoint()}: check the org/repo "
                         f"spelling (or set HF_TOKEN if it is private)") from exc
    except errors.RevisionNotFoundError as exc:
        raise ModelError(f"{what}: revision not found in {repo}; check the branch or "
                         f"commit") from exc
    except errors.LocalEntryNotFoundError as exc:
        raise ModelError(f"could not reach {endpoint()} for {what}, and it is not in the cache "
                         f"({cache_dir()}): check the network or HF_ENDPOINT") from exc
    except errors.EntryNotFoundError as exc:
        raise ModelError(f"{what} not found in {repo} on {endpoint()}: check the file name "
                         f"(or use {repo}:QUANT to pick a quantisation)") from exc
    except errors.OfflineModeIsEnabled as exc:
        raise _not_local(what, "") from exc
    except (httpx2.HTTPError, errors.HfHubHTTPError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"could not download {what} from {endpoint()}: {first}; check the "
                         f"network (or HF_ENDPOINT) and run again: finished files are "
                         f"kept") from exc


def verify(path: Path, what: str) -> None:
    """Check a cached blob against its name, which the hub cache sets to the LFS sha256.

    On mismatch the blob and its snapshot link are deleted, so a rerun downloads it afresh.
    """
    blob = path.resolve()
    if not SHA256_RE.fullmatch(blob.name):
        return  # a small git (non-LFS) file: its ETag is a git sha1, not a content hash
    _say(f"verifying sha256 of {what}")
    with blob.open("rb") as fh:
        got = hashlib.file_digest(fh, "sha256").hexdigest()
    if got != blob.name:
        blob.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        raise ModelError(f"checksum mismatch for {what}: expected sha256 {blob.name}, got {got};"
                         f" the corrupt file was deleted: run the command again to re-download")


def fetch(repo: str, filename: str, revision: str = "main", *, download: bool = True) -> Path:
    """A hub file in the local cache, downloading (and verifying) it when needed."""
    what = f"{repo}/{filename}"
    if hit := cached(repo, filename, revision):
        return hit
    if not download or offline():
        raise _not_local(what, f"run `mesh-llm download {what}`")
    from huggingface_hub import hf_hub_download

    _say(f"downloading {what} from {endpoint()} into {cache_dir()}")
    with _hub_errors(repo, what):
        path = Path(hf_hub_download(repo, filename, revision=revision,
                                    cache_dir=str(cache_dir()), endpoint=endpoint()))
    verify(path, what)
    return path


def _local_listing(repo: str, revision: str) -> list[str] | None:
    """Files of a cached repo snapshot (the offline stand-in for the hub's listing)."""
    folder = cache_dir() / ("models--" + repo.replace("/", "--"))
    ref = folder / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = folder / "snapshots" / commit
    if not snapshot.is_dir():
        return None
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*")
                  if p.is_file())


def list_files(repo: str, revision: str = "main", *, download: bool = True) -> list[str]:
    """Every file path in a hub repo; from the local cache when offline or not downloading."""
    if not download or offline():
        local = _local_listing(repo, revision)
        if local is None:
            raise _not_local(f"model repo {repo}", f"run `mesh-llm download {repo}:QUANT`")
        return local
    from huggingface_hub import HfApi

    with _hub_errors(repo, f"the file list of {repo}"):
        info = HfApi(endpoint=endpoint()).model_info(
            repo, revision=None if revision == "main" else revision)
    return sorted(s.rfilename for s in info.siblings or ())


def parse_hub_url(url: str) -> tuple[str, str, str] | None:
    """``(repo, revision, file)`` for a hub file URL (huggingface.co or HF_ENDPOINT), else None."""
    parsed = urlparse(url)
    hub_hosts = {"huggingface.co", "www.huggingface.co", "hf.co", urlparse(endpoint()).netloc}
    m = HF_URL_RE.match(parsed.path)
    if parsed.netloc not in hub_hosts or not m:
        return None
    return m["repo"], unquote(m["rev"]), unquote(m["file"])


def url_target(url: str) -> Path:
    """Where a plain URL's file is kept: the models dir, by host and file name."""
    parsed = urlparse(url)
    name = PurePosixPath(unquote(parsed.path)).name
    if not name.endswith(".gguf"):
        raise ModelError(f"URL {url} does not name a .gguf file; give the direct link to one")
    host = re.sub(r"[^\w.-]", "_", parsed.netloc)
    return models_dir() / "urls" / host / name


def split_pin(url: str) -> tuple[str, str | None]:
    """A model URL without its ``#sha256=HEX`` fragment, and that sha256 (None when absent)."""
    base, hash_sign, fragment = url.partition("#")
    if not hash_sign:
        return url, None
    if (m := PINNED_RE.fullmatch(fragment)) is None:
        raise ModelError(f"URL {url}: after '#' give the file's checksum as sha256= and 64 hex "
                         f"digits ({base}#sha256=HEX), or drop the '#...' part")
    return base, m["hex"].lower()


def _sha256_of(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def pinned_matches(path: Path, sha256: str) -> bool:
    """Whether ``path`` has this sha256. A hub blob is named by its sha256 (checked when it was
    downloaded); a plain file's check is remembered in ``NAME.sha256`` until the file changes."""
    if SHA256_RE.fullmatch(path.resolve().name):
        return path.resolve().name == sha256
    mark = path.with_name(path.name + ".sha256")
    try:
        if (mark.read_text().strip() == sha256
                and mark.stat().st_mtime_ns >= path.stat().st_mtime_ns):
            return True
    except OSError:
        pass
    _say(f"verifying sha256 of {path.name}")
    if _sha256_of(path) != sha256:
        return False
    mark.write_text(sha256 + "\n")
    return True


def fetch_url(url: str, *, download: bool = True, sha256: str | None = None) -> Path:
    """A plain http(s) file, kept under the models dir; a rerun resumes a partial download.

    With ``sha256`` the file (cached or fresh) must have that checksum: a mismatching one is
    deleted and the error says so."""
    target = url_target(url)
    if target.is_file():
        if sha256 is not None and not pinned_matches(target, sha256):
            target.unlink(missing_ok=True)
            raise ModelError(f"checksum mismatch for {url}: the kept copy {target} is not sha256 "
                             f"{sha256}; it was deleted: run the command again to download it")
        return target
    if not download or offline():
        raise _not_local(url, f"run `mesh-llm download {url}`")
    from huggingface_hub.file_download import http_get

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    _say(f"downloading {url} into {target.parent}")
    with _hub_errors(url, url), partial.open("ab") as fh:
        http_get(url, fh, resume_size=fh.tell(), displayed_filename=target.name)
    if sha256 is not None:
        _say(f"verifying sha256 of {target.name}")
        if (got := _sha256_of(partial)) != sha256:
            partial.unlink(missing_ok=True)
            raise ModelError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {got};"
                             f" the download was deleted: check the URL and the checksum")
    partial.replace(target)
    if sha256 is not None:
        target.with_name(target.name + ".sha256").write_text(sha256 + "\n")
    return target
