"""A fake Hugging Face Hub on loopback: the endpoints huggingface_hub's downloads use, served from folders.

What huggingface_hub 2.4 asks of a Hub when `snapshot_download` / `hf_hub_download` fetch files:

- ``GET /api/models/ORG/NAME/revision/REV``: the repository's info; ``sha`` is the commit;
- ``GET /api/models/ORG/NAME/tree/REV?recursive=True``: the file list, with sizes and, for files
  stored in LFS (weights, checkpoints), their sha256 (one page: no ``Link`` header);
- ``HEAD /ORG/NAME/resolve/REV/PATH``: ``X-Repo-Commit``, ``ETag`` (the git blob id; for LFS files
  ``X-Linked-Etag`` = sha256, which names the cache blob, and ``X-Linked-Size``), ``Content-Length``;
- ``GET`` of the same address, honouring ``Range: bytes=N-`` with ``206`` and ``Content-Range``.

No Xet headers are ever sent, so the client downloads over plain HTTP. Errors carry the
``X-Error-Code`` the client maps to its exceptions (``RepoNotFound``, ``GatedRepo``, ``EntryNotFound``).
Every request is recorded; faults (a connection cut in the middle of a file, an outage) are injected
per file.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

#: Extensions the real repositories keep in LFS (their .gitattributes).
_LFS = (".safetensors", ".bin", ".ckpt")


@dataclass(frozen=True)
class Request:
    """One request as the fake Hub saw it."""

    method: str
    path: str
    headers: dict[str, str]

    def file(self) -> tuple[str, str] | None:
        """``(repo, file)`` when this is a ``/resolve/`` request, else None."""
        head, sep, tail = self.path.partition("/resolve/")
        if not sep:
            return None
        return head.strip("/"), tail.split("/", 1)[1]


@dataclass
class Fault:
    """How the Hub misbehaves on one file: cut the first GET after ``cut_at`` bytes, then (while
    ``outage`` is set) answer that status to every later GET, or (``drop_again``) close the
    connection before any response."""

    cut_at: int
    outage: int | None = None
    drop_again: bool = False
    cuts: int = 0


@dataclass
class Repo:
    """A repository: its commit and its files (path -> bytes)."""

    commit: str
    files: dict[str, bytes]
    gated: bool = False


@dataclass
class FakeHub:
    """The server; ``url`` is its HF_ENDPOINT once started."""

    repos: dict[str, Repo] = field(default_factory=dict)
    #: Ids whose repository was deleted: answered as the Hub answers them (401 to an anonymous
    #: client, 404 to a logged-in one, both "RepoNotFound").
    removed: set[str] = field(default_factory=set)
    faults: dict[tuple[str, str], Fault] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    def add_folder(self, repo_id: str, folder: Path, commit: str, gated: bool = False) -> None:
        """Serve ``folder``'s files as repository ``repo_id`` at ``commit``."""
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        self.repos[repo_id] = Repo(commit, files, gated)

    def start(self) -> str:
        """Listen on a free loopback port; returns the endpoint URL."""
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self.url

    def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def url(self) -> str:
        """The endpoint, ``http://127.0.0.1:PORT``."""
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def take_requests(self) -> list[Request]:
        """The requests seen since the last call."""
        with self._lock:
            taken, self.requests[:] = list(self.requests), []
        return taken

    def file_gets(self, requests: list[Request] | None = None) -> list[tuple[str, str]]:
        """``(repo, file)`` of every GET of a file, in order."""
        reqs = self.requests if requests is None else requests
        return [r.file() for r in reqs if r.method == "GET" and r.file() is not None]


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # a client that goes away mid-answer (as after a cut) is not the server's error


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeHub

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass  # the request log is FakeHub.requests

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
        self._serve(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(body=True)

    # -- routing ------------------------------------------------------------------------------
    def _serve(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.fake.record(Request(self.command, path, {k: v for k, v in self.headers.items()}))
        if path.startswith("/api/models/"):
            rest = path[len("/api/models/"):]
            for kind in ("/revision/", "/tree/"):
                repo_id, sep, tail = rest.partition(kind)
                if sep:
                    return self._api(repo_id, kind.strip("/"), tail, body)
            return self._error(404, "RepoNotFound", "Repository not found", body)
        repo_id, sep, tail = path.strip("/").partition("/resolve/")
        if not sep or "/" not in tail:
            return self._error(404, None, "Not found", body)
        revision, name = tail.split("/", 1)
        return self._file(repo_id, revision, name, body)

    def _repo(self, repo_id: str, revision: str, body: bool) -> Repo | None:
        repo = self.fake.repos.get(repo_id)
        if repo_id in self.fake.removed:
            status = 404 if self.headers.get("Authorization") else 401
            self._error(status, "RepoNotFound", "Repository not found", body)
        elif repo is None:
            self._error(404, "RepoNotFound", "Repository not found", body)
        elif repo.gated:
            self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in the "
                        "authorized list. Visit https://huggingface.co/" + repo_id + " to ask for access.", body)
        elif revision not in ("main", repo.commit):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
        else:
            return repo
        return None

    def _api(self, repo_id: str, kind: str, tail: str, body: bool) -> None:
        revision, _, sub = tail.partition("/")
        repo = self._repo(repo_id, revision, body)
        if repo is None:
            return
        if kind == "revision":
            info = {"id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False, "gated": False,
                    "siblings": [{"rfilename": f} for f in repo.files]}
            return self._json(info, body)
        entries, folders = [], set()
        for name, data in repo.files.items():
            if sub and not name.startswith(sub.rstrip("/") + "/"):
                continue
            parts = name.split("/")
            folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
            entry = {"type": "file", "oid": _git_blob_id(data), "size": len(data), "path": name}
            if name.endswith(_LFS):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        entries += [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
                    for f in sorted(folders)]
        return self._json(entries, body)

    def _file(self, repo_id: str, revision: str, name: str, body: bool) -> None:
        repo = self._repo(repo_id, revision, body)
        if repo is None:
            return
        data = repo.files.get(name)
        if data is None:
            return self._error(404, "EntryNotFound", f"{name} does not exist", body, {"X-Repo-Commit": repo.commit})
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{_git_blob_id(data)}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if name.endswith(_LFS):
            headers |= {"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": str(len(data))}
        fault = self.fake.faults.get((repo_id, name))
        if body and fault is not None and fault.cuts > 0:
            if fault.drop_again:
                return self._drop()
            if fault.outage is not None:
                return self._error(fault.outage, None, "Service Unavailable", body)
        start, status = 0, 200
        rng = self.headers.get("Range")
        if body and rng and rng.startswith("bytes=") and rng.endswith("-"):
            start, status = int(rng[len("bytes="):-1]), 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        payload = data[start:]
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if not body:
            return
        if fault is not None and fault.cuts == 0 and fault.cut_at < len(payload):
            fault.cuts += 1
            self.wfile.write(payload[:fault.cut_at])
            self.wfile.flush()
            return self._drop()
        self.wfile.write(payload)

    # -- answers ------------------------------------------------------------------------------
    def _drop(self) -> None:
        """Close the connection now, mid-answer or before any."""
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def _json(self, value, body: bool) -> None:
        data = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(self, status: int, code: str | None, message: str, body: bool,
               extra: dict[str, str] | None = None) -> None:
        data = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)
