"""Dataset versions in a Delta Lake table: each pruning run overwrites the table with exactly
its kept samples, as one atomic commit whose custom metadata holds the provenance; earlier
versions stay readable by time travel.

Row schema: sample_id int64, label int64, data binary (the sample's array, C order),
dtype string (numpy dtype), shape list<int32>.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import DeltaError, TableNotFoundError

from .data import Dataset
from .errors import DatasetError

METADATA_KEY = "dataset_pruning"


def table_name(uri: str) -> str:
    """The table's last path component: names the `dataset.<name>` event resource."""
    return Path(uri.rstrip("/")).name


def version_table(ds: Dataset, keep: np.ndarray) -> pa.Table:
    """The kept rows of `ds` (keep: bool mask (n,)) in the row schema above."""
    x = np.ascontiguousarray(ds.x[keep])
    k = len(x)
    row_bytes = int(np.prod(ds.sample_shape, dtype=np.int64)) * x.dtype.itemsize
    offsets = np.arange(k + 1, dtype=np.int64) * row_bytes
    data = pa.LargeBinaryArray.from_buffers(pa.large_binary(), k, [None, pa.py_buffer(offsets), pa.py_buffer(x.tobytes())])
    return pa.table({
        "sample_id": pa.array(ds.sample_id[keep], pa.int64()),
        "label": pa.array(ds.y[keep], pa.int64()),
        "data": data.cast(pa.binary()),
        "dtype": pa.array([x.dtype.str] * k, pa.string()),
        "shape": pa.array([list(ds.sample_shape)] * k, pa.list_(pa.int32())),
    })


def commit_version(uri: str, ds: Dataset, keep: np.ndarray, provenance: dict) -> int:
    """Commit the kept samples as the table's new version; return that version's number.

    The version is found by this run's `run_id` in the log, so a concurrent writer committing
    in between cannot make it report the other's version.
    """
    provenance = {**provenance, "origin": ds.origin, "n_classes": ds.n_classes}
    Path(uri).parent.mkdir(parents=True, exist_ok=True) if "://" not in uri else None
    write_deltalake(uri, version_table(ds, keep), mode="overwrite", schema_mode="overwrite",
                    commit_properties=CommitProperties(custom_metadata={METADATA_KEY: json.dumps(provenance, default=str)}))
    for entry in DeltaTable(uri).history():
        if provenance_of(entry).get("run_id") == provenance.get("run_id"):
            return int(entry["version"])
    raise RuntimeError(f"{uri}: the commit of run {provenance.get('run_id')} is not in the table's log")


def provenance_of(history_entry: dict) -> dict:
    raw = history_entry.get(METADATA_KEY)
    try:
        return json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {}


def open_table(uri: str, version: int | None = None) -> DeltaTable:
    try:
        return DeltaTable(uri, version=version)
    except TableNotFoundError as exc:
        raise DatasetError(f"delta:{uri}: no Delta table there") from exc
    except DeltaError as exc:
        raise DatasetError(f"delta:{uri}@{version}: cannot be opened ({str(exc).splitlines()[0][:160]})") from exc


def read_version(uri: str, version: int | None = None) -> Dataset:
    """A version back as a `Dataset` (rows in sample_id order); its test split comes from the
    root source named in the provenance."""
    from .data import load_dataset  # the root source is loaded like any other

    table = open_table(uri, version)
    version = table.version()
    entry = next((h for h in table.history() if int(h["version"]) == version), {})
    provenance = provenance_of(entry)
    origin = provenance.get("origin") or {}
    if not origin.get("source"):
        raise DatasetError(f"delta:{uri}@{version}: not written by dataset-prune (no provenance in its commit)")
    rows = table.to_pyarrow_table().sort_by("sample_id")
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
    return Dataset(f"delta:{uri}@{version}", x, rows.column("label").to_numpy().astype(np.int64),
                   rows.column("sample_id").to_numpy().astype(np.int64), root.x_test, root.y_test,
                   int(provenance.get("n_classes", root.n_classes)), dict(origin))


def list_versions(uri: str) -> list[dict]:
    """Every version of the table, newest first: version, timestamp (ms), rows added, provenance."""
    table = open_table(uri)
    out = []
    for entry in table.history():
        out.append({"version": int(entry["version"]), "timestamp": entry.get("timestamp"),
                    "operation": entry.get("operation"),
                    "rows": (entry.get("operationMetrics") or {}).get("num_added_rows"),
                    "provenance": provenance_of(entry)})
    return out
