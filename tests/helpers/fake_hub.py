"""A strict, in-memory Hugging Face Hub on 127.0.0.1 for tests of :mod:`quantforge.hub`.

It implements only the requests ``huggingface_hub`` (2.x, legacy LFS path, i.e. ``HF_HUB_DISABLE_XET``) sends
for: reading a repo at a revision (``GET /api/models/{repo}/revision/{rev}``), creating a repo
(``POST /api/repos/create``) and a branch, checking a README's metadata (``POST /api/validate-yaml``), the
preupload check, the LFS batch API with single-part or multi-part uploads and the verify call, and the NDJSON
commit. Anything else is answered 404 and recorded in :attr:`FakeHub.unexpected`, so a test can assert the client
sent exactly what we meant. Every API call must carry the expected bearer token; the "storage" URLs must not.

Commits are applied atomically: a commit either lands whole (new head) or not at all. The server is bounded: it
stops by itself after ``ttl`` seconds, caps request bodies, and times out idle connections.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

GITATTRIBUTES = b"*.gguf filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n" \
                b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
LFS_SUFFIXES = (".gguf", ".safetensors", ".bin")
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
MAX_BODY = 64 * 1024 * 1024
_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


def git_blob_oid(content: bytes) -> str:
    """The git object id of a regular file, as the Hub reports it for non-LFS files in the preupload answer."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    oid: str
    summary: str
    description: str
    files: dict[str, bytes]
    lfs_paths: frozenset[str] = frozenset()


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, list[Commit]] = field(default_factory=dict)

    def head(self, branch: str) -> Commit:
        """The latest commit of ``branch``."""
        return self.branches[branch][-1]


class _Reject(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, body: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.body = status, message, code, body


class FakeHub:
    """The server and its state. Use as a context manager; ``url`` is the endpoint to give ``HfApi``.

    ``multipart_chunk`` makes LFS objects larger than it use the multi-part transfer; ``before_commit`` is called
    with the repo just before a commit is applied (a test can move the branch there, as a concurrent push would).
    """

    def __init__(self, token: str, *, ttl: float = 60.0, multipart_chunk: int | None = None) -> None:
        self.token = token
        self.multipart_chunk = multipart_chunk
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.parts: dict[tuple[str, int], bytes] = {}
        self.samples: dict[tuple[str, str], bytes] = {}
        self.requests: list[str] = []
        self.unexpected: list[str] = []
        self.validated: list[str] = []
        self.before_commit: Callable[[Repo], None] | None = None
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._timer = threading.Timer(ttl, self.stop)
        self._timer.daemon = True

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._timer.cancel()
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def add_repo(self, repo_id: str, files: dict[str, bytes] | None = None, private: bool = False) -> Repo:
        """A repo as the Hub makes it (initial commit with .gitattributes), plus ``files`` in a second commit."""
        repo = Repo(repo_id, private)
        repo.branches["main"] = [Commit(uuid.uuid4().hex + "00000000", "initial commit", "",
                                        {".gitattributes": GITATTRIBUTES})]
        if files:
            repo.branches["main"].append(Commit(uuid.uuid4().hex + "00000000", "seed", "",
                                                {**repo.head("main").files, **files}))
        self.repos[repo_id] = repo
        return repo

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        """Path -> bytes of the head of ``branch`` (LFS files resolved to their content)."""
        return dict(self.repos[repo_id].head(branch).files)

    def commits(self, repo_id: str, branch: str = "main") -> list[Commit]:
        """Every commit of ``branch``, oldest first (the Hub's initial commit included)."""
        return list(self.repos[repo_id].branches[branch])

    def handle(self, method: str, path: str, query: str, headers: Any, body: bytes) -> tuple[int, dict, bytes]:
        """Answer one request: ``(status, headers, body)``. Requests are served one at a time (a lock)."""
        with self._lock:
            self.requests.append(f"{method} {path}")
            try:
                return self._route(method, path, query, headers, body)
            except _Reject as r:
                if r.status == 404 and r.code is None:
                    self.unexpected.append(f"{method} {path}?{query}" if query else f"{method} {path}")
                hdrs = {"X-Error-Message": r.message}
                if r.code:
                    hdrs["X-Error-Code"] = r.code
                payload = r.body if r.body is not None else {"error": r.message}
                return r.status, hdrs, json.dumps(payload).encode()

    def _auth(self, headers: Any, required: bool = True) -> None:
        got = headers.get("authorization")
        if not required:
            if got is not None:
                raise _Reject(400, "storage URLs must not receive the Hub token")
            return
        if got != f"Bearer {self.token}":
            raise _Reject(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_id: str, branch: str | None = None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise _Reject(404, "Repository not found", "RepoNotFound")
        if branch is not None and branch not in repo.branches:
            raise _Reject(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        return repo

    def _route(self, method: str, path: str, query: str, headers: Any, body: bytes) -> tuple[int, dict, bytes]:
        def ok(payload: Any, status: int = 200, hdrs: dict | None = None) -> tuple[int, dict, bytes]:
            return status, hdrs or {}, json.dumps(payload).encode()

        if method == "PUT" and (m := re.fullmatch(r"/_storage/(?P<oid>[0-9a-f]{64})(/(?P<part>\d+))?", path)):
            self._auth(headers, required=False)
            return self._store(m["oid"], m["part"], body)
        if method == "POST" and (m := re.fullmatch(r"/_storage/(?P<oid>[0-9a-f]{64})/complete", path)):
            self._auth(headers, required=False)
            return ok(self._complete(m["oid"], json.loads(body)))
        self._auth(headers)
        if query:
            raise _Reject(404, f"unexpected query string {query!r}")
        if method == "GET" and (m := re.fullmatch(rf"/api/models/{_REPO}/revision/(?P<rev>[^/]+)", path)):
            return ok(self._info(m["repo"], unquote(m["rev"])))
        if method == "POST" and path == "/api/repos/create":
            return self._create(json.loads(body))
        if method == "POST" and (m := re.fullmatch(rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", path)):
            return ok(self._branch(m["repo"], unquote(m["branch"]), json.loads(body)))
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body))
        if method == "POST" and (m := re.fullmatch(rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", path)):
            return ok(self._preupload(m["repo"], unquote(m["rev"]), json.loads(body)))
        if method == "POST" and (m := re.fullmatch(rf"/{_REPO}\.git/info/lfs/objects/batch", path)):
            if "git-lfs" not in headers.get("content-type", ""):
                raise _Reject(400, "LFS batch requests must be application/vnd.git-lfs+json")
            return ok(self._batch(m["repo"], json.loads(body)))
        if method == "POST" and path == "/_storage/verify":
            req = json.loads(body)
            if self.lfs.get(req["oid"]) is None or len(self.lfs[req["oid"]]) != req["size"]:
                raise _Reject(404, "object not uploaded", "EntryNotFound")
            return ok({"ok": True})
        if method == "POST" and (m := re.fullmatch(rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", path)):
            if headers.get("content-type") != "application/x-ndjson":
                raise _Reject(400, "commit body must be application/x-ndjson")
            return ok(self._commit(m["repo"], unquote(m["rev"]), body))
        raise _Reject(404, f"no such endpoint: {method} {path}")

    def _info(self, repo_id: str, rev: str) -> dict[str, Any]:
        repo = self._repo(repo_id, rev)
        head = repo.head(rev)
        siblings = [{"rfilename": p} for p in sorted(head.files)]
        return {"id": repo_id, "sha": head.oid, "private": repo.private, "siblings": siblings}

    def _create(self, req: dict[str, Any]) -> tuple[int, dict, bytes]:
        if not set(req) <= {"name", "organization", "visibility", "type"} or req.get("type", "model") != "model":
            raise _Reject(400, f"unexpected create payload {sorted(req)}")
        if req.get("visibility") not in (None, "private", "public"):
            raise _Reject(400, "bad visibility")
        repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            return 409, {}, json.dumps({"error": "You already created this model repo", "url": url}).encode()
        self.add_repo(repo_id, private=req.get("visibility") == "private")
        return 200, {}, json.dumps({"url": url, "name": repo_id, "id": uuid.uuid4().hex}).encode()

    def _branch(self, repo_id: str, branch: str, req: dict[str, Any]) -> dict[str, Any]:
        repo = self._repo(repo_id)
        if branch in repo.branches:
            raise _Reject(409, "branch already exists")
        start = req.get("startingPoint")
        if start is not None and start != repo.head("main").oid:
            raise _Reject(400, "this fake only branches from the head of main")
        repo.branches[branch] = [repo.head("main")]
        return {}

    def _validate_yaml(self, req: dict[str, Any]) -> tuple[int, dict, bytes]:
        import yaml

        self.validated.append(req.get("content", ""))
        m = re.match(r"\A---\s*\n(.*?)\n---\s*\n", req.get("content", ""), re.S)
        try:
            data = yaml.safe_load(m.group(1)) if m else None
        except yaml.YAMLError as exc:
            data = exc
        if req.get("repoType") != "model" or not isinstance(data, dict):
            return 400, {}, json.dumps({"errors": [{"message": "metadata must be a YAML mapping"}]}).encode()
        return 200, {}, json.dumps({"errors": [], "warnings": []}).encode()

    def _preupload(self, repo_id: str, rev: str, req: dict[str, Any]) -> dict[str, Any]:
        head = self._repo(repo_id, rev).head(rev)
        out = []
        for f in req["files"]:
            sample = base64.b64decode(f["sample"])
            self.samples[(repo_id, f["path"])] = sample
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_SIZE_THRESHOLD
            old = head.files.get(f["path"])
            oid = None if old is None else (hashlib.sha256(old).hexdigest() if lfs else git_blob_oid(old))
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": oid})
        return {"files": out}

    def _batch(self, repo_id: str, req: dict[str, Any]) -> dict[str, Any]:
        self._repo(repo_id, req.get("ref", {}).get("name", "main"))
        if req.get("operation") != "upload" or req.get("hash_algo") != "sha256":
            raise _Reject(400, "only sha256 uploads are supported")
        objects = []
        for o in req["objects"]:
            oid, size = o["oid"], o["size"]
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.lfs:
                href = f"{self.url}/_storage/{oid}"
                upload: dict[str, Any] = {"href": href}
                chunk = self.multipart_chunk
                if chunk and size > chunk:
                    n = -(-size // chunk)
                    upload = {"href": f"{href}/complete", "header": {"chunk_size": str(chunk),
                              **{f"{i:05d}": f"{href}/{i}" for i in range(1, n + 1)}}}
                entry["actions"] = {"upload": upload, "verify": {"href": f"{self.url}/_storage/verify"}}
            objects.append(entry)
        return {"transfer": "basic", "objects": objects}

    def _store(self, oid: str, part: str | None, body: bytes) -> tuple[int, dict, bytes]:
        if part is not None:
            self.parts[(oid, int(part))] = body
            return 200, {"ETag": hashlib.md5(body).hexdigest()}, b""
        if hashlib.sha256(body).hexdigest() != oid:
            raise _Reject(400, "uploaded bytes do not match their sha256")
        self.lfs[oid] = body
        return 200, {}, b""

    def _complete(self, oid: str, req: dict[str, Any]) -> dict[str, Any]:
        numbers = [p["partNumber"] for p in req["parts"]]
        if req["oid"] != oid or numbers != list(range(1, len(numbers) + 1)):
            raise _Reject(400, "bad multipart completion")
        chunks = [self.parts.pop((oid, n)) for n in numbers]
        if any(p["etag"] != hashlib.md5(c).hexdigest() for p, c in zip(req["parts"], chunks)):
            raise _Reject(400, "etag mismatch")
        data = b"".join(chunks)
        if hashlib.sha256(data).hexdigest() != oid:
            raise _Reject(400, "assembled bytes do not match their sha256")
        self.lfs[oid] = data
        return {}

    def _commit(self, repo_id: str, rev: str, body: bytes) -> dict[str, Any]:
        repo = self._repo(repo_id, rev)
        if self.before_commit is not None:
            self.before_commit(repo)
        lines = [json.loads(x) for x in body.splitlines() if x.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _Reject(400, "commit must start with a header line")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent is not None and not repo.head(rev).oid.startswith(parent):
            raise _Reject(412, "parent commit is not the head of the branch")
        files = dict(repo.head(rev).files)
        lfs_paths = set()
        for line in lines[1:]:
            value = line["value"]
            path = value["path"]
            if line["key"] == "file" and value.get("encoding") == "base64":
                content = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile" and value.get("algo") == "sha256":
                content = self.lfs.get(value["oid"])
                if content is None or len(content) != value["size"]:
                    raise _Reject(400, f"LFS object for {path} was never uploaded")
                lfs_paths.add(path)
            else:
                raise _Reject(400, f"unexpected commit line {line['key']!r}")
            sample = self.samples.get((repo_id, path))
            if sample is None or content[:512] != sample:
                raise _Reject(400, f"{path} was not announced by a matching preupload call")
            files[path] = content
        commit = Commit(hashlib.sha1(uuid.uuid4().bytes).hexdigest(), header["summary"], header.get("description", ""),
                        files, frozenset(lfs_paths))
        repo.branches[rev].append(commit)
        return {"commitUrl": f"{self.url}/{repo_id}/commit/{commit.oid}", "commitOid": commit.oid,
                "pullRequestUrl": None}


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 10

        def _body(self) -> bytes:
            if self.headers.get("transfer-encoding", "").lower() == "chunked":
                chunks, total = [], 0
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline().strip():
                            pass
                        return b"".join(chunks)
                    total += size
                    if total > MAX_BODY:
                        raise ValueError("request body too large")
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            n = int(self.headers.get("content-length") or 0)
            if n > MAX_BODY:
                raise ValueError("request body too large")
            return self.rfile.read(n)

        def _serve(self) -> None:
            url = urlsplit(self.path)
            try:
                body = self._body()
            except ValueError:
                self.close_connection = True
                status, hdrs, payload = 413, {}, b'{"error": "too large"}'
            else:
                try:
                    status, hdrs, payload = hub.handle(self.command, url.path, url.query, self.headers, body)
                except Exception as exc:  # a malformed request: 400, so the client fails at once instead of retrying
                    status, hdrs, payload = 400, {}, json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode()
                    hub.unexpected.append(f"server error on {self.command} {url.path}: {exc!r}")
            self.send_response(status)
            for k, v in hdrs.items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _serve

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler
