"""A small, real, Hugging Face Hub-compatible HTTP server for tests.

`LocalHub` serves the subset of the Hub HTTP API that `huggingface_hub` (>= 2.4) uses to create repos,
push files (`create_commit`, `upload_file`, `upload_folder`) and pull them back (`hf_hub_download`,
`snapshot_download`, `repo_info`, `list_repo_files`, ...). Tests point the *real* client at it through
`HF_ENDPOINT` (see `configure_client` / `client_env`), so no mocks are involved and nothing leaves 127.0.0.1.

Design choices, each mirroring what the client expects from the real Hub:

* The preupload endpoint answers `"regular"` for every file, so the client always sends file contents
  base64-encoded inline in the ndjson commit payload: no LFS batch API, no Xet storage to emulate.
* Responses never carry Xet headers (`X-Xet-Hash`, ...), so downloads always take the plain HTTP path,
  whether or not `hf_xet` is installed.
* Every commit is an immutable snapshot (path -> blob) with a fresh 40-hex sha, and file contents are stored
  content-addressed under `<root>/blobs/<git-sha1>`. Old commits stay resolvable, which matters because
  `snapshot_download` downloads files by commit sha, not by branch name.
* Errors carry the `X-Error-Code` / `X-Error-Message` headers that `hf_raise_for_status` maps onto
  `RepositoryNotFoundError`, `RevisionNotFoundError` and `RemoteEntryNotFoundError`, plus a JSON
  `{"error": ...}` body that the client appends to its exception message.

Standard library only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["LocalHub", "HubError", "client_env", "configure_client"]

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
# The Hub creates every repo with one initial commit holding a `.gitattributes` file; we do the same so that
# a freshly created repo already has a sha (the client asserts `repo_info(...).sha is not None`).
_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"

# Routes on the *raw* (still percent-encoded) path: the client quotes revisions and folder paths with
# `safe=""`, so "/" inside them arrives as "%2F" and must not be split on.
_API_REPO = r"/api/(?P<kind>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)"
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("GET", re.compile(r"/api/whoami-v2"), "whoami"),
    ("GET", re.compile(r"/api/agent-harnesses"), "agent_harnesses"),
    ("POST", re.compile(r"/api/repos/create"), "create_repo"),
    ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml"),
    ("GET", re.compile(_API_REPO + r"(?:/revision/(?P<rev>[^/]+))?"), "repo_info"),
    ("GET", re.compile(_API_REPO + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?"), "tree"),
    ("POST", re.compile(_API_REPO + r"/paths-info/(?P<rev>[^/]+)"), "paths_info"),
    ("POST", re.compile(_API_REPO + r"/preupload/(?P<rev>[^/]+)"), "preupload"),
    ("POST", re.compile(_API_REPO + r"/commit/(?P<rev>[^/]+)"), "commit"),
    (
        "GET",
        re.compile(r"/(?:(?P<kind>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)"),
        "resolve",
    ),
]


class HubError(Exception):
    """An HTTP error answered to the client, shaped like the real Hub's (status, error code, JSON body)."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = dict(headers or {})


def git_blob_sha1(data: bytes) -> str:
    """Git's blob id: what the Hub returns as `oid`/ETag for regular files and what the client compares
    against in preupload to skip unchanged files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now_iso() -> str:
    # The client's `parse_datetime` expects exactly the Hub's '%Y-%m-%dT%H:%M:%S.%fZ' shape.
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    date: str
    tree: dict[str, tuple[str, int]]  # path -> (git blob sha1, size)


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    refs: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    commits: dict[str, Commit] = field(default_factory=dict)

    @property
    def owner(self) -> str:
        return self.repo_id.split("/", 1)[0]

    def resolve(self, revision: str) -> Commit:
        """Branch name or full commit sha -> commit; unknown revisions are a 404 RevisionNotFound."""
        sha = self.refs.get(revision, revision)
        if sha not in self.commits:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[sha]


class LocalHub:
    """A Hub-compatible HTTP server on 127.0.0.1 that stores everything under `root`.

    Usage::

        with LocalHub(tmp_path, tokens={"hf_test_token": "testuser"}) as hub:
            configure_client(monkeypatch, hub.endpoint, tmp_path / "hf_home")
            HfApi().create_repo("testuser/adapter", token="hf_test_token")

    `tokens` maps bearer tokens to user names. A user may write only to repos in its own namespace and read
    private repos only from it. Requests carrying an unknown token are rejected (401) like on the real Hub.
    """

    def __init__(self, root: str | os.PathLike[str], tokens: Mapping[str, str] | None = None, port: int = 0):
        self.root = Path(root)
        self.tokens = dict(tokens or {})
        self._blobs = self.root / "blobs"
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._repos: dict[tuple[str, str], Repo] = {}
        self._lock = threading.RLock()  # handler threads run concurrently (snapshot_download uses 8 workers)
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _make_handler(self))
        self._server.daemon_threads = True  # idle keep-alive connections must not block shutdown
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        """Base URL to use as `HF_ENDPOINT`, e.g. "http://127.0.0.1:54321"."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> LocalHub:
        # A short poll interval keeps `stop()` (which waits for the serve loop to notice) fast.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="LocalHub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers for assertions in tests ------------------------------------------------------------------

    def files(self, repo_id: str, *, repo_type: str = "model", revision: str = "main") -> list[str]:
        """Sorted paths of the files stored in `repo_id` at `revision` (includes the initial `.gitattributes`)."""
        with self._lock:
            return sorted(self._get_repo(repo_type, repo_id).resolve(revision).tree)

    def read_file(self, repo_id: str, path: str, *, repo_type: str = "model", revision: str = "main") -> bytes:
        """Stored bytes of `path` in `repo_id` at `revision`."""
        with self._lock:
            oid, _ = self._get_repo(repo_type, repo_id).resolve(revision).tree[path]
        return (self._blobs / oid).read_bytes()

    def head(self, repo_id: str, *, repo_type: str = "model", revision: str = "main") -> str:
        """Commit sha that `revision` (default: main) points to."""
        with self._lock:
            return self._get_repo(repo_type, repo_id).resolve(revision).sha

    # -- storage --------------------------------------------------------------------------------------------

    def _get_repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise KeyError(f"No {repo_type} repo {repo_id!r} on this LocalHub")
        return repo

    def _store_blob(self, data: bytes) -> str:
        oid = git_blob_sha1(data)
        path = self._blobs / oid
        if not path.exists():
            tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)  # atomic: a concurrent reader never sees a half-written blob
        return oid

    def _new_commit(self, repo: Repo, branch: str, tree: dict[str, tuple[str, int]], message: str) -> Commit:
        parent = repo.refs.get(branch)
        # Unique even for identical trees (the real Hub allows empty commits, each with its own sha).
        seed = json.dumps([parent, sorted(tree.items()), message, uuid.uuid4().hex]).encode()
        commit = Commit(hashlib.sha1(seed).hexdigest(), parent, message, _now_iso(), tree)
        repo.commits[commit.sha] = commit
        repo.refs[branch] = commit.sha
        self._save(repo)
        return commit

    def _save(self, repo: Repo) -> None:
        # Metadata is kept in memory; this JSON copy only makes the storage directory self-describing for debugging.
        meta = self.root / "repos" / f"{repo.repo_type}s" / f"{repo.repo_id}.json"
        meta.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text(
            json.dumps(
                {"private": repo.private, "refs": repo.refs, "commits": {s: vars(c) for s, c in repo.commits.items()}},
                indent=1,
            )
        )


def _make_handler(hub: LocalHub) -> type[BaseHTTPRequestHandler]:
    # http.server instantiates the handler class per request: bind the hub as a class attribute.
    return type("LocalHubHandler", (_HubHandler,), {"hub": hub})


class _HubHandler(BaseHTTPRequestHandler):
    """One instance per request. Each route returns `(status, json_payload)` or `(status, bytes, headers)`,
    or raises `HubError`."""

    hub: LocalHub
    query: dict[str, str]
    protocol_version = "HTTP/1.1"  # keep-alive: the client pools connections
    timeout = 30  # close idle keep-alive connections eventually

    # -- plumbing -----------------------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature from the base class
        pass  # keep pytest output clean

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            status, payload, headers = self._route(method, url.path, body)
        except Exception as exc:  # noqa: BLE001 - answer a JSON 500 rather than dropping the connection
            err = exc if isinstance(exc, HubError) else HubError(500, f"LocalHub error: {exc!r}")
            status, payload = err.status, {"error": err.message}
            headers = {
                **err.headers,
                "X-Error-Message": err.message.encode("ascii", "replace").decode(),  # headers must be latin-1
                **({"X-Error-Code": err.code} if err.code else {}),
            }
        if isinstance(payload, bytes):
            self._send(status, payload, headers)
        else:
            self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **headers})

    def _route(self, method: str, path: str, body: bytes) -> tuple[int, Any, dict[str, str]]:
        for route_method, pattern, name in _ROUTES:
            match = pattern.fullmatch(path)
            if match and (route_method == method or (route_method, method) == ("GET", "HEAD")):
                params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                with self.hub._lock:  # guards the state only; the response is written after releasing it
                    status, payload, *headers = getattr(self, f"route_{name}")(body=body, **params)
                return status, payload, headers[0] if headers else {}
        raise HubError(404, f"LocalHub does not implement {method} {path}")

    def _send(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))  # mandatory with HTTP/1.1 keep-alive
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    # -- auth ---------------------------------------------------------------------------------------------

    def _user(self) -> str | None:
        """User behind the bearer token, None when anonymous. An unknown token is a 401 whatever the route,
        with the exact message the client recognises as "bad credentials" (not as "repo not found")."""
        auth = self.headers.get("Authorization") or ""
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.hub.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.hub.tokens[token]

    def _require_user(self) -> str:
        user = self._user()
        if user is None:
            raise HubError(
                401, "Unauthorized: write operations need an 'Authorization: Bearer <token>' header with a valid token"
            )
        return user

    def _readable_repo(self, kind: str, repo_id: str) -> Repo:
        """Private or missing repos look the same to outsiders, as on the Hub: 401 when anonymous, 404 else."""
        user = self._user()
        repo = self.hub._repos.get((_REPO_TYPES[kind], repo_id))
        if repo is None or (repo.private and user != repo.owner):
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _writable_repo(self, kind: str, repo_id: str) -> Repo:
        user = self._require_user()
        repo = self._readable_repo(kind, repo_id)
        if user != repo.owner:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    # -- routes -------------------------------------------------------------------------------------------

    def route_whoami(self, body: bytes) -> tuple[int, Any]:
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return 200, {
            "type": "user",
            "id": user,
            "name": user,
            "fullname": user,
            "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
        }

    def route_agent_harnesses(self, body: bytes) -> tuple[int, Any]:
        # Fetched by the client to build its user agent (unless telemetry is disabled): answer "no agents".
        return 200, {"standardEnvVars": [], "harnesses": {}}

    def route_validate_yaml(self, body: bytes) -> tuple[int, Any]:
        # Called before committing a README.md; accept any model card metadata.
        return 200, {"errors": [], "warnings": []}

    def route_create_repo(self, body: bytes) -> tuple[int, Any]:
        user = self._require_user()
        payload = json.loads(body or b"{}")
        namespace = payload.get("organization") or user
        repo_id, repo_type = f"{namespace}/{payload['name']}", payload.get("type") or "model"
        if namespace != user:
            raise HubError(403, f"You don't have the rights to create a {repo_type} under the namespace {namespace}")
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.hub.endpoint}/{prefix}{repo_id}"
        if (repo_type, repo_id) in self.hub._repos:
            # `create_repo(exist_ok=True)` swallows the 409 but still reads "url" from the body.
            return 409, {"error": f"You already created this {repo_type} repo", "url": url}
        private = payload.get("visibility", "private" if payload.get("private") else "public") != "public"
        repo = Repo(repo_type, repo_id, private, _now_iso())
        self.hub._repos[(repo_type, repo_id)] = repo
        oid = self.hub._store_blob(_GITATTRIBUTES)
        self.hub._new_commit(repo, "main", {".gitattributes": (oid, len(_GITATTRIBUTES))}, "initial commit")
        return 200, {"url": url, "name": repo_id, "id": repo_id}

    def route_repo_info(self, body: bytes, kind: str, repo: str, rev: str = "main") -> tuple[int, Any]:
        r = self._readable_repo(kind, repo)
        commit = r.resolve(rev)
        blobs = self.query.get("blobs", "").lower() in ("1", "true")  # set by `files_metadata=True`
        siblings = [
            {"rfilename": path, **({"size": size, "blobId": oid} if blobs else {})}
            for path, (oid, size) in sorted(commit.tree.items())
        ]
        return 200, {
            "id": r.repo_id,
            "author": r.owner,
            "sha": commit.sha,
            "private": r.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "createdAt": r.created_at,
            "lastModified": commit.date,
            "siblings": siblings,
        }

    @staticmethod
    def _entries(commit: Commit, prefix: str, recursive: bool) -> list[dict[str, Any]]:
        """Tree entries (files and folders) below `prefix`, in the Hub's /tree format."""
        base = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        files: dict[str, dict[str, Any]] = {}
        folders: set[str] = set()
        for path, (oid, size) in commit.tree.items():
            if not path.startswith(base):
                continue
            parts = path[len(base) :].split("/")
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folders.add(base + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                files[path] = {"type": "file", "path": path, "oid": oid, "size": size}
        dirs = [
            {"type": "directory", "path": p, "size": 0, "oid": hashlib.sha1(p.encode()).hexdigest()} for p in folders
        ]
        return sorted(dirs + list(files.values()), key=lambda e: e["path"])

    def route_tree(self, body: bytes, kind: str, repo: str, rev: str, path: str = "") -> tuple[int, Any]:
        commit = self._readable_repo(kind, repo).resolve(rev)
        entries = self._entries(commit, path, self.query.get("recursive", "").lower() in ("1", "true"))
        if path and not entries:
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        return 200, entries  # single page: no "Link: <...>; rel=next" header needed

    def route_paths_info(self, body: bytes, kind: str, repo: str, rev: str) -> tuple[int, Any]:
        commit = self._readable_repo(kind, repo).resolve(rev)
        everything = {e["path"]: e for e in self._entries(commit, "", recursive=True)}
        paths = parse_qs(body.decode()).get("paths", [])  # form-encoded, one "paths" field per path
        return 200, [everything[p.strip("/")] for p in paths if p.strip("/") in everything]

    def route_preupload(self, body: bytes, kind: str, repo: str, rev: str) -> tuple[int, Any]:
        commit = self._writable_repo(kind, repo).resolve(rev)
        files = json.loads(body)["files"]
        # "regular" for every file => the client inlines contents in the commit payload (no LFS/Xet upload).
        # "oid" is the current blob id: the client skips files whose local git-sha1 matches it.
        return 200, {
            "files": [
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": commit.tree.get(f["path"], (None, 0))[0],
                }
                for f in files
            ]
        }

    def route_commit(self, body: bytes, kind: str, repo: str, rev: str) -> tuple[int, Any]:
        r = self._writable_repo(kind, repo)
        if self.query.get("create_pr"):
            raise HubError(400, "LocalHub does not support pull requests (create_pr)")
        if rev not in r.refs:
            raise HubError(404, f"Invalid rev id: {rev} (commits must target an existing branch)", "RevisionNotFound")
        head = r.commits[r.refs[rev]]
        tree = dict(head.tree)
        header: dict[str, Any] = {}
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                data = (
                    base64.b64decode(value["content"])
                    if value.get("encoding") == "base64"
                    else value["content"].encode()
                )
                tree[value["path"]] = (self.hub._store_blob(data), len(data))
            elif key == "deletedFile":
                if tree.pop(value["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                folder = value["path"].strip("/") + "/"
                tree = {p: v for p, v in tree.items() if not p.startswith(folder)}
            else:  # "lfsFile" cannot happen: preupload never answers "lfs"
                raise HubError(400, f"LocalHub does not support commit operation {key!r}")
        parent = header.get("parentCommit")
        if parent and not head.sha.startswith(parent):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        commit = self.hub._new_commit(r, rev, tree, header.get("summary") or "")
        prefix = "" if r.repo_type == "model" else f"{r.repo_type}s/"
        return 200, {
            "success": True,
            "commitOid": commit.sha,
            "pullRequestUrl": None,
            "commitUrl": f"{self.hub.endpoint}/{prefix}{r.repo_id}/commit/{commit.sha}",
        }

    def route_resolve(
        self, body: bytes, repo: str, rev: str, path: str, kind: str = "models"
    ) -> tuple[int, bytes, dict[str, str]]:
        commit = self._readable_repo(kind, repo).resolve(rev)
        # X-Repo-Commit is mandatory: the client refuses a HEAD answer without it, and on 404 it uses it to
        # cache the file's absence (`.no_exist/<sha>/<path>`).
        headers = {"X-Repo-Commit": commit.sha}
        if path not in commit.tree:
            raise HubError(404, "Entry not found", "EntryNotFound", headers)
        oid, _ = commit.tree[path]
        data = (self.hub._blobs / oid).read_bytes()
        # ETag names the blob in the client cache (`blobs/<etag>`); Content-Length is the expected size.
        return (
            200,
            data,
            {**headers, "ETag": f'"{oid}"', "Content-Type": "application/octet-stream", "Accept-Ranges": "none"},
        )


# -- client configuration -------------------------------------------------------------------------------------


def client_env(
    endpoint: str, hf_home: str | os.PathLike[str], token: str | None = None, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment for a fresh (sub)process whose `huggingface_hub` must talk to `endpoint` only.

    Starts from `base` (default: `os.environ`), points every cache under `hf_home` and sets `HF_TOKEN`
    (or removes it when `token` is None, so no real token is ever sent).
    """
    env = dict(os.environ if base is None else base)
    home = Path(hf_home)
    env.update(
        {
            "HF_ENDPOINT": endpoint,
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",  # also skips the agent-detection request made for the user agent
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HOME": str(home),
            "HF_HUB_CACHE": str(home / "hub"),
            "HF_ASSETS_CACHE": str(home / "assets"),
            "HF_XET_CACHE": str(home / "xet"),
            "HF_TOKEN_PATH": str(home / "token"),
        }
    )
    for name in (
        "TRANSFORMERS_OFFLINE",
        "HUGGINGFACE_HUB_CACHE",
        "HUGGINGFACE_ASSETS_CACHE",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_TOKEN",
        "HUGGINGFACE_CO_STAGING",
    ):
        env.pop(name, None)
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def configure_client(
    monkeypatch: Any,
    endpoint: str,
    hf_home: str | os.PathLike[str],
    token: str | None = None,
    disable_xet: bool = False,
) -> None:
    """Point the already-imported `huggingface_hub` of this process at `endpoint` (pytest `monkeypatch`).

    Setting `HF_ENDPOINT` is not enough in-process: `huggingface_hub.constants` reads the environment once at
    import, `hf_hub_url` formats `HUGGINGFACE_CO_URL_TEMPLATE` directly, and the module-level `HfApi` behind
    `huggingface_hub.upload_folder`/`whoami`/... captured `ENDPOINT` when it was built. All of them are
    patched here, together with the cache/token paths (so the user's real cache and token are never touched).
    `disable_xet=True` makes uploads take the legacy `create_commit` path instead of the `hf_xet` pipeline.
    """
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _cache_assets, _cache_manager

    home = Path(hf_home)
    env = client_env(endpoint, home, token, base={})
    for name in (
        "TRANSFORMERS_OFFLINE",
        "HUGGINGFACE_HUB_CACHE",
        "HUGGINGFACE_ASSETS_CACHE",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_TOKEN",
        "HUGGINGFACE_CO_STAGING",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if disable_xet:
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")

    patched_constants: dict[str, Any] = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {"127.0.0.1"},
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_XET": disable_xet,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": env["HF_HUB_CACHE"],
        "HUGGINGFACE_HUB_CACHE": env["HF_HUB_CACHE"],
        "HF_ASSETS_CACHE": env["HF_ASSETS_CACHE"],
        "HUGGINGFACE_ASSETS_CACHE": env["HF_ASSETS_CACHE"],
        "HF_XET_CACHE": env["HF_XET_CACHE"],
        "HF_TOKEN_PATH": env["HF_TOKEN_PATH"],
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
    }
    for name, value in patched_constants.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", env["HF_HUB_CACHE"])  # `from ..constants import` copies
    monkeypatch.setattr(_cache_assets, "HF_ASSETS_CACHE", env["HF_ASSETS_CACHE"])
