"""The `prune-dataset` flow under a real Prefect API with real Dask LocalClusters."""

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import HANG, cifar_shaped, gpu_worker
from deltalake import DeltaTable

from flows.parameters import RunParameters
from flows.prune import prune_dataset
from pruning_core.artifacts import claim_folder, load_scores
from pruning_core.data import load_dataset
from pruning_core.errors import DatasetError
from pruning_core.refs import DatasetRef, ModelRef
from pruning_core.selection import objective
from pruning_core.training import accuracy, load_model
from pruning_core.versions import commit_version, read_version


def run(tmp_path, name, **overrides):
    values = dict(model="cnn", epochs=5, prune_ratio=0.4, shards=3, workers=2, block_size=128,
                  out=str(tmp_path / name / "runs"), target=str(tmp_path / name / "table"))
    values.update(overrides)
    return prune_dataset(RunParameters(**values))


@pytest.fixture(scope="module")
def first_run(prefect_api, small_npz, tmp_path_factory, dask_cluster):
    """The module's first run, on the session's warm cluster; the runs that test local clusters
    (shard and worker counts) start their own."""
    tmp = tmp_path_factory.mktemp("flow")
    return tmp, run(tmp, "first", dataset=f"npz:{small_npz}", dask_address=dask_cluster)


def test_flow_publishes_exactly_the_kept_samples(first_run, prefect_api):
    tmp, manifest = first_run
    run_dir = tmp / "first" / "runs" / manifest["run_id"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["examples.png", "forgetting.npy", "manifest.json",
                                                          "mislabelled.png", "model.pt", "scores.parquet",
                                                          "selection.parquet", "selection.png"]
    assert json.loads((run_dir / "manifest.json").read_text()) == json.loads(json.dumps(manifest, default=str))
    assert not any((tmp / "first" / "runs" / ".staging").iterdir())

    scores = pq.read_table(run_dir / "scores.parquet")
    assert scores.schema.field("sample_id").type == "int64" and scores.schema.field("loss").type == "double"
    assert scores.schema.field("influence").type.list_size == 10 * 128 + 10
    table, vectors, _ = load_scores(run_dir / "scores.parquet")
    selection = pq.read_table(run_dir / "selection.parquet")
    pruned = selection.column("pruned").to_numpy(zero_copy_only=False)
    assert pruned.sum() == 800 == manifest["selection"]["n_pruned"]
    assert manifest["selection"]["objective"] == pytest.approx(objective(vectors, pruned), rel=1e-12)
    # the samples that look mislabelled (13 % of this small set, under a cnn at 75 % accuracy) go
    # first; the solver's choice of the rest beats the first others in sample order
    flagged = table.column("mislabelled").to_numpy(zero_copy_only=False)
    assert 0 < flagged.sum() <= 800 and pruned[flagged].all()
    assert manifest["selection"]["solver_info"]["mislabelled_first"] == {"flagged": int(flagged.sum()),
                                                                         "removed_first": int(flagged.sum())}
    arbitrary = flagged | (np.cumsum(~flagged) <= 800 - flagged.sum()) & ~flagged
    assert arbitrary.sum() == 800 and manifest["selection"]["objective"] < objective(vectors, arbitrary)

    delta = DeltaTable(manifest["version"]["uri"], version=manifest["version"]["version"])
    rows = delta.to_pyarrow_table()
    kept = selection.column("sample_id").to_numpy()[~pruned]
    assert sorted(rows.column("sample_id").to_pylist()) == kept.tolist()
    history = delta.history()[0]
    assert json.loads(history["dataset_pruning"])["run_id"] == manifest["run_id"]
    assert 0.5 < manifest["model"]["test_accuracy"] <= 1.0


def test_flow_draws_what_it_pruned_and_carries_the_pictures_to_the_ui(first_run, prefect_api):
    """selection.png and examples.png in the run folder, and inside the summary artifact itself
    (data: URIs: the Prefect UI cannot read the run's files)."""
    import base64

    import matplotlib.image as mpimg
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    tmp, manifest = first_run
    run_dir = tmp / "first" / "runs" / manifest["run_id"]
    assert manifest["figures"] == {"selection": str(run_dir / "selection.png"),
                                   "examples": str(run_dir / "examples.png"),
                                   "mislabelled": str(run_dir / "mislabelled.png")}
    for path in manifest["figures"].values():
        image = mpimg.imread(path)
        assert image.shape[0] > 400 and image.shape[1] > 800 and image.std() > 0.05
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["dataset-pruning-summary"])))
    (summary,) = [a for a in found if a.description == f"Run {manifest['run_id']}"]
    pictures = re.findall(r"!\[(\w+)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", summary.data)
    assert [(name, base64.b64decode(data)) for name, data in pictures] == [
        (name, (run_dir / f"{name}.png").read_bytes()) for name in ("selection", "examples", "mislabelled")]
    flagged = int(pq.read_table(run_dir / "scores.parquet").column("mislabelled").to_numpy(zero_copy_only=False).sum())
    assert manifest["mislabelled"]["count"] == flagged and f"| look mislabelled | {flagged} samples (" in summary.data


def test_a_picture_that_cannot_be_drawn_loses_nothing(first_run, small_npz, cnn_checkpoint, monkeypatch,
                                                      dask_cluster):
    import flows.prune

    tmp, _ = first_run

    def broken(*args, **kwargs):
        raise RuntimeError("no display")

    monkeypatch.setattr(flows.prune, "draw_figures", broken)
    manifest = run(tmp, "no-pictures", dataset=f"npz:{small_npz}", checkpoint=cnn_checkpoint, dask_address=dask_cluster)
    assert manifest["figures"] == {} and manifest["version"]["version"] == 0
    run_dir = tmp / "no-pictures" / "runs" / manifest["run_id"]
    assert not list(run_dir.glob("*.png")) and (run_dir / "selection.parquet").exists()


def test_flow_emits_the_version_event(first_run, prefect_api):
    import time

    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter
    from prefect.events.worker import EventsWorker

    _, manifest = first_run
    EventsWorker.drain_all()  # events are sent in the background, and stored by the server asynchronously
    deadline = time.monotonic() + HANG
    while True:
        with get_client(sync_client=True) as client:
            page = client.read_events(filter=EventFilter(event=EventNameFilter(name=["dataset.version.created"])),
                                      limit=50)
        if any(e.payload.get("run_id") == manifest["run_id"] for e in page.events) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    payloads = [e.payload for e in page.events if e.payload.get("run_id") == manifest["run_id"]]
    assert payloads == [{"uri": manifest["version"]["uri"], "version": manifest["version"]["version"],
                         "run_id": manifest["run_id"], "n_kept": 1200}]
    assert page.events[0].resource.id == "dataset.table"


def test_scores_identical_for_any_shard_and_worker_count(first_run, small_npz):
    tmp, manifest = first_run
    checkpoint = manifest["model"]["checkpoint"]
    outputs = []
    # and the first run's (3, 2), the reference; 7 shards on one worker: the --gpu test below
    for shards, workers in [(1, 1), (7, 2)]:
        m = run(tmp, f"s{shards}w{workers}", dataset=f"npz:{small_npz}", checkpoint=checkpoint,
                shards=shards, workers=workers)
        folder = tmp / f"s{shards}w{workers}" / "runs" / m["run_id"]
        outputs.append(((folder / "scores.parquet").read_bytes(), (folder / "selection.parquet").read_bytes(),
                        pq.read_table(folder / "scores.parquet"), version_rows(m)))
    first = tmp / "first" / "runs" / manifest["run_id"]
    reference = pq.read_table(first / "scores.parquet").drop_columns(["forgetting"])
    for scores_bytes, selection_bytes, table, rows in outputs:
        assert table.equals(reference.replace_schema_metadata(table.schema.metadata))
        assert scores_bytes == outputs[0][0] and selection_bytes == outputs[0][1]
        # the same selection and the same published rows (every column, the sample bytes too) as
        # the run that trained the model
        assert selection_bytes == (first / "selection.parquet").read_bytes()
        assert rows.equals(version_rows(manifest)) and rows.num_rows == 1200


def test_gpu_shards_run_only_on_the_workers_that_offer_the_resource(first_run, small_npz):
    """`--gpu`: the shard tasks ask for the Dask resource GPU=1, so on a cluster where one worker of
    two offers it (a `dask worker --resources GPU=1`, as on a GPU host) only that worker runs them,
    which shows in the models the workers loaded. Its 7 shards on that one worker give the reference's
    scores and selection (on this machine the shards compute on its CPU)."""
    from distributed import Client, LocalCluster

    from flows.cluster import local_cluster_kwargs
    from pruning_core import pipeline

    tmp, manifest = first_run
    plain = local_cluster_kwargs(workers=1)  # one worker, no GPU resource
    with LocalCluster(**plain) as cluster, Client(cluster) as client, gpu_worker(client):
        m = run(tmp, "gpu", dataset=f"npz:{small_npz}", checkpoint=manifest["model"]["checkpoint"], gpu=True,
                shards=7, dask_address=cluster.scheduler_address)
        models = client.run(lambda: pipeline._model_once.cache_info().currsize)
        names = {w["id"]: a for a, w in client.scheduler_info()["workers"].items()}
    assert models[names["gpu-worker"]] == 1 and sum(models.values()) == 1
    folder, first = tmp / "gpu" / "runs" / m["run_id"], tmp / "first" / "runs" / manifest["run_id"]
    scores = pq.read_table(folder / "scores.parquet")
    reference = pq.read_table(first / "scores.parquet").drop_columns(["forgetting"])
    assert scores.equals(reference.replace_schema_metadata(scores.schema.metadata))
    assert (folder / "selection.parquet").read_bytes() == (first / "selection.parquet").read_bytes()


def version_rows(manifest):
    """The rows of a run's Delta version, in sample order."""
    return DeltaTable(manifest["version"]["uri"], version=manifest["version"]["version"]).to_pyarrow_table() \
        .sort_by("sample_id")


def test_pruned_version_trains_and_scores_again(first_run, dask_cluster):
    """A table named without a version is read at its newest version, by every run: the warm
    cluster's workers, which hold an older version of the table loaded under its bare name,
    too. The run records the version it read."""
    tmp, manifest = first_run
    uri, version = manifest["version"]["uri"], manifest["version"]["version"]
    again = run(tmp, "again", dataset=f"delta:{uri}", prune_ratio=0.25, dask_address=dask_cluster)
    assert again["arguments"]["dataset"] == f"delta:{uri}@{version}"
    assert again["dataset"]["n"] == 1200 and again["selection"]["n_pruned"] == 300
    first_rows = DeltaTable(uri, version=version).to_pyarrow_table()
    rows = DeltaTable(again["version"]["uri"]).to_pyarrow_table()
    assert set(rows.column("sample_id").to_pylist()) < set(first_rows.column("sample_id").to_pylist())
    assert rows.num_rows == 900

    older = read_version(uri, version)
    newer = commit_version(uri, older, np.arange(older.n) < 600, {"run_id": "by-hand"})
    third = run(tmp, "third", dataset=f"delta:{uri}", prune_ratio=0.25, dask_address=dask_cluster)
    assert third["arguments"]["dataset"] == f"delta:{uri}@{newer}" and third["dataset"]["n"] == 600
    scores = pq.read_table(tmp / "third" / "runs" / third["run_id"] / "scores.parquet")
    assert scores.column("sample_id").to_pylist() == older.sample_id[:600].tolist()


def test_the_paper_s_resnet18_runs_on_cifar_shaped_images(prefect_api, fmnist, tmp_path, dask_cluster):
    """The GPU recipe's model (docs/guide.md#the-papers-setting-resnet-18-on-cifar-10-on-gpus) end
    to end, on the CPU and small: `resnet18` trained 1 epoch on 128 real images shaped as
    CIFAR-10's (3 x 32 x 32), its influence over the last layer (512 features and a bias per
    class), the selection, the Delta version and the pictures, in colour."""
    import matplotlib.image as mpimg

    path = tmp_path / "cifar-shaped.npz"
    np.savez(path, x=cifar_shaped(fmnist.x[:128]), y=fmnist.y[:128], x_test=cifar_shaped(fmnist.x_test[:32]),
             y_test=fmnist.y_test[:32])
    manifest = run(tmp_path, "resnet18", dataset=f"npz:{path}", model="resnet18", epochs=1, shards=1, block_size=64,
                   dask_address=dask_cluster)
    run_dir = tmp_path / "resnet18" / "runs" / manifest["run_id"]
    assert manifest["arguments"]["model"] == "resnet18"
    ds = load_dataset(f"npz:{path}")  # the accuracy reported is the saved model's on the 32 test images
    model = load_model(str(run_dir / "model.pt"), "resnet18", ds, device="cpu")
    assert manifest["model"]["test_accuracy"] == accuracy(model, ds.x_test, ds.y_test, "cpu")
    table, vectors, _ = load_scores(run_dir / "scores.parquet")
    assert vectors.shape == (128, 10 * 512 + 10) and np.isfinite(vectors).all() and (vectors != 0).any()
    pruned = pq.read_table(run_dir / "selection.parquet").column("pruned").to_numpy(zero_copy_only=False)
    assert pruned.sum() == round(0.4 * 128) == manifest["selection"]["n_pruned"]
    assert manifest["selection"]["objective"] == pytest.approx(objective(vectors, pruned), rel=1e-12)
    assert version_rows(manifest).num_rows == 128 - pruned.sum()
    image = mpimg.imread(run_dir / "examples.png")
    assert image.shape[2] >= 3 and image.std() > 0.05


def test_sharded_dask_scores_equal_one_plain_process(first_run, small_npz, tmp_path):
    """The stage functions called in this process (one shard, no Dask, no Prefect) give the same
    table as the 3-shard run on a 2-worker LocalCluster. Both run on the stages' fixed one thread:
    the bits depend on the intra-op thread count on some CPUs (AVX-512: 2 threads moved the
    influence vectors by an ulp or two), which is why the stages pin it."""
    from pruning_core import pipeline

    tmp, manifest = first_run
    model, data = trained_model(manifest), DatasetRef(f"npz:{small_npz}")
    args = RunParameters(dataset=data.spec, prune_ratio=0.4, block_size=128).influence_args()
    features = pipeline.features_shard_stage(tmp_path, model, data, 0, 2000, args)
    inverse = pipeline.inverse_stage(tmp_path, model, data, args, feature_paths=[features], weight_decay=5e-4)
    shard = pipeline.influence_shard_stage(tmp_path, model, data, 0, 2000, args, inverse=inverse.path)
    flow_scores = pq.read_table(tmp / "first" / "runs" / manifest["run_id"] / "scores.parquet")
    merged = flow_scores.drop_columns(["forgetting", "mislabelled"])  # columns the merge adds
    assert pq.read_table(shard).equals(merged.replace_schema_metadata(None))


def test_a_shard_stage_that_loads_other_data_than_the_run_trained_on_writes_nothing(first_run, small_npz, tmp_path):
    """The cache folder is claimed for the data the run trained on (its fingerprint). A worker
    that loads other data under the same name (another machine's file at that path) is refused
    before it writes a shard there that this run and later ones would take for the run's."""
    from pruning_core import pipeline

    tmp, manifest = first_run
    model, data = trained_model(manifest), DatasetRef(f"npz:{small_npz}")
    args = RunParameters(dataset=data.spec, prune_ratio=0.4, block_size=128).influence_args()
    cache = claim_folder(tmp_path / "cache", {"dataset": "0" * 64})
    with pytest.raises(DatasetError,
                       match=r"is not the data this run trained on \(fingerprint \w{12}, not 000000000000\)"):
        pipeline.features_shard_stage(cache, model, data, 0, 100, args)
    inverse = tmp / "first" / "runs" / ".cache"
    inverse = next(inverse.glob("influence-*/inverse*.npy"))
    with pytest.raises(DatasetError, match="is not the data this run trained on"):
        pipeline.influence_shard_stage(cache, model, data, 0, 100, args, inverse=str(inverse))
    assert [p.name for p in cache.iterdir()] == ["arguments.json"]


def trained_model(manifest: dict) -> ModelRef:
    """The model a run's manifest records, as the stages take it."""
    m = manifest["model"]
    return ModelRef(m["name"], m["checkpoint"], m["checkpoint_sha256"], m["test_accuracy"], m["train_accuracy"],
                    m["seconds"])


def test_a_worker_s_view_of_a_run_names_what_it_lacks(small_npz, tmp_path):
    """What the run asks each worker of a given cluster before it trains (`worker_view`), and the
    one-line reason it gives for a worker that cannot take part (`worker_problem`)."""
    from flows.preflight import worker_problem
    from pruning_core import code_digest
    from pruning_core.data import load_dataset
    from pruning_core.pipeline import worker_view

    spec, here = f"npz:{small_npz}", load_dataset(f"npz:{small_npz}").fingerprint
    probe = tmp_path / ".workers-probe"
    probe.write_text("t0k3n")
    view = worker_view(spec, None, str(probe))
    assert view == {"code": code_digest(), "fingerprint": here, "probe": "t0k3n"}
    assert worker_problem(view, spec, here, "t0k3n", tmp_path) is None
    assert list(tmp_path.iterdir()) == [probe]  # the file it wrote beside the probe is gone
    assert worker_problem(view, spec, "f" * 64, "t0k3n", tmp_path) == (
        f"loads other data as {spec} (fingerprint {here[:12]}, not ffffffffffff as here); every worker must see the "
        "same data under the same name")
    assert "it holds another run's probe" in worker_problem(view, spec, here, "other", tmp_path)

    absent, elsewhere = f"npz:{tmp_path / 'absent.npz'}", tmp_path / "elsewhere"
    lost = worker_view(absent, None, str(elsewhere / ".workers-probe"))
    assert worker_problem(lost, absent, here, "t0k3n", elsewhere) == (
        f"cannot open {absent} ({absent}: file not found); every worker needs this process's access to the data (the "
        "object store's credentials in its environment, the same `data_root`)")
    folderless = worker_view(spec, None, str(elsewhere / ".workers-probe"))
    assert re.fullmatch(rf"cannot use the run's folder {elsewhere} \(\[Errno 2\] No such file or directory: .+\); the "
                        r"workers read the model there and write their shards beside it, so they must share `out`'s "
                        r"filesystem with this process", worker_problem(folderless, spec, here, "t0k3n", elsewhere))
    gone = [str(tmp_path / "scores.parquet"), str(tmp_path / "model.pt")]
    assert worker_problem(worker_view(spec, None, str(probe), (str(probe), *gone)), spec, here, "t0k3n", tmp_path) == (
        f"cannot read {gone[0]} ([Errno 2] No such file or directory: '{gone[0]}') and 1 more; the workers read it "
        "themselves, so they must share its filesystem with this process")
    assert worker_problem(ModuleNotFoundError("No module named 'pruning_core'"), spec, here, "t0k3n", tmp_path) == (
        "cannot run dataset-prune's code (No module named 'pruning_core'); install the same dataset-prune on every "
        "worker")
    assert worker_problem(MemoryError("Unable to allocate 4.7 GiB"), spec, here, "t0k3n", tmp_path) == (
        "failed while it was asked (MemoryError: Unable to allocate 4.7 GiB)")
    assert worker_problem({**view, "code": "0123456789abcdef"}, spec, here, "t0k3n", tmp_path) == (
        f"runs other dataset-prune code (its pruning_core sources hash to 0123456789ab, here to {code_digest()[:12]}); "
        "install the same dataset-prune on every worker")


def test_the_code_digest_changes_with_any_source_of_pruning_core(tmp_path):
    """What tells a worker's code from the run's: the package's sources, not its version number."""
    import shutil
    import subprocess
    import sys

    import pruning_core

    copy = tmp_path / "pruning_core"
    shutil.copytree(Path(pruning_core.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    digest = [sys.executable, "-c", "import pruning_core; print(pruning_core.code_digest())"]

    def digest_of_copy():
        return subprocess.run(digest, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)},
                              capture_output=True, text=True, check=True).stdout.strip()
    assert digest_of_copy() == pruning_core.code_digest()
    with (copy / "selection.py").open("a") as f:
        f.write("\n# an edit\n")
    assert digest_of_copy() != pruning_core.code_digest()


@pytest.mark.parametrize("extra", [["--method", "el2n"], ["--class-balanced"], ["--method", "forgetting"]])
def test_select_command_over_stored_scores(first_run, tmp_path, extra, capsys):
    from flows.cli import main

    tmp, manifest = first_run
    scores = tmp / "first" / "runs" / manifest["run_id"] / "scores.parquet"
    out = tmp_path / "selection.parquet"
    assert main(["select", "--scores", str(scores), "--prune-ratio", "0.3", *extra, "--out", str(out)]) == 0
    table = pq.read_table(out)
    pruned = table.column("pruned").to_numpy(zero_copy_only=False)
    assert pruned.sum() == 600 and "pruned 600 of 2000" in capsys.readouterr().out
    if "--class-balanced" in extra:
        labels = pq.read_table(scores).column("label").to_numpy()
        counts = np.bincount(labels[pruned], minlength=10)
        assert np.abs(counts - 0.3 * np.bincount(labels, minlength=10)).max() <= 1


def test_select_draws_the_pictures_of_its_own_selection(first_run, small_npz, tmp_path, capsys):
    """`select --pictures DIR` draws what a run draws, of the new selection, with the dataset the
    scores' run folder names; without that folder's manifest, or with a dataset that no longer
    lists the scored samples, it refuses in one line before selecting, and writes nothing."""
    from flows.cli import main
    from pruning_core import figures
    from pruning_core.data import load_dataset

    tmp, manifest = first_run
    run_dir = tmp / "first" / "runs" / manifest["run_id"]
    out, pictures = tmp_path / "el2n.parquet", tmp_path / "pictures"
    assert main(["select", "--scores", str(run_dir / "scores.parquet"), "--prune-ratio", "0.3", "--method", "el2n",
                 "--out", str(out), "--pictures", str(pictures)]) == 0
    printed = capsys.readouterr().out
    assert f"pictures:      {pictures / 'selection.png'}, {pictures / 'examples.png'}, " \
           f"{pictures / 'mislabelled.png'}" in printed
    assert sorted(p.name for p in pictures.iterdir()) == ["examples.png", "mislabelled.png",
                                                           "selection.png"]  # no drawing folder left
    direct = tmp_path / "direct"
    direct.mkdir()
    summary = json.loads(pq.read_schema(out).metadata[b"dataset_pruning"])
    figures.draw_run(direct, load_dataset(f"npz:{small_npz}"), run_dir / "scores.parquet", out, summary["objective"])
    for name in ("selection.png", "examples.png"):
        assert (pictures / name).read_bytes() == (direct / name).read_bytes()
        # the run's own pruned 40 %, by influence
        assert (pictures / name).read_bytes() != (run_dir / name).read_bytes()

    alone, moved, nameless = tmp_path / "alone", tmp_path / "moved", tmp_path / "nameless"
    for folder in (alone, moved, nameless):
        folder.mkdir()
        (folder / "scores.parquet").write_bytes((run_dir / "scores.parquet").read_bytes())
    np.savez(tmp_path / "other.npz", **{k: v[:1000] for k, v in np.load(small_npz).items()})
    used = {**manifest, "arguments": {**manifest["arguments"], "dataset": f"npz:{tmp_path / 'other.npz'}"}}
    (moved / "manifest.json").write_text(json.dumps(used, default=str))
    (nameless / "manifest.json").write_text(json.dumps({**manifest, "arguments": {}}, default=str))
    for folder, message in ((alone, "no manifest.json, so the dataset to draw --pictures from is not known"),
                            (moved, "no longer lists the samples"),
                            (nameless, "its manifest names no dataset, so the dataset to draw --pictures from is")):
        refused = tmp_path / f"{folder.name}.parquet"
        assert main(["select", "--scores", str(folder / "scores.parquet"), "--prune-ratio", "0.3",
                     "--out", str(refused), "--pictures", str(tmp_path / f"{folder.name}-pictures")]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, err
        assert not refused.exists() and not (tmp_path / f"{folder.name}-pictures").exists()


def test_select_train_epochs_shifts_the_hard_cut_by_the_run_s_own_epochs(first_run, tmp_path, capsys):
    """`select --train-epochs N` reads the scoring run's epochs (5) from the manifest beside --scores:
    twice them cuts 10 % at 80 % pruned instead of 15 %, four times 5 %, fewer than half of them 25 %;
    without the run's manifest the budget is not known and the command refuses in one line."""
    from flows.cli import main

    tmp, manifest = first_run
    scores = tmp / "first" / "runs" / manifest["run_id"] / "scores.parquet"
    assert manifest["arguments"]["epochs"] == 5
    cuts = {}
    for train_epochs in (None, 10, 20, 2):
        out = tmp_path / f"selection-{train_epochs}.parquet"
        extra = ["--train-epochs", str(train_epochs)] if train_epochs else []
        assert main(["select", "--scores", str(scores), "--prune-ratio", "0.8", *extra, "--no-mislabel-first",
                     "--out", str(out)]) == 0  # the whole cut from the hardest, none of it flagged first
        coverage = json.loads(pq.read_schema(out).metadata[b"dataset_pruning"])["solver_info"]["coverage"]
        cuts[train_epochs] = (coverage["hard_fraction"], coverage["hard_cut"], coverage["train_budget"])
    assert cuts == {None: (0.15, 300, 1.0), 10: (0.1, 200, 2.0), 20: (0.05, 100, 4.0), 2: (0.25, 500, 0.4)}
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "scores.parquet").write_bytes(scores.read_bytes())
    capsys.readouterr()
    assert main(["select", "--scores", str(alone / "scores.parquet"), "--prune-ratio", "0.8", "--train-epochs", "8",
                 "--out", str(tmp_path / "refused.parquet")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no manifest.json" in err, err
    assert not (tmp_path / "refused.parquet").exists()


@pytest.mark.integration
def test_local_dask_workers_keep_glibc_malloc_defaults(monkeypatch):
    """Dask's default MALLOC_TRIM_THRESHOLD_=65536 halves training speed in a worker (every large
    tensor mapped afresh); the product's local clusters start their workers without it, also
    when an earlier cluster copied it into this process's environment."""
    import os

    from distributed import Client, LocalCluster

    from flows.cluster import local_cluster_kwargs

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")  # as a previous Nanny leaves it
    kwargs = local_cluster_kwargs(workers=1)
    with LocalCluster(**kwargs) as cluster, Client(cluster) as client:
        seen = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
    assert list(seen.values()) == [None]


@pytest.mark.integration
def test_local_cluster_dashboard_link_answers_on_loopback():
    """prefect-dask logs the client's dashboard link at the start of a run: the link must open
    (with no dashboard, Dask still answers on 8787 with its health routes only: 404)."""
    import urllib.parse
    import urllib.request

    from distributed import Client, LocalCluster

    from flows.cluster import local_cluster_kwargs

    kwargs = local_cluster_kwargs(workers=1)
    with LocalCluster(**kwargs) as cluster, Client(cluster) as client:
        link = client.dashboard_link
        with urllib.request.urlopen(link, timeout=30) as page:
            status, body = page.status, page.read()
    assert urllib.parse.urlsplit(link).hostname == "127.0.0.1"
    assert status == 200 and b"Dask" in body


@pytest.mark.integration
def test_a_run_s_local_cluster_starts_once_when_asked_and_closes_with_the_run():
    """`run_cluster`: the local cluster every stage of a run shares starts when a stage first asks
    for it, answers at one address however often it is asked, and is gone when the run ends; a run
    that ends before any stage asked starts none. Its workers outlive a SIGINT (Ctrl-C reaches the
    whole process group; the command closes the cluster itself). A given scheduler is passed
    through and nothing is started."""
    import os
    import signal

    import psutil
    from distributed import Client

    from flows.cluster import run_cluster

    before = {p.pid for p in psutil.Process().children(recursive=True)}

    def started():  # but multiprocessing's resource tracker, which lives as long as this process
        return [p for p in psutil.Process().children(recursive=True)
                if p.pid not in before and "resource_tracker" not in " ".join(p.cmdline())]

    with pytest.raises(RuntimeError, match="the run failed"), run_cluster(None, workers=1):
        assert not started()
        raise RuntimeError("the run failed")
    with run_cluster(None, workers=1) as cluster:
        address = cluster()
        assert cluster() == address
        with Client(address) as client:
            (pid,) = client.run(os.getpid).values()
            os.kill(pid, signal.SIGINT)
            with pytest.raises(psutil.TimeoutExpired):
                psutil.Process(pid).wait(timeout=3)
            assert list(client.run(os.getpid).values()) == [pid]
    with pytest.raises(OSError):
        Client(address, timeout=3)
    _, alive = psutil.wait_procs(started(), timeout=HANG)
    assert not alive, [" ".join(p.cmdline())[:100] for p in alive]
    with run_cluster("tcp://127.0.0.1:1", workers=1) as given:
        assert given() == "tcp://127.0.0.1:1"
    assert not started()


def test_release_memory_trims_glibc_s_heap_and_does_nothing_without_it(monkeypatch):
    """With glibc: malloc_trim(0) on libc.so.6. A libc without malloc_trim (musl) or no libc.so.6
    at all: nothing to do, and no error."""
    import ctypes

    from pruning_core.pipeline import release_memory

    calls = []

    class Glibc:
        def __init__(self, name):
            calls.append(name)

        def malloc_trim(self, pad):
            calls.append(("malloc_trim", pad))
            return 1

    class Musl:
        def __init__(self, name):
            calls.append(name)

    def missing(name):
        calls.append(name)
        raise OSError(f"{name}: cannot open shared object file")

    for libc in (Glibc, Musl, missing):
        monkeypatch.setattr(ctypes, "CDLL", libc)
        assert release_memory() is None
    assert calls == ["libc.so.6", ("malloc_trim", 0), "libc.so.6", "libc.so.6"]


def test_a_selection_that_keeps_nothing_publishes_nothing(first_run, small_npz, tmp_path, capsys, dask_cluster):
    """An ε above the whole set's ‖Σ s_i‖ would remove every sample: the run stops with one clear
    error before a version without samples is written, and leaves no run folder; the run's task and
    flow logs keep the reason without a traceback; `select` writes no file."""
    from flows.cli import main

    tmp, manifest = first_run
    run_dir = tmp / "first" / "runs" / manifest["run_id"]
    records = []
    keep = logging.Handler()
    keep.emit = records.append
    loggers = [logging.getLogger(name) for name in ("prefect.task_runs", "prefect.flow_runs")]
    for logger in loggers:
        logger.addHandler(keep)
    try:
        code = main(["run", "--dataset", f"npz:{small_npz}", "--model", "cnn",
                     "--checkpoint", str(run_dir / "model.pt"), "--epsilon", "1e9", "--shards", "1",
                     "--dask-address", dask_cluster, "--block-size", "128", "--no-progress",
                     "--out", str(tmp_path / "eps" / "runs"), "--target", str(tmp_path / "eps" / "table")])
    finally:
        for logger in loggers:
            logger.removeHandler(keep)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and re.fullmatch(r"dataset-prune: error: --epsilon 1e\+09 removes all 2000 samples .* so nothing "
                                      r"would be kept; give a smaller value", err[-1]), err[-3:]
    failed = [r for r in records if "removes all 2000 samples" in r.getMessage()]
    assert len(failed) >= 2 and not any(r.exc_info for r in failed)  # the task's and the flow's failure
    runs = tmp_path / "eps" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == [".cache", ".staging"] and not any((runs / ".staging").iterdir())
    assert not (tmp_path / "eps" / "table").exists()

    out = tmp_path / "selection.parquet"
    assert main(["select", "--scores", str(run_dir / "scores.parquet"), "--epsilon", "1e9", "--out", str(out)]) == 2
    assert "removes all 2000 samples" in capsys.readouterr().err and not out.exists()


def test_rounds_rescore_what_the_earlier_rounds_kept(first_run, small_npz):
    """--rounds 2 at 0.4: round 1 prunes 20 % of the samples with the run's model; round 2 trains a
    fresh model on the 1,600 kept (a Delta table in the run folder, sample ids unchanged), scores
    them and prunes 25 % of them; one version of the 1,200 left is published, one selection lists
    every sample with the round that pruned it. Both rounds score on the run's one local cluster,
    which is closed when the run ends."""
    import logging

    from distributed import Client

    from flows.cli import _lineage_text
    from pruning_core.targets import lineage
    from tasks.progress import listening

    tmp, first = first_run
    seen, runner_log = [], logging.getLogger("prefect.task_runner.dask")
    said = logging.Handler()
    said.emit = lambda record: seen.append((None, record.getMessage()))
    runner_log.addHandler(said)
    try:
        with listening(lambda value, text: seen.append((value, text))):
            manifest = run(tmp, "rounds", dataset=f"npz:{small_npz}", rounds=2)
    finally:
        runner_log.removeHandler(said)
    connected = [t for v, t in seen if v is None and t.startswith("Connecting to an existing Dask cluster at ")]
    assert len(connected) == 2 and len(set(connected)) == 1, [t for v, t in seen if v is None]
    with pytest.raises(OSError):
        Client(connected[0].rsplit(" ", 1)[1], timeout=3)
    seen = [(v, t) for v, t in seen if v is not None]
    # one bar for the whole run: each round fills its half, never going back
    values = [v for v, _ in seen]
    assert values == sorted(values) and values[-1] == 100.0
    assert max(v for v, t in seen if t.startswith("round 1/2 · ")) <= 50 < min(v for v, t in seen
                                                                               if t.startswith("round 2/2 · "))
    run_dir = tmp / "rounds" / "runs" / manifest["run_id"]
    sel = manifest["selection"]
    assert (sel["n_pruned"], sel["n_kept"], sel["pruned_per_round"]) == (800, 1200, [400, 400])
    assert [(r["round"], r["n_pruned"]) for r in sel["rounds"]] == [(1, 400), (2, 400)]
    assert [r["prune_ratio"] for r in sel["rounds"]] == pytest.approx([0.2, 0.25])
    selection = pq.read_table(run_dir / "selection.parquet")
    ids = selection.column("sample_id").to_numpy()
    pruned = selection.column("pruned").to_numpy(zero_copy_only=False)
    in_round = selection.column("round").to_numpy()
    assert ids.tolist() == list(range(2000)) and ((in_round > 0) == pruned).all()

    one = pq.read_table(run_dir / "rounds" / "round-1" / "selection.parquet")
    assert (one.column("pruned").to_numpy(zero_copy_only=False) == (in_round == 1)).all()
    two_dir = run_dir / "rounds" / "round-2"
    table, vectors, meta = load_scores(two_dir / "scores.parquet")
    assert table.column("sample_id").to_numpy().tolist() == ids[in_round != 1].tolist()  # what round 1 kept
    model_two = sel["rounds"][1]
    assert model_two["folder"] == str(two_dir) and model_two["dataset"] == f"delta:{two_dir / 'source'}@0"
    assert meta["checkpoint_sha256"] != manifest["checkpoint_sha256"]  # scored by its own, fresh model
    two = pq.read_table(two_dir / "selection.parquet")
    assert (two.column("pruned").to_numpy(zero_copy_only=False) == (in_round[in_round != 1] == 2)).all()
    assert model_two["objective"] == pytest.approx(objective(vectors, two.column("pruned").to_numpy(
        zero_copy_only=False)), rel=1e-9)
    # the run's objective: the first round's (full-data) vectors over the whole pruned set
    _, full_vectors, _ = load_scores(run_dir / "scores.parquet")
    assert sel["objective"] == pytest.approx(objective(full_vectors, pruned), rel=1e-9)
    # the rounds' sources read back from the finished run folder; the target received one version
    from pruning_core.data import load_dataset

    assert load_dataset(model_two["dataset"]).n == 1600
    assert version_rows(manifest).column("sample_id").to_pylist() == ids[~pruned].tolist()
    assert DeltaTable(manifest["version"]["uri"]).version() == 0
    assert not any((tmp / "rounds" / "runs" / ".staging").iterdir())
    (chain,) = lineage(manifest["version"]["uri"])
    source = load_dataset(f"npz:{small_npz}").name
    assert (chain[0]["rounds"], chain[0]["prune_ratio"], chain[1]["ref"]) == (2, 0.4, source)
    assert f"pruned by run {manifest['run_id']} (influence/greedy, ratio 0.4, in 2 rounds) from {source}" in \
        _lineage_text(chain)


def test_a_round_that_fails_leaves_nothing(first_run, small_npz, monkeypatch, dask_cluster):
    """A failure after round 2 has trained and scored: no run folder, no staging, no version."""
    import flows.prune

    tmp, _ = first_run

    def broken(*args, **kwargs):
        raise RuntimeError("composition failed")

    monkeypatch.setattr(flows.prune, "compose_rounds", broken)
    with pytest.raises(RuntimeError, match="composition failed"):
        run(tmp, "broken", dataset=f"npz:{small_npz}", rounds=2, epochs=2, dask_address=dask_cluster)
    runs = tmp / "broken" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == [".cache", ".staging"] and not any((runs / ".staging").iterdir())
    assert not (tmp / "broken" / "table").exists()
