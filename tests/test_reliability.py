"""Reliability: a lost Dask worker, concurrent commits to one Delta table, stale staging
folders of dead runs, and runs that would not fit in memory. Crashes of the whole run process
at each stage are in test_resume.py; bad input in test_cli.py."""

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import HANG
from deltalake import DeltaTable
from fault_injection import KillOnFirstStart, commit_rounds

from flows.cli import main
from flows.parameters import RunParameters
from pruning_core import artifacts
from pruning_core.errors import BadInputError


def test_worker_killed_during_influence_shards_leaves_identical_scores(small_npz, cnn_checkpoint, prefect_api,
                                                                       tmp_path):
    """The OS process of a Dask worker is killed as it starts an influence shard (a worker plugin:
    `KillOnFirstStart`); the flow still completes (Dask reschedules the shard, the nanny restarts
    the worker) and its scores, selection and version equal those of an undisturbed run."""
    import json

    from distributed import Client, LocalCluster

    from flows.prune import prune_dataset

    def run(name, address):
        return prune_dataset(RunParameters(dataset=f"npz:{small_npz}", checkpoint=cnn_checkpoint, prune_ratio=0.3,
                                           shards=8, block_size=250, dask_address=address,
                                           out=str(tmp_path / name), target=str(tmp_path / f"{name}-table")))

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1") as cluster, Client(cluster) as client:
        pids = set(client.run(os.getpid).values())
        record = tmp_path / "killed.json"
        client.register_plugin(KillOnFirstStart("influence_shard", str(record),
                                                (str(tmp_path / "disturbed"), ".cache/*/scores-*.parquet")))
        disturbed = run("disturbed", cluster.scheduler_address)
        assert record.exists(), "no worker started an influence shard"
        killed = json.loads(record.read_text())
        assert killed["pid"] in pids and killed["done"] < 8
        assert killed["pid"] not in client.run(os.getpid).values()  # that process is gone (the nanny started another)
        undisturbed = run("undisturbed", cluster.scheduler_address)

    a, b = Path(disturbed["run_dir"]), Path(undisturbed["run_dir"])
    assert pq.read_table(a / "scores.parquet").equals(pq.read_table(b / "scores.parquet"))
    assert (a / "selection.parquet").read_bytes() == (b / "selection.parquet").read_bytes()
    rows = [DeltaTable(m["version"]["uri"]).to_pyarrow_table().sort_by("sample_id") for m in (disturbed, undisturbed)]
    assert rows[0].equals(rows[1]) and rows[0].num_rows == 1400


def test_concurrent_commits_to_one_table_all_land_as_distinct_versions(small_npz, tmp_path):
    """Three processes commit three versions each to one Delta table, every round started at
    the same moment; from the second round on, every writer's first attempt is held until all
    have read the same snapshot (`commit_rounds`), so two of three must collide (Delta refuses all
    but one commit per version) and retry: all nine commits become distinct versions, each
    exactly what its writer wrote, and every version stays readable."""
    uri = str(tmp_path / "table")
    writers, rounds = 3, 3
    spawn = multiprocessing.get_context("spawn")  # deltalake's runtime does not survive fork
    barrier, results = spawn.Barrier(writers), spawn.Queue()
    procs = [spawn.Process(target=commit_rounds, args=(uri, f"npz:{small_npz}", w, rounds, barrier, results))
             for w in range(writers)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=HANG) for _ in procs]
    for proc in procs:
        proc.join(timeout=HANG)
        assert proc.exitcode == 0

    commits = [c for _, done, _ in outcomes for c in done]
    assert sorted(version for _, _, version, _ in commits) == list(range(writers * rounds))
    assert sum(conflicts for *_, conflicts in outcomes) >= (writers - 1) * (rounds - 1)
    history = {int(h["version"]): h for h in DeltaTable(uri).history()}
    assert sorted(history) == list(range(writers * rounds))
    for _, run_id, version, kept in commits:
        assert f'"run_id": "{run_id}"' in history[version]["dataset_pruning"]
        rows = DeltaTable(uri, version=version).to_pyarrow_table()
        assert sorted(rows.column("sample_id").to_pylist()) == kept


def test_stale_staging_folders_are_removed_and_live_ones_kept(tmp_path):
    """A staging folder whose run died (its lock released by the kernel) is removed; one whose
    run is alive, and one without a lock file (not this mechanism's), are kept."""
    out = tmp_path / "runs"
    live = artifacts.lock_staging(out, "live")
    artifacts.staging_path(out, "live").mkdir()
    dead = (f"from pruning_core import artifacts; artifacts.lock_staging({str(out)!r}, 'dead', {{'pid': 7}}); "
            f"folder = artifacts.staging_path({str(out)!r}, 'dead'); folder.mkdir(); "
            f"(folder / 'scores.parquet').write_text('partial'); import os; os._exit(0)")
    subprocess.run([sys.executable, "-c", dead], check=True, cwd=Path(__file__).parents[1])
    (out / ".staging" / "foreign").mkdir()
    try:
        with pytest.raises(BadInputError, match="already running"):
            artifacts.lock_staging(out, "live")
        assert artifacts.remove_stale_staging(out) == {"dead": {"pid": 7}}  # with what its lock recorded
        assert sorted(p.name for p in (out / ".staging").iterdir()) == ["foreign", "live", "live.lock"]
    finally:
        artifacts.release_staging(out, "live", live)
    assert artifacts.remove_stale_staging(out) == {}


GIB = 2**30
P_CNN = 215_370  # every parameter of cnn: a projection below p can still need more than the machine has


@pytest.fixture
def host_memory(monkeypatch):
    """`host_memory(free)`: this host's memory as `pruning_core.influence.memory_available`
    reports it, wherever the function was imported: `free` bytes available of 4 × `free` in all
    (so that the available memory, not the local workers' share of the total, is the limit)."""
    import sys

    import flows.cli  # the commands and the flow, with what they import, before the names are looked for
    import flows.prune  # noqa: F401
    from pruning_core import influence

    original = influence.memory_available

    def report(free: int) -> None:
        for module in list(sys.modules.values()):
            if getattr(module, "memory_available", None) is original:
                monkeypatch.setattr(module, "memory_available", lambda: {"total": 4 * free, "available": free})

    return report


def memory_cases(free: int) -> tuple[int, int]:
    """For `free` bytes of host memory: a projection dimension whose M = P H⁻¹ alone needs twice
    that (below cnn's p up to 171 GiB), and one whose whole estimate needs a hundredth of it."""
    huge = 2 * free // (8 * P_CNN) + 1
    assert huge < P_CNN
    return huge, max(1, free // (100 * 8 * (P_CNN + 1024)))


@pytest.mark.parametrize("free_gib", [4, 128])  # 128: the GPU hosts, where the host's own figure once failed this
def test_a_run_that_would_exceed_memory_is_refused_early_with_the_estimate(free_gib, host_memory, small_npz, tmp_path,
                                                                           capsys):
    """A projection dimension whose M = P H⁻¹ alone needs twice the available memory is refused
    before anything runs, naming the estimate and the memory reported; a small one passes the
    same check. The host's memory is set here, so the case holds on any machine."""
    host_memory(free_gib * GIB)
    huge, small = memory_cases(free_gib * GIB)
    out, target = tmp_path / "runs", tmp_path / "table"
    common = ["run", "--dataset", f"npz:{small_npz}", "--prune-ratio", "0.4", "--scope", "all", "--hessian", "cg",
              "--out", str(out), "--target", str(target)]
    assert main([*common, "--projection-dim", str(huge)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "the influence stage needs ≈" in err and f"stored dim={huge}" in err, err
    assert f"but only {free_gib:.2f} GiB is available (this machine's available memory)" in err, err
    assert not out.exists() and not target.exists()

    assert main([*common, "--projection-dim", str(small), "--dry-run"]) == 0
    assert f"stored dim={small}" in capsys.readouterr().out
    assert not out.exists() and not target.exists()


def test_the_flow_itself_refuses_what_would_not_fit(host_memory, small_npz, tmp_path, prefect_api):
    """The same check inside the flow (deployments do not pass through the command line)."""
    from flows.prune import prune_dataset

    host_memory(128 * GIB)
    huge, _ = memory_cases(128 * GIB)
    out = tmp_path / "runs"
    with pytest.raises(BadInputError, match=r"the influence stage needs ≈ .* but only 128.00 GiB is available"):
        prune_dataset(RunParameters(dataset=f"npz:{small_npz}", prune_ratio=0.4, scope="all", hessian="cg",
                                    projection_dim=huge, out=str(out), target=str(tmp_path / "table")))
    assert not out.exists() and not (tmp_path / "table").exists()


def test_memory_limit_where_the_stage_will_run(host_memory):
    """On a given cluster the smallest worker's Dask limit (less the nanny's 5 % margin) counts,
    and no limit means no check; locally, the smaller of this machine's available memory and each
    local worker's share of the total."""
    from flows.preflight import memory_limit
    from pruning_core.influence import check_memory

    gib = 2**30
    info = {"workers": {"a": {"memory_limit": 4 * gib}, "b": {"memory_limit": 2 * gib}}}
    limit, where = memory_limit(2, info)
    assert limit == int(2 * gib * 0.95) and "smallest worker" in where
    assert memory_limit(2, {"workers": {"a": {"memory_limit": 0}}}) == (None, "")
    host_memory(8 * gib)  # 8 GiB available of 32 (read twice, the host's own figure moved between the reads)
    assert memory_limit(1, None) == (8 * gib, "this machine's available memory")
    assert memory_limit(8, None) == (int(32 * gib / 8 * 0.95), "the memory limit of each of the 8 local Dask workers")
    estimate = {"n": 10, "p": 10, "k": 10, "memory_bytes": {"hessian": 3 * gib}, "peak_bytes": 3 * gib,
                "seconds": 1.0}
    with pytest.raises(BadInputError, match=r"needs ≈ 3.00 GiB but only 1.90 GiB is available \(the memory limit"):
        check_memory(estimate, limit, where)
    check_memory(estimate, None, "")  # unknown: not refused
    check_memory(estimate, 4 * gib, "this machine")
