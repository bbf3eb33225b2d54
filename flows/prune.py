"""The `prune-dataset` flow: wiring only. Every stage is a task from `tasks/`; the influence
stage is a sub-flow on a Dask task runner (a LocalCluster unless an address is given)."""

from __future__ import annotations

import contextlib
import os
import platform
import secrets
import time
from dataclasses import asdict, replace
from pathlib import Path

import dask
from prefect import flow, get_run_logger
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect_dask import DaskTaskRunner

import pruning_core
from pruning_core import artifacts
from pruning_core.data import Dataset, load_dataset
from pruning_core.influence import format_estimate, shard_ranges
from pruning_core.manifest import influence_entry, rounds_summary, run_manifest, version_provenance
from pruning_core.refs import DatasetRef, ModelRef, Round, RoundResult, ScoresRef, SelectionResult, VersionRef
from pruning_core.selection import round_ratios
from tasks.influence import features_shard, influence_shard, inverse_hessian, merge_scores
from tasks.progress import RunProgress
from tasks.publish import class_balance, commit_dataset_version, draw_figures, emit_version_event, publish_artifacts
from tasks.select import compose_selections, select_samples
from tasks.train import load_checkpoint, train_model

from .cluster import run_cluster
from .parameters import RunParameters
from .preflight import check_workers, influence_estimate, run_preflight


@flow(name="prune-dataset")
def prune_dataset(params: RunParameters, run_id: str | None = None) -> dict:
    """Train, score every sample's influence, select, and publish the kept samples as a new
    Delta version. Returns the manifest. On any failure the staged run folder is removed; the
    staging folder of a run that was killed is removed by the next run on the same `out`."""
    params, run_id, out = start_run(params, run_id)
    final, target = out / run_id, params.target_uri()
    with artifacts.staged_folder(out, run_id, {"flow_run_id": flow_run.get_id(), "pid": os.getpid()}) as staging:
        remove_dead_runs(out)
        timed, progress = Timings(), RunProgress.create(run_id)
        ds = load_dataset(params.dataset, params.data_root)
        if params.dask_address:
            workers_ready(params, ds, staging)
        result = run_rounds(params, staging, final, progress, timed)
        pictures = run_figures(params, staging, result.selection, timed)
        version = publish_version(params, target, run_id, final, ds, result, progress, timed)
        influence = influence_entry(params.influence_args(), result.scores)
        manifest = run_manifest(run_id, final, ds, result.model, influence, result.selection.summary, version,
                                pictures, timings=dict(timed), arguments=params.as_json(), software=software_versions(),
                                mislabelled=result.scores.mislabelled)
        artifacts.save_manifest(manifest, staging)
    emit_version_event(version, run_id)
    publish_artifacts(manifest, class_balance(dataset_of(params), str(artifacts.selection_path(final))))
    get_run_logger().info("run folder %s; version %s@%d", final, version.uri, version.version)
    return manifest


def start_run(params: RunParameters, run_id: str | None) -> tuple[RunParameters, str, Path]:
    """The run's parameters, checked and pinned (a Delta source's version: the one this run loads,
    on every worker), its id and its `--out`, resolved; refused before anything is written where
    the run folder exists or the preflight fails (the scheduler answers, the estimate fits)."""
    params.validate_all()
    params = params.pinned()
    run_id = run_id if run_id is not None else new_run_id()
    out = Path(params.out).expanduser().resolve()
    artifacts.new_run_folder(out, run_id)
    run_preflight(params, load_checkpoint=False)
    return params, run_id, out


def remove_dead_runs(out: Path) -> None:
    """Remove the staging folders of the runs on `out` that died, and end their flow runs Crashed."""
    logger = get_run_logger()
    for stale, owner in artifacts.remove_stale_staging(out).items():
        logger.warning("removed the staging folder of run %s, which died before it finished", stale)
        mark_crashed(owner.get("flow_run_id"), stale, logger)


class Timings(dict):
    """Seconds per stage: `timings(stage, started)` records and logs the time since `started`
    (a `time.perf_counter()` reading)."""

    def __call__(self, stage: str, started: float) -> None:
        self[stage] = round(time.perf_counter() - started, 3)
        get_run_logger().info("stage %s finished in %.1f s", stage, self[stage])


@flow(name="influence-scores")
def influence_scores(params: RunParameters, model: ModelRef, cache: str, scores_out: str, metadata: dict,
                     progress: str | None = None) -> ScoresRef:
    """Features per shard → H⁻¹ → influence per shard → merged scores.parquet. `progress`: the
    run's progress artifact, advanced as each shard finishes."""
    track = RunProgress.attach(progress)
    ds = load_dataset(params.dataset, params.data_root)
    args = params.influence_args()
    ranges = shard_ranges(ds.n, params.shards, args.block_size)
    get_run_logger().info(format_estimate(influence_estimate(params, ds)))
    common = dict(cache=cache, model=model, data=dataset_of(params))
    feature_paths = run_shards(params, features_shard, "features", ranges, track, **common, args=args)
    inverse = inverse_hessian(**common, feature_paths=feature_paths, weight_decay=params.weight_decay, args=args)
    track.update("inverse", 1, 1, inverse.strategy)
    shards = run_shards(params, influence_shard, "influence", ranges, track, **common, inverse=inverse.path, args=args)
    return merge_scores(shards, scores_out, metadata, inverse, cache, model.forgetting, ds.n_classes)


def run_shards(params: RunParameters, task, stage: str, ranges, track: RunProgress, **kwargs) -> list:
    """`task` submitted once per sample range (on GPU workers with --gpu), the run's progress
    advanced as each finishes; the results in the order of `ranges`."""
    with gpu_resources(params):
        futures = [task.submit(**kwargs, start=a, end=b) for a, b in ranges]
    shard_of = {id(f): r for f, r in zip(futures, ranges)}
    for done, future in enumerate(as_completed(futures), 1):
        track.update(stage, done, len(ranges), "samples {}–{}".format(*shard_of[id(future)]))
    return [f.result() for f in futures]


def dataset_of(params: RunParameters) -> DatasetRef:
    """The dataset the run's stages load, as each process names it."""
    return DatasetRef(params.dataset, params.data_root)


def workers_ready(params: RunParameters, ds, folder: Path, reads: tuple[str, ...] = (),
                  model: str | None = None) -> None:
    """Before training: every worker of the given cluster opens the data and the files `reads`,
    builds the user's own model (`model`, else the run's), and shares `folder`
    (`preflight.check_workers`); a cluster with no worker yet is only warned about."""
    if not check_workers(params.dask_address, params.dataset, params.data_root, ds.fingerprint, folder, reads,
                         model or params.model):
        get_run_logger().warning("no Dask worker has joined %s yet: the run cannot check that workers open %s and "
                                 "share %s; it waits for them at the influence stage", params.dask_address,
                                 params.dataset, folder)


def gpu_resources(params: RunParameters):
    """The tasks submitted inside ask for a Dask GPU resource when `params.gpu` is set (workers
    started with `--resources GPU=1`, or a LocalCluster on a CUDA machine): a run's shard tasks,
    an evaluation's retrainings."""
    return dask.annotate(resources={"GPU": 1}) if params.gpu else contextlib.nullcontext()


def software_versions() -> dict:
    import deltalake
    import prefect
    import pyarrow
    import torch

    return {"dataset-pruning": pruning_core.__version__, "pruning_core sha256": pruning_core.code_digest(),
            "python": platform.python_version(),
            "torch": torch.__version__, "prefect": prefect.__version__, "pyarrow": pyarrow.__version__,
            "deltalake": deltalake.__version__, "platform": platform.platform()}


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def mark_crashed(flow_run_id: str | None, run_id: str, logger) -> None:
    """End the flow run of a run found dead Crashed. A run killed outright (SIGKILL, out of memory,
    machine lost) cannot report its own end, so Prefect would show it Running for ever. Nothing
    happens when that flow run is already final or lives on another Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    if not flow_run_id:
        return
    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
            if state is not None and state.is_final():
                return
            client.set_flow_run_state(flow_run_id, Crashed(message=f"run {run_id} died before it finished (found "
                                                                    "by a later run on the same --out)"), force=True)
    except ObjectNotFound:
        return
    except Exception as exc:  # bookkeeping of a dead run: never a reason for this run to fail
        logger.warning("could not mark flow run %s of run %s Crashed: %s", flow_run_id, run_id, exc)
        return
    logger.warning("flow run %s of run %s was %s; marked Crashed", flow_run_id, run_id,
                   state.name if state else "without a state")


def prune_round(params: RunParameters, folder: Path, out: Path, progress: RunProgress, timed, cluster,
                label: str = "") -> RoundResult:
    """One round of a run on `params.dataset`: train (or load --checkpoint), score every sample's
    influence on Dask, select; model.pt, scores.parquet and selection.parquet go to `folder`.
    `timed(stage, started)` records each stage's seconds under `label` + its name; `cluster()`
    returns the address of the run's Dask scheduler (`run_cluster`)."""
    t = time.perf_counter()
    ds = load_dataset(params.dataset, params.data_root)
    ckpt = str(artifacts.checkpoint_path(folder))
    if params.checkpoint:
        model = load_checkpoint(dataset_of(params), params.model, params.checkpoint, ckpt)
    else:
        model = train_model(dataset_of(params), params.train_args(), ckpt)
    timed(label + "train", t)
    progress.update("train", 1, 1, f"test accuracy {model.test_accuracy:.4f}")

    t = time.perf_counter()
    influence_args = params.influence_args()
    key_args = {"dataset": ds.fingerprint, "model": params.model, "checkpoint_sha256": model.checkpoint_sha256,
                "weight_decay": params.weight_decay, "influence": asdict(influence_args)}
    cache = artifacts.claim_folder(out / ".cache" / f"influence-{artifacts.arguments_key(key_args)}", key_args)
    scores_meta = {"influence": asdict(influence_args), "weight_decay": params.weight_decay,
                   "dataset_fingerprint": ds.fingerprint, "checkpoint_sha256": model.checkpoint_sha256}
    scores = influence_scores.with_options(task_runner=DaskTaskRunner(address=cluster()))(
        params, model, str(cache), str(artifacts.scores_path(folder)), scores_meta, progress.artifact_id)
    timed(label + "influence", t)

    t = time.perf_counter()
    selection = select_samples(scores.path, params.selection_args(), str(artifacts.selection_path(folder)),
                               cluster(), progress=progress.artifact_id)
    timed(label + "selection", t)
    get_run_logger().info("%spruned %d of %d samples, objective ‖Σ s_i‖ = %.6g", label, selection.n_pruned, ds.n,
                          selection.objective)
    return RoundResult(model, scores, selection)


def run_rounds(params: RunParameters, staging: Path, final: Path, progress: RunProgress, timed) -> RoundResult:
    """The run's rounds on one Dask cluster (no stage after selection uses it), into `staging`:
    one round, or `--rounds K` (`later_rounds`) with the selection composed over every round
    (`compose_rounds`) and round 1's model and scores. The caches go to `--out` (`final.parent`)."""
    out = final.parent
    n = load_dataset(params.dataset, params.data_root).n
    first_share = round_ratios(params.prune_ratio, params.rounds, n)[0] if params.rounds > 1 else params.prune_ratio
    with run_cluster(params.dask_address, params.workers, params.gpu) as cluster:
        first = prune_round(params.model_copy(update={"prune_ratio": first_share}), staging, out,
                            progress.in_round(1, params.rounds), timed, cluster)
        if params.rounds == 1:
            return first
        rounds = later_rounds(params, artifacts.selection_path(staging), staging / "rounds", out,
                              progress, timed, cluster, first_round=first)
    selection = compose_rounds(params, staging, rounds, final)
    get_run_logger().info("%d rounds pruned %d of %d samples, objective ‖Σ s_i‖ = %.6g with round 1's vectors",
                          params.rounds, selection.n_pruned, n, selection.objective)
    return replace(first, selection=selection)


def later_rounds(params: RunParameters, first_selection: Path, folder: Path, out: Path, progress: RunProgress,
                 timed, cluster, first_round: RoundResult | None = None) -> list[Round]:
    """Rounds 2…K of `--rounds K` (`params.prune_ratio` is the total share pruned; round 1 pruned
    its share `round_ratios(...)[0]` of `params.dataset` into `first_selection`). Round j keeps the
    rows the round before kept as a Delta table (folder/round-j/source, the sample_ids unchanged),
    trains a fresh model on them with the run's recipe, scores and selects its share there.
    Returns every round (round 1's result from `first_round` when given). `cluster`: as for
    `prune_round`."""
    ratios = round_ratios(params.prune_ratio, params.rounds, load_dataset(params.dataset, params.data_root).n)
    done = [Round(1, params.dataset, ratios[0], str(first_selection), result=first_round)]
    for j in range(2, params.rounds + 1):
        here = folder / f"round-{j}"
        here.mkdir(parents=True)
        before = done[-1]
        commit_dataset_version(str(here / "source"), DatasetRef(before.dataset, params.data_root),
                               before.selection_path, {"round": j - 1, "rounds": params.rounds,
                                                       "prune_ratio": before.prune_ratio, "run_dir": str(folder)})
        round_params = params.model_copy(update={"dataset": f"delta:{here / 'source'}@0", "prune_ratio": ratios[j - 1],
                                                 "checkpoint": None, "rounds": 1,
                                                 "data_root": None})  # a table holds its rows
        run = prune_round(round_params, here, out, progress.in_round(j, params.rounds), timed, cluster,
                          label=f"round {j} ")
        done.append(Round(j, round_params.dataset, ratios[j - 1], str(artifacts.selection_path(here)), str(here), run))
    return done


def compose_rounds(params: RunParameters, folder: Path, rounds: list[Round], final: Path) -> SelectionResult:
    """The run's selection.parquet (every sample, with the round that pruned it) from its rounds, round
    1's own moved to rounds/round-1/; its summary with each round's (`manifest.rounds_summary`), its
    paths named as they will be once `folder` is renamed to `final`."""
    first = artifacts.selection_path(folder)
    round_one = artifacts.selection_path(folder / "rounds" / "round-1")
    round_one.parent.mkdir(parents=True)
    os.replace(first, round_one)
    composed = compose_selections(str(artifacts.scores_path(folder)),
                                  [str(round_one)] + [r.selection_path for r in rounds[1:]], str(first),
                                  params.prune_ratio)
    return SelectionResult(str(first), rounds_summary(rounds, composed.summary, folder, final))


def run_figures(params: RunParameters, staging: Path, selection: SelectionResult, timed) -> dict[str, str]:
    """The run's pictures in `staging` ({name: file}); none where they cannot be drawn: a picture
    is never a reason to lose a run."""
    t = time.perf_counter()
    try:
        pictures = draw_figures(dataset_of(params), str(artifacts.scores_path(staging)),
                                str(artifacts.selection_path(staging)), str(staging), selection.objective)
    except Exception as exc:
        get_run_logger().warning("could not draw the run's pictures: %s", exc)
        pictures = {}
    timed("figures", t)
    return pictures


def publish_version(params: RunParameters, target: str, run_id: str, final: Path, ds: Dataset, result: RoundResult,
                    progress: RunProgress, timed) -> VersionRef:
    """Commit the samples the run kept to `target` as a new version recording the run's provenance."""
    t = time.perf_counter()
    provenance = version_provenance(run_id, final, ds, result.model, result.selection.summary, params.as_json())
    version = commit_dataset_version(target, dataset_of(params), result.selection.path, provenance)
    timed("materialise", t)
    progress.update("publish", 1, 1, f"{version.uri}@{version.version}")
    return version
