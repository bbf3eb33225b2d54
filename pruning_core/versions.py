"""Dataset versions in a Delta Lake table: each pruning run overwrites the table with exactly
its kept samples, as one atomic commit whose custom metadata holds the provenance; earlier
versions stay readable by time travel.

Concurrent runs on one table: Delta's optimistic concurrency lets one of two simultaneous
overwrites win; the other gets `CommitFailedError` with nothing of it visible, and is retried on
a fresh snapshot, so both end as distinct versions (in either order) and none is lost. The
first commit of a local table is serialised by a file lock inside the table's folder: deltalake
(1.6) rebases an overwrite that lost the race to create a table as an append, which would
publish a version holding both runs' rows.

Row schema: sample_id int64, label int64, data binary (the sample's array, C order),
dtype string (numpy dtype), shape list<int32>; and path string (the sample's file relative to
the source's train folder) where the dataset has paths (a `folder:` source).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

from .data import Dataset
from .errors import CommitConflictError, DatasetError, first_line

METADATA_KEY = "dataset_pruning"
COMMIT_ATTEMPTS = 10  # per run, against concurrent writers of the same table
MAINTENANCE_OPERATIONS = {"VACUUM START", "VACUUM END", "OPTIMIZE", "SET TBLPROPERTIES"}  # same rows after
CREATE_LOCK = ".dataset-prune-create.lock"  # hidden: Delta's vacuum leaves it alone
log = logging.getLogger(__name__)


def table_name(uri: str) -> str:
    """The table's last path component: names the `dataset.<name>` event resource."""
    return Path(uri.rstrip("/")).name


def version_table(ds: Dataset, keep: np.ndarray) -> pa.Table:
    """The kept rows of `ds` (keep: bool mask (n,)) in the row schema above (`path` only where
    `ds.paths` is set: the rows of other sources stay as they were)."""
    x = np.ascontiguousarray(ds.x[keep])
    k = len(x)
    row_bytes = int(np.prod(ds.sample_shape, dtype=np.int64)) * x.dtype.itemsize
    offsets = np.arange(k + 1, dtype=np.int64) * row_bytes
    data = pa.LargeBinaryArray.from_buffers(pa.large_binary(), k,
                                            [None, pa.py_buffer(offsets), pa.py_buffer(x.tobytes())])
    columns = {
        "sample_id": pa.array(ds.sample_id[keep], pa.int64()),
        "label": pa.array(ds.y[keep], pa.int64()),
        "data": data.cast(pa.binary()),
        "dtype": pa.array([x.dtype.str] * k, pa.string()),
        "shape": pa.array([list(ds.sample_shape)] * k, pa.list_(pa.int32())),
    }
    if ds.paths is not None:
        columns["path"] = pa.array(ds.paths[keep].tolist(), pa.string())
    return pa.table(columns)


def commit_version(uri: str, ds: Dataset, keep: np.ndarray, provenance: dict) -> int:
    """Commit the kept samples as the table's new version; return that version's number.

    The version is found by this run's `run_id` in the log, so a concurrent writer committing
    in between cannot make it report the other's version. A commit that loses a race to another
    writer (`CommitFailedError`: nothing of it is visible) is retried on a fresh snapshot, up to
    `COMMIT_ATTEMPTS` times with jittered backoff; a run whose `run_id` is already in the log (its
    commit landed before a failure, and the task is retried) gets that version back instead of
    committing the same samples twice.
    """
    provenance = {**provenance, "origin": ds.origin, "n_classes": ds.n_classes}
    run_id = provenance.get("run_id")
    Path(uri).parent.mkdir(parents=True, exist_ok=True) if "://" not in uri else None
    rows = version_table(ds, keep)
    metadata = CommitProperties(custom_metadata={METADATA_KEY: json.dumps(provenance, default=str)})
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        done = version_of_run(uri, run_id)
        if done is not None:
            return done
        try:
            with first_commit_lock(uri):
                write_deltalake(uri, rows, mode="overwrite", schema_mode="overwrite", commit_properties=metadata)
            break
        except CommitFailedError as exc:
            if attempt == COMMIT_ATTEMPTS:
                raise CommitConflictError(f"{uri}: the commit of run {run_id} lost {attempt} races to concurrent "
                                          f"writers; nothing of it was committed, rerun it") from exc
            delay = min(2.0, 0.05 * 2 ** attempt) * random.uniform(0.5, 1.5)
            log.warning("%s: commit of run %s conflicted with a concurrent writer (%s); retrying in %.2f s "
                        "(attempt %d of %d)", uri, run_id, first_line(exc, 120), delay, attempt + 1,
                        COMMIT_ATTEMPTS)
            time.sleep(delay)
    if run_id is None:  # nothing to find it by: the table's newest version
        return DeltaTable(uri).version()
    done = version_of_run(uri, run_id)
    if done is None:
        raise RuntimeError(f"{uri}: the commit of run {run_id} is not in the table's log")
    return done


@contextlib.contextmanager
def first_commit_lock(uri: str):
    """Hold an exclusive lock on `<uri>/.dataset-prune-create.lock` while a local table that does
    not exist yet is written; a no-op once it exists (Delta detects conflicts between overwrites
    of an existing table) and for remote URIs (no shared lock there: concurrent first commits
    to a new remote table are not safe with deltalake 1.6)."""
    if "://" in uri or DeltaTable.is_deltatable(uri):
        yield
        return
    Path(uri).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(uri) / CREATE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits for a creator that holds it
        yield
    finally:
        os.close(fd)


def version_of_run(uri: str, run_id: str | None) -> int | None:
    """The version committed by `run_id` (newest first in the log), or None: no such commit,
    no table yet, or no run_id to look for."""
    if run_id is None:
        return None
    try:
        history = commit_history(uri)
    except TableNotFoundError:
        return None
    for entry in history:
        if provenance_of(entry).get("run_id") == run_id:
            return int(entry["version"])
    return None


def commit_history(uri: str, attempts: int = 20) -> list[dict]:
    """The table's commit log, newest first, each entry with its true `version`.

    deltalake 1.6's `DeltaTable.history()` lists every commit in storage but numbers them down
    from the version of the snapshot it was called on (delta-rs #4488): on a table opened at an
    older version, or when another writer commits while it runs, every number is shifted — a
    concurrent commit would report another run's version, and after a `vacuum()` (which commits)
    an old version would be read with a VACUUM commit's (empty) provenance. So the history is
    read from the newest snapshot, and read again if a commit landed meanwhile."""
    for _ in range(attempts):
        table = DeltaTable(uri)
        history = table.history()
        if DeltaTable(uri).version() == table.version():  # nothing landed while the log was listed
            return history
    raise CommitConflictError(f"{uri}: the log kept changing while it was read ({attempts} attempts); retry")


def provenance_of(history_entry: dict) -> dict:
    raw = history_entry.get(METADATA_KEY)
    try:
        return json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {}


def open_table(uri: str, version: int | None = None) -> DeltaTable:
    at = "" if version is None else f"@{version}"
    if "://" not in uri and Path(uri).is_file():
        raise DatasetError(f"delta:{uri}: is a file; a Delta table is a folder")
    try:
        return DeltaTable(uri, version=version)
    except TableNotFoundError as exc:
        if str(exc).startswith("Unknown scheme"):  # not "no table yet": no table can be there (nor be written)
            raise DatasetError(f"delta:{uri}: unknown scheme {uri.partition('://')[0]!r} (Delta Lake's include s3, "
                               "gs, az, abfss, hdfs and file; a local path needs none)") from None
        raise DatasetError(f"delta:{uri}: no Delta table there") from exc
    except (DeltaError, OSError) as exc:  # OSError: an object store that cannot be reached or read
        newest = _newest_version(uri) if version is not None else None
        if newest is not None and version > newest:
            raise DatasetError(f"delta:{uri}{at}: no such version (the newest is {newest})") from exc
        hint = (" (the store's credentials, region and endpoint come from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                "AWS_REGION and AWS_ENDPOINT_URL)") if uri.startswith(("s3://", "s3a://")) else ""
        raise DatasetError(f"delta:{uri}{at}: cannot be opened ({first_line(exc, 160)}){hint}") from exc


def _newest_version(uri: str) -> int | None:
    try:
        return DeltaTable(uri).version()
    except (DeltaError, OSError):
        return None


def provenance_at(uri: str, version: int) -> dict:
    """The provenance of the table's `version`: that of the newest commit up to it that wrote
    data (table maintenance, a vacuum or an optimize, commits without changing the rows)."""
    entry = next((h for h in commit_history(uri) if int(h["version"]) <= version
                  and h.get("operation") not in MAINTENANCE_OPERATIONS), {})
    return provenance_of(entry)


def read_version(uri: str, version: int | None = None) -> Dataset:
    """A version back as a `Dataset` (rows in sample_id order, with their paths where it has
    them); its test split comes from the root source named in the provenance."""
    from .data import load_dataset  # the root source is loaded like any other

    table = open_table(uri, version)
    version = table.version()
    provenance = provenance_at(uri, version)
    origin = provenance.get("origin") or {}
    if not origin.get("source"):
        raise DatasetError(f"delta:{uri}@{version}: not written by dataset-prune (no provenance in its commit)")
    try:
        rows = table.to_pyarrow_table().sort_by("sample_id")
    except (DeltaError, OSError, pa.ArrowException) as exc:  # a data file deleted, truncated or damaged
        raise DatasetError(f"delta:{uri}@{version}: its data cannot be read ({first_line(exc, 160)})") from exc
    dtypes = set(rows.column("dtype").unique().to_pylist())
    shapes = {tuple(s) for s in rows.column("shape").to_pylist()}
    if len(dtypes) > 1 or len(shapes) > 1:
        raise DatasetError(f"delta:{uri}@{version}: samples of mixed dtype or shape {dtypes} {shapes}")
    root = load_dataset(origin["source"], origin.get("data_root"))
    if rows.num_rows == 0:
        x = np.zeros((0, *root.sample_shape), dtype=root.x.dtype)
    else:
        shape, dtype = shapes.pop(), np.dtype(dtypes.pop())
        blob = b"".join(rows.column("data").to_pylist())
        x = np.frombuffer(blob, dtype=dtype).reshape(rows.num_rows, *shape).copy()
    paths = np.array(rows.column("path").to_pylist(), dtype=str) if "path" in rows.column_names else None
    return Dataset(f"delta:{uri}@{version}", x, rows.column("label").to_numpy().astype(np.int64),
                   rows.column("sample_id").to_numpy().astype(np.int64), root.x_test, root.y_test,
                   int(provenance.get("n_classes", root.n_classes)), dict(origin), paths)


def list_versions(uri: str) -> list[dict]:
    """Every version of the table, newest first: version, timestamp (ms), rows added, provenance."""
    open_table(uri)  # a clear error for a missing table
    out = []
    for entry in commit_history(uri):
        out.append({"version": int(entry["version"]), "timestamp": entry.get("timestamp"),
                    "operation": entry.get("operation"),
                    "rows": (entry.get("operationMetrics") or {}).get("num_added_rows"),
                    "provenance": provenance_of(entry)})
    return out
