"""Versioning backends behind one interface: DVC with real `git` and `dvc`, lakeFS against a
fake server that implements the REST endpoints used (lakeFS itself cannot run here), and the
source → pruned lineage across Delta tables."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import HANG
from fake_lakefs import FakeLakeFS

from benchmarks.local_s3 import local_s3
from flows.cli import main
from pruning_core.data import load_dataset
from pruning_core.errors import BadInputError
from pruning_core.targets import DvcTarget, LakeFSTarget, lineage, open_target
from pruning_core.versions import commit_version, list_versions, read_version

DVC = str(Path(sys.executable).parent / "dvc")
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost",
       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@localhost"}


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    rng = np.random.default_rng(7)
    path = tmp_path_factory.mktemp("src") / "tiny.npz"
    np.savez(path, x=rng.integers(0, 256, (60, 1, 6, 6), dtype=np.uint8), y=rng.integers(0, 4, 60),
             x_test=rng.integers(0, 256, (8, 1, 6, 6), dtype=np.uint8), y_test=rng.integers(0, 4, 8))
    return load_dataset(f"npz:{path}")


def provenance(ds, run_id, keep):
    return {"run_id": run_id, "source": {"name": ds.name, "fingerprint": ds.fingerprint, "n": ds.n},
            "method": "random", "solver": None, "prune_ratio": round(1 - keep.mean(), 3), "epsilon": None,
            "n_pruned": int((~keep).sum()), "n_kept": int(keep.sum())}


def assert_exactly(table: pa.Table, ds, keep):
    """The table holds exactly the kept samples: ids, labels and bytes."""
    table = table.sort_by("sample_id")
    assert table.column("sample_id").to_pylist() == ds.sample_id[keep].tolist()
    assert table.column("label").to_pylist() == ds.y[keep].tolist()
    x = np.frombuffer(b"".join(table.column("data").to_pylist()), dtype=table.column("dtype")[0].as_py())
    assert np.array_equal(x.reshape(ds.x[keep].shape), ds.x[keep])


def git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, env=ENV, check=True, capture_output=True, text=True).stdout


def dvc(repo, *args):
    return subprocess.run([DVC, *args], cwd=repo, env=ENV, check=True, capture_output=True, text=True).stdout


# --- DVC ----------------------------------------------------------------------------------

@pytest.fixture
def repo(tmp_path):
    """A git repository with DVC and a local default remote (a folder)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    dvc(repo, "init", "-q")
    dvc(repo, "remote", "add", "-d", "store", str(tmp_path / "dvc-store"))
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "dvc init")
    return repo


def test_dvc_tagged_commits_check_out_to_exactly_the_kept_samples(ds, repo, tmp_path):
    target = open_target(f"dvc:{repo}#data/tiny-pruned")
    keeps = [np.arange(60) % 3 != 0, np.arange(60) % 4 == 0]
    for i, keep in enumerate(keeps):
        assert target.commit(ds, keep, provenance(ds, f"run-{i}", keep)) == i
    assert git(repo, "status", "--porcelain") == ""
    assert git(repo, "tag", "--list").split() == ["data-tiny-pruned-v0", "data-tiny-pruned-v1"]

    # in place: check out the first tag, then DVC restores its files from the cache
    git(repo, "checkout", "-q", "data-tiny-pruned-v0")
    dvc(repo, "checkout", "--force")
    assert_exactly(pq.read_table(repo / "data/tiny-pruned/samples.parquet"), ds, keeps[0])
    assert json.loads((repo / "data/tiny-pruned/provenance.json").read_text())["run_id"] == "run-0"

    # elsewhere: a clone at the second tag pulls its files from the remote the versions were pushed to
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", "--branch", "data-tiny-pruned-v1", str(repo), str(clone))
    assert not (clone / "data/tiny-pruned").exists()
    dvc(clone, "pull", "-q")
    assert_exactly(pq.read_table(clone / "data/tiny-pruned/samples.parquet"), ds, keeps[1])
    assert sorted(p.name for p in (clone / "data/tiny-pruned").iterdir()) == ["provenance.json", "samples.parquet"]

    rows = target.versions()
    assert [(r["version"], r["ref"], r["rows"], r["provenance"]["run_id"]) for r in rows] == \
        [(1, "data-tiny-pruned-v1", 15, "run-1"), (0, "data-tiny-pruned-v0", 40, "run-0")]


def test_dvc_failed_commit_leaves_the_repository_as_it_was(ds, repo):
    target = DvcTarget(f"dvc:{repo}#tiny-pruned")
    first = np.arange(60) < 30
    target.commit(ds, first, provenance(ds, "ok", first))
    head = git(repo, "rev-parse", "HEAD")
    before = (repo / "tiny-pruned/samples.parquet").read_bytes()
    hook = repo / ".git/hooks/pre-commit"  # a hook that refuses the commit, after `dvc add` ran
    hook.write_text("#!/bin/sh\necho refused >&2\nexit 1\n")
    hook.chmod(0o755)
    with pytest.raises(Exception, match="git commit failed"):
        target.commit(ds, ~first, provenance(ds, "refused", ~first))
    assert git(repo, "rev-parse", "HEAD") == head
    assert git(repo, "status", "--porcelain") == ""
    assert git(repo, "tag", "--list").split() == ["tiny-pruned-v0"]
    assert (repo / "tiny-pruned/samples.parquet").read_bytes() == before
    assert not [p for p in repo.iterdir() if p.name.startswith(".tiny-pruned.")]


@pytest.mark.parametrize("uri, message", [
    ("dvc:{tmp}/absent#x", "is not a folder"),
    ("dvc:{tmp}#x", "is not the top folder of a git repository"),
    ("dvc:{tmp}", "expected dvc:REPO#PATH"),
    ("dvc:{tmp}#../outside", "must be a relative path"),
    ("lakefs://repo-only", "expected lakefs://REPOSITORY/BRANCH/PATH"),
    ("s3://dataset-prune-no-such-bucket/pruned", "--target s3://dataset-prune-no-such-bucket/pruned: cannot be opened"),
])
def test_bad_targets_exit_2_with_one_line(uri, message, small_npz, tmp_path, capsys):
    out = tmp_path / "runs"
    code = main(["run", "--dataset", f"npz:{small_npz}", "--model", "linear", "--prune-ratio", "0.2",
                 "--out", str(out), "--target", uri.format(tmp=tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_an_unreachable_object_store_is_one_line_on_the_terminal_too(tmp_path):
    """The same refusal as the command prints it (capsys sees only Python's stderr): without an
    AWS region, delta-rs's AWS SDK logged WARN lines of its own on the process's stderr first."""
    env = {k: v for k, v in os.environ.items() if k == "AWS_CA_BUNDLE" or not k.startswith(("AWS_", "RUST_LOG"))}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "versions", "s3://dataset-prune-no-such-bucket/t"],
                          cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=HANG)
    assert done.returncode == 2 and done.stderr.startswith("dataset-prune: error: delta:s3://"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_an_object_store_target_is_probed_before_the_run(tmp_path):
    """A table URI with a scheme is opened before anything runs (an unreachable store or missing
    credentials used to fail only at publishing); one where no table exists yet is accepted."""
    open_target(f"file://{tmp_path}/new-table").check()
    assert not (tmp_path / "new-table").exists()


@pytest.fixture
def s3(monkeypatch, tmp_path):
    """A local S3 server (`local_s3`) with one bucket, and the credentials in the environment, as a
    user sets them for a real store."""
    with local_s3(tmp_path / "moto.log") as env:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        yield "s3://datasets"


def test_runs_publish_to_an_object_store_and_prune_what_they_published(s3, prefect_api, small_npz, tmp_path,
                                                                        capsys, monkeypatch):
    """The whole path through S3's protocol: the preflight's probe of a table that does not exist
    yet, the commit and its provenance, a second run that reads the published version back from
    the store as its source, `versions` and the lineage across both."""
    monkeypatch.chdir(tmp_path)  # where a URI mistaken for a local path would be written
    uri = f"{s3}/fmnist-pruned"
    out = tmp_path / "runs"
    quick = ["--model", "cnn", "--epochs", "1"]  # `linear`'s exact 7,850² inverse took 20 s a run here
    assert main(["run", "--dataset", f"npz:{small_npz}", *quick, "--prune-ratio", "0.4",
                 "--out", str(out), "--target", uri]) == 0
    assert f"delta version: {uri}@0" in capsys.readouterr().out
    assert main(["run", "--dataset", f"delta:{uri}@0", *quick, "--prune-ratio", "0.5",
                 "--out", str(out), "--target", uri]) == 0
    assert f"delta version: {uri}@1" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moto.log", "runs"]  # nothing local in the table's place

    runs = sorted(p for p in out.iterdir() if p.name[:1].isdigit())
    rows = list_versions(uri)
    assert [(r["version"], r["rows"], r["provenance"]["run_id"]) for r in rows] == \
        [(1, 600, runs[1].name), (0, 1200, runs[0].name)]
    source = load_dataset(f"npz:{small_npz}")
    selection = pq.read_table(runs[0] / "selection.parquet")
    kept = np.isin(source.sample_id, selection.filter(pc.invert(selection["pruned"]))["sample_id"].to_numpy())
    first = read_version(uri, 0)
    order = np.argsort(first.sample_id)
    assert np.array_equal(first.sample_id[order], source.sample_id[kept]) and \
        np.array_equal(first.x[order], source.x[kept])

    assert main(["versions", uri, "--lineage", "--json"]) == 0
    chains = json.loads(capsys.readouterr().out)
    assert [f"delta:{uri}@1", f"delta:{uri}@0", source.name] in [[node["ref"] for node in c] for c in chains]


def test_workers_without_the_store_s_credentials_are_refused_before_the_run_trains(s3, prefect_api, small_npz,
                                                                                   dask_cluster, tmp_path, capsys):
    """The session's cluster started before the store's credentials were set, like a cluster
    someone started without them: its workers cannot open the table this process can. The run
    refuses in one line before it trains, instead of failing at the influence stage after."""
    uri = f"{s3}/source"
    ds = load_dataset(f"npz:{small_npz}")
    commit_version(uri, ds, np.ones(ds.n, bool), {"run_id": "by-hand"})
    out = tmp_path / "runs"
    code = main(["run", "--dataset", f"delta:{uri}", "--model", "cnn", "--epochs", "1", "--prune-ratio", "0.4",
                 "--out", str(out), "--target", str(tmp_path / "table"), "--dask-address", dask_cluster])
    estimate, error = capsys.readouterr().err.strip().splitlines()  # the influence stage's estimate, then why not
    assert code == 2 and estimate.startswith("influence stage estimate: n=2000")
    assert re.fullmatch(rf"dataset-prune: error: --dask-address {dask_cluster}: worker tcp://\S+ cannot open "
                        rf"delta:{uri}@0 \(.+\); every worker needs this process's access to the data \(the object "
                        r"store's credentials in its environment, the same --data-root\)", error), error
    assert sorted(p.name for p in out.iterdir()) == [".staging"] and not any((out / ".staging").iterdir())
    assert not (tmp_path / "table").exists()


# --- lakeFS (against its API contract) -----------------------------------------------------

@pytest.fixture
def lakefs():
    with FakeLakeFS(repository="datasets", branch="main") as server:
        yield server


def lakefs_target(server, uri="lakefs://datasets/main/tiny/pruned", **kw):
    return LakeFSTarget(uri, endpoint=server.endpoint, access_key=server.access_key,
                        secret_key=kw.get("secret", server.secret_key))


def test_lakefs_commits_tags_and_lists_versions(ds, lakefs, monkeypatch):
    lakefs.staging["main"]["tiny/pruned/stale.bin"] = b"left by someone else"  # committed below
    lakefs.route("POST", "/api/v1/repositories/datasets/branches/main/commits", {},
                 json.dumps({"message": "seed"}).encode(), {"Content-Type": "application/json"})
    target = lakefs_target(lakefs)
    keeps = [np.arange(60) % 2 == 0, np.arange(60) < 10]
    for i, keep in enumerate(keeps):
        assert target.commit(ds, keep, provenance(ds, f"run-{i}", keep)) == i
    for i, keep in enumerate(keeps):
        tree = lakefs.tree(f"tiny-pruned-v{i}")
        assert sorted(tree) == ["tiny/pruned/provenance.json", "tiny/pruned/samples.parquet"]  # stale file gone
        assert_exactly(pq.read_table(pa.BufferReader(tree["tiny/pruned/samples.parquet"])), ds, keep)
    rows = target.versions()
    assert [(r["version"], r["ref"], r["rows"], r["provenance"]["run_id"]) for r in rows] == \
        [(1, "tiny-pruned-v1", 10, "run-1"), (0, "tiny-pruned-v0", 30, "run-0")]
    assert rows[0]["provenance"]["origin"]["source"] == ds.name
    # configured from the environment, as the command line is
    monkeypatch.setenv("LAKEFS_ENDPOINT", lakefs.endpoint)
    monkeypatch.setenv("LAKEFS_ACCESS_KEY_ID", lakefs.access_key)
    monkeypatch.setenv("LAKEFS_SECRET_ACCESS_KEY", lakefs.secret_key)
    assert [[n["ref"] for n in chain] for chain in lineage(target.uri)] == \
        [[f"{target.uri}@tiny-pruned-v{v}", ds.name] for v in (1, 0)]


def test_lakefs_failed_commit_leaves_nothing_staged(ds, lakefs):
    target = lakefs_target(lakefs)
    keep = np.arange(60) < 20
    target.commit(ds, keep, provenance(ds, "first", keep))
    head = lakefs.branches["main"]
    lakefs.fail("POST", "/branches/main/commits", 500)
    with pytest.raises(Exception, match="500"):
        target.commit(ds, ~keep, provenance(ds, "second", ~keep))
    assert lakefs.branches["main"] == head and lakefs.staging["main"] == {}
    assert sorted(lakefs.tags) == ["tiny-pruned-v0"]
    assert ("PUT", "/api/v1/repositories/datasets/branches/main") in lakefs.requests  # the reset


def test_lakefs_refuses_a_dirty_branch_and_bad_credentials(ds, lakefs):
    keep = np.ones(60, bool)
    with pytest.raises(BadInputError, match="check LAKEFS_ACCESS_KEY_ID"):
        lakefs_target(lakefs, secret="wrong").commit(ds, keep, provenance(ds, "r", keep))
    with pytest.raises(BadInputError, match="does the repository and branch exist"):
        lakefs_target(lakefs, uri="lakefs://datasets/nobranch/x").check()
    lakefs.staging["main"]["other/file"] = b"uncommitted"
    with pytest.raises(BadInputError, match="has uncommitted changes"):
        lakefs_target(lakefs).commit(ds, keep, provenance(ds, "r", keep))
    assert lakefs.tags == {} and lakefs.staging["main"] == {"other/file": b"uncommitted"}


# --- lineage ------------------------------------------------------------------------------

def test_versions_view_shows_source_to_pruned_lineage_across_runs(ds, tmp_path, capsys):
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    keep = np.arange(60) < 40
    commit_version(first, ds, keep, provenance(ds, "run-a", keep))
    again = read_version(first, 0)  # prune the pruned version again, into another table
    keep2 = np.arange(again.n) % 2 == 0
    commit_version(second, again, keep2, provenance(again, "run-b", keep2))

    chains = lineage(second)
    assert [[node["ref"] for node in chain] for chain in chains] == [[f"delta:{second}@0", f"delta:{first}@0", ds.name]]
    assert [node["run_id"] for node in chains[0][:2]] == ["run-b", "run-a"]
    assert [node["rows"] for node in chains[0]] == [20, 40, 60]

    assert main(["versions", second, "--lineage"]) == 0
    out = capsys.readouterr().out
    assert "run-b" in out and "run-a" in out and ds.name in out
    assert out.index(second) < out.index(first) < out.index(ds.name)
