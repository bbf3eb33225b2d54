"""Files as the pipeline writes them: atomically, and readable as the umask says."""

import os
import stat

import numpy as np
import pyarrow as pa
import pytest

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


def test_a_new_run_folder_is_one_absent_folder_name(tmp_path):
    """Both flows refuse, in one line, a run id that is not one folder name or names a folder
    that is there (an evaluation's refusal was a FileExistsError traceback)."""
    from pruning_core.artifacts import new_run_folder
    from pruning_core.errors import BadInputError

    assert new_run_folder(tmp_path, "eval-1") == tmp_path / "eval-1"
    (tmp_path / "eval-1").mkdir()
    with pytest.raises(BadInputError, match=r"run folder .*eval-1 already exists; choose another run id"):
        new_run_folder(tmp_path, "eval-1")
    with pytest.raises(BadInputError, match="must be one folder name"):
        new_run_folder(tmp_path, "../elsewhere")
