"""Files as the pipeline writes them: atomically, and readable as the umask says."""

import os
import stat

import numpy as np
import pyarrow as pa

from pruning_core import artifacts


def test_outputs_take_the_umask_s_mode_not_tempfile_s(tmp_path):
    """A run's files are written to a temporary name and renamed: made by tempfile they were 0600
    (folders 0700) whatever the umask, so on a shared filesystem the group could not read a run
    folder's scores, selection, manifest or model. They take the umask now, as plain files do."""
    before = os.umask(0o027)
    try:
        artifacts.save_parquet(pa.table({"sample_id": np.arange(3)}), tmp_path / "selection.parquet")
        artifacts.write_json(tmp_path / "manifest.json", {"run_id": "x"})
        folder = artifacts.fresh_path(tmp_path, ".staging-", folder=True)
        (tmp_path / "plain").write_text("")
    finally:
        os.umask(before)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "selection.parquet") == mode(tmp_path / "manifest.json") == mode(tmp_path / "plain") == 0o640
    assert mode(folder) == 0o750 and not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    names = {artifacts.fresh_path(tmp_path, "same-", ".tmp").name for _ in range(50)}
    assert len(names) == 50  # each a new file
