"""Stored artifacts: each has `*_path`, `save_*` and `load_*` side by side. Every write goes
to a temporary file in the same folder and is renamed into place, so a reader never sees half
a file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ArgumentsMismatchError, BadInputError


def fresh_path(parent: str | Path, prefix: str, suffix: str = "", folder: bool = False) -> Path:
    """A new empty file (or folder) in `parent` under a name nothing else has, made with the
    process's umask, as every other output is: tempfile's are 0600 (0700) whatever the umask, and
    the run's files renamed from them were unreadable to the rest of a group sharing the folder."""
    for _ in range(100):
        path = Path(parent) / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            if folder:
                os.mkdir(path, 0o777)
            else:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free name for {prefix}…{suffix} in {parent}")


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; rename it to `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_path(path.parent, f".{path.name}.", ".tmp")
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_can_create(path: str | Path, option: str, folder: bool = True) -> None:
    """Refuse, in one line, a path where the folder (or, `folder=False`, the file) cannot be made:
    a file where the folder should be, a file in the way above it, a read-only or special file
    system. Probed by making and removing a temporary folder in the nearest existing ancestor, so
    that the check leaves nothing behind."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise BadInputError(f"{option} {path}: exists and is not a folder")
    start = path if folder else path.parent
    ancestor = next(p for p in (start, *start.parents) if p.exists())
    if not ancestor.is_dir():
        raise BadInputError(f"{option} {path}: {ancestor} is not a folder")
    try:
        tempfile.TemporaryDirectory(prefix=".dataset-prune-probe.", dir=ancestor).cleanup()
    except OSError as exc:
        raise BadInputError(f"{option} {path}: nothing can be written in {ancestor} ({exc.strerror or exc})") from exc


def write_json(path: str | Path, obj) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    return Path(path)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def arguments_key(arguments: dict) -> str:
    """A short stable hash of JSON-able arguments (names a cache folder)."""
    return hashlib.sha256(json.dumps(arguments, sort_keys=True, default=str).encode()).hexdigest()[:16]


def claim_folder(folder: str | Path, arguments: dict) -> Path:
    """Create `folder` holding `arguments.json`, or check an existing one holds the same."""
    folder = Path(folder)
    saved = folder / "arguments.json"
    if saved.exists():
        if claimed_arguments(folder) != json.loads(json.dumps(arguments, sort_keys=True, default=str)):
            raise ArgumentsMismatchError(f"{folder} holds results made with other arguments; use another folder")
    else:
        write_json(saved, arguments)
    return folder


def claimed_arguments(folder: str | Path) -> dict:
    """The arguments `folder` was claimed for (`claim_folder`); {} for a folder never claimed."""
    saved = Path(folder) / "arguments.json"
    return json.loads(saved.read_text()) if saved.exists() else {}


# --- run folders: staged as <out>/.staging/<run_id>, locked while their run lives ---------

RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_run_id(run_id: str) -> str:
    """A run id names one folder under `--out`: it cannot be a path, absolute or with '..'."""
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise BadInputError(f"run id {run_id!r} must be one folder name (letters, digits, '.', '_', '-'; "
                            f"no '/', no '..', at most 128 characters)")
    return run_id


def new_run_folder(out: Path, run_id: str) -> Path:
    """`out`/`run_id`, refused in one line where the id is not one folder name or the folder exists
    (a run or an evaluation never writes into one that is there)."""
    final = Path(out) / check_run_id(run_id)
    if final.exists():
        raise BadInputError(f"run folder {final} already exists; choose another run id")
    return final


def staging_path(out: Path, run_id: str) -> Path:
    return Path(out) / ".staging" / run_id


def staging_lock_path(out: Path, run_id: str) -> Path:
    return Path(out) / ".staging" / f"{run_id}.lock"


def lock_staging(out: Path, run_id: str, owner: dict | None = None) -> int:
    """Create and exclusively lock `<out>/.staging/<run_id>.lock`; return its descriptor. Taken
    before the staging folder is made and held until `release_staging`: the kernel drops the
    lock when the process dies however it dies, which is what marks a staging folder stale.
    `owner` (JSON) is written into the lock file, for whoever finds the run dead."""
    path = staging_lock_path(out, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BadInputError(f"run {run_id} is already running in {out} (its staging folder is locked)") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(owner or {}).encode())
    return fd


def release_staging(out: Path, run_id: str, fd: int) -> None:
    """Remove the lock file, then release the lock (the staging folder is gone by now)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(staging_lock_path(out, run_id))
    os.close(fd)


def remove_stale_staging(out: Path) -> dict[str, dict]:
    """Remove the staging folders of runs that died (killed, out of memory, machine lost): those
    whose lock file no live process holds. Return {run id: the owner its lock file recorded}. A
    folder without a lock file is not touched: it is not this mechanism's to judge."""
    root = Path(out) / ".staging"
    removed = {}
    for lock in sorted(root.glob("*.lock")) if root.is_dir() else []:
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:  # its run finished meanwhile
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its run is alive
                continue
            run_id = lock.name[:-len(".lock")]
            try:
                owner = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
            except ValueError:  # written by a run that died mid-write, or by an older version
                owner = {}
            shutil.rmtree(root / run_id, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
            removed[run_id] = owner if isinstance(owner, dict) else {}
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def staged_folder(out: Path, run_id: str, owner: dict | None = None) -> Iterator[Path]:
    """Yield `<out>/.staging/<run_id>`, empty and locked (`lock_staging`, recording `owner`);
    renamed to `<out>/<run_id>` when the block succeeds, removed when it fails, the lock released
    either way: a reader never sees half a run, and a killed run's folder is found stale."""
    lock = lock_staging(out, run_id, owner)
    staging = staging_path(out, run_id)
    try:
        shutil.rmtree(staging, ignore_errors=True)  # ours by the lock: left by an earlier attempt of this run id
        staging.mkdir(parents=True)
        yield staging
        os.replace(staging, Path(out) / run_id)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        release_staging(out, run_id, lock)


# --- model checkpoint ---------------------------------------------------------------------

def checkpoint_path(run_dir: Path) -> Path:
    return Path(run_dir) / "model.pt"


def save_checkpoint(model, path: str | Path) -> str:
    """Save a CPU state_dict atomically; return its sha256. Serialised in memory first: torch
    names the archive after the file, and a temporary name would make equal weights differ."""
    import torch  # here: what only reads artifacts starts without torch

    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


# --- last-layer inputs of one shard (intermediate, in the influence cache) ----------------

def features_shard_path(cache: Path, start: int, end: int) -> Path:
    return Path(cache) / f"features-{start:010d}-{end:010d}.npy"


def save_features_shard(phi: np.ndarray, path: Path) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, phi)
    return path


def load_features_shard(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


# --- M = B H⁻¹ (in the influence cache) ----------------------------------------------------

def inverse_path(cache: Path) -> Path:
    return Path(cache) / "inverse-hessian.npy"


def inverse_info_path(cache: Path) -> Path:
    return Path(cache) / "inverse-hessian.json"


def save_inverse(M: np.ndarray, info: dict, cache: Path) -> Path:
    with atomic_path(inverse_path(cache)) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, M)
    write_json(inverse_info_path(cache), info)  # written last: its presence marks M complete
    return inverse_path(cache)


def load_inverse_info(cache: Path) -> dict:
    return json.loads(inverse_info_path(cache).read_text())


# --- scores (per shard, then merged) -------------------------------------------------------

def scores_shard_path(cache: Path, start: int, end: int) -> Path:
    return Path(cache) / f"scores-{start:010d}-{end:010d}.parquet"


def scores_path(run_dir: Path) -> Path:
    return Path(run_dir) / "scores.parquet"


def _fixed_size_list(matrix: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(matrix).reshape(-1)), matrix.shape[1])


def scores_table(columns: dict[str, np.ndarray], vectors: np.ndarray, metadata: dict | None = None,
                 embedding: np.ndarray | None = None) -> pa.Table:
    """A scores table: the given 1-d columns, `influence` (n, p) and optionally `embedding`
    (n, d: the model's features, for herding/kcenter/moderate) as fixed-size lists."""
    arrays = {name: pa.array(values) for name, values in columns.items()}
    arrays["influence"] = _fixed_size_list(vectors)
    if embedding is not None:
        arrays["embedding"] = _fixed_size_list(embedding)
    table = pa.table(arrays)
    if metadata:
        table = table.replace_schema_metadata({"dataset_pruning": json.dumps(metadata, sort_keys=True)})
    return table


def column_array(table: pa.Table, name: str) -> np.ndarray:
    """A column as numpy: 1-d columns as (n,), fixed-size lists as (n, width)."""
    return array_numpy(table.column(name).combine_chunks())


def array_numpy(column: pa.Array) -> np.ndarray:
    """An Arrow array as numpy: a fixed-size list array as (n, width), any other as (n,)."""
    if pa.types.is_fixed_size_list(column.type):
        return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)
    return column.to_numpy(zero_copy_only=False)


def forgetting_path(run_dir: Path) -> Path:
    return Path(run_dir) / "forgetting.npy"


def save_array(array: np.ndarray, path: Path) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)
    return Path(path)


def save_parquet(table: pa.Table, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def load_scores(path: str | Path, with_vectors: bool = True, name: str | None = None
                ) -> tuple[pa.Table, np.ndarray | None, dict]:
    """(table without `influence`, vectors (n, p) or None, metadata). Checks the contract; its
    messages name the file as `name` (default: `--scores PATH`)."""
    name = name or f"`scores` {path}"
    try:
        schema = pq.read_schema(path)
        table = pq.read_table(path, columns=None if with_vectors else [n for n in schema.names if n != "influence"])
    except (OSError, pa.ArrowInvalid) as exc:
        raise BadInputError(f"{name}: cannot be read as Parquet ({exc})") from exc
    required = {"sample_id": pa.int64(), "label": pa.int64(), "loss": pa.float64(), "el2n": pa.float64()}
    for column, dtype in required.items():
        if column not in schema.names or schema.field(column).type != dtype:
            raise BadInputError(f"{name}: column {column} ({dtype}) is missing or of another type")
    if "influence" not in schema.names or not pa.types.is_fixed_size_list(schema.field("influence").type):
        raise BadInputError(f"{name}: column influence (fixed-size list of floats) is missing")
    if table.num_rows == 0:
        raise BadInputError(f"{name}: no rows")
    if any(table.column(c).null_count for c in required):
        raise BadInputError(f"{name}: {', '.join(c for c in required if table.column(c).null_count)} has empty values")
    ids = table.column("sample_id").to_numpy()
    if len(np.unique(ids)) != len(ids):
        raise BadInputError(f"{name}: sample_id values must be unique")
    if (table.column("label").to_numpy() < 0).any():
        raise BadInputError(f"{name}: label values must be class indices (0 or more)")
    # the scores the baselines and the difficulty strata rank by: a NaN sorted silently last
    for column in ("loss", "el2n", *(c for c in ("grand", "forgetting") if c in schema.names)):
        values = table.column(column)
        if pa.types.is_floating(values.type) and not np.isfinite(values.to_numpy(zero_copy_only=False)).all():
            raise BadInputError(f"{name}: column {column} contains NaN, Inf or empty values")
    vectors = column_array(table, "influence") if with_vectors else None
    if vectors is not None and not np.isfinite(vectors).all():
        raise BadInputError(f"{name}: influence vectors contain NaN or Inf")
    meta = schema.metadata or {}
    metadata = json.loads(meta.get(b"dataset_pruning", b"{}"))
    return (table.drop_columns(["influence"]) if with_vectors else table), vectors, metadata


def check_scores(path: str | Path, name: str) -> pa.Table:
    """`load_scores`'s checks with the vectors read in batches and never all held (every page is
    still decoded: a file damaged inside is refused). Returns the table without `influence`."""
    table, _, _ = load_scores(path, with_vectors=False, name=name)
    try:
        norms = influence_norms(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise BadInputError(f"{name}: cannot be read as Parquet ({exc})") from exc
    if not np.isfinite(norms).all():
        raise BadInputError(f"{name}: influence vectors contain NaN or Inf")
    return table


def influence_norms(path: str | Path, batch_rows: int = 8192) -> np.ndarray:
    """‖s_i‖₂ of every row of a scores file, read in batches (the vectors are never all held)."""
    norms = []
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=["influence"]):
        norms.append(np.linalg.norm(array_numpy(batch.column(0)).astype(np.float64), axis=1))
    return np.concatenate(norms) if norms else np.zeros(0)


# --- selection -----------------------------------------------------------------------------

def selection_path(run_dir: Path) -> Path:
    return Path(run_dir) / "selection.parquet"


def selection_table(sample_id: np.ndarray, pruned: np.ndarray, metadata: dict, paths: np.ndarray | None = None
                    ) -> pa.Table:
    """The selection; `metadata` goes into the schema without timings, so equal inputs give
    byte-identical files. `paths`: each sample's file, for a source made of files (a `path`
    column after `sample_id`)."""
    metadata = {k: v for k, v in metadata.items() if k != "seconds"}
    columns = {"sample_id": pa.array(sample_id, pa.int64())}
    if paths is not None:
        columns["path"] = pa.array(paths, pa.string())
    table = pa.table({**columns, "pruned": pa.array(pruned, pa.bool_())})
    return table.replace_schema_metadata({"dataset_pruning": json.dumps(metadata, sort_keys=True, default=str)})


def load_selection(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(path)
    return table.column("sample_id").to_numpy(), table.column("pruned").to_numpy(zero_copy_only=False)


# --- manifest ------------------------------------------------------------------------------

def manifest_path(run_dir: Path) -> Path:
    return Path(run_dir) / "manifest.json"


def save_manifest(manifest: dict, run_dir: Path) -> Path:
    return write_json(manifest_path(run_dir), manifest)


def run_finished(run_dir: Path) -> bool:
    """Whether `run_dir` holds what an evaluation reads of a finished run: manifest, scores, model."""
    return all(p.is_file() for p in (manifest_path(run_dir), scores_path(run_dir), checkpoint_path(run_dir)))


def load_manifest(run_dir: Path) -> dict:
    return json.loads(manifest_path(run_dir).read_text())
