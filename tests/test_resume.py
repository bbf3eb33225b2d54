"""An interrupted run resumes: shards already written for the same inputs are reused."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq


def command(small_npz, checkpoint, out, target):
    exe = Path(sys.executable).parent / "dataset-prune"
    return [str(exe), "run", "--dataset", f"npz:{small_npz}", "--checkpoint", checkpoint, "--prune-ratio", "0.4",
            "--shards", "16", "--workers", "1", "--block-size", "125", "--out", str(out), "--target", str(target)]


def test_killed_run_recomputes_only_missing_shards(small_npz, tmp_path, prefect_api):
    from pruning_core.artifacts import save_checkpoint
    from pruning_core.data import load_dataset
    from pruning_core.training import TrainArgs, train

    ds = load_dataset(f"npz:{small_npz}")
    checkpoint = str(tmp_path / "cnn.pt")
    save_checkpoint(train(ds, TrainArgs(model="cnn", epochs=2)).model, checkpoint)
    env = {**os.environ, "PREFECT_API_URL": prefect_api}

    # 1. start, and kill the whole process group once the first influence shards exist
    out = tmp_path / "runs"
    proc = subprocess.Popen(command(small_npz, checkpoint, out, tmp_path / "table"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not list(out.glob(".cache/*/scores-*.parquet")):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob(".cache/*/*-*.*")}
    assert any(name.startswith("scores-") for name in before), "the run ended before it could be interrupted"
    assert sum(name.startswith("scores-") for name in before) < 16, "nothing was left to resume"
    assert not [p for p in out.iterdir() if not p.name.startswith(".")], "a killed run left a run folder"

    # 2. rerun: finished shards are not rewritten, the missing ones are computed
    subprocess.run(command(small_npz, checkpoint, out, tmp_path / "table"), env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob(".cache/*/*-*.*")}
    assert all(after[name] == mtime for name, mtime in before.items())
    assert sum(name.startswith("scores-") for name in after) == 16

    # 3. the same scores as an uninterrupted run in a fresh folder
    clean = tmp_path / "clean"
    subprocess.run(command(small_npz, checkpoint, clean, tmp_path / "table2"), env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resumed = pq.read_table(next(out.glob("2*/scores.parquet")))
    reference = pq.read_table(next(clean.glob("2*/scores.parquet")))
    assert resumed.equals(reference)
