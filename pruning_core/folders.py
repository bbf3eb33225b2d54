"""Image folders as a dataset source (`folder:PATH`) and pruned versions written back as folders.

The layout is the one torchvision's `ImageFolder` reads: `PATH/train/<class>/<file>` and
`PATH/test/<class>/<file>` (`PATH/val/` where there is no `test/`). The files directly inside
each class folder are the samples (hidden files, named `.…`, are skipped). Classes are the sorted
names of the `train/` class folders; a label is the class's index in that list. `sample_id` is
the position of the file in the train paths sorted by (class folder, file name), so anyone can
map an id back to its file; `Dataset.paths` holds those paths, relative to `train/`
(`airplane/0001.jpg`).

Decoded arrays are cached in the user cache folder (`images.cache_folder`), keyed by the tree's
fingerprint: the sorted relative paths with the size and modification time of every file, taken
from `stat` alone. Nothing is ever written inside PATH, which may be read-only.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from .data import Dataset, split_version
from .errors import BadInputError, DatasetError
from .images import cached_arrays, decode_images

LAYOUT = "PATH/train/<class>/<image> and PATH/test/<class>/<image> (or val/)"
FOLDER_ARRAYS = ("x", "x_test", "y", "y_test", "paths", "classes")  # a cache entry


@dataclass(frozen=True)
class FolderListing:
    """What a folder source holds, from its file names and `stat` alone. train, test: paths
    relative to their split folder (`class/file`), in sample order; y, y_test: their labels."""

    root: Path
    test_split: str  # "test", or "val" where there is no test/
    classes: tuple[str, ...]
    train: list[str]
    y: np.ndarray
    test: list[str]
    y_test: np.ndarray
    fingerprint: str


def _what(root: Path) -> str:
    return f"`dataset` folder:{root}"


def _class_folders(split: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split) if e.is_dir() and not e.name.startswith("."))


def _split_files(root: Path, split: str, classes: list[str], labels: dict[str, int], digest) -> tuple[list[str], list]:
    """The files of each class folder of `split` in (class folder, file name) order and their
    labels; each file's relative path, size and mtime_ns go into `digest`."""
    files, y = [], []
    for name in classes:
        folder = root / split / name
        entries = sorted((e for e in os.scandir(folder) if not e.name.startswith(".") and not e.is_dir()),
                         key=lambda e: e.name)
        if not entries:
            raise DatasetError(f"{_what(root)}: the class folder {split}/{name} is empty; every class folder needs "
                               "at least one image")
        for entry in entries:
            relative = f"{name}/{entry.name}"
            try:
                st = entry.stat()
            except OSError as exc:  # a dangling link, a file removed meanwhile
                reason = exc.strerror or exc
                raise DatasetError(f"{_what(root)}: {split}/{relative} cannot be read ({reason})") from None
            digest.update(f"{split}/{relative}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            files.append(relative)
            y.append(labels[name])
    return files, y


def folder_listing(path: str | Path) -> FolderListing:
    """List a folder source and refuse, each in one line, what cannot be one: no folder, no
    `train/`, neither `test/` nor `val/`, an empty class folder, a test class not in `train/`."""
    root = Path(path)
    what = _what(root)
    if not root.is_dir():
        raise DatasetError(f"{what}: {'is a file, not a folder' if root.exists() else 'no such folder'}")
    if not (root / "train").is_dir():
        raise DatasetError(f"{what}: no train/ folder; the layout is {LAYOUT}")
    test_split = next((s for s in ("test", "val") if (root / s).is_dir()), None)
    if test_split is None:
        raise DatasetError(f"{what}: neither test/ nor val/ beside train/; the layout is {LAYOUT}")
    classes = _class_folders(root / "train")
    if not classes:
        raise DatasetError(f"{what}: train/ holds no class folders; the layout is {LAYOUT}")
    test_classes = _class_folders(root / test_split)
    missing = [name for name in test_classes if name not in classes]
    if missing:
        raise DatasetError(f"{what}: {test_split}/{missing[0]} is a class that train/ does not have"
                           + (f" ({len(missing)} such classes)" if len(missing) > 1 else "")
                           + "; the classes are the folders of train/")
    labels = {name: i for i, name in enumerate(classes)}
    digest = hashlib.sha256()
    train, y = _split_files(root, "train", classes, labels, digest)
    test, y_test = _split_files(root, test_split, test_classes, labels, digest)
    return FolderListing(root, test_split, tuple(classes), train, np.array(y, dtype=np.int64), test,
                         np.array(y_test, dtype=np.int64), digest.hexdigest())


def tree_fingerprint(path: str | Path) -> str:
    """The fingerprint of a folder source's files (relative paths, sizes, mtime_ns; no file is
    read): what tells this tree from another, and the key of its decoded arrays."""
    return folder_listing(path).fingerprint


def load_folder(path: str | Path, fingerprint: str | None = None) -> Dataset:
    """The folder source at `path` (absolute) as a `Dataset`, images (n, C, H, W) uint8: decoded
    in parallel on a first load, from the cache after. `fingerprint`: the tree's, where the
    caller has just taken it (`data.file_stamp`); a cached tree is then not listed again."""
    root = Path(path)
    fingerprint = fingerprint or tree_fingerprint(root)

    def decode() -> dict[str, np.ndarray]:
        listing = folder_listing(root)
        if listing.fingerprint != fingerprint:  # its arrays would be stored under the other tree's key
            raise DatasetError(f"{_what(root)}: its files changed while it was read; load it again")
        split = listing.test_split
        files = [f"train/{p}" for p in listing.train] + [f"{split}/{p}" for p in listing.test]
        x = decode_images([str(root / f) for f in files], files, _what(root))
        return {"x": x[:len(listing.train)], "x_test": x[len(listing.train):], "y": listing.y,
                "y_test": listing.y_test, "paths": np.array(listing.train), "classes": np.array(listing.classes)}

    arrays = cached_arrays({"source": "folder", "tree": fingerprint}, FOLDER_ARRAYS, decode)
    classes = [str(c) for c in arrays["classes"]]
    origin = {"source": f"folder:{root}", "data_root": None, "classes": classes}
    return Dataset(f"folder:{root}", arrays["x"], np.asarray(arrays["y"]), np.arange(len(arrays["y"]), dtype=np.int64),
                   arrays["x_test"], np.asarray(arrays["y_test"]), len(classes), origin,
                   paths=np.asarray(arrays["paths"]))


# --- export: a version back as a folder ----------------------------------------------------

def _checked_to(to: str | Path) -> Path:
    from .artifacts import check_can_create

    to = Path(to).expanduser().resolve()
    if to.exists() and not to.is_dir():
        raise BadInputError(f"`to` {to}: exists and is not a folder")
    if to.is_dir() and any(to.iterdir()):
        raise BadInputError(f"`to` {to}: exists and is not empty; give a new or empty folder")
    check_can_create(to, "`to`")
    return to


def _version_source(ref: str) -> tuple[str, int, Path, list[str]]:
    """(table URI, version, source folder, kept paths) of a Delta version of a folder source."""
    from .versions import open_table, provenance_at

    text = ref.removeprefix("delta:")
    if text.startswith(("dvc:", "lakefs://")) or not text.strip():
        raise BadInputError(f"export {ref}: give a Delta version, URI[@VERSION] as `dataset-prune versions` lists it")
    uri, version = split_version(text)
    uri = uri if "://" in uri else str(Path(uri).expanduser().resolve())
    table = open_table(uri, version)
    version = table.version()
    source = ((provenance_at(uri, version).get("origin") or {}).get("source") or "")
    if not source.startswith("folder:"):
        raise BadInputError(f"export {uri}@{version}: its source is {source or 'not recorded'}, not an image folder "
                            "(folder:PATH); only versions of folder sources are written back as files")
    if "path" not in table.schema().to_arrow().names:
        raise BadInputError(f"export {uri}@{version}: its rows have no path column")
    rows = table.to_pyarrow_table(columns=["sample_id", "path"]).sort_by("sample_id")
    return uri, version, Path(source[len("folder:"):]), rows.column("path").to_pylist()


def export_version(ref: str, to: str | Path) -> dict:
    """Write the Delta version `ref` (`URI[@VERSION]`, `delta:` optional) of a folder source as an
    ImageFolder tree at `to`: `train/<class>/<file>` for every kept file and the source's whole
    test (or val) split, every class folder of the source present (labels keep their indices).
    Files are hard links where the file system allows, else copies. Written into a staging folder
    beside `to`, renamed into place at the end: a failure leaves nothing. `to` must be new or
    empty. Returns the counts written."""
    uri, version, root, kept = _version_source(ref)
    to = _checked_to(to)
    listing = folder_listing(root)
    known = set(listing.train)
    gone = next((p for p in kept if p not in known), None)
    if gone is not None:  # also keeps a path from another writer inside the tree
        raise DatasetError(f"export {uri}@{version}: train/{gone} is no longer in its source folder {root}")
    files = [f"train/{p}" for p in kept] + [f"{listing.test_split}/{p}" for p in listing.test]
    folders = [PurePosixPath("train", c) for c in listing.classes] + \
        [PurePosixPath(listing.test_split, p).parent for p in listing.test]
    to.parent.mkdir(parents=True, exist_ok=True)
    from .artifacts import fresh_path

    staging = fresh_path(to.parent, f".{to.name}.export-", folder=True)
    linked = 0
    try:
        for folder in dict.fromkeys(folders):
            (staging / folder).mkdir(parents=True, exist_ok=True)
        link = True
        for f in files:
            src, dst = root / f, staging / f
            if link:
                try:
                    os.link(src, dst)
                    linked += 1
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                        raise DatasetError(f"export {uri}@{version}: {f} of {root} cannot be linked "
                                           f"({exc.strerror or exc})") from None
                    link = False  # another file system, or links not allowed here: copies from now on
            try:
                shutil.copy2(src, dst)
            except FileNotFoundError:
                raise DatasetError(f"export {uri}@{version}: {f} of {root} is gone") from None
        os.replace(staging, to)  # onto an empty folder, or a new name
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return {"to": str(to), "version": f"{uri}@{version}", "source": str(root), "train": len(kept),
            "test": len(listing.test), "test_split": listing.test_split, "classes": len(listing.classes),
            "linked": linked, "copied": len(files) - linked}
