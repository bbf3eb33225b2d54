"""A small in-memory lakeFS server for tests: the REST endpoints `pruning_core.targets.
LakeFSTarget` uses, with the request and response shapes of lakeFS's OpenAPI spec (api/swagger.yml,
`/api/v1`): basic auth; branches read uncommitted (staged) changes; commits need changes;
pagination by `after`/`amount` with `pagination.has_more`/`next_offset`; errors as
`{"message": ...}`. Runs on 127.0.0.1 on a free port in a thread; `fail` injects an error
status for the next request matching a method and path suffix."""

from __future__ import annotations

import base64
import email.parser
import email.policy
import hashlib
import json
import re
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeLakeFS:
    def __init__(self, repository: str = "data", branch: str = "main", access_key: str = "AKIAFAKE",
                 secret_key: str = "fake-secret"):
        self.repository, self.access_key, self.secret_key = repository, access_key, secret_key
        root = self._commit_id("root")
        self.commits: dict[str, dict] = {root: {"id": root, "parents": [], "committer": "admin",
                                                "message": "Repository created",
                                                "creation_date": int(time.time()), "meta_range_id": "", "metadata": {},
                                                "tree": {}}}
        self.branches: dict[str, str] = {branch: root}
        self.staging: dict[str, dict[str, bytes | None]] = {branch: {}}
        self.tags: dict[str, str] = {}
        self.requests: list[tuple[str, str]] = []
        self.failures: list[tuple[str, str, int]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def fail(self, method: str, path_suffix: str, status: int = 500) -> None:
        self.failures.append((method, path_suffix, status))

    # --- model ----------------------------------------------------------------------------
    @staticmethod
    def _commit_id(seed: str) -> str:
        return hashlib.sha256(seed.encode()).hexdigest()

    def tree(self, ref: str) -> dict[str, bytes]:
        """Objects at a branch (with its staged changes), tag or commit id."""
        if ref in self.branches:
            tree = dict(self.commits[self.branches[ref]]["tree"])
            for path, data in self.staging[ref].items():
                if data is None:
                    tree.pop(path, None)
                else:
                    tree[path] = data
            return tree
        commit = self.tags.get(ref, ref)
        if commit not in self.commits:
            raise KeyError(ref)
        return dict(self.commits[commit]["tree"])

    # --- HTTP -----------------------------------------------------------------------------
    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body=None, content_type="application/json"):
                raw = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                if raw:
                    self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _handle(self, method: str):
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = urllib.parse.unquote(url.path)
                with fake.lock:
                    fake.requests.append((method, path))
                    expected = "Basic " + base64.b64encode(f"{fake.access_key}:{fake.secret_key}".encode()).decode()
                    if self.headers.get("Authorization") != expected:
                        return self._send(401, {"message": "error authenticating request"})
                    for i, (m, suffix, status) in enumerate(fake.failures):
                        if m == method and path.endswith(suffix):
                            del fake.failures[i]
                            return self._send(status, {"message": "injected failure"})
                    try:
                        status, out, ctype = fake.route(method, path, query, body, self.headers)
                    except KeyError as exc:
                        status, out, ctype = 404, {"message": f"not found: {exc}"}, "application/json"
                    except ValueError as exc:
                        status, out, ctype = 400, {"message": str(exc)}, "application/json"
                return self._send(status, out, ctype)

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def do_PUT(self):
                self._handle("PUT")

            def do_DELETE(self):
                self._handle("DELETE")

        return Handler

    @staticmethod
    def _page(items: list, key, query: dict) -> dict:
        amount = int(query.get("amount", 100))
        if not 0 <= amount <= 1000 and amount != -1:
            raise ValueError("amount out of range")
        items = sorted(items, key=key)
        if query.get("after"):
            items = [i for i in items if key(i) > query["after"]]
        page, more = items[:amount] if amount > 0 else items, len(items) > amount > 0
        return {"pagination": {"has_more": more, "next_offset": key(page[-1]) if page and more else "",
                               "results": len(page), "max_per_page": 1000}, "results": page}

    def route(self, method: str, path: str, query: dict, body: bytes, headers):
        prefix = f"/api/v1/repositories/{self.repository}/"
        if not path.startswith(prefix):
            raise KeyError(path)
        rest = path[len(prefix):]
        json_body = (json.loads(body) if body and (headers.get("Content-Type") or "").startswith("application/json")
                     else None)
        if m := re.fullmatch(r"branches/([^/]+)", rest):
            branch = m.group(1)
            if branch not in self.branches:
                raise KeyError(branch)
            if method == "GET":
                return 200, {"id": branch, "commit_id": self.branches[branch]}, "application/json"
            if method == "PUT":  # resetBranch: ResetCreation {type: object|common_prefix|reset, path}
                kind = json_body["type"]
                if kind == "reset":
                    self.staging[branch] = {}
                elif kind in ("object", "common_prefix"):
                    target = json_body["path"]
                    self.staging[branch] = {p: d for p, d in self.staging[branch].items()
                                            if not (p == target if kind == "object" else p.startswith(target))}
                else:
                    raise ValueError(f"bad reset type {kind}")
                return 204, None, "application/json"
        if (m := re.fullmatch(r"branches/([^/]+)/diff", rest)) and method == "GET":
            branch = m.group(1)
            base = self.commits[self.branches[branch]]["tree"]
            diffs = [{"type": "removed" if d is None else "changed" if p in base else "added", "path": p,
                      "path_type": "object", "size_bytes": 0 if d is None else len(d)}
                     for p, d in self.staging[branch].items() if not (d is None and p not in base)]
            return 200, self._page(diffs, lambda d: d["path"], query), "application/json"
        if rest == "tags":
            if method == "GET":
                refs = [{"id": t, "commit_id": c} for t, c in self.tags.items()
                        if t.startswith(query.get("prefix", ""))]
                return 200, self._page(refs, lambda r: r["id"], query), "application/json"
            if method == "POST":  # TagCreation {id, ref}
                tag, ref = json_body["id"], json_body["ref"]
                if tag in self.tags:
                    return 409, {"message": "tag already exists"}, "application/json"
                commit = self.branches.get(ref, self.tags.get(ref, ref))
                if commit not in self.commits:
                    raise KeyError(ref)
                self.tags[tag] = commit
                return 201, {"id": tag, "commit_id": commit}, "application/json"
        if (m := re.fullmatch(r"refs/([^/]+)/objects/ls", rest)) and method == "GET":
            tree = self.tree(m.group(1))
            stats = [{"path": p, "path_type": "object", "physical_address": f"local://{p}",
                      "checksum": hashlib.md5(d).hexdigest(), "size_bytes": len(d), "mtime": int(time.time())}
                     for p, d in tree.items() if p.startswith(query.get("prefix", ""))]
            return 200, self._page(stats, lambda s: s["path"], query), "application/json"
        if (m := re.fullmatch(r"refs/([^/]+)/objects", rest)) and method == "GET":
            return 200, self.tree(m.group(1))[query["path"]], "application/octet-stream"
        if (m := re.fullmatch(r"branches/([^/]+)/objects/delete", rest)) and method == "POST":  # PathList
            branch = m.group(1)
            for p in json_body["paths"]:
                self.staging[branch][p] = None
            return 200, {"errors": []}, "application/json"
        if (m := re.fullmatch(r"branches/([^/]+)/objects", rest)) and method == "POST":  # uploadObject
            branch, target = m.group(1), query["path"]
            ctype = headers.get("Content-Type") or ""
            if not ctype.startswith("multipart/form-data"):
                raise ValueError("upload must be multipart/form-data")
            message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                f"Content-Type: {ctype}\r\n\r\n".encode() + body)
            parts = [p for p in message.iter_parts() if p.get_param("name", header="content-disposition") == "content"]
            if len(parts) != 1:
                raise ValueError('exactly one multipart field named "content" is expected')
            data = parts[0].get_payload(decode=True)
            self.staging[branch][target] = data
            return 201, {"path": target, "path_type": "object", "physical_address": f"local://{target}",
                         "checksum": hashlib.md5(data).hexdigest(), "size_bytes": len(data),
                         "mtime": int(time.time())}, "application/json"
        if (m := re.fullmatch(r"branches/([^/]+)/commits", rest)) and method == "POST":  # CommitCreation
            branch = m.group(1)
            if "message" not in json_body:
                raise ValueError("message is required")
            metadata = json_body.get("metadata") or {}
            if not all(isinstance(v, str) for v in metadata.values()):
                raise ValueError("metadata values must be strings")
            tree = self.tree(branch)
            if tree == self.commits[self.branches[branch]]["tree"]:
                raise ValueError("commit: no changes")
            cid = self._commit_id(f"{self.branches[branch]}{json_body['message']}{len(self.commits)}")
            self.commits[cid] = {"id": cid, "parents": [self.branches[branch]], "committer": self.access_key,
                                 "message": json_body["message"], "creation_date": int(time.time()),
                                 "meta_range_id": cid[:16], "metadata": metadata, "tree": tree}
            self.branches[branch], self.staging[branch] = cid, {}
            return 201, {k: v for k, v in self.commits[cid].items() if k != "tree"}, "application/json"
        if (m := re.fullmatch(r"commits/([^/]+)", rest)) and method == "GET":
            return 200, {k: v for k, v in self.commits[m.group(1)].items() if k != "tree"}, "application/json"
        raise KeyError(f"{method} {path}")
