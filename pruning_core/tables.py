"""Image tables as a dataset source: `parquet:PATH` and the image rows of `delta:URI[@VERSION]`.

A row holds an encoded image (PNG or JPEG bytes, or Hugging Face's struct {bytes, path}) and an
integer label, in the columns `image` and `label` unless the spec names others
(`parquet:PATH?image=COL&label=COL`, the same for delta). The split is a `split` column with the
values `train` and `test`, or, for Parquet, a folder holding `train*.parquet` and `test*.parquet`
(Hugging Face's export layout, also under `data/`). `sample_id` is a `sample_id` column where the
table has one (the train rows then in sample_id order), else the row's position in the train
split (the table's row order).

A Delta table with the columns `data`, `dtype` and `shape` and no columns named in the spec is a
version this product wrote (`versions.py`), read as before; any other is an image table.
Decoded arrays are cached in the user cache folder, keyed by the table's identity (the Parquet
files' stamps, or the Delta table's id and version) and the columns read.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .data import Dataset, DatasetSpec
from .errors import DatasetError, first_line
from .images import cached_arrays, decode_images

VERSION_COLUMNS = {"data", "dtype", "shape"}  # the rows of a version this product wrote
HINT = "name them as {source}?image=COL&label=COL"


def _what(spec: DatasetSpec) -> str:
    return f"`dataset` {spec}"


def columns_of(spec: DatasetSpec) -> tuple[str, str]:
    """(image column, label column) of an image table."""
    options = dict(spec.options)
    return options.get("image", "image"), options.get("label", "label")


def is_image_table(spec: DatasetSpec) -> bool:
    """Whether a `delta:` source is an image table rather than a version this product wrote."""
    if spec.options:
        return True
    from .versions import open_table

    return not VERSION_COLUMNS <= set(open_table(spec.path, spec.version).schema().to_arrow().names)


# --- Parquet ------------------------------------------------------------------------------

def parquet_files(spec: DatasetSpec) -> dict[str, list[Path]] | Path:
    """A Parquet file's path, or a folder's {"train": files, "test": files} (sorted)."""
    path = Path(spec.path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise DatasetError(f"{_what(spec)}: no such file or folder")
    for folder in (path, path / "data"):
        splits = {s: sorted(folder.glob(f"{s}*.parquet")) for s in ("train", "test")}
        if splits["train"]:
            if not splits["test"]:
                where = "the folder" if folder == path else "its data/ folder"
                raise DatasetError(f"{_what(spec)}: no test split: {where} holds train*.parquet but no "
                                   "test*.parquet")
            return splits
    raise DatasetError(f"{_what(spec)}: the folder holds no train*.parquet and test*.parquet (nor under data/); give "
                       "the folder of a split dataset or one file with a split column")


def parquet_stamp(spec: DatasetSpec) -> tuple:
    """Path, inode, size and mtime_ns of every file of a Parquet source: what tells this copy of
    the table from another, and the key of its decoded arrays."""
    found = parquet_files(spec)
    stamps = []
    for f in [found] if isinstance(found, Path) else [f for split in found.values() for f in split]:
        try:
            st = os.stat(f)
        except OSError as exc:
            raise DatasetError(f"{_what(spec)}: {f.name} cannot be read ({exc.strerror or exc})") from None
        stamps.append((str(f), st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(stamps)


def _read_parquet(spec: DatasetSpec, files: list[Path], columns: list[str]) -> tuple[pa.Table, list[str]]:
    """The `columns` the files have, concatenated, and each row's name (`FILE row R`)."""
    tables, names = [], []
    for f in files:
        try:
            found = pq.read_schema(f).names
            _check_columns(spec, found)
            tables.append(pq.read_table(f, columns=[c for c in columns if c in found]))
        except (OSError, pa.ArrowException) as exc:
            raise DatasetError(f"{_what(spec)}: {f.name} cannot be read as Parquet ({first_line(exc, 120)})") from None
        names += [f"{f.name} row {r}" for r in range(tables[-1].num_rows)]
    try:
        return pa.concat_tables(tables, promote_options="default"), names
    except pa.ArrowException as exc:
        raise DatasetError(f"{_what(spec)}: its files have different columns ({first_line(exc, 120)})") from None


def _split_rows(spec: DatasetSpec, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the train and the test split of a table with a `split` column."""
    if "split" not in table.column_names:
        raise DatasetError(f"{_what(spec)}: no test split: give a split column with the values train and test"
                           + (", or a folder of train*.parquet and test*.parquet" if spec.kind == "parquet" else ""))
    split = table.column("split").cast(pa.string()).to_numpy(zero_copy_only=False)
    train, test = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    if len(test) == 0:
        found = ", ".join(sorted({str(s) for s in split})[:5]) or "none"
        raise DatasetError(f"{_what(spec)}: no test split: no row has split test (values found: {found})")
    return train, test


def _check_columns(spec: DatasetSpec, names: list[str]) -> None:
    image, label = columns_of(spec)
    missing = [c for c in (image, label) if c not in names]
    if missing:
        raise DatasetError(f"{_what(spec)}: no column {', '.join(missing)} (columns: {', '.join(names)}); "
                           + HINT.format(source="delta:URI[@VERSION]" if spec.kind == "delta" else "parquet:PATH"))


def _images(spec: DatasetSpec, column: pa.ChunkedArray) -> list[bytes | None]:
    """The encoded bytes of an image column: binary, or a struct with a `bytes` field."""
    column = column.combine_chunks()
    if pa.types.is_struct(column.type):
        if column.type.get_field_index("bytes") < 0:
            raise DatasetError(f"{_what(spec)}: the image column is a struct without a bytes field")
        column = column.field("bytes")
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise DatasetError(f"{_what(spec)}: the image column holds {column.type}, not encoded image bytes")
    return column.to_pylist()


def _integers(spec: DatasetSpec, column: pa.ChunkedArray, name: str) -> np.ndarray:
    if not pa.types.is_integer(column.type) or column.null_count:
        raise DatasetError(f"{_what(spec)}: the {name} column must hold integers without empty values, found "
                           f"{column.type}" + (" with empty values" if column.null_count else ""))
    return column.to_numpy().astype(np.int64)


def _decoded(spec: DatasetSpec, table: pa.Table, names: list[str], train: np.ndarray, test: np.ndarray) -> dict:
    """The arrays of the rows `train` and `test` of an image table (train sorted by `sample_id`
    where it has one); `names` names each row in a refusal."""
    image, label = columns_of(spec)
    ids = None
    if "sample_id" in table.column_names:
        ids = _integers(spec, table.column("sample_id").take(train), "sample_id")
        order = np.argsort(ids, kind="stable")
        train, ids = train[order], ids[order]
    labels = _integers(spec, table.column(label), label)
    rows = np.concatenate([train, test])
    x = decode_images(_images(spec, table.column(image).take(rows)), [names[r] for r in rows], _what(spec))
    return {"x": x[:len(train)], "y": labels[train], "x_test": x[len(train):], "y_test": labels[test],
            "sample_id": np.arange(len(train), dtype=np.int64) if ids is None else ids}


ARRAYS = ("x", "y", "sample_id", "x_test", "y_test")


def _dataset(spec: DatasetSpec, arrays: dict) -> Dataset:
    y, y_test = arrays["y"], arrays["y_test"]
    n_classes = int(max(y.max(initial=-1), y_test.max(initial=-1))) + 1
    return Dataset(str(spec), arrays["x"], y, arrays["sample_id"], arrays["x_test"], y_test, n_classes,
                   {"source": str(spec), "data_root": None})


def load_parquet(spec: DatasetSpec, stamp: tuple) -> Dataset:
    """A Parquet image table: one file with a split column, or a folder of split files."""
    image, label = columns_of(spec)
    found = parquet_files(spec)

    def decode() -> dict:
        wanted = [image, label, "split", "sample_id"]
        if isinstance(found, Path):
            table, names = _read_parquet(spec, [found], wanted)
            return _decoded(spec, table, names, *_split_rows(spec, table))
        (train, train_names), (test, test_names) = (_read_parquet(spec, found[s], wanted) for s in ("train", "test"))
        table = pa.concat_tables([train.drop_columns([c for c in ("split",) if c in train.column_names]),
                                  test.select([c for c in (image, label) if c in test.column_names])],
                                 promote_options="default")
        return _decoded(spec, table, train_names + test_names, np.arange(train.num_rows),
                        train.num_rows + np.arange(test.num_rows))

    return _dataset(spec, cached_arrays({"source": "parquet", "files": stamp, "image": image, "label": label},
                                        ARRAYS, decode))


def load_delta_images(spec: DatasetSpec, table_id: str) -> Dataset:
    """A Delta image table at its version (`spec.version`, pinned)."""
    from deltalake.exceptions import DeltaError

    from .versions import open_table

    image, label = columns_of(spec)

    def decode() -> dict:
        table = open_table(spec.path, spec.version)
        names = table.schema().to_arrow().names
        _check_columns(spec, names)
        try:
            rows = table.to_pyarrow_table(columns=[c for c in (image, label, "split", "sample_id") if c in names])
        except (DeltaError, OSError, pa.ArrowException) as exc:
            raise DatasetError(f"{_what(spec)}: its data cannot be read ({first_line(exc, 160)})") from exc
        return _decoded(spec, rows, [f"row {r}" for r in range(rows.num_rows)], *_split_rows(spec, rows))

    return _dataset(spec, cached_arrays({"source": "delta", "table": table_id, "version": spec.version,
                                         "image": image, "label": label}, ARRAYS, decode))
