"""Data sources: Fashion-MNIST (Debian's idx files), torchvision datasets, `npz:PATH`,
`delta:URI[@VERSION]`, image folders (`folder:PATH`, folders.py) and image tables
(`parquet:PATH`, and Delta tables of encoded images: tables.py), each loaded into one `Dataset`
with a content fingerprint.

Arrays keep their stored dtype: uint8 images stay uint8 until `as_float` scales them to
[0, 1]; float arrays are used exactly as given. Images are channel-first, `(n, C, H, W)`.
`sample_id` is the row of each sample in its source's canonical order; a Delta source keeps the
ids it carries, so ids survive pruning twice.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import json
import os
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DatasetError, no_file

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
TORCHVISION_DATASETS = {"mnist": "MNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}
NAMED_DATASETS = ("fashion-mnist", *TORCHVISION_DATASETS)
OWN_DATA = ("npz", "delta", "folder", "parquet")  # sources that name their own files: no data_root
TABLE_OPTIONS = ("image", "label")  # `?image=COL&label=COL` of an image table's spec
VALID_SPECS = "fashion-mnist, mnist, cifar10, cifar100, npz:PATH, delta:URI[@VERSION], folder:PATH, parquet:PATH"


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed `--dataset` value. `kind` is a named dataset, `npz`, `delta`, `folder` or
    `parquet`; `options`: an image table's column names, ((name, column), ...) sorted."""

    kind: str
    path: str | None = None
    version: int | None = None
    options: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        query = "?" + "&".join(f"{k}={v}" for k, v in self.options) if self.options else ""
        if self.kind == "delta":
            return f"delta:{self.path}" + (f"@{self.version}" if self.version is not None else "") + query
        if self.kind in OWN_DATA:
            return f"{self.kind}:{self.path}{query}"
        return self.kind

    @property
    def short_name(self) -> str:
        """A name fit for a table or folder: `fashion-mnist`, the npz or Parquet file's stem, the
        table's or the folder's name."""
        if self.kind in OWN_DATA:
            path = Path(self.path.rstrip("/"))
            keep_suffix = self.kind == "folder" or (self.kind == "parquet" and path.suffix != ".parquet")
            stem = path.name if keep_suffix else path.stem  # a folder's name whole: `cifar10.v2`
            return re.sub(r"[^A-Za-z0-9_.-]+", "-", stem) or "dataset"
        return self.kind


def split_version(uri: str) -> tuple[str, int | None]:
    """`URI@VERSION` → (URI, VERSION); (uri, None) where it ends in no `@` and digits."""
    match = re.fullmatch(r"(.+)@(\d+)", uri)
    return (match.group(1), int(match.group(2))) if match else (uri, None)


def _table_options(text: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """`PATH?image=COL&label=COL` → (PATH, (("image", COL), ("label", COL))); a `?` not followed
    by such pairs is part of the path."""
    head, sep, query = text.rpartition("?")
    if not sep or not re.fullmatch(r"[A-Za-z_]+=[^&=]*(&[A-Za-z_]+=[^&=]*)*", query):
        return text, ()
    options = dict(pair.split("=", 1) for pair in query.split("&"))
    unknown = [k for k in options if k not in TABLE_OPTIONS]
    if unknown:
        raise DatasetError(f"`dataset` {text!r}: unknown option {unknown[0]!r}; an image table takes "
                           f"{' and '.join(f'{k}=COLUMN' for k in TABLE_OPTIONS)}")
    empty = [k for k, v in options.items() if not v]
    if empty:
        raise DatasetError(f"`dataset` {text!r}: {empty[0]}= names no column")
    return head, tuple(sorted(options.items()))


def parse_dataset_spec(text: str) -> DatasetSpec:
    """Parse `--dataset`; raise `DatasetError` naming the valid forms."""
    text = (text or "").strip()
    if text in NAMED_DATASETS:
        return DatasetSpec(kind=text)
    if text.startswith("npz:") and len(text) > 4:
        return DatasetSpec(kind="npz", path=str(Path(text[4:]).expanduser().resolve()))
    if text.startswith("folder:") and len(text) > 7:
        return DatasetSpec(kind="folder", path=str(Path(text[7:]).expanduser().resolve()))
    if text.startswith("parquet:") and len(text) > 8:
        path, options = _table_options(text[8:])
        return DatasetSpec(kind="parquet", path=str(Path(path).expanduser().resolve()), options=options)
    if text.startswith("delta:") and len(text) > 6:
        uri, options = _table_options(text[6:])
        uri, version = split_version(uri)
        if version is None and "@" in uri and not Path(uri).exists():
            raise DatasetError(f"`dataset` {text!r}: the version after '@' must be a non-negative integer")
        if "://" not in uri:
            uri = str(Path(uri).expanduser().resolve())
        return DatasetSpec(kind="delta", path=uri, version=version, options=options)
    raise DatasetError(f"`dataset` {text!r} is not a known dataset; valid: {VALID_SPECS}")


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled training split with its test split.

    x: (n, *shape) uint8 or float; y: (n,) int64 in [0, n_classes); sample_id: (n,) int64,
    unique; x_test, y_test likewise for the test split. `origin` is the provenance of the test
    split (the spec of the root source and its data root), kept through Delta versions. `paths`:
    (n,) str, each sample's file relative to its source's train folder, for sources made of
    files (`folder:`), else None; kept through subsets and Delta versions.
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    sample_id: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    origin: dict = field(default_factory=dict)
    paths: np.ndarray | None = None

    @property
    def n(self) -> int:
        return len(self.y)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 over dtype, shape and bytes of every array, then the paths where there are any:
        equal content, equal fingerprint."""
        digest = hashlib.sha256()
        for array in (self.x, self.y, self.sample_id, self.x_test, self.y_test):
            digest.update(f"{array.dtype.str}{array.shape}".encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        if self.paths is not None:  # as text, whatever width the string array has
            digest.update("\n".join(self.paths.tolist()).encode())
        return digest.hexdigest()

    def subset(self, rows: np.ndarray, name: str | None = None) -> Dataset:
        """The training rows `rows` (indices or a boolean mask), same test split."""
        return Dataset(name or self.name, self.x[rows], self.y[rows], self.sample_id[rows],
                       self.x_test, self.y_test, self.n_classes, dict(self.origin),
                       None if self.paths is None else self.paths[rows])


def np_float_dtype(torch_dtype) -> type:
    """The numpy float type matching a torch float dtype."""
    return np.float64 if str(torch_dtype) == "torch.float64" else np.float32


def as_float(x: np.ndarray, dtype=np.float32) -> np.ndarray:
    """A new writable array: uint8 scaled to [0, 1], float values kept as given (cast to `dtype`)."""
    if x.dtype == np.uint8:
        return x.astype(dtype) / dtype(255)
    return x.astype(dtype)


def cifar_shaped(x: np.ndarray) -> np.ndarray:
    """Fashion-MNIST images (n, 1, 28, 28) as CIFAR's shape (n, 3, 32, 32): padded by 2 pixels
    and repeated over 3 channels, real images for the paper's ResNet-18 recipe (the tests and
    experiments/gap_memory.py)."""
    return np.repeat(np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2))), 3, axis=1)


def _read_idx(path: Path) -> np.ndarray:
    """Read one idx file (optionally gzipped): magic, dims as big-endian int32, then data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype_code != 0x08:
            raise DatasetError(f"{path}: not an unsigned-byte idx file")
        dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        if data.size != int(np.prod(dims)):
            raise DatasetError(f"{path}: holds {data.size} bytes, its header says {int(np.prod(dims))}")
        return data.reshape(dims)
    except (OSError, EOFError, struct.error) as exc:
        raise DatasetError(f"{path}: cannot be read as an idx file ({exc})") from exc


def _load_idx_dataset(name: str, root: Path) -> Dataset:
    files = {
        "x": "train-images-idx3-ubyte", "y": "train-labels-idx1-ubyte",
        "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte",
    }
    arrays = {}
    for key, stem in files.items():
        candidates = [root / f"{stem}.gz", root / stem]
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            hint = " (install Debian's dataset-fashion-mnist)" if name == "fashion-mnist" else ""
            raise DatasetError(f"{name}: {candidates[0]} is missing{hint}; "
                               "set `data_root` to the folder holding the idx files")
        arrays[key] = _read_idx(found)
    n = len(arrays["y"])
    return Dataset(name, arrays["x"][:, None], arrays["y"].astype(np.int64), np.arange(n, dtype=np.int64),
                   arrays["x_test"][:, None], arrays["y_test"].astype(np.int64), 10,
                   {"source": name, "data_root": str(root)})


def _load_torchvision(name: str, root: Path) -> Dataset:
    import torchvision  # imported here: only these sources need it

    cls = getattr(torchvision.datasets, TORCHVISION_DATASETS[name])
    try:
        train, test = cls(str(root), train=True, download=False), cls(str(root), train=False, download=False)
    except RuntimeError as exc:
        raise DatasetError(f"{name}: not found under `data_root` {root} ({exc}); download it there first: python -c "
                           f"'import torchvision; torchvision.datasets.{cls.__name__}(\"{root}\", download=True)'"
                           ) from exc

    def arrays(split):
        x = np.asarray(split.data)
        x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # (n, C, H, W)
        return np.ascontiguousarray(x), np.asarray(split.targets, dtype=np.int64)

    (x, y), (x_test, y_test) = arrays(train), arrays(test)
    return Dataset(name, x, y, np.arange(len(y), dtype=np.int64), x_test, y_test,
                   len(train.classes), {"source": name, "data_root": str(root)})


def _load_npz(path: str) -> Dataset:
    if not Path(path).is_file():
        raise DatasetError(f"npz:{path}: {no_file(path)}")
    if not zipfile.is_zipfile(path):  # np.load would return a .npy's array, or try to unpickle anything else
        raise DatasetError(f"npz:{path}: not an .npz archive (a zip of the arrays x, y, x_test, y_test, as np.savez "
                           "writes it)")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x", "y", "x_test", "y_test") if k not in f.files]
            if missing:
                raise DatasetError(f"npz:{path}: missing arrays {missing}; it must hold x, y, x_test, y_test")
            x, y, x_test, y_test = (f[k] for k in ("x", "y", "x_test", "y_test"))
    except (OSError, ValueError, zipfile.BadZipFile, zlib.error, EOFError) as exc:
        if isinstance(exc, DatasetError):
            raise
        raise DatasetError(f"npz:{path}: cannot be read as an .npz file ({exc})") from exc
    for key, labels in (("y", y), ("y_test", y_test)):
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DatasetError(f"npz:{path}: {key} must be a 1-d integer array, got {labels.dtype} {labels.shape}")
    y, y_test = y.astype(np.int64), y_test.astype(np.int64)  # uint8 labels (as MNIST ships them) included
    n_classes = int(max(y.max(initial=-1), y_test.max(initial=-1))) + 1
    return Dataset(f"npz:{path}", x, y, np.arange(len(y), dtype=np.int64), x_test, y_test, n_classes,
                   {"source": f"npz:{path}", "data_root": None})


def validate(ds: Dataset) -> Dataset:
    """Check lengths, values and ids; raise `DatasetError` naming what is wrong."""
    label = ds.name
    if ds.n == 0 or len(ds.y_test) == 0:
        raise DatasetError(f"{label}: the training and test splits must both be non-empty")
    for xs, ys, split in ((ds.x, ds.y, "train"), (ds.x_test, ds.y_test, "test")):
        if len(xs) != len(ys):
            raise DatasetError(f"{label}: {split} split has {len(xs)} samples but {len(ys)} labels")
        if xs.dtype != np.uint8 and not np.issubdtype(xs.dtype, np.floating):
            raise DatasetError(f"{label}: {split} samples must be uint8 or float, got {xs.dtype}")
        if np.issubdtype(xs.dtype, np.floating) and not np.isfinite(xs).all():
            raise DatasetError(f"{label}: {split} samples contain NaN or Inf")
        if ys.min() < 0 or ys.max() >= ds.n_classes:
            raise DatasetError(f"{label}: {split} labels must lie in [0, {ds.n_classes}), "
                               f"found [{ys.min()}, {ys.max()}]")
    if ds.x.shape[1:] != ds.x_test.shape[1:]:
        raise DatasetError(f"{label}: train samples have shape {ds.x.shape[1:]}, test samples {ds.x_test.shape[1:]}")
    if len(np.unique(ds.sample_id)) != ds.n:
        raise DatasetError(f"{label}: sample_id values must be unique")
    if ds.n_classes < 2:
        raise DatasetError(f"{label}: at least two classes are needed, found {ds.n_classes}")
    if ds.paths is not None and len(ds.paths) != ds.n:
        raise DatasetError(f"{label}: {ds.n} samples but {len(ds.paths)} paths")
    for array in (ds.x, ds.y, ds.sample_id, ds.x_test, ds.y_test, *(() if ds.paths is None else (ds.paths,))):
        array.flags.writeable = False
    return ds


@functools.lru_cache(maxsize=4)
def _load_cached(spec: DatasetSpec, data_root: str | None, stamp: tuple | None) -> Dataset:
    """`stamp` (`file_stamp`) is part of the cache's key; a folder's and a Delta image table's
    also key their decoded arrays."""
    if spec.kind == "fashion-mnist":
        ds = _load_idx_dataset("fashion-mnist", Path(data_root) if data_root else FASHION_MNIST_ROOT)
    elif spec.kind in TORCHVISION_DATASETS:
        if not data_root:
            raise DatasetError(f"{spec.kind}: `data_root` is required (the folder torchvision downloaded it to)")
        ds = _load_torchvision(spec.kind, Path(data_root))
    elif spec.kind == "npz":
        ds = _load_npz(spec.path)
    elif spec.kind == "folder":
        from .folders import load_folder  # Pillow is needed only for the image sources

        ds = load_folder(spec.path, stamp[1])
    elif spec.kind == "parquet":
        from .tables import load_parquet

        ds = load_parquet(spec, stamp)
    else:
        from .tables import is_image_table, load_delta_images
        from .versions import read_version  # deltalake is needed only for this source

        ds = load_delta_images(spec, stamp[1]) if is_image_table(spec) else read_version(spec.path, spec.version)
    return validate(ds)


def load_dataset(spec: str | DatasetSpec, data_root: str | None = None) -> Dataset:
    """Load and validate a dataset; cached per process, so a worker loads it once. What a name
    means is looked up at every call, not at the first one, so that a long-lived process (a Dask
    worker serving run after run) keeps no older data under it: a Delta table named without a
    version is its newest version, a table or an npz file written anew at its path is read again."""
    spec = pinned(spec)
    if spec.kind in OWN_DATA:  # a source that holds its own data: no part of its cache key
        data_root = None
    elif data_root is not None:
        data_root = str(Path(data_root).expanduser().resolve())
    return _load_cached(spec, data_root, file_stamp(spec))


def file_stamp(spec: DatasetSpec) -> tuple | None:
    """What tells this copy of the data from another under the same name: an npz file's inode,
    modification time and size (None if it is not there: loading it says so); a Delta table's id,
    which a table deleted and written again at the same path does not keep, though its versions
    start again at 0; a folder's tree fingerprint (`folders.tree_fingerprint`), each Parquet
    file's stamp (a folder or a table that is no source is refused here). None for the named
    datasets."""
    if spec.kind == "delta":
        from .versions import open_table  # deltalake is needed only for this source

        return ("delta", open_table(spec.path, spec.version).metadata().id)
    if spec.kind == "folder":
        from .folders import tree_fingerprint

        return ("folder", tree_fingerprint(spec.path))
    if spec.kind == "parquet":
        from .tables import parquet_stamp

        return parquet_stamp(spec)
    if spec.kind != "npz":
        return None
    try:
        st = os.stat(spec.path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def pinned(spec: str | DatasetSpec) -> DatasetSpec:
    """`spec` parsed, a Delta table without `@VERSION` given its newest version; a run passes
    this on to its workers, so that they load what it loaded even if a commit lands meanwhile."""
    if isinstance(spec, str):
        spec = parse_dataset_spec(spec)
    if spec.kind == "delta" and spec.version is None:
        from .versions import open_table  # deltalake is needed only for this source

        spec = dataclasses.replace(spec, version=open_table(spec.path).version())
    return spec


def dataset_summary(ds: Dataset) -> dict:
    """The manifest's `dataset` entry."""
    return {"name": ds.name, "fingerprint": ds.fingerprint, "n": ds.n, "n_test": len(ds.y_test),
            "n_classes": ds.n_classes, "sample_shape": list(ds.sample_shape), "dtype": str(ds.x.dtype),
            "origin": json.loads(json.dumps(ds.origin))}
