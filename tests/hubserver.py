"""FAKE Hugging Face Hub: a small local HTTP test double of the Hub, for tests that cannot reach the real one.

This is NOT the Hugging Face Hub and shares no code with it. It answers just enough of the Hub's HTTP API for the
real `huggingface_hub` client (written against v2.4.0) to run `snapshot_download`, `hf_hub_download`,
`HfApi.repo_info/model_info`, `list_repo_tree`, `list_repo_refs`, `create_repo`, `create_branch`, `create_tag`,
`upload_folder`/`upload_file`/`create_commit` and `PyTorchModelHubMixin.push_to_hub` against it, with the same
responses, headers and typed errors the client relies on:

    GET  /api/whoami-v2                                    -> the fake user (FAKE_USER)
    POST /api/validate-yaml                                -> always valid (README.md model cards)
    POST /api/repos/create        {name, organization, visibility|private, type}
                                                           -> {"url": ...}; 409 if the repo exists
    DELETE /api/repos/delete      {name, organization, type}
    GET  /api/{models|datasets|spaces}/{ns}/{name}[/revision/{rev}][?blobs=1]
                                                           -> repo info: "sha" (the commit) and "siblings" (files)
    GET  /api/.../{ns}/{name}/tree/{rev}[/{path}][?recursive=1]
                                                           -> [{"type": "file"|"directory", "oid", "size", "path", "lfs"?}]
    GET  /api/.../{ns}/{name}/refs                         -> {"branches", "tags", "converts"}
    POST /api/.../{ns}/{name}/branch/{branch} {startingPoint?};  DELETE the same url
    POST /api/.../{ns}/{name}/tag/{rev}       {tag, message?}
    POST /api/.../{ns}/{name}/preupload/{rev} {files: [{path, sample, size}]}
                                                           -> every file "regular" (never LFS), with the current "oid"
    POST /api/.../{ns}/{name}/commit/{rev}[?create_pr=1]  NDJSON: header, file (base64), deletedFile, deletedFolder
                                                           -> {"commitUrl", "commitOid", "pullRequestUrl"}
    HEAD|GET /[datasets/|spaces/]{ns}/{name}/resolve/{rev}/{path}  (Range: bytes=N- supported on GET)
                                                           -> the file, with X-Repo-Commit, ETag, Content-Length;
                                                              with `lfs_threshold`, big files 302 to /_lfs/{sha256}
                                                              with X-Linked-Etag/X-Linked-Size, like the Hub's CDN hop

Errors carry the Hub's `X-Error-Code` header so the client raises its typed errors: an unknown repo is
404 `RepoNotFound` (a private repo asked without a token: 401 `RepoNotFound`) -> RepositoryNotFoundError; an unknown
branch/tag/commit is 404 `RevisionNotFound` -> RevisionNotFoundError; a missing file is 404 `EntryNotFound` (with
X-Repo-Commit) -> RemoteEntryNotFoundError. With `token=...`, writes need `Authorization: Bearer <token>` (else 401
"Invalid credentials in Authorization header"). An endpoint it does not know answers 501 and is recorded in
`hub.unsupported`, so a test can tell "the fake lacks this" from a real failure.

Revisions: every commit gets a new 40-hex sha; a branch ("main", made with an initial `.gitattributes` commit like the
Hub does) points to its latest commit; a revision may be a branch, a tag, "refs/pr/N" or a full commit sha.
Blobs are stored on disk under a temporary folder (`hub.root`), keyed by their git blob sha1; refs and commits are
kept in memory.

Use it as a context manager (it serves on 127.0.0.1 on a free port, from a background thread):

    with FakeHub() as hub:
        sha = hub.publish_folder("path/to/model", "user/tiny")     # straight into storage, no HTTP
        env = hub.env(hf_home)                                      # HF_ENDPOINT=hub.url, HF_HOME=..., telemetry off
        subprocess.run([...], env=env)                              # HF_ENDPOINT is read at import time

or run one by hand: `python tests/hubserver.py --port 8123 --publish DIR user/name`.
"""
from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterable, Mapping
from urllib.parse import parse_qs, unquote, urlsplit

FAKE_USER = "user"  # the namespace used when a repo id has none, and whoami's answer
DEFAULT_BRANCH = "main"
URL_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
_SKIP_DIRS = {".git", ".cache", "__pycache__"}


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file's content: what the Hub reports as a regular file's oid/ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class HubError(Exception):
    """An HTTP error answer, with the Hub's X-Error-Code when there is one."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.body = status, message, code, headers or {}, body or {}


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, str]  # path -> git blob sha1
    title: str
    description: str = ""
    date: str = field(default_factory=_now)


@dataclass
class Repo:
    repo_id: str
    repo_type: str = "model"
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)  # name (incl. "refs/pr/N") -> commit oid
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    created_at: str = field(default_factory=_now)
    next_pr: int = 1

    def resolve(self, revision: str | None) -> str | None:
        """A branch, tag, refs/pr/N or full commit sha -> the commit oid (None if unknown)."""
        revision = revision or DEFAULT_BRANCH
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.tags:
            return self.tags[revision]
        if revision.startswith("refs/heads/") and revision[11:] in self.branches:
            return self.branches[revision[11:]]
        if COMMIT_SHA.match(revision) and revision in self.commits:
            return revision
        return None

    def history(self, revision: str = DEFAULT_BRANCH) -> list[str]:
        """Commit oids from the revision back to the first commit."""
        out, oid = [], self.resolve(revision)
        while oid is not None:
            out.append(oid)
            oid = self.commits[oid].parent
        return out


class FakeHub:
    """A FAKE, in-process Hugging Face Hub HTTP server for tests (see the module docstring)."""

    def __init__(self, root: str | os.PathLike | None = None, *, token: str | None = None, lfs_threshold: int | None = None):
        """root: where blobs are stored (a fresh temporary folder, removed on stop, by default).
        token: if set, writes (create, commit, branch, tag, delete) require this bearer token.
        lfs_threshold: if set, files of at least this many bytes are served like the Hub's LFS files
        (listed with "lfs" info, and /resolve redirects to a content-addressed /_lfs/{sha256} url).
        """
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="fake-hub-")) if root is None else Path(root)
        self.blobs = self.root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.lfs_threshold = lfs_threshold
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request served
        self.unsupported: list[tuple[str, str]] = []  # requests for endpoints this fake does not implement
        self.auth_seen: list[str | None] = []  # the Authorization header of every request (None if absent)
        self._sha256_to_oid: dict[str, str] = {}
        self._lock = threading.RLock()
        self._counter = itertools.count()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self, port: int = 0) -> "FakeHub":
        handler = type("Handler", (_Handler,), {"hub": self})  # each server's handlers see their own hub
        self._server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            # shutdown() waits for serve_forever to notice; bound the wait (at interpreter exit the thread may be frozen)
            stopper = threading.Thread(target=self._server.shutdown, daemon=True)
            stopper.start()
            stopper.join(timeout=5)
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "FakeHub":
        return self.start() if self._server is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "FakeHub is not started"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        """The endpoint to give as HF_ENDPOINT (no trailing slash)."""
        return f"http://127.0.0.1:{self.port}"

    def env(self, hf_home: str | os.PathLike, *, offline: bool = False, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for a subprocess that talks to this fake (huggingface_hub reads HF_ENDPOINT at import time)."""
        env = dict(os.environ if base is None else base)
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE", "HF_HUB_OFFLINE"):
            env.pop(name, None)
        env.update(
            HF_ENDPOINT=self.url,
            HF_HOME=str(hf_home),
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_HUB_DISABLE_IMPLICIT_TOKEN="1",
            GRADIO_ANALYTICS_ENABLED="False",
            NO_PROXY="127.0.0.1,localhost",
            no_proxy="127.0.0.1,localhost",
        )
        if offline:
            env["HF_HUB_OFFLINE"] = "1"
        return env

    # ------------------------------------------------------------------ storage (used directly by tests, and by the handler)

    def _key(self, repo_id: str, repo_type: str = "model") -> tuple[str, str]:
        if "/" not in repo_id:
            repo_id = f"{FAKE_USER}/{repo_id}"
        return repo_type, repo_id

    def get_repo(self, repo_id: str, repo_type: str = "model") -> Repo | None:
        with self._lock:
            return self.repos.get(self._key(repo_id, repo_type))

    def create_repo(self, repo_id: str, *, repo_type: str = "model", private: bool = False, exist_ok: bool = False) -> Repo:
        """Create an empty repo whose "main" holds an initial `.gitattributes` commit, as the Hub does."""
        key = self._key(repo_id, repo_type)
        with self._lock:
            if key in self.repos:
                if exist_ok:
                    return self.repos[key]
                raise HubError(409, f"You already created this {repo_type} repo")
            repo = self.repos[key] = Repo(key[1], repo_type, private)
            self._commit(repo, DEFAULT_BRANCH, {".gitattributes": GITATTRIBUTES}, [], "initial commit")
            return repo

    def delete_repo(self, repo_id: str, repo_type: str = "model") -> None:
        with self._lock:
            if self.repos.pop(self._key(repo_id, repo_type), None) is None:
                raise HubError(404, "Repository not found", "RepoNotFound")

    def _store(self, data: bytes) -> str:
        oid = git_blob_sha1(data)
        path = self.blobs / oid
        if not path.exists():
            tmp = path.with_name(f"{oid}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        self._sha256_to_oid[hashlib.sha256(data).hexdigest()] = oid
        return oid

    def blob(self, oid: str) -> bytes:
        return (self.blobs / oid).read_bytes()

    def _commit(self, repo: Repo, branch: str, add: Mapping[str, bytes], delete: Iterable[str], title: str, description: str = "",
                parent: str | None = None) -> str:
        head = repo.branches.get(branch)
        if parent is not None and head is not None and parent != head:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[head].files) if head else {}
        for path in delete:
            path = path.strip("/")
            folder = [p for p in files if p.startswith(path + "/")]
            if path not in files and not folder:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            for p in [path, *folder]:
                files.pop(p, None)
        for path, data in add.items():
            files[path.strip("/")] = self._store(data)
        seed = json.dumps([repo.repo_id, head, sorted(files.items()), title, description, next(self._counter), time.time_ns()])
        oid = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[oid] = Commit(oid, head, files, title, description)
        repo.branches[branch] = oid
        return oid

    def commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str | os.PathLike],
        *,
        delete: Iterable[str] = (),
        message: str = "Upload files",
        branch: str = DEFAULT_BRANCH,
        repo_type: str = "model",
        create: bool = True,
        private: bool = False,
    ) -> str:
        """Commit files straight into storage (no HTTP); returns the new commit sha.

        files: path in repo -> bytes, text (str, stored UTF-8) or a local file (a Path). `delete` removes files or
        folders. The repo is created if missing (unless create=False), and a missing branch is started from main.
        """
        add = {}
        for path, value in files.items():
            if isinstance(value, bytes):
                add[path] = value
            elif isinstance(value, str):
                add[path] = value.encode()
            else:
                add[path] = Path(value).read_bytes()
        with self._lock:
            repo = self.get_repo(repo_id, repo_type)
            if repo is None:
                if not create:
                    raise HubError(404, "Repository not found", "RepoNotFound")
                repo = self.create_repo(repo_id, repo_type=repo_type, private=private)
            if branch not in repo.branches:
                repo.branches[branch] = repo.branches[DEFAULT_BRANCH]
            return self._commit(repo, branch, add, delete, message)

    def publish_folder(self, folder: str | os.PathLike, repo_id: str, *, message: str | None = None, branch: str = DEFAULT_BRANCH, **kwargs) -> str:
        """Commit every file of a local folder (recursively; .git/.cache skipped) straight into storage; returns the commit sha."""
        folder = Path(folder)
        files = {}
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if path.is_file() and not _SKIP_DIRS.intersection(rel.parts):
                files[rel.as_posix()] = path.read_bytes()
        return self.commit(repo_id, files, message=message or f"Upload {folder.name}", branch=branch, **kwargs)

    def create_branch(self, repo_id: str, branch: str, *, revision: str | None = None, repo_type: str = "model") -> str:
        with self._lock:
            repo = self._require(repo_id, repo_type)
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            oid = repo.resolve(revision)
            if oid is None:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            repo.branches[branch] = oid
            return oid

    def create_tag(self, repo_id: str, tag: str, *, revision: str | None = None, repo_type: str = "model") -> str:
        with self._lock:
            repo = self._require(repo_id, repo_type)
            if tag in repo.tags:
                raise HubError(409, f"Tag already exists: {tag}")
            oid = repo.resolve(revision)
            if oid is None:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            repo.tags[tag] = oid
            return oid

    def head(self, repo_id: str, revision: str = DEFAULT_BRANCH, repo_type: str = "model") -> str | None:
        with self._lock:
            repo = self.get_repo(repo_id, repo_type)
            return None if repo is None else repo.resolve(revision)

    def files(self, repo_id: str, revision: str = DEFAULT_BRANCH, repo_type: str = "model") -> dict[str, bytes]:
        """Every file of a repo at a revision: path -> content."""
        with self._lock:
            repo = self._require(repo_id, repo_type)
            oid = self._resolve(repo, revision)
            return {p: self.blob(b) for p, b in sorted(repo.commits[oid].files.items())}

    def _require(self, repo_id: str, repo_type: str) -> Repo:
        repo = self.get_repo(repo_id, repo_type)
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    @staticmethod
    def _resolve(repo: Repo, revision: str | None) -> str:
        oid = repo.resolve(revision)
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return oid

    def _is_lfs(self, size: int) -> bool:
        return self.lfs_threshold is not None and size >= self.lfs_threshold

    def _file_entry(self, path: str, oid: str) -> dict:
        blob = self.blobs / oid
        size = blob.stat().st_size
        entry = {"type": "file", "oid": oid, "size": size, "path": path}
        if self._is_lfs(size):
            entry["lfs"] = {"oid": hashlib.sha256(blob.read_bytes()).hexdigest(), "size": size, "pointerSize": 134}
        return entry


class _Handler(BaseHTTPRequestHandler):
    """Routes one request of the fake Hub API (see the module docstring)."""

    hub: FakeHub
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"

    def log_message(self, format, *args) -> None:  # quiet: tests read hub.requests instead
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    # -------------------------------------------------------------- plumbing

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json_body(self):
        raw = self._body()
        try:
            return json.loads(raw or b"{}")
        except json.JSONDecodeError as e:
            raise HubError(400, f"invalid JSON body: {e}")

    def _send(self, status: int, body=b"", headers: dict | None = None, *, content_type: str = "application/json") -> None:
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, e: HubError) -> None:
        headers = dict(e.headers)
        if e.code:
            headers["X-Error-Code"] = e.code
        headers["X-Error-Message"] = e.message
        self._send(e.status, {"error": e.message, **e.body}, headers)

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") is not None

    def _require_write(self) -> None:
        token = self.hub.token
        if token is not None and self.headers.get("Authorization") != f"Bearer {token}":
            raise HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.hub.get_repo(repo_id, repo_type)
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        if repo.private and not self._authorized():
            raise HubError(401, "Repository not found", "RepoNotFound")
        return repo

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        parts = [unquote(p) for p in split.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        hub = self.hub
        with hub._lock:
            hub.requests.append((method, split.path))
            hub.auth_seen.append(self.headers.get("Authorization"))
        try:
            if parts[:1] == ["api"]:
                handled = self._api(method, parts[1:], query)
            elif parts[:1] == ["_lfs"] and len(parts) == 2 and method in ("GET", "HEAD"):
                self._lfs(parts[1], query)
                handled = True
            else:
                handled = self._resolve_route(method, parts)
            if not handled:
                with hub._lock:
                    hub.unsupported.append((method, self.path))
                self._send(501, {"error": f"fake hub: {method} {split.path} is not implemented"})
        except HubError as e:
            self._error(e)
        except (BrokenPipeError, ConnectionResetError):
            pass

    # -------------------------------------------------------------- /api

    def _api(self, method: str, parts: list[str], query: dict) -> bool:
        hub = self.hub
        if parts == ["whoami-v2"] and method == "GET":
            self._send(200, {"type": "user", "name": FAKE_USER, "fullname": "Fake User", "orgs": [], "auth": {}})
            return True
        if parts == ["validate-yaml"] and method == "POST":
            self._body()
            self._send(200, {"errors": [], "warnings": []})
            return True
        if parts[:1] == ["repos"] and parts[1:] in (["create"], ["delete"]):
            body = self._json_body()
            self._require_write()
            repo_type = body.get("type") or "model"
            repo_id = f"{body.get('organization') or FAKE_USER}/{body['name']}"
            url = f"{hub.url}/{URL_PREFIX[repo_type]}{repo_id}"
            if parts[1] == "create" and method == "POST":
                private = body.get("visibility", "private" if body.get("private") else "public") != "public"
                try:
                    hub.create_repo(repo_id, repo_type=repo_type, private=private)
                except HubError as e:  # 409: the Hub's answer still carries the url (create_repo(exist_ok=True) reads it)
                    raise HubError(e.status, e.message, e.code, body={"url": url}) from None
                self._send(200, {"url": url, "name": repo_id, "id": repo_id})
                return True
            if parts[1] == "delete" and method == "DELETE":
                hub.delete_repo(repo_id, repo_type)
                self._send(200, b"", content_type="text/plain")
                return True
            return False
        if len(parts) >= 3 and parts[0] in URL_TYPES:
            repo_type, repo_id, rest = URL_TYPES[parts[0]], f"{parts[1]}/{parts[2]}", parts[3:]
            return self._repo_api(method, repo_type, repo_id, rest, query)
        return False

    def _repo_api(self, method: str, repo_type: str, repo_id: str, rest: list[str], query: dict) -> bool:
        hub = self.hub
        if method == "GET" and (rest == [] or (len(rest) == 2 and rest[0] == "revision")):
            with hub._lock:
                repo = self._repo(repo_type, repo_id)
                oid = hub._resolve(repo, rest[1] if rest else None)
                commit = repo.commits[oid]
                blobs = query.get("blobs", "").lower() in ("1", "true")
                siblings = []
                for path, blob_oid in sorted(commit.files.items()):
                    sib = {"rfilename": path}
                    if blobs:
                        entry = hub._file_entry(path, blob_oid)
                        sib.update(size=entry["size"], blobId=blob_oid)
                        if "lfs" in entry:
                            sib["lfs"] = {"sha256": entry["lfs"]["oid"], "size": entry["size"], "pointerSize": 134}
                    siblings.append(sib)
                info = {
                    "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
                    "id": repo.repo_id,
                    "modelId": repo.repo_id,
                    "author": repo.repo_id.split("/")[0],
                    "sha": oid,
                    "lastModified": commit.date,
                    "createdAt": repo.created_at,
                    "private": repo.private,
                    "gated": False,
                    "disabled": False,
                    "downloads": 0,
                    "likes": 0,
                    "tags": [],
                    "siblings": siblings,
                }
            self._send(200, info)
            return True
        if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
            with hub._lock:
                repo = self._repo(repo_type, repo_id)
                commit = repo.commits[hub._resolve(repo, rest[1])]
                base = "/".join(rest[2:]).strip("/")
                recursive = query.get("recursive", "").lower() in ("1", "true")
                entries = self._tree(commit, base, recursive)
            self._send(200, entries)
            return True
        if method == "GET" and rest == ["refs"]:
            with hub._lock:
                repo = self._repo(repo_type, repo_id)
                branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": o} for b, o in repo.branches.items() if not b.startswith("refs/")]
                prs = [{"name": b, "ref": b, "targetCommit": o} for b, o in repo.branches.items() if b.startswith("refs/pr/")]
                tags = [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": o} for t, o in repo.tags.items()]
            payload = {"branches": branches, "tags": tags, "converts": []}
            if query.get("include_prs"):
                payload["pullRequests"] = prs
            self._send(200, payload)
            return True
        if len(rest) == 2 and rest[0] == "branch" and method in ("POST", "DELETE"):
            body = self._json_body()
            self._require_write()
            with hub._lock:
                repo = self._repo(repo_type, repo_id)
                if method == "POST":
                    hub.create_branch(repo_id, rest[1], revision=body.get("startingPoint"), repo_type=repo_type)
                elif rest[1] not in repo.branches:
                    raise HubError(404, f"Invalid rev id: {rest[1]}", "RevisionNotFound")
                elif rest[1] == DEFAULT_BRANCH:
                    raise HubError(403, "You cannot delete the default branch")
                else:
                    del repo.branches[rest[1]]
            self._send(200, {})
            return True
        if len(rest) == 2 and rest[0] == "tag" and method == "POST":
            body = self._json_body()
            self._require_write()
            with hub._lock:
                self._repo(repo_type, repo_id)
                hub.create_tag(repo_id, body["tag"], revision=rest[1], repo_type=repo_type)
            self._send(200, {})
            return True
        if len(rest) == 2 and rest[0] == "preupload" and method == "POST":
            body = self._json_body()
            self._require_write()
            with hub._lock:
                repo = self._repo(repo_type, repo_id)
                oid = hub._resolve(repo, rest[1])
                current = repo.commits[oid].files
                files = [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": current.get(f["path"])}
                    for f in body.get("files", [])
                ]
            self._send(200, {"files": files, "commitOid": oid})
            return True
        if len(rest) == 2 and rest[0] == "commit" and method == "POST":
            self._commit(repo_type, repo_id, rest[1], query)
            return True
        return False

    def _tree(self, commit: Commit, base: str, recursive: bool) -> list[dict]:
        return _tree(self.hub, commit, base, recursive)

    def _commit(self, repo_type: str, repo_id: str, revision: str, query: dict) -> None:
        hub = self.hub
        raw = self._body()
        self._require_write()
        header, add, delete = {}, {}, []
        for line in raw.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                header = value
            elif key == "file":
                content = value.get("content", "")
                add[value["path"]] = base64.b64decode(content) if value.get("encoding", "base64") == "base64" else content.encode()
            elif key == "lfsFile":
                oid = hub._sha256_to_oid.get(value.get("oid", ""))
                if oid is None:
                    raise HubError(422, "fake hub: LFS uploads are not supported (preupload answers 'regular' for every file)")
                add[value["path"]] = hub.blob(oid)
            elif key in ("deletedFile", "deletedFolder"):
                delete.append(value["path"])
            else:
                raise HubError(400, f"fake hub: unknown commit operation {key!r}")
        if not header.get("summary"):
            raise HubError(400, "commit summary is required")
        with hub._lock:
            repo = self._repo(repo_type, repo_id)
            pr_url = None
            if query.get("create_pr") in ("1", "true"):
                base = hub._resolve(repo, revision)
                branch = f"refs/pr/{repo.next_pr}"
                pr_url = f"{hub.url}/{URL_PREFIX[repo_type]}{repo.repo_id}/discussions/{repo.next_pr}"
                repo.next_pr += 1
                repo.branches[branch] = base
            else:
                branch = revision[11:] if revision.startswith("refs/heads/") else revision
                if branch not in repo.branches:
                    raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            oid = hub._commit(repo, branch, add, delete, header["summary"], header.get("description", ""), header.get("parentCommit"))
        self._send(
            200,
            {
                "success": True,
                "commitOid": oid,
                "commitUrl": f"{hub.url}/{URL_PREFIX[repo_type]}{repo.repo_id}/commit/{oid}",
                "commitMessage": header["summary"],
                "pullRequestUrl": pr_url,
            },
        )

    # -------------------------------------------------------------- file downloads

    def _resolve_route(self, method: str, parts: list[str]) -> bool:
        if method not in ("GET", "HEAD"):
            return False
        repo_type = "model"
        if parts[:1] and parts[0] in ("datasets", "spaces"):
            repo_type, parts = URL_TYPES[parts[0]], parts[1:]
        if len(parts) < 5 or parts[2] != "resolve":
            return False
        hub = self.hub
        repo_id, revision, path = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
        with hub._lock:
            repo = self._repo(repo_type, repo_id)
            oid = hub._resolve(repo, revision)
            blob_oid = repo.commits[oid].files.get(path)
            if blob_oid is None:
                raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": oid})
            data = hub.blob(blob_oid)
        if hub._is_lfs(len(data)):
            sha256 = hashlib.sha256(data).hexdigest()
            self._send(
                302,
                b"",
                {
                    "Location": f"{hub.url}/_lfs/{sha256}?commit={oid}",
                    "X-Repo-Commit": oid,
                    "X-Linked-Etag": f'"{sha256}"',
                    "X-Linked-Size": str(len(data)),
                    "ETag": f'"{blob_oid}"',
                },
                content_type="text/plain",
            )
            return True
        self._send_file(data, {"X-Repo-Commit": oid, "ETag": f'"{blob_oid}"'})
        return True

    def _lfs(self, sha256: str, query: dict) -> None:
        hub = self.hub
        with hub._lock:
            oid = hub._sha256_to_oid.get(sha256)
            if oid is None:
                raise HubError(404, "Not found")
            data = hub.blob(oid)
        headers = {"ETag": f'"{sha256}"'}
        if query.get("commit"):
            headers["X-Repo-Commit"] = query["commit"]
        self._send_file(data, headers)

    def _send_file(self, data: bytes, headers: dict) -> None:
        headers = {"Accept-Ranges": "bytes", **headers}
        match = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", "")) if self.command == "GET" else None
        if match and int(match.group(1)) < len(data):
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(data) - 1
            end = min(end, len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            self._send(206, data[start : end + 1], headers, content_type="application/octet-stream")
        else:
            self._send(200, data, headers, content_type="application/octet-stream")


def _tree(hub: FakeHub, commit: Commit, base: str, recursive: bool) -> list[dict]:
    """Files and folders under `base` (direct children, or all descendants when recursive), like /api/.../tree."""
    prefix = f"{base}/" if base else ""
    if base and base not in commit.files and not any(p.startswith(prefix) for p in commit.files):
        raise HubError(404, f"Entry not found: {base}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
    if base in commit.files:  # a file path: the Hub answers with that single entry
        return [hub._file_entry(base, commit.files[base])]
    folders, files = set(), []
    for path, oid in sorted(commit.files.items()):
        if not path.startswith(prefix):
            continue
        rel = path[len(prefix) :].split("/")
        for depth in range(1, len(rel)):
            if recursive or depth == 1:
                folders.add(prefix + "/".join(rel[:depth]))
        if recursive or len(rel) == 1:
            files.append(hub._file_entry(path, oid))
    dirs = [
        {"type": "directory", "oid": hashlib.sha1(f"{commit.oid}:{d}".encode()).hexdigest(), "size": 0, "path": d}
        for d in sorted(folders)
    ]
    return dirs + files


def _main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Run the FAKE Hugging Face Hub test server (not the real Hub).")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--publish", nargs=2, action="append", default=[], metavar=("DIR", "REPO_ID"), help="publish a local folder as a repo")
    parser.add_argument("--token", default=None, help="require this bearer token for writes")
    args = parser.parse_args(argv)
    import signal

    def _interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)  # `kill` cleans up the temporary storage too
    hub = FakeHub(token=args.token).start(args.port)
    for folder, repo_id in args.publish:
        print(f"published {folder} as {repo_id} at {hub.publish_folder(folder, repo_id)}")
    print(f"FAKE Hub serving at {hub.url} (export HF_ENDPOINT={hub.url}); Ctrl+C stops it")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        hub.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
