"""Encoded images (JPEG, PNG, anything Pillow reads) decoded in parallel into one channel-first
uint8 array, and the user cache folder that keeps decoded arrays between processes and runs.

Shared by the image sources (`folders.py`, `tables.py`). Images are never resized: a source
whose images differ in size is refused, naming two of them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .errors import DatasetError, first_line

CACHE_ENV = "DATASET_PRUNING_CACHE"
CACHE_FORMAT = 1  # part of every cache key: a change of the decoded layout makes older entries unused
CHUNK = 512  # images per decoding task
log = logging.getLogger(__name__)


def decode_threads() -> int:
    """Threads that decode: one more than the usable cores. Threads, not processes: Pillow decodes
    with the GIL released, processes were no faster on 2 cores (docs/results.md#image-sources) and
    a Dask worker, a daemon process, may not start any."""
    return len(os.sched_getaffinity(0)) + 1 if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1) + 1


def _decode_one(source: str | bytes) -> np.ndarray:
    """(H, W) for a grayscale ('L') image, (H, W, 3) RGB for any other mode."""
    from PIL import Image  # imported here: only the image sources need it

    with Image.open(source if isinstance(source, str) else io.BytesIO(source)) as image:
        return np.asarray(image if image.mode == "L" else image.convert("RGB"))


class _Undecodable(Exception):
    def __init__(self, index: int, reason: str):
        super().__init__(index, reason)
        self.index, self.reason = index, reason


def _decode_chunk(sources: Sequence[str | bytes], start: int) -> list[np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    out = []
    for i, source in enumerate(sources):
        if source is None:
            raise _Undecodable(start + i, "no image bytes")
        try:
            out.append(_decode_one(source))
        except UnidentifiedImageError:  # its message names the file object, not the sample
            raise _Undecodable(start + i, "not in an image format Pillow reads") from None
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
            raise _Undecodable(start + i, first_line(exc, 100)) from None
    return out


def decode_images(sources: Sequence[str | bytes | None], names: Sequence[str], what: str) -> np.ndarray:
    """Decode every source (a file path or encoded bytes) into (n, C, H, W) uint8: C = 1 where
    every image is grayscale ('L'), else 3 (RGB; a grayscale image among colour ones repeated
    over the channels, as Pillow converts it). `names[i]` names source i in a refusal, `what`
    the dataset (`` `dataset` folder:PATH ``). Raises `DatasetError` for an image that cannot be
    read or decoded (the first in order) and for images of different sizes (not resized)."""
    chunks = [(sources[i:i + CHUNK], i) for i in range(0, len(sources), CHUNK)]
    pool = ThreadPoolExecutor(decode_threads())
    try:
        decoded = [image for part in pool.map(lambda c: _decode_chunk(*c), chunks) for image in part]
    except _Undecodable as exc:
        raise DatasetError(f"{what}: {names[exc.index]} cannot be read as an image ({exc.reason})") from None
    finally:
        pool.shutdown(cancel_futures=True)  # after a refusal, the chunks not started are not decoded
    sizes = [image.shape[:2] for image in decoded]
    odd = next((i for i, size in enumerate(sizes) if size != sizes[0]), None)
    if odd is not None:
        (h0, w0), (h1, w1) = sizes[0], sizes[odd]
        raise DatasetError(f"{what}: images of different sizes, {names[0]} is {w0}x{h0} and {names[odd]} is {w1}x{h1} "
                           "(width x height); images are not resized, so give images of one size")
    if not decoded:
        return np.zeros((0, 3, 0, 0), dtype=np.uint8)
    h, w = sizes[0]
    if all(image.ndim == 2 for image in decoded):
        return np.stack(decoded)[:, None]  # (n, 1, H, W)
    x = np.empty((len(decoded), 3, h, w), dtype=np.uint8)
    for i, image in enumerate(decoded):
        x[i] = image.transpose(2, 0, 1) if image.ndim == 3 else image[None]
    return x


# --- the cache of decoded arrays -----------------------------------------------------------

def cache_folder() -> Path:
    """`$DATASET_PRUNING_CACHE`, else `$XDG_CACHE_HOME/dataset-pruning`, else
    `~/.cache/dataset-pruning`: outside the source, which may be read-only."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "dataset-pruning"


def cache_key(identity: dict) -> str:
    """The cache entry's name for a source's `identity` (what tells its content from any other's:
    a file tree's fingerprint, a table's id and version, the columns read)."""
    text = json.dumps({"format": CACHE_FORMAT, **identity}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def decoded_path(key: str) -> Path:
    """The entry's folder: one `.npy` file per array, read memory-mapped (a later load reads no
    more than it uses, and processes on one machine share the pages)."""
    return cache_folder() / "decoded" / key


def load_decoded(key: str, names: Sequence[str]) -> dict[str, np.ndarray] | None:
    """The arrays `names` stored under `key`, or None: no entry, or one that cannot be read
    (a file missing, truncated or not a `.npy`), which is then removed, to be written again."""
    folder = decoded_path(key)
    if not folder.is_dir():
        return None
    try:
        return {name: np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in names}
    except (OSError, ValueError, EOFError) as exc:
        log.warning("%s: unreadable cache entry, decoding again (%s)", folder, first_line(exc, 120))
        shutil.rmtree(folder, ignore_errors=True)
        return None


def save_decoded(key: str, arrays: dict[str, np.ndarray]) -> None:
    """Store `arrays` under `key`: written into a temporary folder beside the entry and renamed,
    so a reader (another worker) never sees half an entry; where another process stored the
    entry first, its copy is kept. A cache that cannot be written is skipped with a warning: the
    data was decoded all the same."""
    from .artifacts import fresh_path

    folder = decoded_path(key)
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = fresh_path(folder.parent, f".{key}.", ".tmp", folder=True)
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array, allow_pickle=False)
        os.rename(tmp, folder)
    except OSError as exc:
        if not folder.is_dir():
            log.warning("%s: the decoded images cannot be cached (%s); set %s to a writable folder", folder,
                        first_line(exc, 120), CACHE_ENV)
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def cached_arrays(identity: dict, names: Sequence[str], build: Callable[[], dict[str, np.ndarray]]
                  ) -> dict[str, np.ndarray]:
    """The arrays `names` that `build()` returns for a source of this `identity`, from the cache
    where an entry holds them, else built and stored."""
    key = cache_key({**identity, "arrays": list(names)})
    stored = load_decoded(key, names)
    if stored is not None:
        return stored
    arrays = build()
    save_decoded(key, {name: arrays[name] for name in names})
    return arrays
