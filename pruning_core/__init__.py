"""dataset-pruning core library: data sources, models, training, influence, selection and
dataset versions. Pure numpy/torch/pyarrow/deltalake; never imports prefect or dask."""

import functools
import hashlib
from pathlib import Path

__version__ = "0.1.0"


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """SHA-256 of this package's Python sources (their paths and bytes): processes compute alike
    only where it is equal, which the version number, unchanged by a checkout's edits, cannot say.
    A run compares its workers' with its own before it trains."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()
