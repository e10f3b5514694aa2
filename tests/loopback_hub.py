"""A Hugging Face hub on loopback: the download endpoints ``huggingface_hub`` calls (repository info, file tree,
resolve), serving repositories of real files, so the real client downloads, caches and fails as it does on the hub.

Point a process at it with ``HF_ENDPOINT``. A repository can be gated (401 ``GatedRepo`` without a token) or cut
(its weights end halfway, as a dropped connection or a truncating proxy leaves them); ``push`` makes a new commit.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from harness.launcher import free_port
from tests.serving import wait_until


@dataclass
class Repo:
    """One repository: its commits (oldest first), each a mapping of file name to bytes."""

    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)
    gated: bool = False
    cut: bool = False  # weight files are served half-length under the full advertised size

    def at(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        if revision == "main":
            return self.commits[-1]
        return next((c for c in self.commits if c[0] == revision), None)


def read_dir(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _error(status: int, code: str, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers={"X-Error-Code": code})


@dataclass
class LoopbackHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)  # "METHOD path" of every request, in order

    def push(self, repo_id: str, files: dict[str, bytes]) -> str:
        """Commit ``files`` as the new head of ``main``; returns the commit hash."""
        repo = self.repos.setdefault(repo_id, Repo())
        digest = hashlib.sha1(repo_id.encode() + str(len(repo.commits)).encode())
        for name, data in sorted(files.items()):
            digest.update(name.encode() + hashlib.sha1(data).digest())
        commit = digest.hexdigest()
        repo.commits.append((commit, dict(files)))
        return commit

    def _find(self, request: Request, repo_id: str, revision: str) -> tuple[Repo, str, dict[str, bytes]] | Response:
        repo = self.repos.get(repo_id)
        if repo is None:
            return _error(404, "RepoNotFound", f"Repository Not Found for url: {request.url}")
        if repo.gated and not request.headers.get("authorization"):
            return _error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must be authenticated.")
        found = repo.at(revision)
        if found is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo, *found

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.middleware("http")
        async def record(request: Request, call_next: Any) -> Response:
            self.requests.append(f"{request.method} {request.url.path}")
            response: Response = await call_next(request)
            return response

        @app.get("/api/models/{owner}/{name}/revision/{revision}")
        async def info(request: Request, owner: str, name: str, revision: str) -> Response:
            found = self._find(request, f"{owner}/{name}", revision)
            if isinstance(found, Response):
                return found
            _, commit, files = found
            siblings = [{"rfilename": f} for f in files]
            return JSONResponse({"id": f"{owner}/{name}", "sha": commit, "siblings": siblings, "private": False})

        @app.get("/api/models/{owner}/{name}/tree/{revision}")
        async def tree(request: Request, owner: str, name: str, revision: str) -> Response:
            found = self._find(request, f"{owner}/{name}", revision)
            if isinstance(found, Response):
                return found
            _, _, files = found
            entries = [
                {"type": "file", "path": f, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                for f, data in files.items()
            ]
            return JSONResponse(entries)

        @app.api_route("/{owner}/{name}/resolve/{revision}/{filename:path}", methods=["GET", "HEAD"])
        async def resolve(request: Request, owner: str, name: str, revision: str, filename: str) -> Response:
            found = self._find(request, f"{owner}/{name}", revision)
            if isinstance(found, Response):
                return found
            repo, commit, files = found
            if filename not in files:
                return _error(404, "EntryNotFound", f"{filename} does not exist at {revision}")
            data = files[filename]
            headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
            if request.method == "HEAD":
                headers["Content-Length"] = str(len(data))
                return Response(headers=headers)
            if repo.cut and filename.endswith((".safetensors", ".bin", ".h5")):
                data = data[: len(data) // 2]
            return Response(data, headers=headers, media_type="application/octet-stream")

        return app


@contextmanager
def serve_hub(hub: LoopbackHub) -> Iterator[str]:
    """Serve ``hub`` on a free loopback port from a thread; yields its URL (for ``HF_ENDPOINT``); stopped after."""
    port = free_port()
    config = uvicorn.Config(hub.app(), host="127.0.0.1", port=port, log_config=None, access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="loopback-hub", daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout=30, what="loopback hub started")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
