"""Where a run publishes its kept samples: one interface over three versioning backends.

`--target` chooses the backend by its form:

- a path or a URI deltalake opens (default): a Delta Lake table, one commit per run, the
  provenance in the commit's custom metadata (`versions.py`);
- `dvc:REPO#PATH`: the kept samples written as files under PATH inside the git repository
  REPO, `dvc add`ed, committed (the `.dvc` file) and tagged `<slug>-v<N>`, the provenance in the
  tag's annotation; pushed to the DVC default remote when the repository has one;
- `lakefs://REPOSITORY/BRANCH/PATH`: the same files uploaded through the lakeFS REST API
  (endpoint `LAKEFS_ENDPOINT`, credentials `LAKEFS_ACCESS_KEY_ID` / `LAKEFS_SECRET_ACCESS_KEY`,
  or lakectl's `LAKECTL_*` names), committed with the provenance in the commit metadata and
  tagged `<slug>-v<N>`.

File layout of the DVC and lakeFS backends, under PATH: `samples.parquet` (the row schema of
`versions.version_table`: sample_id, label, data, dtype, shape — exactly the kept samples, in
sample order) and `provenance.json`. Every backend numbers its versions 0, 1, 2, … and
`commit` returns that number; a failed commit leaves the target as it was.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from abc import ABC, abstractmethod
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow.parquet as pq
from deltalake.exceptions import TableNotFoundError

from . import versions as delta
from .artifacts import check_can_create, fresh_path
from .data import Dataset, split_version
from .errors import BadInputError, PruningError

SAMPLES_FILE = "samples.parquet"
PROVENANCE_FILE = "provenance.json"


class VersioningError(PruningError):
    """A versioning backend failed for a reason the user cannot fix by changing arguments."""


class VersionTarget(ABC):
    """A place that receives one new version per run."""

    uri: str
    name: str  # the table's or folder's name: the event resource is `dataset.<name>`

    @abstractmethod
    def check(self) -> None:
        """Raise `BadInputError` if the target cannot receive a version. Writes nothing."""

    @abstractmethod
    def commit(self, ds: Dataset, keep: np.ndarray, provenance: dict) -> int:
        """Publish the samples of `ds` where keep (bool, (n,)) is set as the next version;
        return its number. On failure the target is left as it was."""

    @abstractmethod
    def versions(self) -> list[dict]:
        """Every version, newest first: version, timestamp (ms), rows, provenance, ref."""


def open_target(uri: str) -> VersionTarget:
    """The backend for a `--target` value (already made absolute where it is a local path)."""
    if uri.startswith("dvc:"):
        return DvcTarget(uri)
    if uri.startswith("lakefs://"):
        return LakeFSTarget(uri)
    return DeltaTarget(uri)


def is_versioning_uri(uri: str) -> bool:
    """True for the forms that are not a plain path (kept as given by `--target`)."""
    return uri.startswith("dvc:") or "://" in uri


def samples_parquet(ds: Dataset, keep: np.ndarray) -> bytes:
    """The kept samples as Parquet bytes, in the Delta row schema."""
    buffer = io.BytesIO()
    pq.write_table(delta.version_table(ds, keep), buffer)
    return buffer.getvalue()


def _provenance_json(provenance: dict, ds: Dataset) -> str:
    full = {**provenance, "origin": ds.origin, "n_classes": ds.n_classes}
    return json.dumps(full, sort_keys=True, default=str, separators=(",", ":"))


def _check_path(uri: str, path: str) -> PurePosixPath:
    p = PurePosixPath(path.strip("/"))
    if not path.strip("/") or p.is_absolute() or any(part in ("", ".", "..") for part in p.parts):
        raise BadInputError(f"`target` {uri!r}: the path {path!r} must be a relative path without '..'")
    return p


def _version_of_tag(tag: str, slug: str) -> int | None:
    match = re.fullmatch(re.escape(slug) + r"-v(\d+)", tag)
    return int(match.group(1)) if match else None


# --- Delta Lake ---------------------------------------------------------------------------

class DeltaTarget(VersionTarget):
    def __init__(self, uri: str):
        self.uri = uri
        self.name = delta.table_name(uri)

    def check(self) -> None:
        if "://" not in self.uri:
            check_can_create(self.uri, "`target`")
            return
        try:  # an object store: reachable with these credentials, whether or not the table exists yet
            delta.open_table(self.uri)
        except delta.DatasetError as exc:
            if not isinstance(exc.__cause__, TableNotFoundError):
                raise BadInputError(f"`target` {self.uri}: {str(exc).partition(': ')[2]}") from None

    def commit(self, ds: Dataset, keep: np.ndarray, provenance: dict) -> int:
        return delta.commit_version(self.uri, ds, keep, provenance)

    def versions(self) -> list[dict]:
        return [{**row, "ref": f"{self.uri}@{row['version']}"} for row in delta.list_versions(self.uri)]


# --- DVC ----------------------------------------------------------------------------------

def dvc_executable() -> str:
    """`dvc` beside this interpreter (the project's virtual environment), else on PATH."""
    beside = Path(sys.executable).parent / "dvc"
    found = str(beside) if beside.exists() else shutil.which("dvc")
    if not found:
        raise BadInputError("`target` dvc:…: the dvc command is not installed (pip install dvc)")
    return found


class DvcTarget(VersionTarget):
    """`dvc:REPO#PATH`: files under REPO/PATH tracked by DVC, one git commit and tag per version."""

    def __init__(self, uri: str):
        repo, sep, path = uri[len("dvc:"):].partition("#")
        if not repo or not sep:
            raise BadInputError(f"`target` {uri!r}: expected dvc:REPO#PATH (a git repository and a folder in it)")
        self.repo = Path(repo).expanduser().resolve()
        self.path = _check_path(uri, path)
        self.uri = f"dvc:{self.repo}#{self.path}"
        self.name = self.path.name
        self.slug = str(self.path).replace("/", "-")

    # subprocesses: git and dvc run in the repository, without analytics, with an identity
    def _env(self) -> dict:
        env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
        if not self._git("config", "user.email", check=False).strip():
            env.update(GIT_AUTHOR_NAME="dataset-prune", GIT_AUTHOR_EMAIL="dataset-prune@localhost",
                       GIT_COMMITTER_NAME="dataset-prune", GIT_COMMITTER_EMAIL="dataset-prune@localhost")
        return env

    def _run(self, argv: list[str], check: bool = True, env: dict | None = None) -> str:
        result = subprocess.run(argv, cwd=self.repo, capture_output=True, text=True, check=False,
                                env=env or {**os.environ, "DVC_NO_ANALYTICS": "1"})
        if check and result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise VersioningError(f"{Path(argv[0]).name} {argv[1]} failed in {self.repo}: "
                                  f"{detail[-1] if detail else result.returncode}")
        return result.stdout

    def _git(self, *args: str, check: bool = True, env: dict | None = None) -> str:
        return self._run(["git", *args], check=check, env=env)

    def _dvc(self, *args: str, env: dict | None = None) -> str:
        return self._run([dvc_executable(), *args], env=env)

    def check(self) -> None:
        self._check_repository()
        dvc_executable()
        dirty = self._git("status", "--porcelain", "--", f"{self.path}.dvc")
        if dirty.strip():
            raise BadInputError(f"`target` {self.uri}: {self.path}.dvc has uncommitted changes; commit or restore them")

    def _check_repository(self) -> None:
        if not self.repo.is_dir():
            raise BadInputError(f"`target` {self.uri}: {self.repo} is not a folder")
        if shutil.which("git") is None:
            raise BadInputError("`target` dvc:…: git is not installed")
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=self.repo, capture_output=True, text=True,
                             check=False)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != self.repo:
            raise BadInputError(f"`target` {self.uri}: {self.repo} is not the top folder of a git repository "
                                "(git init)")

    def default_remote(self, env: dict | None = None) -> str | None:
        """The DVC default remote's name, if the repository has one (then versions are pushed)."""
        result = subprocess.run([dvc_executable(), "remote", "default"], cwd=self.repo, capture_output=True, text=True,
                                check=False, env=env or {**os.environ, "DVC_NO_ANALYTICS": "1"})
        return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else None

    def _tags(self) -> dict[int, str]:
        out = self._git("tag", "--list", f"{self.slug}-v*")
        return {v: t for t in out.split() if (v := _version_of_tag(t, self.slug)) is not None}

    def commit(self, ds: Dataset, keep: np.ndarray, provenance: dict) -> int:
        self.check()
        env = self._env()
        tags = self._tags()
        version = max(tags, default=-1) + 1
        tag = f"{self.slug}-v{version}"
        folder = self.repo / self.path
        folder.parent.mkdir(parents=True, exist_ok=True)
        head = self._git("rev-parse", "--verify", "-q", "HEAD", check=False).strip() or None
        gitignore = (self.path.parent / ".gitignore").as_posix() if str(self.path.parent) != "." else ".gitignore"
        tracked = [f"{self.path}.dvc", gitignore]
        created_dvc = not (self.repo / ".dvc").is_dir()
        if created_dvc:
            tracked += [".dvc/config", ".dvc/.gitignore", ".dvcignore"]
        before = {name: (self.repo / name).read_bytes() if (self.repo / name).is_file() else None for name in tracked}
        info = _provenance_json(provenance, ds)
        staging = fresh_path(folder.parent, f".{self.name}.new-", folder=True)  # published: the umask's mode
        backup = folder.parent / f".{self.name}.old-{uuid.uuid4().hex[:8]}"
        existed, committed = folder.exists(), False
        try:
            if created_dvc:
                self._dvc("init", "--quiet", env=env)
            (staging / SAMPLES_FILE).write_bytes(samples_parquet(ds, keep))
            (staging / PROVENANCE_FILE).write_text(info + "\n")
            if folder.exists():
                os.replace(folder, backup)
            os.replace(staging, folder)
            self._dvc("add", "--quiet", str(self.path), env=env)
            self._git("add", "--", *tracked, env=env)
            message = f"dataset-prune: {self.path} v{version} (run {provenance.get('run_id')}, " \
                      f"{int(np.count_nonzero(keep))} samples kept)"
            self._git("commit", "--quiet", "-m", message, "--", *tracked, env=env)
            committed = True
            self._git("tag", "-a", tag, "-m", info, env=env)
            if self.default_remote(env):
                self._dvc("push", "--quiet", f"{self.path}.dvc", env=env)
        except BaseException:
            self._restore(folder, backup, staging, existed, before, head, tag if committed else None, committed, env)
            if created_dvc:
                shutil.rmtree(self.repo / ".dvc", ignore_errors=True)
            raise
        shutil.rmtree(backup, ignore_errors=True)
        return version

    def _restore(self, folder: Path, backup: Path, staging: Path, existed: bool, before: dict, head: str | None,
                 tag: str | None, committed: bool, env: dict) -> None:
        """Put the repository back as it was before `commit`: tag, commit, index, files."""
        if tag:
            self._git("tag", "-d", tag, check=False, env=env)
        if committed:
            if head:
                self._git("reset", "--quiet", "--soft", head, check=False, env=env)
            else:
                self._git("update-ref", "-d", "HEAD", check=False, env=env)
        if head:
            self._git("reset", "--quiet", "--", *before, check=False, env=env)
        else:
            self._git("rm", "--cached", "--quiet", "--ignore-unmatch", "--", *before, check=False, env=env)
        for name, content in before.items():
            if content is None:
                (self.repo / name).unlink(missing_ok=True)
            else:
                (self.repo / name).write_bytes(content)
        shutil.rmtree(staging, ignore_errors=True)
        if backup.exists():
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(backup, folder)
        elif not existed:
            shutil.rmtree(folder, ignore_errors=True)

    def versions(self) -> list[dict]:
        self._check_repository()
        out = self._git("for-each-ref", "--sort=-creatordate",
                        "--format=%(refname:strip=2)%09%(creatordate:unix)%09%(contents:subject)",
                        f"refs/tags/{self.slug}-v*")
        rows = []
        for line in out.splitlines():
            tag, when, subject = (line.split("\t", 2) + ["", ""])[:3]
            version = _version_of_tag(tag, self.slug)
            if version is None:
                continue
            try:
                provenance = json.loads(subject) if subject else {}
            except json.JSONDecodeError:
                provenance = {}
            rows.append({"version": version, "timestamp": int(when) * 1000 if when else None, "operation": "dvc add",
                         "rows": provenance.get("n_kept"), "provenance": provenance, "ref": tag})
        return sorted(rows, key=lambda r: -r["version"])


# --- lakeFS -------------------------------------------------------------------------------

class LakeFSTarget(VersionTarget):
    """`lakefs://REPOSITORY/BRANCH/PATH` through the lakeFS REST API (`/api/v1`). Endpoints
    used: get branch, diff branch, list/create tags, list objects, delete objects, upload
    object (multipart field `content`), commit, get commit, reset branch."""

    def __init__(self, uri: str, endpoint: str | None = None, access_key: str | None = None,
                 secret_key: str | None = None, timeout: float = 60.0):
        parts = uri[len("lakefs://"):].split("/", 2)
        if len(parts) < 3 or not parts[0] or not parts[1]:
            raise BadInputError(f"`target` {uri!r}: expected lakefs://REPOSITORY/BRANCH/PATH")
        self.repository, self.branch = parts[0], parts[1]
        self.path = _check_path(uri, parts[2])
        self.uri = f"lakefs://{self.repository}/{self.branch}/{self.path}"
        self.name = self.path.name
        self.slug = str(self.path).replace("/", "-")
        env = os.environ
        self.endpoint = (endpoint or env.get("LAKEFS_ENDPOINT") or env.get("LAKECTL_SERVER_ENDPOINT_URL")
                         or "").rstrip("/")
        if self.endpoint and not self.endpoint.endswith("/api/v1"):
            self.endpoint += "/api/v1"
        self.access_key = access_key or env.get("LAKEFS_ACCESS_KEY_ID") or env.get("LAKECTL_CREDENTIALS_ACCESS_KEY_ID")
        self.secret_key = secret_key or env.get("LAKEFS_SECRET_ACCESS_KEY") or \
            env.get("LAKECTL_CREDENTIALS_SECRET_ACCESS_KEY")
        self.timeout = timeout

    def _url(self, route: str, query: dict) -> str:
        quoted = "/".join(urllib.parse.quote(p, safe="") for p in route.split("/"))
        query = {k: v for k, v in query.items() if v is not None}
        return f"{self.endpoint}/{quoted}" + (f"?{urllib.parse.urlencode(query)}" if query else "")

    def _request(self, method: str, route: str, body: bytes | None = None, content_type: str | None = None,
                 query: dict | None = None):
        if not self.endpoint:
            raise BadInputError(f"`target` {self.uri}: set LAKEFS_ENDPOINT to the lakeFS server (http://host:8000)")
        request = urllib.request.Request(self._url(route, query or {}), data=body, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        request.add_header("Accept", "application/json")
        if self.access_key and self.secret_key:
            token = base64.b64encode(f"{self.access_key}:{self.secret_key}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read() or b"{}").get("message", "")
            except (ValueError, AttributeError):
                message = ""
            where = f"lakeFS {method} {route}: {exc.code} {message}".strip()
            if exc.code in (401, 403):
                raise BadInputError(f"`target` {self.uri}: {where} (check LAKEFS_ACCESS_KEY_ID/SECRET)") from None
            if exc.code == 404:
                raise BadInputError(f"`target` {self.uri}: {where} (does the repository and branch exist?)") from None
            raise VersioningError(where) from None
        except urllib.error.URLError as exc:
            raise BadInputError(f"`target` {self.uri}: cannot reach lakeFS at {self.endpoint} ({exc.reason})") from None
        return json.loads(raw) if raw else None

    def _json(self, method: str, route: str, obj):
        return self._request(method, route, json.dumps(obj).encode(), "application/json")

    def _pages(self, route: str, **query):
        after = None
        while True:
            page = self._request("GET", route, query={**query, "after": after, "amount": 1000})
            yield from page.get("results", [])
            pagination = page.get("pagination") or {}
            if not pagination.get("has_more"):
                return
            after = pagination.get("next_offset")

    def _repo(self, tail: str) -> str:
        return f"repositories/{self.repository}/{tail}"

    def check(self) -> None:
        self._request("GET", self._repo(f"branches/{self.branch}"))
        if next(iter(self._pages(self._repo(f"branches/{self.branch}/diff"))), None) is not None:
            raise BadInputError(f"`target` {self.uri}: branch {self.branch!r} has uncommitted changes; "
                                "commit or reset them first")

    def _tags(self) -> dict[int, dict]:
        return {v: ref for ref in self._pages(self._repo("tags"), prefix=f"{self.slug}-v")
                if (v := _version_of_tag(ref["id"], self.slug)) is not None}

    def _upload(self, name: str, data: bytes, content_type: str) -> None:
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"content\"; filename=\"{name}\"\r\n"
                f"Content-Type: {content_type}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        self._request("POST", self._repo(f"branches/{self.branch}/objects"), body,
                      f"multipart/form-data; boundary={boundary}", query={"path": f"{self.path}/{name}"})

    def commit(self, ds: Dataset, keep: np.ndarray, provenance: dict) -> int:
        self.check()
        version = max(self._tags(), default=-1) + 1
        info = _provenance_json(provenance, ds)
        staged = False
        try:
            old = [o["path"] for o in self._pages(self._repo(f"refs/{self.branch}/objects/ls"), prefix=f"{self.path}/")
                   if o.get("path_type", "object") == "object"]
            for i in range(0, len(old), 1000):
                staged = True
                self._json("POST", self._repo(f"branches/{self.branch}/objects/delete"), {"paths": old[i:i + 1000]})
            staged = True
            self._upload(SAMPLES_FILE, samples_parquet(ds, keep), "application/vnd.apache.parquet")
            self._upload(PROVENANCE_FILE, (info + "\n").encode(), "application/json")
            message = f"dataset-prune: {self.path} v{version} (run {provenance.get('run_id')}, " \
                      f"{int(np.count_nonzero(keep))} samples kept)"
            commit = self._json("POST", self._repo(f"branches/{self.branch}/commits"),
                                {"message": message, "metadata": {delta.METADATA_KEY: info,
                                                                  "dataset_pruning_version": str(version)}})
            staged = False
        except BaseException:
            if staged:  # drop what this call staged; the branch was clean before it
                self._json("PUT", self._repo(f"branches/{self.branch}"),
                           {"type": "common_prefix", "path": f"{self.path}/"})
            raise
        self._json("POST", self._repo("tags"), {"id": f"{self.slug}-v{version}", "ref": commit["id"]})
        return version

    def versions(self) -> list[dict]:
        rows = []
        for version, ref in self._tags().items():
            commit = self._request("GET", self._repo(f"commits/{ref['commit_id']}"))
            try:
                provenance = json.loads((commit.get("metadata") or {}).get(delta.METADATA_KEY) or "{}")
            except json.JSONDecodeError:
                provenance = {}
            rows.append({"version": version, "timestamp": int(commit.get("creation_date", 0)) * 1000,
                         "operation": "commit", "rows": provenance.get("n_kept"), "provenance": provenance,
                         "ref": ref["id"], "commit_id": ref["commit_id"]})
        return sorted(rows, key=lambda r: -r["version"])


# --- lineage ------------------------------------------------------------------------------

def lineage(uri: str, max_depth: int = 32) -> list[list[dict]]:
    """For every version of the target (newest first), the chain of datasets it descends from:
    the version itself, then each source it was pruned from, following `delta:URI@VERSION`
    sources into their own tables' provenance, down to the root source (a named dataset, an
    npz file, or a table version without provenance). Each node: `ref` (a dataset spec),
    `rows`, and for pruned nodes `run_id`, `method`, `solver`, `prune_ratio`, `epsilon`,
    `rounds` (how many rounds pruned it; the rounds' own tables stay inside its run folder)."""
    chains = []
    cache: dict[str, list[dict]] = {}
    for row in open_target(uri).versions():
        chain = [_node(row, _version_ref(uri, row))]
        source = (row["provenance"].get("source") or {})
        seen = {chain[0]["ref"]}
        while source.get("name") and len(chain) < max_depth:
            name = source["name"]
            node = {"ref": name, "rows": source.get("n")}
            table, version = split_version(name[len("delta:"):]) if name.startswith("delta:") else (name, None)
            if version is not None and name not in seen:
                seen.add(name)
                if table not in cache:
                    try:
                        cache[table] = delta.list_versions(table)
                    except BadInputError:
                        cache[table] = []
                entry = next((r for r in cache[table] if r["version"] == version), None)
                if entry is not None and entry["provenance"]:
                    chain.append({**_node(entry, name), "rows": source.get("n")})
                    source = entry["provenance"].get("source") or {}
                    continue
            chain.append(node)
            break
        chains.append(chain)
    return chains


def _version_ref(uri: str, row: dict) -> str:
    if uri.startswith(("dvc:", "lakefs://")):
        return f"{uri}@{row['ref']}"
    return f"delta:{uri}@{row['version']}"


def _node(row: dict, ref: str) -> dict:
    p = row["provenance"]
    return {"ref": ref, "rows": row.get("rows") if row.get("rows") is not None else p.get("n_kept"),
            "run_id": p.get("run_id"), "method": p.get("method"), "solver": p.get("solver"),
            "prune_ratio": p.get("prune_ratio"), "epsilon": p.get("epsilon"), "n_pruned": p.get("n_pruned"),
            "rounds": (p.get("arguments") or {}).get("rounds", 1)}
