"""An interrupted run resumes: shards already written for the same inputs are reused. A run
killed at any stage leaves no run folder that claims success and no partial version."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import HANG, clean_env, read_until


def command(small_npz, checkpoint, out, target, shards=16, dask_address=None):
    exe = Path(sys.executable).parent / "dataset-prune"
    cluster = ["--dask-address", dask_address] if dask_address else ["--workers", "1"]
    return [str(exe), "run", "--dataset", f"npz:{small_npz}", "--checkpoint", checkpoint, "--prune-ratio", "0.4",
            "--shards", str(shards), *cluster, "--block-size", "125", "--out", str(out), "--target", str(target)]


@pytest.fixture(scope="module")
def reference(small_npz, cnn_checkpoint, prefect_api, tmp_path_factory, dask_cluster) -> dict:
    """An undisturbed run of the same inputs (4 shards; scores do not depend on the shard count nor
    on the cluster), in this process on the session's warm cluster."""
    from flows.parameters import RunParameters
    from flows.prune import prune_dataset

    tmp = tmp_path_factory.mktemp("reference")
    return prune_dataset(RunParameters(dataset=f"npz:{small_npz}", checkpoint=cnn_checkpoint, prune_ratio=0.4,
                                       shards=4, dask_address=dask_cluster, block_size=125, out=str(tmp / "runs"),
                                       target=str(tmp / "table")))


def test_killed_run_recomputes_only_missing_shards(small_npz, cnn_checkpoint, tmp_path, prefect_api, reference,
                                                  dask_cluster):
    """The run is killed with its own cluster mid-shards; the rerun (on the session's warm cluster:
    which cluster computes the missing shards is not what this tests) reuses what was written."""
    checkpoint = cnn_checkpoint
    env = {**os.environ, "PREFECT_API_URL": prefect_api}

    # 1. start, and kill the whole process group once the first influence shards exist
    out = tmp_path / "runs"
    proc = subprocess.Popen(command(small_npz, checkpoint, out, tmp_path / "table"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + HANG
    while time.monotonic() < deadline and proc.poll() is None and not list(out.glob(".cache/*/scores-*.parquet")):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob(".cache/*/*-*.*")}
    assert any(name.startswith("scores-") for name in before), "the run ended before it could be interrupted"
    assert sum(name.startswith("scores-") for name in before) < 16, "nothing was left to resume"
    assert not [p for p in out.iterdir() if not p.name.startswith(".")], "a killed run left a run folder"
    (lock,) = out.glob(".staging/*.lock")
    killed = json.loads(lock.read_text())["flow_run_id"]
    assert flow_run_state(killed).name == "Running"  # it could not report its own end

    # 2. rerun: finished shards are not rewritten, the missing ones are computed; the killed run's
    #    flow run is marked Crashed
    subprocess.run(command(small_npz, checkpoint, out, tmp_path / "table", dask_address=dask_cluster), env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert flow_run_state(killed).name == "Crashed"
    assert "died before it finished" in flow_run_state(killed).message
    assert not list(out.glob(".staging/*"))
    after = {p.name: p.stat().st_mtime_ns for p in out.glob(".cache/*/*-*.*")}
    assert all(after[name] == mtime for name, mtime in before.items())
    assert sum(name.startswith("scores-") for name in after) == 16

    # 3. the same scores as an uninterrupted run
    resumed = pq.read_table(next(out.glob("2*/scores.parquet")))
    assert resumed.equals(pq.read_table(Path(reference["run_dir"]) / "scores.parquet"))


def flow_run_state(flow_run_id: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state


FAULTS = Path(__file__).with_name("fault_injection.py")


def test_killed_in_selection_or_commit_leaves_nothing_visible_and_the_rerun_is_identical(
        small_npz, cnn_checkpoint, tmp_path, prefect_api, reference, dask_cluster):
    """The whole run process is killed (SIGKILL) mid-selection, right after its Delta commit, and
    with a commit in flight over an existing version; then the run is repeated. No run folder
    ever claims success, no partial version appears, the version already there stays readable,
    dead runs' staging folders are removed by the next run, every shard is reused, and the rerun
    publishes exactly what an undisturbed run publishes. The runs use the session's warm cluster
    (the kills come after the influence stage; killing a run's own cluster mid-shards is the test
    above)."""
    from deltalake import DeltaTable

    ref_dir = Path(reference["run_dir"])
    ref_rows = sorted(DeltaTable(reference["version"]["uri"]).to_pyarrow_table().column("sample_id").to_pylist())

    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    out, target = tmp_path / "runs", tmp_path / "table"
    argv = command(small_npz, cnn_checkpoint, out, target, shards=4, dask_address=dask_cluster)[1:]

    def crash(point):
        with open(tmp_path / f"{point}.log", "w") as log:
            proc = subprocess.Popen([sys.executable, str(FAULTS), point, *argv], env=env, stdout=log, stderr=log,
                                    start_new_session=True)
            code = proc.wait(timeout=HANG)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything it started
        assert code == -signal.SIGKILL, (tmp_path / f"{point}.log").read_text()[-3000:]
        assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == [], "a killed run left a run folder"
        staged = [p for p in (out / ".staging").iterdir() if p.is_dir()]
        assert len(staged) == 1, "the staging folder of an earlier dead run was not removed"
        return staged[0]

    def cache_files():
        return {p.name: p.stat().st_mtime_ns for p in out.glob(".cache/*/*") if not p.name.startswith(".")}

    # 1. killed mid-selection: scores merged, no selection written, no table
    dead = crash("selection")
    assert (dead / "scores.parquet").exists() and not (dead / "selection.parquet").exists()
    assert not DeltaTable.is_deltatable(str(target))
    cache = cache_files()
    assert sum(name.startswith("scores-") for name in cache) == 4

    # 2. killed right after its commit: a complete version 0, its run folder never published
    dead = crash("committed")
    table = DeltaTable(str(target))
    assert table.version() == 0
    assert sorted(table.to_pyarrow_table().column("sample_id").to_pylist()) == ref_rows
    assert json.loads(table.history()[0]["dataset_pruning"])["run_id"] == dead.name

    # 3. killed with a commit in flight over version 0: no version 1, version 0 intact
    crash("commit")
    table = DeltaTable(str(target))
    assert table.version() == 0 and [h["version"] for h in table.history()] == [0]
    assert sorted(table.to_pyarrow_table().column("sample_id").to_pylist()) == ref_rows

    # 4. the rerun: every shard reused, the undisturbed result, nothing stale left
    subprocess.run(command(small_npz, cnn_checkpoint, out, target, shards=4, dask_address=dask_cluster), env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert cache_files() == cache
    (run_dir,) = [p for p in out.iterdir() if not p.name.startswith(".")]
    assert (run_dir / "selection.parquet").read_bytes() == (ref_dir / "selection.parquet").read_bytes()
    assert pq.read_table(run_dir / "scores.parquet").equals(pq.read_table(ref_dir / "scores.parquet"))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["version"]["version"] == 1
    table = DeltaTable(str(target))
    assert [h["version"] for h in table.history()] == [1, 0]
    for version in (0, 1):
        rows = DeltaTable(str(target), version=version).to_pyarrow_table()
        assert sorted(rows.column("sample_id").to_pylist()) == ref_rows
    assert list((out / ".staging").iterdir()) == []


@pytest.mark.parametrize("to, sig", [("the command", signal.SIGTERM), ("its process group", signal.SIGTERM),
                                     ("its process group", signal.SIGINT)], ids=["kill", "kill group", "Ctrl-C"])
def test_sigterm_marks_the_run_crashed_and_stops_the_server_the_command_started(to, sig, small_npz, own_home, tmp_path):
    """What a scheduler or `kill` sends, here mid-training: the command unwinds — the flow run ends
    Crashed, its staged output is removed, the Prefect server it started for itself (no API
    configured) stops with it, and it exits 128 + SIGTERM. Sent to the whole process group (as
    `timeout` and Ctrl-C do), the signal once killed the server first and the command hung
    retrying the Crashed state against it."""
    import psutil

    env = clean_env(own_home)
    out = tmp_path / "runs"
    log = tmp_path / "log.txt"
    with log.open("w") as sink:
        # it trains its own model for 30 epochs: the signal lands in the flow's training task
        argv = [str(Path(sys.executable).parent / "dataset-prune"), "run", "--dataset", f"npz:{small_npz}",
                "--epochs", "30", "--prune-ratio", "0.4", "--out", str(out), "--target", str(tmp_path / "table")]
        # SIGINT as in a terminal: a test session started in the background (make test under nohup or
        # CI) ignores it, and its children would inherit that
        proc = subprocess.Popen(argv, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + HANG
        while time.monotonic() < deadline and proc.poll() is None and "epoch 1/30" not in log.read_text():
            time.sleep(0.05)
        tree = psutil.Process(proc.pid).children(recursive=True)
        started_server = any("prefect.server" in " ".join(c.cmdline()) for c in tree)
        if to == "the command":
            proc.send_signal(sig)
        else:
            os.killpg(proc.pid, sig)
        try:
            returncode = proc.wait(timeout=HANG)
            _, alive = psutil.wait_procs(tree, timeout=HANG)  # what the command started ends with it
            survivors = [" ".join(c.cmdline())[:120] for c in alive]
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            for child in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
    text = log.read_text()
    assert started_server, "the command started no Prefect server of its own"
    assert returncode == 128 + sig, text[-2000:]
    last = text.rstrip().splitlines()[-1]
    assert "Traceback" not in text and (last == "dataset-prune: interrupted" if sig == signal.SIGINT else
                                        "Stopping temporary server on" in last), text[-2000:]
    assert not survivors, f"processes the command started outlived it: {survivors}"
    assert "Finished in state Crashed" in text
    assert not [p for p in out.iterdir() if not p.name.startswith(".")], "a terminated run left a run folder"
    assert not any((out / ".staging").iterdir()), "a terminated run left staged output"


def test_a_run_whose_log_reader_goes_away_unwinds_and_exits_as_sigpipe_would(small_npz, own_home, tmp_path,
                                                                             prefect_api):
    """`dataset-prune run … 2>&1 | head`: once head has its lines, the next log line meets a closed
    pipe. Rich, which prints Prefect's log lines, ends the command there with SystemExit(1), which
    unwinds the run as Ctrl-C does; the command exits 141 (128 + SIGPIPE), not 1, and leaves no run
    folder, no staged output and no process it started. It reports to the session's server (the
    server a command starts for itself is the subject of the test above)."""
    import psutil

    argv = [str(Path(sys.executable).parent / "dataset-prune"), "run", "--dataset", f"npz:{small_npz}",
            "--epochs", "30", "--prune-ratio", "0.4", "--out", str(tmp_path / "runs"), "--target", str(tmp_path / "t")]
    proc = subprocess.Popen(argv, env=clean_env(own_home, PREFECT_API_URL=prefect_api), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:  # the reader takes lines up to the first epoch's, then goes
        seen = read_until(proc.stdout.fileno(), lambda text: "epoch 1/30" in text)
        tree = psutil.Process(proc.pid).children(recursive=True)
        proc.stdout.close()
        returncode = proc.wait(timeout=HANG)
        _, alive = psutil.wait_procs(tree, timeout=HANG)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert "epoch 1/30" in seen, seen[-2000:]
    assert returncode == 128 + signal.SIGPIPE
    assert not alive, [" ".join(c.cmdline())[:120] for c in alive]
    assert not [p for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")]
    assert not any((tmp_path / "runs" / ".staging").iterdir()) and not (tmp_path / "t").exists()
