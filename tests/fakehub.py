"""A small Hugging Face Hub look-alike on 127.0.0.1, for testing the real huggingface_hub client.

Point a process at it with ``HF_ENDPOINT=hub.url``. It answers the endpoints huggingface_hub 2.x uses
to resolve and download a model, with the Hub's status codes and headers:

- ``GET /api/models/{repo}[/revision/{rev}]``: repo info JSON (``sha``, ``siblings``; sizes and LFS
  data with ``?blobs=true``), ``gated`` set for gated repos (their metadata is public, as on the Hub).
- ``GET /api/models/{repo}/tree/{rev}[/{path}]``: the file listing (``?recursive=true``).
- ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``: plain files answer 200 with ``ETag`` (git blob id),
  ``X-Repo-Commit`` and ``Content-Length``; LFS files (weights) answer 302 to a "CDN" on another
  origin (``localhost`` instead of ``127.0.0.1``) with ``X-Linked-Etag`` (sha256) and
  ``X-Linked-Size``, so the client's "no Authorization header off the Hub" rule is exercised.
- ``GET /api/whoami-v2``: the token's user (``{"name": "user-<n>"}``), 401 without a known token.
- ``GET /api/models/{repo}/auth-check``: 200 when the token may read the repo's files, else the same
  ``GatedRepo`` / ``RepoNotFound`` answers as a download.
- Errors carry ``X-Error-Code``/``X-Error-Message``: ``RepoNotFound`` (401 without a token, 404 with
  one, as the Hub does so private repos do not leak), ``RevisionNotFound`` (404), ``EntryNotFound``
  (404), ``GatedRepo`` (401 without a token, 403 with a token not granted), and 401
  "Invalid credentials in Authorization header" for an unknown token.

Every request is logged (method, path, headers) in ``hub.requests`` so tests can assert what the
client sent, e.g. whether it downloaded anything or which Authorization header it used.

    with FakeHub({"org/tiny": {"config.json": b"{}", "model.safetensors": b"..."}}) as hub:
        env = {"HF_ENDPOINT": hub.url, ...}
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

# Weight formats the Hub stores with Git LFS; everything else is a plain git file.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx")

_EMPTY_AGENT_REGISTRY = {"standardEnvVars": [], "harnesses": {}}


@dataclass
class FakeRepo:
    """One model repo at one commit. ``granted`` tokens may download a gated repo's files."""

    files: dict[str, bytes]
    gated: bool = False
    granted: frozenset[str] = frozenset()
    branches: tuple[str, ...] = ("main",)
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        digest = hashlib.sha1()
        for name in sorted(self.files):
            digest.update(name.encode() + b"\0" + hashlib.sha1(self.files[name]).digest())
        self.sha = digest.hexdigest()

    def resolves(self, revision: str) -> bool:
        return revision == self.sha or revision in self.branches

    @staticmethod
    def is_lfs(path: str) -> bool:
        return path.endswith(LFS_SUFFIXES)

    @staticmethod
    def blob_id(content: bytes) -> str:
        """Git's blob object id, which the Hub uses as ETag for plain files."""
        return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()

    def entry(self, path: str) -> dict[str, Any]:
        content = self.files[path]
        item: dict[str, Any] = {
            "type": "file",
            "oid": self.blob_id(content),
            "size": len(content),
            "path": path,
        }
        if self.is_lfs(path):
            item["lfs"] = {
                "oid": hashlib.sha256(content).hexdigest(),
                "size": len(content),
                "pointerSize": 134,
            }
        return item


@dataclass
class LoggedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names


class FakeHub:
    """Context manager running the fake hub in a daemon thread on a free 127.0.0.1 port."""

    def __init__(
        self,
        repos: dict[str, FakeRepo | dict[str, bytes]],
        *,
        tokens: frozenset[str] = frozenset(),
        body_pause_s: float = 0.0,
    ):
        # `tokens`: tokens the hub knows (valid but not necessarily granted on gated repos);
        # a repo's granted tokens are valid too. Any other Authorization is "invalid credentials".
        # `body_pause_s`: pause half way through every file body, to play a slow download.
        self.body_pause_s = body_pause_s
        self.repos = {rid: r if isinstance(r, FakeRepo) else FakeRepo(files=r) for rid, r in repos.items()}
        self.tokens = frozenset(tokens).union(*(r.granted for r in self.repos.values()))
        self.requests: list[LoggedRequest] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def from_directory(cls, root: str | Path, **kwargs: Any) -> FakeHub:
        """Serve ``root/<org>/<name>/**`` as repo ``org/name`` (every file, relative paths kept)."""
        repos: dict[str, FakeRepo | dict[str, bytes]] = {}
        for repo_dir in sorted(p for p in Path(root).glob("*/*") if p.is_dir()):
            files = {f.relative_to(repo_dir).as_posix(): f.read_bytes() for f in repo_dir.rglob("*") if f.is_file()}
            repos[repo_dir.relative_to(root).as_posix()] = files
        return cls(repos, **kwargs)

    @property
    def port(self) -> int:
        assert self._server is not None, "FakeHub is not running"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def cdn_url(self) -> str:
        # Same server, another origin: huggingface_hub compares (scheme, host, port).
        return f"http://localhost:{self.port}"

    def file_downloads(self) -> list[LoggedRequest]:
        """GETs that transferred file content (hub plain files and CDN blobs)."""
        with self._lock:
            return [
                r for r in self.requests if r.method == "GET" and ("/resolve/" in r.path or r.path.startswith("/cdn/"))
            ]

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    def __enter__(self) -> FakeHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fakehub", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _log(self, request: LoggedRequest) -> None:
        with self._lock:
            self.requests.append(request)


class _Reply(Exception):
    """Raised inside a handler to send an error answer with the Hub's error headers."""

    def __init__(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


_API_AUTH = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/auth-check$")
_API_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_API_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_CDN = re.compile(r"^/cdn/(?P<sha256>[0-9a-f]{64})$")
_RANGE = re.compile(r"^bytes=(?P<start>\d+)-(?P<end>\d*)$")


def _make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:
            self._dispatch(head=False)

        def do_HEAD(self) -> None:
            self._dispatch(head=True)

        # ------------------------------------------------------------------ routing
        def _dispatch(self, *, head: bool) -> None:
            split = urlsplit(self.path)
            path, query = split.path, parse_qs(split.query)
            hub._log(LoggedRequest(self.command, path, {k.lower(): v for k, v in self.headers.items()}))
            try:
                self._check_token()
                if path == "/api/agent-harnesses":
                    return self._json(_EMPTY_AGENT_REGISTRY, head=head)
                if path == "/api/whoami-v2":
                    return self._whoami(head=head)
                if m := _API_AUTH.match(path):
                    return self._auth_check(m["repo"], head=head)
                if m := _API_TREE.match(path):
                    return self._tree(m["repo"], unquote(m["rev"]), m["path"], query, head=head)
                if m := _API_INFO.match(path):
                    return self._info(m["repo"], unquote(m["rev"] or "main"), query, head=head)
                if m := _RESOLVE.match(path):
                    return self._resolve(m["repo"], unquote(m["rev"]), unquote(m["path"]), head=head)
                if m := _CDN.match(path):
                    return self._cdn(m["sha256"], head=head)
                raise _Reply(404, None, "Not Found")
            except _Reply as reply:
                self._error(reply, head=head)

        # ------------------------------------------------------------------ auth and lookups
        def _token(self) -> str | None:
            auth = self.headers.get("Authorization", "")
            return auth[len("Bearer ") :] if auth.startswith("Bearer ") else None

        def _check_token(self) -> None:
            token = self._token()
            if token is not None and token not in hub.tokens:
                raise _Reply(401, None, "Invalid credentials in Authorization header")

        def _repo(self, repo_id: str, revision: str) -> FakeRepo:
            repo = hub.repos.get(repo_id)
            if repo is None:
                # The Hub answers 401 to anonymous callers so that private repos do not leak.
                status = 404 if self._token() else 401
                raise _Reply(status, "RepoNotFound", "Repository not found")
            if not repo.resolves(revision):
                raise _Reply(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return repo

        # ------------------------------------------------------------------ endpoints
        def _info(self, repo_id: str, revision: str, query: dict[str, list[str]], *, head: bool) -> None:
            repo = self._repo(repo_id, revision)
            with_blobs = query.get("blobs", ["false"])[0].lower() == "true"
            siblings = []
            for name in sorted(repo.files):
                sibling: dict[str, Any] = {"rfilename": name}
                if with_blobs:
                    entry = repo.entry(name)
                    sibling.update(size=entry["size"], blobId=entry["oid"])
                    if "lfs" in entry:
                        lfs = entry["lfs"]
                        sibling["lfs"] = {
                            "size": lfs["size"],
                            "sha256": lfs["oid"],
                            "pointerSize": lfs["pointerSize"],
                        }
                siblings.append(sibling)
            body = {
                "_id": repo.sha[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0],
                "sha": repo.sha,
                "lastModified": "2024-01-01T00:00:00.000Z",
                "private": False,
                "disabled": False,
                "gated": "manual" if repo.gated else False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
                "createdAt": "2024-01-01T00:00:00.000Z",
            }
            self._json(body, head=head)

        def _whoami(self, *, head: bool) -> None:
            token = self._token()
            if token is None:
                raise _Reply(401, None, "Invalid credentials in Authorization header")
            self._json({"type": "user", "name": f"user-{sorted(hub.tokens).index(token)}"}, head=head)

        def _auth_check(self, repo_id: str, *, head: bool) -> None:
            repo = self._repo(repo_id, "main")
            if repo.gated and self._token() not in repo.granted:
                status = 401 if self._token() is None else 403
                raise _Reply(status, "GatedRepo", f"Access to model {repo_id} is restricted.")
            self._json({"ok": True}, head=head)

        def _tree(
            self, repo_id: str, revision: str, sub: str | None, query: dict[str, list[str]], *, head: bool
        ) -> None:
            repo = self._repo(repo_id, revision)
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            prefix = f"{sub.strip('/')}/" if sub else ""
            if sub and not any(name.startswith(prefix) for name in repo.files):
                raise _Reply(404, "EntryNotFound", f'{sub} does not exist on "{revision}"', {"X-Repo-Commit": repo.sha})
            entries: dict[str, dict[str, Any]] = {}
            for name in sorted(repo.files):
                if not name.startswith(prefix):
                    continue
                rest = name[len(prefix) :].split("/")
                # Folders on the way down are listed too, as the Hub does.
                for depth in range(1, len(rest)):
                    if depth > 1 and not recursive:
                        break
                    folder = prefix + "/".join(rest[:depth])
                    entries.setdefault(
                        folder,
                        {
                            "type": "directory",
                            "oid": FakeRepo.blob_id(folder.encode()),
                            "size": 0,
                            "path": folder,
                        },
                    )
                if recursive or len(rest) == 1:
                    entries[name] = repo.entry(name)
            self._json(list(entries.values()), head=head)

        def _resolve(self, repo_id: str, revision: str, path: str, *, head: bool) -> None:
            repo = self._repo(repo_id, revision)
            commit = {"X-Repo-Commit": repo.sha}
            if repo.gated and self._token() not in repo.granted:
                if self._token() is None:
                    message = (
                        f"Access to model {repo_id} is restricted. You must have access to it and be "
                        "authenticated to access it. Please log in."
                    )
                    raise _Reply(401, "GatedRepo", message, commit)
                message = (
                    f"Access to model {repo_id} is restricted and you are not in the authorized list. "
                    f"Visit https://huggingface.co/{repo_id} to ask for access."
                )
                raise _Reply(403, "GatedRepo", message, commit)
            if path not in repo.files:
                raise _Reply(404, "EntryNotFound", "Entry not found", commit)
            content = repo.files[path]
            if repo.is_lfs(path):
                sha256 = hashlib.sha256(content).hexdigest()
                self.send_response(302)
                self.send_header("Location", f"{hub.cdn_url}/cdn/{sha256}?X-Amz-Signature=fake")
                self.send_header("X-Repo-Commit", repo.sha)
                self.send_header("ETag", f'"{repo.blob_id(content)}"')
                self.send_header("X-Linked-Etag", f'"{sha256}"')
                self.send_header("X-Linked-Size", str(len(content)))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self._bytes(content, {"ETag": f'"{repo.blob_id(content)}"', **commit}, head=head)

        def _cdn(self, sha256: str, *, head: bool) -> None:
            for repo in hub.repos.values():
                for content in repo.files.values():
                    if hashlib.sha256(content).hexdigest() == sha256:
                        return self._bytes(content, {"ETag": f'"{sha256}"'}, head=head)
            raise _Reply(404, None, "NoSuchKey")

        # ------------------------------------------------------------------ answers
        def _bytes(self, content: bytes, headers: dict[str, str], *, head: bool) -> None:
            status, body = 200, content
            if (m := _RANGE.match(self.headers.get("Range", ""))) is not None:
                start = int(m["start"])
                end = int(m["end"]) if m["end"] else len(content) - 1
                status, body = 206, content[start : end + 1]
                headers = {**headers, "Content-Range": f"bytes {start}-{end}/{len(content)}"}
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                half = len(body) // 2
                self.wfile.write(body[:half])
                if hub.body_pause_s:
                    self.wfile.flush()
                    time.sleep(hub.body_pause_s)
                self.wfile.write(body[half:])

        def _json(self, obj: Any, *, head: bool) -> None:
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _error(self, reply: _Reply, *, head: bool) -> None:
            body = json.dumps({"error": reply.message}).encode()
            self.send_response(reply.status)
            if reply.code:
                self.send_header("X-Error-Code", reply.code)
            self.send_header("X-Error-Message", reply.message)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

    return Handler
