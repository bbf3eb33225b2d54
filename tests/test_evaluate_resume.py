"""An interrupted evaluation resumes: each retraining's record is in the retrain cache the moment
it finishes, the scoring run an evaluation makes is recorded for the next one with the same
arguments, and an evaluation started again, or run in parts, retrains only what is missing and
ends with the records of an uninterrupted one."""

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import HANG

from flows.cli import main

FAULTS = Path(__file__).with_name("fault_injection.py")
# what determines a record (its training times, which the machine's load sets, left out)
COMPARED = ("method", "prune_ratio", "selection", "selection_seed", "train_model", "seed", "n_kept", "test_accuracy",
            "train_accuracy", "samples_seen", "objective", "n_test", "test_correct")


def evaluate_argv(small_npz: str, checkpoint: str, out: Path, *more: str) -> list[str]:
    """A small evaluation: scored by a given cnn, 6 retrainings of one epoch (full, influence and
    random at 0.5, with the seeds of `more`)."""
    return ["evaluate", "--dataset", f"npz:{small_npz}", "--model", "cnn", "--checkpoint", checkpoint, "--epochs", "1",
            "--methods", "influence,random", "--ratios", "0.5", "--gap-samples", "0", "--evaluations-per-epoch", "1",
            "--shards", "2", "--out", str(out), "--target", str(out.parent / "table"), *more]


def records(folder: Path) -> list[tuple]:
    """An evaluation folder's rows, as COMPARED, in a fixed order."""
    return sorted((tuple(r[k] for k in COMPARED) for r in pq.read_table(folder / "evaluation.parquet").to_pylist()),
                  key=repr)


def scoring_runs(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.name.startswith("2"))


def recorded(out: Path) -> dict[str, int]:
    """The retrain cache's records, by name, with their modification times."""
    return {p.name: p.stat().st_mtime_ns for p in (out / ".cache" / "retrain").glob("*.json")}


@pytest.fixture(scope="module")
def uninterrupted(small_npz, cnn_checkpoint, prefect_api, dask_cluster, tmp_path_factory) -> list[tuple]:
    """The records of the same evaluation undisturbed, in this process on the session's cluster
    (the retrainings do not depend on which cluster trains them)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "runs"
    assert main(evaluate_argv(small_npz, cnn_checkpoint, out, "--seeds", "0,1", "--dask-address", dask_cluster)) == 0
    return records(next(out.glob("eval-*")))


def test_a_killed_evaluation_started_again_retrains_only_what_is_missing(small_npz, cnn_checkpoint, prefect_api,
                                                                        uninterrupted, tmp_path, capsys, caplog):
    """The evaluation is killed (SIGKILL, with its own cluster) once it has taken its first
    finished retraining. The same command again: it reuses the scoring run the killed one made
    (no second version published), retrains only the cells whose records are missing, says how
    many it reused, removes the dead evaluation's staging folder, and its records are an
    uninterrupted evaluation's."""
    out = tmp_path / "runs"
    argv = evaluate_argv(small_npz, cnn_checkpoint, out, "--seeds", "0,1", "--workers", "1")
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(FAULTS), "retrained", *argv], stdout=log, stderr=log,
                                env={**os.environ, "PREFECT_API_URL": prefect_api}, start_new_session=True)
        code = proc.wait(timeout=HANG)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # its cluster's workers
    assert code == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    before = recorded(out)
    assert 1 <= len(before) < 6, "nothing was recorded, or nothing was left to resume"
    assert not list(out.glob("eval-*")) and any((out / ".staging").iterdir())
    (scored,) = scoring_runs(out)

    with caplog.at_level("INFO"):
        assert main(argv) == 0
    assert (f"reused:            {len(before)} of 6 retrainings, recorded earlier in {out / '.cache' / 'retrain'}"
            in capsys.readouterr().out)
    after = recorded(out)
    assert len(after) == 6 and {name: after[name] for name in before} == before  # none trained again
    assert scoring_runs(out) == [scored] and f"reusing scores and model of {scored}" in caplog.text
    assert "retrained 6 of 6: " in caplog.text and "(recorded by an earlier run, reused)" in caplog.text
    from deltalake import DeltaTable

    assert DeltaTable(str(tmp_path / "table")).version() == 0
    assert not any((out / ".staging").iterdir())
    assert records(next(out.glob("eval-*"))) == uninterrupted


def test_an_evaluation_run_in_parts_is_reused_by_the_whole(small_npz, cnn_checkpoint, uninterrupted, tmp_path,
                                                           capsys, dask_cluster):
    """`--seeds 0`, then `--seeds 1`, then `--seeds 0,1`: the whole trains nothing and scores once,
    and its records are an uninterrupted evaluation's."""
    out = tmp_path / "runs"
    for seeds in ("0", "1", "0,1"):
        capsys.readouterr()
        argv = evaluate_argv(small_npz, cnn_checkpoint, out, "--seeds", seeds, "--dask-address", dask_cluster)
        assert main(argv) == 0
    assert "reused:            6 of 6 retrainings" in capsys.readouterr().out
    assert len(scoring_runs(out)) == 1 and len(recorded(out)) == 6
    (whole,) = [f for f in out.glob("eval-*") if json.loads((f / "evaluation.json").read_text())["arguments"]["seeds"]
                == [0, 1]]
    assert records(whole) == uninterrupted
