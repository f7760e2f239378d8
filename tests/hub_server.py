"""A local Hugging Face Hub for tests: the HTTP API that huggingface_hub uploads to and downloads from.

Standard library only. It serves what `create_repo`, `create_branch`, `upload_folder`/`create_commit` (over
the LFS protocol, with Xet disabled), `model_info`/`repo_info`, `list_repo_tree`, `list_repo_commits`,
`hf_hub_download`, `snapshot_download`, `resolve_revision`, `ModelCard.load`/`validate` and `whoami` need,
written against huggingface_hub 2.4 (`hf_api.py`, `_commit_api.py`, `lfs.py`, `file_download.py`,
`_snapshot_download.py`, `utils/_http.py`):

    GET  /api/whoami-v2
    POST /api/repos/create                      {name, organization, visibility|private, type}
    POST /api/validate-yaml                     {content, repoType}
    POST /api/models/{repo}/branch/{branch}     {startingPoint}
    POST /api/models/{repo}/preupload/{rev}     -> files[].uploadMode (lfs|regular), shouldIgnore, oid
    POST /{repo}.git/info/lfs/objects/batch     -> upload + verify actions (basic transfer)
    PUT  /lfs-objects/{oid}                     the upload action's href
    POST /{repo}.git/info/lfs/objects/verify
    POST /api/models/{repo}/commit/{rev}        NDJSON: header, file, lfsFile, deletedFile, deletedFolder
    GET  /api/models/{repo}[/revision/{rev}]    sha, lastModified, private, siblings (sizes with ?blobs=true)
    GET  /api/models/{repo}/tree/{rev}[/{path}] paginated with a `Link: <...>; rel="next"` header
    GET  /api/models/{repo}/commits/{rev}       the history, newest first, paginated
    HEAD/GET /{repo}/resolve/{rev}/{path}       X-Repo-Commit, ETag, X-Linked-Etag, X-Linked-Size

Errors carry `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound) and `X-Error-Message`, as the
Hub's do, so the client raises its usual typed errors. Private repos answer as missing (401 without a
token, 404 with another user's) unless the request carries `Authorization: Bearer <owner's token>`; an
unknown token is refused everywhere with 401. File contents live on disk under `root` (keyed by sha256);
repos, branches and commits live in memory, and every commit keeps its full file table, so any commit
can be read back by its id.

Usage (see `use_local_hub` for pointing an already-imported huggingface_hub at it):

    with LocalHub(tmp_path, tokens={"hf_alice": "alice"}) as hub:
        hub.url                               # http://127.0.0.1:<free port>
        hub.fail_next("commit", status=500)   # the next commit request fails
        hub.fail_next("preupload", status=RESET)  # the next preupload request: the connection is reset
        released = hub.hold_next("commit")    # the next commit request waits until released.set()
        hub.requests                          # [(method, path), ...] received so far
"""

from __future__ import annotations

import base64
import datetime
import fnmatch
import hashlib
import itertools
import json
import re
import socket
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

# Files stored through LFS, as the `.gitattributes` of a new Hub repo says; anything over 10 MB too.
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.onnx", "*.msgpack", "*.npz",
                "*.png", "*.jpg", "*.jpeg", "*.gif", "*.webp", "*.zip", "*.tar.gz")
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in LFS_PATTERNS)

REPO_PATH = r"(?P<repo>[\w.-]+/[\w.-]+)"
RESET = "reset"  # a `fail_next` status: close the connection with a TCP reset instead of answering


class HubError(Exception):
    """An error answer: HTTP status, message, and the Hub's `X-Error-Code` when it sends one."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass(frozen=True)
class StoredFile:
    size: int
    sha256: str  # content hash: the LFS oid, and the key of the content on disk
    blob_id: str  # git blob sha1 (of the LFS pointer for LFS files)
    lfs: bool

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id


@dataclass
class Commit:
    oid: str
    parent: str | None
    author: str
    title: str
    description: str
    date: str
    files: dict[str, StoredFile]  # the whole tree at this commit: path -> file


@dataclass
class Repo:
    repo_id: str
    owner: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)  # oid -> commit

    def resolve(self, revision: str) -> Commit:
        """The commit a branch name or a (full or abbreviated) commit id points to."""
        oid = self.branches.get(revision)
        if oid is None and re.fullmatch(r"[0-9a-f]{7,40}", revision):
            oid = next((oid for oid in self.commits if oid.startswith(revision)), None)
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[oid]


def git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def is_lfs_path(path: str, size: int) -> bool:
    return size > LFS_SIZE_THRESHOLD or any(fnmatch.fnmatch(path.rsplit("/", 1)[-1], p) for p in LFS_PATTERNS)


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class LocalHub:
    """The Hub's state (users, repos, stored objects) and the HTTP server in front of it."""

    def __init__(self, root: str | Path, tokens: dict[str, str], page_size: int = 1000):
        """`tokens` maps each valid access token to its user; `page_size` paginates tree and commit listings."""
        self.objects = Path(root) / "objects"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tokens = dict(tokens)
        self.page_size = page_size
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self._failures: dict[str, list[int | str]] = {}
        self._holds: dict[str, list[threading.Event]] = {}
        self._commit_counter = itertools.count()
        self._lock = threading.RLock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "LocalHub":
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def fail_next(self, route: str, times: int = 1, status: int | str = 500) -> None:
        """Answers the next `times` requests to `route` (a `_Handler.ROUTES` name, e.g. "commit",
        "lfs_upload", "preupload") with an HTTP `status` error, or with `RESET` by resetting the
        connection, before touching any state."""
        with self._lock:
            self._failures.setdefault(route, []).extend([status] * times)

    def pop_failure(self, route: str) -> int | str | None:
        with self._lock:
            pending = self._failures.get(route)
            return pending.pop(0) if pending else None

    def hold_next(self, route: str) -> threading.Event:
        """Makes the next request to `route` wait, before touching any state, until the returned event is set:
        the moment to kill a client in the middle of a request. The request is then served as usual."""
        released = threading.Event()
        with self._lock:
            self._holds.setdefault(route, []).append(released)
        return released

    def pop_hold(self, route: str) -> threading.Event | None:
        with self._lock:
            pending = self._holds.get(route)
            return pending.pop(0) if pending else None

    # --- Stored objects -------------------------------------------------------------------------

    def has_object(self, sha256: str) -> bool:
        return (self.objects / sha256).is_file()

    def store_object(self, content: bytes) -> str:
        sha256 = hashlib.sha256(content).hexdigest()
        path = self.objects / sha256
        if not path.exists():
            tmp = path.with_suffix(f".tmp-{threading.get_ident()}")
            tmp.write_bytes(content)
            tmp.replace(path)
        return sha256

    def read_object(self, sha256: str) -> bytes:
        return (self.objects / sha256).read_bytes()

    def stored_file(self, content: bytes, lfs: bool) -> StoredFile:
        sha256 = self.store_object(content)
        blob_id = git_blob_id(lfs_pointer(sha256, len(content)) if lfs else content)
        return StoredFile(size=len(content), sha256=sha256, blob_id=blob_id, lfs=lfs)

    # --- Repos and commits ----------------------------------------------------------------------

    def create_repo(self, repo_id: str, owner: str, private: bool) -> Repo:
        repo = Repo(repo_id=repo_id, owner=owner, private=private, created_at=now_iso())
        self.repos[repo_id] = repo
        gitattributes = self.stored_file(GITATTRIBUTES.encode(), lfs=False)
        self.commit(repo, "main", owner, "initial commit", "", {".gitattributes": gitattributes})
        return repo

    def commit(self, repo: Repo, branch: str, author: str, title: str, description: str,
               files: dict[str, StoredFile]) -> Commit:
        parent = repo.branches.get(branch)
        listing = sorted((path, f.blob_id) for path, f in files.items())
        seed = json.dumps([parent, title, listing, next(self._commit_counter)]).encode()
        commit = Commit(oid=hashlib.sha1(seed).hexdigest(), parent=parent, author=author, title=title,
                        description=description, date=now_iso(), files=dict(files))
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit


class _Handler(BaseHTTPRequestHandler):
    """Routes each request to one small method; `HubError`s become the Hub's error answers."""

    server_version = "LocalHub/1.0"
    ROUTES = [  # (method, route name, path regex)
        ("GET", "whoami", r"/api/whoami-v2"),
        ("POST", "create_repo", r"/api/repos/create"),
        ("POST", "validate_yaml", r"/api/validate-yaml"),
        ("POST", "create_branch", rf"/api/models/{REPO_PATH}/branch/(?P<branch>[^/]+)"),
        ("POST", "preupload", rf"/api/models/{REPO_PATH}/preupload/(?P<rev>[^/]+)"),
        ("POST", "commit", rf"/api/models/{REPO_PATH}/commit/(?P<rev>[^/]+)"),
        ("GET", "model_info", rf"/api/models/{REPO_PATH}(?:/revision/(?P<rev>[^/]+))?"),
        ("GET", "tree", rf"/api/models/{REPO_PATH}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?"),
        ("GET", "commits", rf"/api/models/{REPO_PATH}/commits/(?P<rev>[^/]+)"),
        ("POST", "lfs_batch", rf"/{REPO_PATH}\.git/info/lfs/objects/batch"),
        ("POST", "lfs_verify", rf"/{REPO_PATH}\.git/info/lfs/objects/verify"),
        ("PUT", "lfs_upload", r"/lfs-objects/(?P<oid>[0-9a-f]{64})"),
        ("HEAD", "resolve", rf"/{REPO_PATH}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"),
        ("GET", "resolve", rf"/{REPO_PATH}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"),
    ]

    @property
    def hub(self) -> LocalHub:
        return self.server.hub

    def log_message(self, format: str, *args) -> None:  # keep test output clean
        pass

    def _dispatch(self) -> None:
        method, url = self.command, urlsplit(self.path)
        self.query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        self.body = self._read_body()  # always drain the request before answering
        with self.hub._lock:
            self.hub.requests.append((method, url.path))
        try:
            for route_method, name, pattern in self.ROUTES:
                match = re.fullmatch(pattern, url.path)
                if route_method == method and match:
                    if (released := self.hub.pop_hold(name)) is not None:
                        released.wait()
                    if (status := self.hub.pop_failure(name)) == RESET:
                        return self._reset_connection()
                    if status is not None:
                        raise HubError(status, f"Injected failure of {name}")
                    params = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                    with self.hub._lock:
                        return getattr(self, name)(**params)
            raise HubError(404, f"No route for {method} {url.path}")
        except HubError as error:
            headers = {"X-Error-Message": error.message, **error.headers}
            if error.code:
                headers["X-Error-Code"] = error.code
            self._send_json({"error": error.message}, status=error.status, headers=headers)

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch

    # --- Request and response plumbing ----------------------------------------------------------

    def _reset_connection(self) -> None:
        """Drop the connection with a TCP RST (SO_LINGER 0), as a crashing proxy or server does."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _json_body(self) -> dict:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as error:
            raise HubError(400, f"Invalid JSON body: {error}")

    def _send(self, status: int, body: bytes, headers: dict, content_type: str, length: int | None = None) -> None:
        """Sends an answer; `length` is the Content-Length when `body` is left out (HEAD)."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, payload, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers or {}, "application/json")

    def _send_page(self, items: list) -> None:
        """Sends the page of `items` the `cursor` query asks for, linking the next one as the Hub does."""
        start = int(self.query.get("cursor", 0))
        page_size = int(self.query.get("limit", self.hub.page_size))
        headers = {}
        if start + page_size < len(items):
            next_query = urlencode({**self.query, "cursor": start + page_size})
            headers["Link"] = f'<{self.hub.url}{urlsplit(self.path).path}?{next_query}>; rel="next"'
        self._send_json(items[start:start + page_size], headers=headers)

    # --- Authentication and access --------------------------------------------------------------

    def _user(self) -> str | None:
        """The caller's user name, None when anonymous; an unknown token is refused."""
        authorization = self.headers.get("Authorization")
        if authorization is None:
            return None
        token = authorization.removeprefix("Bearer ").strip()
        if token not in self.hub.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.hub.tokens[token]

    def _readable_repo(self, repo_id: str) -> Repo:
        """The repo if the caller may read it; private repos of others look missing, as on the Hub."""
        user = self._user()
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner):
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _writable_repo(self, repo_id: str) -> Repo:
        repo = self._readable_repo(repo_id)
        user = self._user()
        if user != repo.owner:
            raise HubError(401 if user is None else 403, f"You don't have the rights to write to {repo_id}")
        return repo

    # --- Routes ---------------------------------------------------------------------------------

    def whoami(self) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid username or password.")
        self._send_json({"type": "user", "name": user, "fullname": user, "orgs": [],
                         "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})

    def create_repo(self) -> None:
        payload = self._json_body()
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        if payload.get("type", "model") != "model":
            raise HubError(400, "This local Hub only hosts model repos")
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload['name']}"
        if namespace != user:
            raise HubError(403, f"You don't have the rights to create a repo under {namespace}")
        if repo_id in self.hub.repos:
            conflict = {"error": "You already created this model repo", "url": f"{self.hub.url}/{repo_id}"}
            return self._send_json(conflict, status=409)
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.hub.create_repo(repo_id, owner=user, private=private)
        self._send_json({"url": f"{self.hub.url}/{repo_id}", "name": repo_id})

    def validate_yaml(self) -> None:
        """Checks the card's front matter is a closed `---` block of `key: value` lines (no YAML parser here)."""
        content = self._json_body().get("content", "")
        lines = content.splitlines()
        if not lines or lines[0].strip() != "---":
            warning = {"message": "Empty or missing yaml metadata in repo card"}
            return self._send_json({"errors": [], "warnings": [warning]})
        end = next((i for i, line in enumerate(lines[1:], start=1) if line.strip() == "---"), None)
        errors = [] if end is not None else [{"message": "The YAML metadata block is not closed by '---'"}]
        for line in lines[1:end]:
            if line and not line[0].isspace() and not line.startswith(("#", "- ")) and ":" not in line:
                errors.append({"message": f"Invalid YAML line: {line!r}"})
        self._send_json({"errors": errors, "warnings": []}, status=400 if errors else 200)

    def create_branch(self, repo: str, branch: str) -> None:
        target = self._writable_repo(repo)
        if branch in target.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = target.resolve(self._json_body().get("startingPoint") or "main")
        target.branches[branch] = start.oid
        self._send_json({})

    def preupload(self, repo: str, rev: str) -> None:
        head = self._writable_repo(repo).resolve(rev)
        answers = []
        for entry in self._json_body()["files"]:
            lfs = is_lfs_path(entry["path"], entry["size"])
            remote = head.files.get(entry["path"])
            oid = None if remote is None else (remote.sha256 if remote.lfs else remote.blob_id)
            answers.append({"path": entry["path"], "uploadMode": "lfs" if lfs else "regular",
                            "shouldIgnore": False, "oid": oid})
        self._send_json({"files": answers, "commitOid": head.oid})

    def lfs_batch(self, repo: str) -> None:
        self._writable_repo(repo)
        payload = self._json_body()
        if payload.get("operation") != "upload":
            raise HubError(400, "Only the upload operation is supported")
        objects = []
        for obj in payload["objects"]:
            answer = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not self.hub.has_object(obj["oid"]):  # already stored objects need no actions
                answer["actions"] = {
                    "upload": {"href": f"{self.hub.url}/lfs-objects/{obj['oid']}", "header": {}},
                    "verify": {"href": f"{self.hub.url}/{repo}.git/info/lfs/objects/verify", "header": {}},
                }
            objects.append(answer)
        body = json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode()
        self._send(200, body, {}, "application/vnd.git-lfs+json")

    def lfs_upload(self, oid: str) -> None:
        """The upload href: unauthenticated, like the presigned storage URLs the Hub hands out."""
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match its oid {oid}")
        self.hub.store_object(self.body)
        self._send(200, b"", {"ETag": f'"{oid}"'}, "text/plain")

    def lfs_verify(self, repo: str) -> None:
        self._writable_repo(repo)
        payload = self._json_body()
        if not self.hub.has_object(payload["oid"]) or len(self.hub.read_object(payload["oid"])) != payload["size"]:
            raise HubError(404, f"Object {payload['oid']} was not uploaded")
        self._send_json({"success": True})

    def commit(self, repo: str, rev: str) -> None:
        target = self._writable_repo(repo)
        if self.query.get("create_pr"):
            raise HubError(400, "This local Hub does not support pull requests")
        if rev not in target.branches:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        lines = [json.loads(line) for line in self.body.decode().splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), {})
        head = target.resolve(rev)
        if header.get("parentCommit") not in (None, head.oid):
            raise HubError(412, f"Parent commit {header['parentCommit']} is not the head of {rev} ({head.oid})")
        files = dict(head.files)
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                content = base64.b64decode(value["content"])
                files[value["path"]] = self.hub.stored_file(content, lfs=False)
            elif key == "lfsFile":
                if not self.hub.has_object(value["oid"]):
                    raise HubError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                files[value["path"]] = self.hub.stored_file(self.hub.read_object(value["oid"]), lfs=True)
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {path: f for path, f in files.items() if not path.startswith(prefix)}
        commit = self.hub.commit(target, rev, self._user(), header.get("summary") or "Update",
                                 header.get("description", ""), files)
        self._send_json({"success": True, "commitOid": commit.oid, "pullRequestUrl": None,
                         "commitUrl": f"{self.hub.url}/{repo}/commit/{commit.oid}"})

    def model_info(self, repo: str, rev: str = "main") -> None:
        target = self._readable_repo(repo)
        commit = target.resolve(rev)
        with_blobs = self.query.get("blobs", "").lower() == "true"
        siblings = [self._sibling(path, f, with_blobs) for path, f in sorted(commit.files.items())]
        namespace, _ = repo.split("/")
        self._send_json({
            "_id": hashlib.md5(repo.encode()).hexdigest()[:24], "id": repo, "modelId": repo, "author": namespace,
            "sha": commit.oid, "lastModified": commit.date, "createdAt": target.created_at,
            "private": target.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0,
            "tags": [], "siblings": siblings,
        })

    @staticmethod
    def _sibling(path: str, stored: StoredFile, with_blobs: bool) -> dict:
        if not with_blobs:
            return {"rfilename": path}
        lfs = {"size": stored.size, "sha256": stored.sha256,
               "pointerSize": len(lfs_pointer(stored.sha256, stored.size))} if stored.lfs else None
        return {"rfilename": path, "size": stored.size, "blobId": stored.blob_id, "lfs": lfs}

    def tree(self, repo: str, rev: str, path: str = "") -> None:
        commit = self._readable_repo(repo).resolve(rev)
        recursive = self.query.get("recursive", "").lower() == "true"
        self._send_page(self._tree_entries(commit, path.strip("/"), recursive))

    def commits(self, repo: str, rev: str) -> None:
        """The history of `rev`, newest first."""
        target = self._readable_repo(repo)
        history, commit = [], target.resolve(rev)
        while commit is not None:
            history.append({"id": commit.oid, "title": commit.title, "message": commit.description,
                            "date": commit.date, "authors": [{"user": commit.author}]})
            commit = target.commits.get(commit.parent) if commit.parent else None
        self._send_page(history)

    @staticmethod
    def _tree_entries(commit: Commit, folder: str, recursive: bool) -> list[dict]:
        prefix = f"{folder}/" if folder else ""
        below = {path[len(prefix):]: f for path, f in commit.files.items() if path.startswith(prefix)}
        if folder and not below:
            raise HubError(404, f"{folder} does not exist at {commit.oid}", "EntryNotFound",
                           {"X-Repo-Commit": commit.oid})
        entries, folders = [], set()
        for relative, stored in sorted(below.items()):
            parts = relative.split("/")
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folders.add("/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                entry = {"type": "file", "oid": stored.blob_id, "size": stored.size, "path": prefix + relative}
                if stored.lfs:
                    entry["lfs"] = {"oid": stored.sha256, "size": stored.size,
                                    "pointerSize": len(lfs_pointer(stored.sha256, stored.size))}
                entries.append(entry)
        for name in folders:
            tree_id = hashlib.sha1(f"{commit.oid}:{prefix}{name}".encode()).hexdigest()
            entries.append({"type": "directory", "oid": tree_id, "size": 0, "path": prefix + name})
        return sorted(entries, key=lambda entry: entry["path"])

    def resolve(self, repo: str, rev: str, path: str) -> None:
        commit = self._readable_repo(repo).resolve(rev)
        stored = commit.files.get(path)
        if stored is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{stored.etag}"', "Accept-Ranges": "none"}
        if stored.lfs:
            headers.update({"X-Linked-Etag": f'"{stored.sha256}"', "X-Linked-Size": str(stored.size)})
        body = self.hub.read_object(stored.sha256) if self.command == "GET" else b""
        self._send(200, body, headers, "application/octet-stream", length=stored.size)


def use_local_hub(monkeypatch, url: str, home: Path) -> None:
    """Points huggingface_hub, already imported, at `url`, and isolates its cache and stored login in `home`.

    huggingface_hub reads `HF_ENDPOINT`, `HF_HUB_DISABLE_XET` and `HF_HUB_OFFLINE` into module constants at
    import time, and its module-level `HfApi` (behind `huggingface_hub.model_info`, `upload_folder`,
    `resolve_revision`, ... which diffusers calls) keeps the endpoint it was built with; other calls read the
    constants at call time. Both are patched, and the environment too for subprocesses. (diffusers' own copies of
    `HF_HUB_OFFLINE`, in `utils.hub_utils` and `loaders.lora_base`, only feed telemetry and LoRA loading.)
    """
    from huggingface_hub import constants, hf_api

    settings = {
        "ENDPOINT": url,
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False,  # tests/conftest.py turns it on for the rest of the suite
        "HF_HUB_DISABLE_XET": True,  # otherwise uploads ask for a Xet write token
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
    }
    for name, value in settings.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", url)
    environment = {"HF_ENDPOINT": url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0", "HF_HOME": str(home),
                   "HF_HUB_CACHE": str(home / "hub"), "HF_TOKEN_PATH": str(home / "token"), "NO_PROXY": "127.0.0.1"}
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_CO_STAGING"):
        monkeypatch.delenv(name, raising=False)
