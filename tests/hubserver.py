"""A small Hub-protocol HTTP server (standard library only) for end-to-end tests of `push` and Hub
sources, spoken to by the real huggingface_hub client (docs/hub-protocol.md).

Repos are model repos with branches, commits (full file trees), pull requests (`refs/pr/N`),
private visibility and per-user tokens. Uploads work in both client modes: `lfs` files go through
the LFS batch API (PUT + verify), `regular` files come inline in the NDJSON commit. `/resolve`
serves ranges (206) for header-only reads. Every request is logged, with the body bytes sent, so
tests can assert what was (not) downloaded. `die_on` makes the server drop the connection and stop
serving at a given request, as a server dying mid-upload would.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LFS_THRESHOLD = 10 * 1024 * 1024


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, bytes]
    lfs: set[str] = field(default_factory=set)  # paths stored as LFS objects


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # name (or refs/pr/N) -> commit oid
    pulls: int = 0


@dataclass
class Logged:
    method: str
    path: str
    status: int
    range: str | None
    sent: int  # body bytes sent


class FakeHub:
    """`with FakeHub(tokens={"tok": "alice"}) as hub:` serve on 127.0.0.1 at `hub.url`."""

    def __init__(self, tokens: dict[str, str] | None = None, upload_mode: str = "auto") -> None:
        self.tokens = dict(tokens or {})
        self.upload_mode = upload_mode  # "auto" (the Hub's rules), "regular" or "lfs"
        self.repos: dict[str, Repo] = {}
        self.commits: dict[str, Commit] = {}
        self.lfs: dict[str, bytes] = {}
        self.log: list[Logged] = []
        self.die_on: str | None = None  # a regex over "METHOD path": drop the connection there
        # (regex over "METHOD path", repo id, files): commit `files` to that repo's main the
        # first time a request matches, before answering it, as another client's commit would
        self.interject: tuple[str, str, dict[str, bytes]] | None = None
        self.stop_after: str | None = None  # a regex: answer that request, die at the next
        self.drop_once: str | None = None  # a regex: drop that request's connection, go on serving
        self.lock = threading.RLock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self._thread: threading.Thread | None = None

    def start(self) -> FakeHub:
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- state helpers for tests ---------------------------------------------------------------

    def create(self, repo_id: str, private: bool = False) -> Repo:
        with self.lock:
            repo = self.repos.get(repo_id)
            if repo is None:
                repo = self.repos[repo_id] = Repo(repo_id, private)
                root = self._commit(None, "initial commit", {}, set())
                repo.branches["main"] = root.oid
            return repo

    def put(self, repo_id: str, files: dict[str, bytes], private: bool = False) -> str:
        """Commit `files` to main directly (test set-up, not the protocol); returns the oid."""
        with self.lock:
            repo = self.create(repo_id, private)
            parent = self.commits[repo.branches["main"]]
            lfs = {p for p in files if p.endswith((".safetensors", ".bin"))}
            commit = self._commit(parent.oid, "set-up", {**parent.files, **files}, parent.lfs | lfs)
            repo.branches["main"] = commit.oid
            return commit.oid

    def put_folder(self, repo_id: str, folder: Path) -> str:
        files = {
            str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()
        }
        return self.put(repo_id, files)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return dict(self.commits[self.resolve(repo, revision)].files)

    def resolve(self, repo: Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in self.commits:
            return revision
        raise KeyError(revision)

    def _commit(
        self, parent: str | None, message: str, files: dict[str, bytes], lfs: set[str]
    ) -> Commit:
        digest = hashlib.sha1(usedforsecurity=False)
        digest.update(f"{parent}\n{message}\n{len(self.commits)}".encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
        commit = Commit(digest.hexdigest(), parent, message, files, lfs)
        self.commits[commit.oid] = commit
        return commit


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        # --- plumbing ---------------------------------------------------------------------------

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _send(
            self,
            status: int,
            body: bytes | dict[str, Any] | list[Any] = b"",
            headers: dict[str, str] | None = None,
            head: bool = False,
        ) -> None:
            if not isinstance(body, bytes):
                body = json.dumps(body).encode()
                headers = {"Content-Type": "application/json", **(headers or {})}
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if "Content-Length" not in (headers or {}):
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            sent = 0
            if not head:
                self.wfile.write(body)
                sent = len(body)
            with hub.lock:
                hub.log.append(
                    Logged(self.command, self.path, status, self.headers.get("Range"), sent)
                )

        def _error(self, status: int, code: str | None, message: str) -> None:
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, {"error": message}, headers, head=self.command == "HEAD")

        def _user(self) -> str | bool | None:
            """The caller: a user name, None without a token, False for an unknown token."""
            auth = self.headers.get("Authorization", "")
            if not auth.startswith("Bearer "):
                return None
            return hub.tokens.get(auth.removeprefix("Bearer "), False)

        def _auth_failed(self) -> bool:
            if self._user() is False:
                self._error(401, None, "Invalid credentials in Authorization header")
                return True
            return False

        def _repo(self, repo_id: str, write: bool = False) -> Repo | None:
            """The repo if the caller may see it (and write to it); else answers and None."""
            if self._auth_failed():
                return None
            user = self._user()
            repo = hub.repos.get(repo_id)
            owner = repo_id.split("/")[0]
            if repo is None or (repo.private and user != owner):
                self._error(404 if user else 401, "RepoNotFound", f"Repository {repo_id} not found")
                return None
            if write and user != owner:
                self._error(403 if user else 401, None, f"You cannot write to {repo_id}")
                return None
            return repo

        def _revision(self, repo: Repo, rev: str) -> str | None:
            try:
                return hub.resolve(repo, rev)
            except KeyError:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                return None

        def _dying(self) -> bool:
            request = f"{self.command} {self.path}"
            once = bool(hub.drop_once and re.search(hub.drop_once, request))
            if not once and not (hub.die_on and re.search(hub.die_on, request)):
                return False
            self._body()
            self.close_connection = True
            self.connection.shutdown(2)
            if once:
                hub.drop_once = None  # this request's connection only; the server goes on
            else:
                threading.Thread(target=hub.stop, daemon=True).start()  # refuse what follows
            return True

        # --- dispatch ---------------------------------------------------------------------------

        def do_HEAD(self) -> None:
            self._dispatch()

        def do_GET(self) -> None:
            self._dispatch()

        def do_POST(self) -> None:
            self._dispatch()

        def do_PUT(self) -> None:
            self._dispatch()

        def _dispatch(self) -> None:
            if self._dying():
                return
            if hub.interject and re.search(hub.interject[0], f"{self.command} {self.path}"):
                _, repo_id, files = hub.interject
                hub.interject = None
                hub.put(repo_id, files)
            parts = urlsplit(self.path)
            segs = parts.path.split("/")  # split BEFORE unquoting: revisions arrive quoted
            query = parse_qs(parts.query)
            try:
                with hub.lock:
                    self._route(segs, query)
            except (BrokenPipeError, ConnectionResetError):
                pass
            if hub.stop_after and re.search(hub.stop_after, f"{self.command} {self.path}"):
                hub.stop_after = None
                hub.die_on = ".*"  # the next request, whichever it is, finds the server dying

        def _route(self, segs: list[str], query: dict[str, list[str]]) -> None:
            m, n = self.command, len(segs)
            if segs[1:3] == ["api", "whoami-v2"]:
                return self._whoami()
            if segs[1:4] == ["api", "repos", "create"] and m == "POST":
                return self._create()
            if segs[1:3] == ["api", "validate-yaml"]:
                self._body()
                return self._send(200, {"errors": [], "warnings": []})
            if segs[1:3] == ["api", "models"] and n >= 5:
                repo_id = f"{segs[3]}/{segs[4]}"
                rest = segs[5:]
                return self._api(repo_id, rest, query)
            if n >= 4 and segs[3] == "resolve":
                return self._resolve(f"{segs[1]}/{segs[2]}", unquote(segs[4]), "/".join(segs[5:]))
            if (
                n >= 3
                and segs[2].endswith(".git")
                and segs[3:] == ["info", "lfs", "objects", "batch"]
            ):
                return self._lfs_batch(f"{segs[1]}/{segs[2].removesuffix('.git')}")
            if segs[1] == "lfs-upload" and m == "PUT":
                data = self._body()
                if hashlib.sha256(data).hexdigest() != segs[2]:
                    return self._error(400, None, "sha256 mismatch")
                hub.lfs[segs[2]] = data
                return self._send(200, b"")
            if segs[1] == "lfs-verify" and m == "POST":
                self._body()
                return self._send(200 if segs[2] in hub.lfs else 404, {})
            return self._error(404, None, f"no route for {m} {self.path}")

        def _whoami(self) -> None:
            user = self._user()
            if not user:
                return self._error(401, None, "Invalid user token.")
            self._send(200, {"type": "user", "name": user, "fullname": user, "orgs": [],
                             "auth": {"type": "access_token", "accessToken": {"role": "write"}}})  # fmt: skip

        def _create(self) -> None:
            body = json.loads(self._body() or b"{}")
            if self._auth_failed():
                return None
            user = self._user()
            if not user:
                return self._error(401, None, "You must be authenticated to create a repo")
            repo_id = f"{body.get('organization') or user}/{body['name']}"
            if repo_id.split("/")[0] != user:
                return self._error(403, None, f"You cannot create {repo_id}")
            url = f"http://{self.headers['Host']}/{repo_id}"
            if repo_id in hub.repos:
                return self._send(409, {"error": "You already created this model repo", "url": url})
            hub.create(
                repo_id, private=body.get("visibility") == "private" or bool(body.get("private"))
            )
            self._send(200, {"url": url, "name": repo_id})

        # --- /api/models/{repo}/... -------------------------------------------------------------

        def _api(self, repo_id: str, rest: list[str], query: dict[str, list[str]]) -> None:
            head = rest[0] if rest else ""
            write = head in ("preupload", "commit", "branch", "discussions")
            body = self._body() if self.command == "POST" else b""
            repo = self._repo(repo_id, write=write)
            if repo is None:
                return None
            if head in ("", "revision"):
                rev = unquote(rest[1]) if head == "revision" else "main"
                oid = self._revision(repo, rev)
                if oid is None:
                    return None
                files = hub.commits[oid].files
                return self._send(200, {"id": repo_id, "sha": oid, "private": repo.private,
                                        "siblings": [{"rfilename": p} for p in sorted(files)]})  # fmt: skip
            if head == "tree":
                oid = self._revision(repo, unquote(rest[1]))
                if oid is None:
                    return None
                prefix = "/".join(rest[2:])
                return self._send(200, self._tree(hub.commits[oid], prefix))
            if head == "refs":
                branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": o}
                            for b, o in repo.branches.items() if not b.startswith("refs/pr/")]  # fmt: skip
                pulls = [{"name": b, "ref": b, "targetCommit": o}
                         for b, o in repo.branches.items() if b.startswith("refs/pr/")]  # fmt: skip
                return self._send(200, {"branches": branches, "tags": [], "converts": [], "pullRequests": pulls})  # fmt: skip
            if head == "branch" and self.command == "POST":
                name = unquote(rest[1])
                start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
                if name in repo.branches:
                    return self._error(409, None, f"Branch {name} already exists")
                oid = self._revision(repo, start)
                if oid is None:
                    return None
                repo.branches[name] = oid
                return self._send(200, {})
            if head == "preupload":
                return self._preupload(repo, unquote(rest[1]), json.loads(body))
            if head == "commit":
                return self._commit(repo, unquote(rest[1]), body, "create_pr" in query)
            if head == "discussions" and self.command == "POST":
                req = json.loads(body or b"{}")
                if not req.get("pullRequest"):
                    return self._error(400, None, "only pull requests are supported here")
                num = self._open_pr(repo, "main")
                return self._send(200, {"num": num, "title": req.get("title", ""), "isPullRequest": True,
                                        "status": "draft", "author": {"name": self._user()},
                                        "createdAt": "2026-01-01T00:00:00.000Z", "events": [],
                                        "conflictingFiles": None, "target": {"repo": {"name": repo.repo_id, "type": "model"}},
                                        "diff": None, "mergeCommitOid": None, "isReport": False,
                                        "pinned": False, "locked": False})  # fmt: skip
            return self._error(404, None, f"no route for {self.command} {self.path}")

        def _tree(self, commit: Commit, prefix: str) -> list[dict[str, Any]]:
            items, dirs = [], set()
            for path, data in sorted(commit.files.items()):
                if prefix and not path.startswith(prefix.rstrip("/") + "/"):
                    continue
                parts = path.split("/")
                for i in range(1, len(parts)):
                    dirs.add("/".join(parts[:i]))
                item: dict[str, Any] = {
                    "type": "file",
                    "path": path,
                    "size": len(data),
                    "oid": git_blob_id(data),
                }
                if path in commit.lfs:
                    item["lfs"] = {
                        "oid": hashlib.sha256(data).hexdigest(),
                        "size": len(data),
                        "pointerSize": 134,
                    }
                items.append(item)
            items += [{"type": "directory", "path": d, "oid": "0" * 40} for d in sorted(dirs)]
            return items

        def _mode(self, path: str, size: int, sample: bytes) -> str:
            if hub.upload_mode != "auto":
                return hub.upload_mode
            lfs = (
                size >= LFS_THRESHOLD or b"\0" in sample or path.endswith((".safetensors", ".bin"))
            )
            return "lfs" if lfs else "regular"

        def _preupload(self, repo: Repo, rev: str, body: dict[str, Any]) -> None:
            try:
                current = hub.commits[hub.resolve(repo, rev)]
            except KeyError:
                current = hub.commits[repo.branches["main"]]
            answer = []
            for f in body["files"]:
                mode = self._mode(f["path"], f["size"], base64.b64decode(f["sample"]))
                data = current.files.get(f["path"])
                oid = None
                if data is not None:
                    oid = hashlib.sha256(data).hexdigest() if mode == "lfs" else git_blob_id(data)
                answer.append(
                    {"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid}
                )
            self._send(200, {"files": answer})

        def _lfs_batch(self, repo_id: str) -> None:
            body = json.loads(self._body())
            repo = self._repo(repo_id, write=True)
            if repo is None:
                return None
            base = f"http://{self.headers['Host']}"
            objects = []
            for o in body["objects"]:
                if o["oid"] in hub.lfs:
                    objects.append({"oid": o["oid"], "size": o["size"]})
                else:
                    objects.append({"oid": o["oid"], "size": o["size"], "actions": {
                        "upload": {"href": f"{base}/lfs-upload/{o['oid']}"},
                        "verify": {"href": f"{base}/lfs-verify/{o['oid']}"}}})  # fmt: skip
            self._send(200, {"transfer": "basic", "objects": objects},
                       {"Content-Type": "application/vnd.git-lfs+json"})  # fmt: skip

        def _open_pr(self, repo: Repo, base: str) -> int:
            repo.pulls += 1
            repo.branches[f"refs/pr/{repo.pulls}"] = repo.branches[base]
            return repo.pulls

        def _commit(self, repo: Repo, rev: str, body: bytes, create_pr: bool) -> None:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            header = next(x["value"] for x in lines if x["key"] == "header")
            if rev.startswith("refs/pr/") and rev not in repo.branches:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            if not rev.startswith("refs/pr/") and rev not in repo.branches:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            expected = header.get("parentCommit")
            if expected and not create_pr and repo.branches[rev] != expected:
                return self._error(
                    412, None, "A commit has happened since. Please refresh and try again."
                )
            pr = self._open_pr(repo, rev) if create_pr else None
            branch = f"refs/pr/{pr}" if pr else rev
            parent = hub.commits[repo.branches[branch]]
            files, lfs = dict(parent.files), set(parent.lfs)
            for x in lines:
                v = x["value"]
                if x["key"] == "file":
                    files[v["path"]] = base64.b64decode(v["content"])
                    lfs.discard(v["path"])
                elif x["key"] == "lfsFile":
                    if v["oid"] not in hub.lfs:
                        return self._error(422, None, f"LFS object {v['oid']} was never uploaded")
                    files[v["path"]] = hub.lfs[v["oid"]]
                    lfs.add(v["path"])
                elif x["key"] == "deletedFile":
                    if v["path"] not in files:
                        return self._error(
                            404, "EntryNotFound", "A file with this name doesn't exist"
                        )
                    files.pop(v["path"])
            commit = hub._commit(parent.oid, header["summary"], files, lfs)
            repo.branches[branch] = commit.oid
            base = f"http://{self.headers['Host']}/{repo.repo_id}"
            answer = {"success": True, "commitOid": commit.oid, "commitUrl": f"{base}/commit/{commit.oid}",
                      "hookOutput": ""}  # fmt: skip
            if pr:
                answer["pullRequestUrl"] = f"{base}/discussions/{pr}"
            self._send(200, answer)

        # --- downloads --------------------------------------------------------------------------

        def _resolve(self, repo_id: str, rev: str, path: str) -> None:
            repo = self._repo(repo_id)
            if repo is None:
                return None
            oid = self._revision(repo, rev)
            if oid is None:
                return None
            commit = hub.commits[oid]
            path = unquote(path)
            head = self.command == "HEAD"
            if path not in commit.files:
                return self._send(404, {"error": "Entry not found"},
                                  {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": oid}, head=head)  # fmt: skip
            data = commit.files[path]
            etag = hashlib.sha256(data).hexdigest() if path in commit.lfs else git_blob_id(data)
            headers = {"X-Repo-Commit": oid, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
            if path in commit.lfs:
                headers |= {"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))}
            wanted = self.headers.get("Range")
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted or "")
            if match and not head:
                start = int(match.group(1))
                end = min(int(match.group(2)) if match.group(2) else len(data) - 1, len(data) - 1)
                if start >= len(data):
                    return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                return self._send(206, data[start : end + 1], headers)
            headers["Content-Length"] = str(len(data))
            self._send(200, data, headers, head=head)

    return Handler
