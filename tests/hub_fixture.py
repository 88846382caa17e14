"""A local imitation of the Hugging Face Hub, enough for huggingface_hub's model_info, list_repo_tree
and hf_hub_download (checked against huggingface_hub 2.4's own client code).

Usage in a test module (bound by assignment, so test parameters named `hub` do not trip ruff's F811):

    from tests import hub_fixture
    hub = hub_fixture.hub

    def test_x(hub, tmp_path):
        sha = hub.add_repo("org/adapter", adapter_dir)            # branch "main" -> new commit
        config = SourceConfig(hf_endpoint=hub.url)
        ...
        assert all(sha in r.path for r in hub.file_requests())    # downloads pinned to the sha

Served, bound to 127.0.0.1 on a free port:
  GET  /api/models/{org}/{name}[/revision/{rev}][?blobs=true]   model_info (sha, siblings, sizes)
  GET  /api/models/{org}/{name}/tree/{rev}[/{dir}][?recursive=1] list_repo_tree
  HEAD|GET /{org}/{name}/resolve/{rev}/{file}                   file metadata / bytes
  HEAD|GET /cdn-lfs/{sha256}                                    LFS blobs
A branch or tag revision is answered with a 307 to the same path at its commit sha, as the Hub
does. LFS files (*.safetensors, *.bin, ...) answer with a 302 to /cdn-lfs/ on `cdn_host` ("localhost",
a different origin from 127.0.0.1), carrying X-Repo-Commit, X-Linked-Etag and X-Linked-Size, so the
client takes its metadata from the redirect and drops the Authorization header, as with the real CDN.
Errors carry the Hub's X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound). A repo added
with `token=` is private: without "Authorization: Bearer <token>" it answers 401 like the Hub.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
_LFS_POINTER_SIZE = 134


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # percent-decoded path, without the query
    query: dict[str, list[str]]
    headers: dict[str, str]  # names lower-cased
    host: str


@dataclass
class _Blob:
    data: bytes
    git_oid: str  # what the Hub calls blobId / oid: git's sha1 of the blob
    sha256: str
    lfs: bool


@dataclass
class _Repo:
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit sha
    commits: dict[str, dict[str, _Blob]] = field(default_factory=dict)
    # per commit: announced sizes that differ from the real ones (to imitate a lying listing)
    announced: dict[str, dict[str, int]] = field(default_factory=dict)
    token: str | None = None


class HubFixture:
    """A threaded HTTP server imitating the Hub. Thread-safe; `requests` records every request."""

    def __init__(self, cdn_host: str | None = "localhost"):
        self._repos: dict[str, _Repo] = {}
        self._blobs: dict[str, _Blob] = {}  # sha256 -> blob, for /cdn-lfs/
        self._requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._counter = itertools.count()
        self._cdn_host = cdn_host
        # Seconds every answer waits before it is sent: set it to imitate a hub that hangs.
        self.delay_s = 0.0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> HubFixture:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = _Server(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="hub-fixture", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening: later requests get 'connection refused', as with a hub that is down."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)

    def __enter__(self) -> HubFixture:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- content ----------------------------------------------------------------------------
    def add_repo(self, repo_id: str, directory: Path, revision: str = "main", *, token: str | None = None,
                 announced_sizes: dict[str, int] | None = None) -> str:
        """Commit every file under `directory` as the new tree of branch `revision`; return the sha."""
        directory = Path(directory)
        files = {p.relative_to(directory).as_posix(): p.read_bytes()
                 for p in sorted(directory.rglob("*")) if p.is_file()}
        return self.add_files(repo_id, files, revision, token=token, announced_sizes=announced_sizes)

    def add_files(self, repo_id: str, files: dict[str, bytes], revision: str = "main", *,
                  token: str | None = None, announced_sizes: dict[str, int] | None = None) -> str:
        """Like add_repo, from a {path: bytes} dict. `token` makes the repo private; `announced_sizes`
        makes the listing and HEAD announce other sizes than the real ones."""
        blobs = {}
        for name, data in files.items():
            git_oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            blobs[name] = _Blob(data, git_oid, hashlib.sha256(data).hexdigest(), name.endswith(LFS_SUFFIXES))
        seed = f"{repo_id}\0{revision}\0{next(self._counter)}\0" + "".join(
            f"{n}:{b.git_oid}" for n, b in sorted(blobs.items()))
        sha = hashlib.sha1(seed.encode()).hexdigest()
        with self._lock:
            repo = self._repos.setdefault(repo_id, _Repo())
            if token is not None:
                repo.token = token
            repo.commits[sha] = blobs
            repo.announced[sha] = dict(announced_sizes or {})
            repo.refs[revision] = sha
            for blob in blobs.values():
                self._blobs[blob.sha256] = blob
        return sha

    def set_ref(self, repo_id: str, ref: str, sha: str) -> None:
        """Point a branch or tag at an existing commit."""
        with self._lock:
            repo = self._repos[repo_id]
            if sha not in repo.commits:
                raise KeyError(f"{sha} is not a commit of {repo_id}")
            repo.refs[ref] = sha

    # -- what was asked ---------------------------------------------------------------------
    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def file_requests(self, filename: str | None = None, method: str | None = None) -> list[RecordedRequest]:
        """Requests for file contents or metadata (/resolve/ and /cdn-lfs/), optionally for one file name
        (a /cdn-lfs/ request counts for every file with that content)."""
        out = []
        for r in self.requests:
            if method is not None and r.method != method:
                continue
            if "/resolve/" in r.path:
                if filename is None or r.path.endswith("/" + filename):
                    out.append(r)
            elif r.path.startswith("/cdn-lfs/"):
                if filename is None or self._names_of_blob(r.path.rsplit("/", 1)[-1]) & {filename}:
                    out.append(r)
        return out

    def _names_of_blob(self, sha256: str) -> set[str]:
        with self._lock:
            return {name for repo in self._repos.values() for tree in repo.commits.values()
                    for name, blob in tree.items() if blob.sha256 == sha256}

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _lookup(self, repo_id: str, revision: str | None):
        """(repo, sha, tree) or an (status, error code, message) triple."""
        with self._lock:
            repo = self._repos.get(repo_id)
            if repo is None:
                return None, (404, "RepoNotFound", f"Repository {repo_id} not found")
            if revision is None:
                revision = "main" if "main" in repo.refs else next(iter(repo.refs))
            sha = repo.refs.get(revision) or (revision if revision in repo.commits else None)
            if sha is None:
                return repo, (404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return repo, (sha, repo.commits[sha], repo.announced[sha])


def _hub_error(status: int, code: str, message: str) -> tuple[int, dict[str, str], bytes]:
    body = json.dumps({"error": message}).encode()
    return status, {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}, body


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        # A client that hangs up mid-answer (a download stopped at its size limit) is expected here.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    hub: HubFixture
    server_version = "hub-fixture"

    def log_message(self, format, *args) -> None:  # noqa: A002 - http.server's signature
        return None  # recorded in hub.requests instead of printed

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _serve(self, head: bool) -> None:
        split = urlsplit(self.path)
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        self.hub._record(RecordedRequest(
            method=self.command, path=unquote(split.path), query=parse_qs(split.query),
            headers={k.lower(): v for k, v in self.headers.items()}, host=self.headers.get("Host", "")))
        status, headers, body = self._route(segments, parse_qs(split.query))
        if self.hub.delay_s:
            time.sleep(self.hub.delay_s)
        self.send_response(status)
        headers.setdefault("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _route(self, seg: list[str], query: dict[str, list[str]]):
        if seg[:1] == ["cdn-lfs"] and len(seg) == 2:
            return self._cdn(seg[1])
        if seg[:2] == ["api", "models"] and len(seg) >= 4:
            repo_id, rest = f"{seg[2]}/{seg[3]}", seg[4:]
            if not rest:
                return self._model_info(repo_id, None, query)
            if rest[0] == "revision" and len(rest) >= 2:
                return self._model_info(repo_id, "/".join(rest[1:]), query)
            if rest[0] == "tree" and len(rest) >= 2:
                return self._tree(repo_id, rest[1], "/".join(rest[2:]), query)
        if len(seg) >= 5 and seg[2] == "resolve":
            return self._resolve(f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]))
        return 404, {"Content-Type": "text/plain"}, b"not found"

    def _authorized(self, repo: _Repo):
        if repo.token is None:
            return None
        auth = self.headers.get("Authorization")
        if auth is None:
            return _hub_error(401, "RepoNotFound", "Repository not found")
        if auth != f"Bearer {repo.token}":
            return _hub_error(401, "RepoNotFound", "Invalid credentials in Authorization header")
        return None

    def _resolved(self, repo_id: str, revision: str | None):
        repo, found = self.hub._lookup(repo_id, revision)
        if repo is not None and (denied := self._authorized(repo)) is not None:
            return None, denied
        if repo is None or isinstance(found[0], int):
            return None, _hub_error(*found)
        return (repo, *found), None

    def _model_info(self, repo_id: str, revision: str | None, query):
        found, error = self._resolved(repo_id, revision)
        if error:
            return error
        repo, sha, tree, announced = found
        blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for name, blob in sorted(tree.items()):
            entry = {"rfilename": name}
            if blobs:
                size = announced.get(name, len(blob.data))
                entry.update(size=size, blobId=blob.git_oid)
                if blob.lfs:
                    entry["lfs"] = {"size": size, "sha256": blob.sha256, "pointerSize": _LFS_POINTER_SIZE}
            siblings.append(entry)
        info = {"_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
                "author": repo_id.split("/")[0], "sha": sha, "private": repo.token is not None,
                "gated": False, "disabled": False, "tags": ["peft"], "library_name": "peft",
                "lastModified": "2025-01-01T00:00:00.000Z", "createdAt": "2025-01-01T00:00:00.000Z",
                "siblings": siblings}
        return 200, {"Content-Type": "application/json"}, json.dumps(info).encode()

    def _tree(self, repo_id: str, revision: str, directory: str, query):
        found, error = self._resolved(repo_id, revision)
        if error:
            return error
        _, _, tree, announced = found
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = directory.strip("/") + "/" if directory.strip("/") else ""
        entries, folders = [], set()
        for name, blob in sorted(tree.items()):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            if recursive:
                parts = rest.split("/")[:-1]
                folders.update(prefix + "/".join(parts[:i + 1]) for i in range(len(parts)))
            size = announced.get(name, len(blob.data))
            entry = {"type": "file", "oid": blob.git_oid, "size": size, "path": name}
            if blob.lfs:
                entry["lfs"] = {"oid": blob.sha256, "size": size, "pointerSize": _LFS_POINTER_SIZE}
            entries.append(entry)
        if prefix and not entries and not folders:
            return _hub_error(404, "EntryNotFound", f"{directory} does not exist")
        entries += [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
                    for f in sorted(folders)]
        return 200, {"Content-Type": "application/json"}, json.dumps(entries).encode()

    def _resolve(self, repo_id: str, revision: str, filename: str):
        found, error = self._resolved(repo_id, revision)
        if error:
            return error
        _, sha, tree, announced = found
        blob = tree.get(filename)
        if blob is None:
            status, headers, body = _hub_error(404, "EntryNotFound", f"{filename} does not exist at {sha}")
            headers["X-Repo-Commit"] = sha
            return status, headers, body
        if revision != sha:
            # The Hub answers a branch with a relative redirect to the pinned commit.
            location = f"/{repo_id}/resolve/{sha}/{quote(filename)}"
            return 307, {"Location": location, "X-Repo-Commit": sha}, b""
        size = announced.get(filename, len(blob.data))
        headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(size),
                            "ETag": f'"{blob.sha256}"'})
            if self.hub._cdn_host is not None:
                headers["Location"] = f"http://{self.hub._cdn_host}:{self.hub.port}/cdn-lfs/{blob.sha256}"
                return 302, headers, b""
        else:
            headers["ETag"] = f'"{blob.git_oid}"'
        return self._content(blob, headers)

    def _cdn(self, sha256: str):
        with self.hub._lock:
            blob = self.hub._blobs.get(sha256)
        if blob is None:
            return 404, {"Content-Type": "text/plain"}, b"no such blob"
        return self._content(blob, {"ETag": f'"{blob.sha256}"', "Accept-Ranges": "bytes"})

    def _content(self, blob: _Blob, headers: dict[str, str]):
        data = blob.data
        status = 200
        rng = self.headers.get("Range", "")
        if rng.startswith("bytes=") and rng[6:].endswith("-") and rng[6:-1].isdigit():
            start = int(rng[6:-1])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            data, status = data[start:], 206
        headers["Content-Type"] = "application/octet-stream"
        return status, headers, data


def isolate_hf_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, endpoint: str) -> None:
    """Point huggingface_hub at `endpoint` and away from this machine's login, cache and telemetry.

    huggingface_hub reads its environment once at import, so its constants are patched as well."""
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE",
                 "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    # Anything that forgets to pass an endpoint lands on the fixture, never on huggingface.co.
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        endpoint + "/{repo_id}/resolve/{revision}/{filename}")


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A fresh, running HubFixture for one test, with huggingface_hub isolated and pointed at it."""
    with HubFixture() as fixture:
        isolate_hf_hub(monkeypatch, tmp_path, fixture.url)
        yield fixture
