"""A stand-in Hugging Face hub for tests: the endpoints ``hf_hub_download`` and ``model_info`` use.

A starlette app served by uvicorn on 127.0.0.1 in a thread. It answers
``HEAD/GET /{org}/{repo}/resolve/{revision}/{path}`` with the hub's headers (``X-Repo-Commit``,
``ETag``/``X-Linked-Etag`` = the file's sha256 as for LFS files, ``X-Linked-Size``,
``X-Error-Code`` on 404) and HTTP Range support, ``/api/models/{org}/{repo}[/revision/{rev}]``
with the file list, and ``/files/{path}`` as a plain web server. Faults on demand: cut the
connection once after N bytes of a file, or serve a file with one byte flipped.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CHUNK = 1 << 20


class CutConnection(Exception):
    """Raised inside a response body to drop the connection mid-file (a fault we inject)."""


@dataclass
class HubStandIn:
    """Repos and files served, faults to inject, and a log of the requests seen."""

    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    plain: dict[str, bytes] = field(default_factory=dict)
    cut_once: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before cut
    corrupt: set[str] = field(default_factory=set)  # paths served with one byte flipped
    log: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, Range

    def add(self, repo: str, path: str, data: bytes) -> None:
        self.repos.setdefault(repo, {})[path] = data

    def gets(self, suffix: str) -> list[str | None]:
        """The Range headers of the GETs whose path ends with ``suffix``."""
        return [rng for method, path, rng in self.log if method == "GET" and path.endswith(suffix)]

    @property
    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/api/models/{org}/{name}", self._info),
            Route("/api/models/{org}/{name}/revision/{rev}", self._info),
            Route("/files/{path:path}", self._plain, methods=["GET", "HEAD"]),
            Route("/{org}/{name}/resolve/{rev}/{path:path}", self._resolve,
                  methods=["GET", "HEAD"]),
        ])

    async def _info(self, request: Request) -> Response:
        repo = f"{request.path_params['org']}/{request.path_params['name']}"
        if repo not in self.repos:
            return JSONResponse({"error": "Repository not found"}, 404,
                                headers={"X-Error-Code": "RepoNotFound"})
        return JSONResponse({"id": repo, "sha": COMMIT, "private": False,
                             "siblings": [{"rfilename": f} for f in sorted(self.repos[repo])]})

    async def _resolve(self, request: Request) -> Response:
        p = request.path_params
        repo, path = f"{p['org']}/{p['name']}", p["path"]
        if repo not in self.repos:
            return Response(status_code=404, headers={"X-Error-Code": "RepoNotFound"})
        data = self.repos[repo].get(path)
        if data is None:
            return Response(status_code=404, headers={"X-Error-Code": "EntryNotFound",
                                                      "X-Repo-Commit": COMMIT})
        sha = hashlib.sha256(data).hexdigest()
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"',
                   "X-Linked-Size": str(len(data))}
        return self._serve(request, f"{repo}/{path}", data, headers)

    async def _plain(self, request: Request) -> Response:
        path = request.path_params["path"]
        if path not in self.plain:
            return Response(status_code=404)
        return self._serve(request, f"files/{path}", self.plain[path], {})

    def _serve(self, request: Request, key: str, data: bytes,
               headers: dict[str, str]) -> Response:
        rng = request.headers.get("range")
        self.log.append((request.method, "/" + key, rng))
        if key in self.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        start, status = 0, 200
        if rng and rng.startswith("bytes="):
            first, _, last = rng.removeprefix("bytes=").partition("-")
            start, status = int(first), 206
            end = int(last) if last else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data_slice = data[start:end + 1]
        else:
            data_slice = data
        headers |= {"Content-Length": str(len(data_slice)), "Accept-Ranges": "bytes",
                    "Content-Type": "application/octet-stream"}
        if request.method == "HEAD":
            return Response(status_code=status, headers=headers)
        cut = self.cut_once.pop(key, None)
        return StreamingResponse(self._body(data_slice, cut), status_code=status, headers=headers)

    @staticmethod
    async def _body(data: bytes, cut: int | None) -> AsyncIterator[bytes]:
        limit = len(data) if cut is None else cut
        for offset in range(0, limit, CHUNK):
            yield data[offset:min(offset + CHUNK, limit)]
        if cut is not None:
            raise CutConnection(f"stand-in hub dropped the connection after {cut} bytes")


@contextmanager
def serve(hub: HubStandIn) -> Iterator[str]:
    """Run the stand-in on a free loopback port in a thread; yields its base URL."""
    config = uvicorn.Config(hub.app, host="127.0.0.1", port=0, log_level="critical",
                            lifespan="off", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="hf-standin", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the stand-in hub did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def tiny_gguf(path: Path, *, name: str = "tiny", payload_bytes: int = 4096) -> bytes:
    """Write a small valid GGUF (one f32 tensor of about ``payload_bytes``); returns its bytes."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_block_count(1)
    rng = np.random.default_rng(len(name) + payload_bytes)
    writer.add_tensor("token_embd.weight",
                      rng.standard_normal(max(payload_bytes // 4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()
