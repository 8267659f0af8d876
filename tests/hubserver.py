"""A small Hugging Face Hub on 127.0.0.1 for tests: the endpoints huggingface_hub calls to
create repos, commit files (regular and LFS, not Xet), read model info and download files with
Range support. Files are stored on disk, content-addressed by SHA-256; commits are immutable
snapshots, branches point at them. Only model repos; one token is accepted."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import yaml

REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
REV = r"(?P<rev>[^/]+)"


@dataclass
class Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, str]] = field(default_factory=dict)  # sha -> {path: blob}


class HubState:
    def __init__(self, root: Path, token: str, user: str = "tester") -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.user = user
        self.repos: dict[str, Repo] = {}
        self.lock = threading.Lock()
        self.reject_commits: str | None = None  # a reason to refuse every commit with
        self.messages: dict[str, str] = {}  # commit -> summary
        self.log: list[str] = []  # "METHOD path Range" of each request, for assertions

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at branch or commit ``rev``."""
        repo = self.repos[repo_id]
        commit = repo.commits[repo.branches.get(rev, rev)]
        return {p: (self.blobs / b).read_bytes() for p, b in commit.items()}

    def store(self, data: bytes) -> str:
        oid = hashlib.sha256(data).hexdigest()
        (self.blobs / oid).write_bytes(data)
        return oid


class Handler(BaseHTTPRequestHandler):
    server: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet test output
        pass

    @property
    def state(self) -> HubState:
        return self.server.state

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, doc: object, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(doc).encode(), headers)

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message}, {"X-Error-Message": message})

    def _body(self) -> bytes:
        return self.body

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.state.token}"

    def _dispatch(self) -> None:
        # Always consume the body, so that the kept-alive connection stays in step.
        self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = urlparse(self.path).path
        self.state.log.append(f"{self.command} {unquote(path)} {self.headers.get('Range') or ''}"
                              .strip())
        for method, pattern, fn in ROUTES:
            if method == self.command or (method == "GET" and self.command == "HEAD"):
                m = re.fullmatch(pattern, path)
                if m:
                    with self.state.lock:
                        fn(self, **{k: unquote(v) for k, v in m.groupdict().items()})
                    return
        self._error(404, f"no route for {self.command} {path}")

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch

    # --- endpoints -------------------------------------------------------------------------

    def whoami(self) -> None:
        if not self._authorized():
            return self._error(401, "Invalid credentials in Authorization header")
        self._json(200, {"type": "user", "name": self.state.user, "orgs": [],
                         "auth": {"type": "access_token",
                                  "accessToken": {"displayName": "test", "role": "write"}}})

    def create_repo(self) -> None:
        if not self._authorized():
            return self._error(401, "Invalid credentials in Authorization header")
        doc = json.loads(self._body())
        repo_id = f"{doc.get('organization') or self.state.user}/{doc['name']}"
        if repo_id in self.state.repos:
            return self._json(409, {"error": "You already created this model repo",
                                    "url": f"{self.server.url}/{repo_id}"})
        repo = Repo(private=bool(doc.get("private")) or doc.get("visibility") == "private")
        sha = _commit_sha(None, {}, "initial commit")
        repo.commits[sha] = {}
        repo.branches["main"] = sha
        self.state.repos[repo_id] = repo
        self._json(200, {"url": f"{self.server.url}/{repo_id}", "name": repo_id})

    def _repo(self, repo: str, write: bool = False) -> Repo | None:
        """The repo, or None after answering 404 (unknown or private) or 401 (a write
        without the token)."""
        found = self.state.repos.get(repo)
        if found is None or (found.private and not self._authorized()):
            self._error(404, f"Repository Not Found for url: {self.path}")
            return None
        if write and not self._authorized():
            self._error(401, "Invalid credentials in Authorization header")
            return None
        return found

    def _snapshot(self, repo: str, rev: str) -> tuple[Repo, str] | None:
        """The repo and the commit ``rev`` names, or None after answering 404."""
        found = self._repo(repo)
        sha = self._resolve(found, rev) if found is not None else None
        return (found, sha) if found is not None and sha is not None else None

    def _resolve(self, repo: Repo, rev: str) -> str | None:
        sha = repo.branches.get(rev, rev if rev in repo.commits else None)
        if sha is None:
            self._json(404, {"error": f"Invalid rev id: {rev}"},
                       {"X-Error-Code": "RevisionNotFound"})
        return sha

    def validate_yaml(self) -> None:
        """The model card's front matter must parse and be a mapping."""
        text = json.loads(self._body())["content"]
        errors = []
        if text.startswith("---"):
            try:
                meta = yaml.safe_load(text.split("---")[1])
                if not isinstance(meta, dict):
                    errors.append({"message": "metadata must be a YAML mapping"})
            except yaml.YAMLError as e:
                errors.append({"message": f"invalid YAML: {e}"})
        self._json(400 if errors else 200, {"errors": errors, "warnings": []})

    def create_branch(self, repo: str, rev: str) -> None:
        found = self._repo(repo, write=True)
        if found is None:
            return None
        if rev in found.branches:
            return self._error(409, f"Reference already exists: refs/heads/{rev}")
        found.branches[rev] = found.branches["main"]
        self._json(200, {})

    def _files(self, repo: str, rev: str) -> tuple[Repo, str, list[tuple[str, str, int]]] | None:
        """The repo, commit and (path, blob sha256, size) of each file at ``rev``."""
        at = self._snapshot(repo, rev)
        if at is None:
            return None
        found, sha = at
        return found, sha, [(path, blob, (self.state.blobs / blob).stat().st_size)
                            for path, blob in sorted(found.commits[sha].items())]

    def model_info(self, repo: str, rev: str = "main") -> None:
        at = self._files(repo, rev)
        if at is None:
            return None
        found, sha, files = at
        siblings = []
        for path, blob, size in files:
            entry: dict[str, object] = {"rfilename": path, "size": size, "blobId": blob[:40]}
            if _is_lfs(path, size):
                entry["lfs"] = {"sha256": blob, "size": size, "pointerSize": 134}
            siblings.append(entry)
        self._json(200, {"_id": repo, "id": repo, "modelId": repo, "sha": sha,
                         "private": found.private, "siblings": siblings, "tags": [],
                         "downloads": 0, "likes": 0})

    def tree(self, repo: str, rev: str) -> None:
        """The files of a commit, as ``list_repo_tree`` (and so ``snapshot_download``) reads."""
        at = self._files(repo, rev)
        if at is None:
            return None
        entries = []
        for path, blob, size in at[2]:
            entry: dict[str, object] = {"type": "file", "path": path, "size": size,
                                        "oid": blob[:40]}
            if _is_lfs(path, size):
                entry["lfs"] = {"oid": blob, "size": size, "pointerSize": 134}
            entries.append(entry)
        self._json(200, entries)

    def preupload(self, repo: str, rev: str) -> None:
        if self._repo(repo) is None:
            return None
        doc = json.loads(self._body())
        files = [{"path": f["path"], "uploadMode": "lfs" if _is_lfs(f["path"], f["size"])
                  else "regular", "shouldIgnore": False} for f in doc["files"]]
        self._json(200, {"files": files})

    def lfs_batch(self, repo: str) -> None:
        if self._repo(repo) is None:
            return None
        doc = json.loads(self._body())
        objects = []
        for obj in doc["objects"]:
            item: dict[str, object] = {"oid": obj["oid"], "size": obj["size"]}
            if not (self.state.blobs / obj["oid"]).is_file():
                item["actions"] = {"upload": {"href": f"{self.server.url}/lfs/{obj['oid']}"}}
            objects.append(item)
        self._json(200, {"transfer": "basic", "objects": objects})

    def lfs_upload(self, oid: str) -> None:
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, "uploaded bytes do not match the oid")
        self.state.store(data)
        self._send(200)

    def commit(self, repo: str, rev: str) -> None:
        found = self._repo(repo, write=True)
        if found is None:
            return None
        if self.state.reject_commits:
            return self._error(422, self.state.reject_commits)
        sha = self._resolve(found, rev)
        if sha is None:
            return None
        files = dict(found.commits[sha])
        summary = ""
        staged: dict[str, bytes] = {}
        for line in self._body().splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                summary = value["summary"]
            elif item["key"] == "file":
                staged[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                if not (self.state.blobs / value["oid"]).is_file():
                    return self._error(400, f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = value["oid"]
            elif item["key"] == "deletedFile":
                files.pop(value["path"], None)
            else:
                return self._error(400, f"unsupported commit operation {item['key']}")
        for path, data in staged.items():
            files[path] = self.state.store(data)
        new = _commit_sha(sha, files, summary)
        found.commits[new] = files
        self.state.messages[new] = summary
        found.branches[rev] = new
        self._json(200, {"commitOid": new, "commitUrl": f"{self.server.url}/{repo}/commit/{new}",
                         "success": True})

    def resolve(self, repo: str, rev: str, path: str) -> None:
        at = self._snapshot(repo, rev)
        if at is None:
            return None
        found, sha = at
        blob = found.commits[sha].get(path)
        if blob is None:
            return self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
        data = (self.state.blobs / blob).read_bytes()
        headers = {"X-Repo-Commit": sha, "ETag": f'"{blob}"', "Accept-Ranges": "bytes"}
        if _is_lfs(path, len(data)):
            headers["X-Linked-Etag"] = f'"{blob}"'
            headers["X-Linked-Size"] = str(len(data))
        wanted = self.headers.get("Range")
        if wanted and self.command == "GET":
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted)
            if not m or int(m[1]) >= len(data):
                return self._send(416, b"", headers)
            start = int(m[1])
            end = min(int(m[2]) if m[2] else len(data) - 1, len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._send(206, data[start:end + 1], headers, "application/octet-stream")
        self._send(200, data, headers, "application/octet-stream")


ROUTES = [
    ("GET", r"/api/whoami-v2", Handler.whoami),
    ("POST", r"/api/repos/create", Handler.create_repo),
    ("POST", r"/api/validate-yaml", Handler.validate_yaml),
    ("POST", rf"/api/models/{REPO}/branch/{REV}", Handler.create_branch),
    ("GET", rf"/api/models/{REPO}/revision/{REV}", Handler.model_info),
    ("GET", rf"/api/models/{REPO}/tree/{REV}", Handler.tree),
    ("GET", rf"/api/models/{REPO}", Handler.model_info),
    ("POST", rf"/api/models/{REPO}/preupload/{REV}", Handler.preupload),
    ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", Handler.lfs_batch),
    ("PUT", r"/lfs/(?P<oid>[0-9a-f]{64})", Handler.lfs_upload),
    ("POST", rf"/api/models/{REPO}/commit/{REV}", Handler.commit),
    ("GET", rf"/{REPO}/resolve/{REV}/(?P<path>.+)", Handler.resolve),
]


def _is_lfs(path: str, size: int) -> bool:
    return path.endswith(".safetensors") or size > 1_000_000


def _commit_sha(parent: str | None, files: dict[str, str], summary: str) -> str:
    doc = json.dumps([parent, sorted(files.items()), summary]).encode()
    return hashlib.sha1(doc).hexdigest()


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: HubState) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = state
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
