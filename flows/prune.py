"""The `prune-dataset` flow: wiring only. Every stage is a task from `tasks/`; the influence
stage is a sub-flow on a Dask task runner (a LocalCluster unless an address is given)."""

from __future__ import annotations

import contextlib
import os
import platform
import secrets
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import dask
from prefect import flow, get_run_logger
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect_dask import DaskTaskRunner

import pruning_core
from pruning_core import artifacts
from pruning_core.data import dataset_summary, load_dataset
from pruning_core.errors import BadInputError
from pruning_core.influence import format_estimate, shard_ranges
from pruning_core.selection import round_ratios
from tasks.influence import features_shard, influence_shard, inverse_hessian, merge_scores
from tasks.progress import RunProgress
from tasks.publish import class_balance, commit_dataset_version, draw_figures, emit_version_event, publish_artifacts
from tasks.select import compose_selections, select_samples
from tasks.train import load_checkpoint, train_model

from .cluster import run_cluster
from .parameters import RunParameters
from .preflight import check_workers, influence_estimate, run_preflight


@flow(name="influence-scores")
def influence_scores(params: RunParameters, model: dict, cache: str, scores_out: str, metadata: dict,
                     progress: str | None = None) -> dict:
    """Features per shard → H⁻¹ → influence per shard → merged scores.parquet. `progress`: the
    run's progress artifact, advanced as each shard finishes."""
    track = RunProgress.attach(progress)
    ds = load_dataset(params.dataset, params.data_root)
    args = params.influence_args()
    ranges = shard_ranges(ds.n, params.shards, args.block_size)
    get_run_logger().info(format_estimate(influence_estimate(params, ds)))
    common = dict(cache=cache, model=model, dataset=params.dataset, data_root=params.data_root)
    with gpu_resources(params):
        feature_futures = [features_shard.submit(**common, start=a, end=b, args=args) for a, b in ranges]
    shard_of = {id(f): r for f, r in zip(feature_futures, ranges)}
    for done, future in enumerate(as_completed(feature_futures), 1):
        track.update("features", done, len(ranges), "samples {}–{}".format(*shard_of[id(future)]))
    feature_paths = [f.result() for f in feature_futures]
    inverse = inverse_hessian(**common, feature_paths=feature_paths, weight_decay=params.weight_decay, args=args)
    track.update("inverse", 1, 1, inverse["strategy"])
    with gpu_resources(params):
        score_futures = [influence_shard.submit(**common, start=a, end=b, inverse=inverse["path"], args=args)
                         for a, b in ranges]
    shard_of = {id(f): r for f, r in zip(score_futures, ranges)}
    for done, future in enumerate(as_completed(score_futures), 1):
        track.update("influence", done, len(ranges), "samples {}–{}".format(*shard_of[id(future)]))
    solve = {k: v for k, v in inverse.items() if k not in ("path", "seconds")}  # equal inputs, equal bytes
    merged = merge_scores([f.result() for f in score_futures], scores_out, {**metadata, "inverse": solve},
                          model.get("forgetting"))
    return {**merged, "inverse": inverse}


def workers_ready(params: RunParameters, ds, folder: Path, reads: tuple[str, ...] = ()) -> None:
    """Before training: every worker of the given cluster opens the data and the files `reads`,
    and shares `folder` (`preflight.check_workers`); a cluster with no worker yet is only warned
    about."""
    if not check_workers(params.dask_address, params.dataset, params.data_root, ds.fingerprint, folder, reads):
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
                label: str = "") -> dict:
    """One round of a run on `params.dataset`: train (or load --checkpoint), score every sample's
    influence on Dask, select; model.pt, scores.parquet and selection.parquet go to `folder`.
    `timed(stage, started)` records each stage's seconds under `label` + its name; `cluster()`
    returns the address of the run's Dask scheduler (`run_cluster`)."""
    logger = get_run_logger()
    t = time.perf_counter()
    ds = load_dataset(params.dataset, params.data_root)
    ckpt = str(artifacts.checkpoint_path(folder))
    if params.checkpoint:
        model = load_checkpoint(params.dataset, params.data_root, params.model, params.checkpoint, ckpt)
    else:
        model = train_model(params.dataset, params.data_root, params.train_args(), ckpt)
    model["name"] = params.model
    timed(label + "train", t)
    progress.update("train", 1, 1, f"test accuracy {model['test_accuracy']:.4f}")

    t = time.perf_counter()
    influence_args = params.influence_args()
    key_args = {"dataset": ds.fingerprint, "model": params.model, "checkpoint_sha256": model["checkpoint_sha256"],
                "weight_decay": params.weight_decay, "influence": asdict(influence_args)}
    cache = artifacts.claim_folder(out / ".cache" / f"influence-{artifacts.arguments_key(key_args)}", key_args)
    scores_meta = {"influence": asdict(influence_args), "weight_decay": params.weight_decay,
                   "dataset_fingerprint": ds.fingerprint, "checkpoint_sha256": model["checkpoint_sha256"]}
    scores = influence_scores.with_options(task_runner=DaskTaskRunner(address=cluster()))(
        params, model, str(cache), str(artifacts.scores_path(folder)), scores_meta, progress.artifact_id)
    timed(label + "influence", t)

    t = time.perf_counter()
    selection = select_samples(scores["path"], params.selection_args(), str(artifacts.selection_path(folder)),
                               cluster(), progress=progress.artifact_id)
    timed(label + "selection", t)
    logger.info("%spruned %d of %d samples, objective ‖Σ s_i‖ = %.6g", label, selection["n_pruned"], ds.n,
                selection["objective"])
    return {"model": model, "scores": scores, "selection": selection, "cache": cache}


def later_rounds(params: RunParameters, first_selection: Path, folder: Path, out: Path, progress: RunProgress,
                 timed, cluster, first_round: dict | None = None) -> list[dict]:
    """Rounds 2…K of `--rounds K` (`params.prune_ratio` is the total share pruned; round 1 pruned
    its share `round_ratios(...)[0]` of `params.dataset` into `first_selection`). Round j keeps the
    rows the round before kept as a Delta table (folder/round-j/source, the sample_ids unchanged),
    trains a fresh model on them with the run's recipe, scores and selects its share there.
    Returns every round's {dataset, prune_ratio, folder, model, selection} (round 1's from
    `first_round` when given). `cluster`: as for `prune_round`."""
    ratios = round_ratios(params.prune_ratio, params.rounds, load_dataset(params.dataset, params.data_root).n)
    done = [{"round": 1, "dataset": params.dataset, "prune_ratio": ratios[0], "selection_path": str(first_selection),
             **({"model": first_round["model"], "selection": first_round["selection"]} if first_round else {})}]
    for j in range(2, params.rounds + 1):
        here = folder / f"round-{j}"
        here.mkdir(parents=True)
        before = done[-1]
        commit_dataset_version(str(here / "source"), before["dataset"], params.data_root, before["selection_path"],
                               {"round": j - 1, "rounds": params.rounds, "prune_ratio": before["prune_ratio"],
                                "run_dir": str(folder)})
        round_params = params.model_copy(update={"dataset": f"delta:{here / 'source'}@0", "prune_ratio": ratios[j - 1],
                                                 "checkpoint": None, "rounds": 1,
                                                 "data_root": None})  # a table holds its rows
        run = prune_round(round_params, here, out, progress.in_round(j, params.rounds), timed, cluster,
                          label=f"round {j} ")
        done.append({"round": j, "dataset": round_params.dataset, "prune_ratio": ratios[j - 1], "folder": str(here),
                     "selection_path": str(artifacts.selection_path(here)), "model": run["model"],
                     "selection": run["selection"]})
    return done


def compose_rounds(params: RunParameters, folder: Path, rounds: list[dict], final: Path) -> dict:
    """The run's selection.parquet (every sample, with the round that pruned it) from its rounds, round
    1's own moved to rounds/round-1/; the run's `selection` summary with each round's, its paths
    named as they will be once `folder` is renamed to `final`."""
    first = artifacts.selection_path(folder)
    round_one = artifacts.selection_path(folder / "rounds" / "round-1")
    round_one.parent.mkdir(parents=True)
    os.replace(first, round_one)
    summary = compose_selections(str(artifacts.scores_path(folder)),
                                 [str(round_one)] + [r["selection_path"] for r in rounds[1:]], str(first),
                                 params.prune_ratio)
    return {"method": rounds[0]["selection"]["method"], "solver": rounds[0]["selection"]["solver"], **summary, "rounds": [
        {"round": r["round"], "dataset": r["dataset"].replace(str(folder), str(final), 1), "prune_ratio": r["prune_ratio"],
         "n_pruned": r["selection"]["n_pruned"], "objective": r["selection"]["objective"],
         "model_test_accuracy": r["model"]["test_accuracy"],
         "folder": str(final / Path(r.get("folder", folder)).relative_to(folder))}
        for r in rounds]}


@flow(name="prune-dataset")
def prune_dataset(params: RunParameters, run_id: str | None = None) -> dict:
    """Train, score every sample's influence, select, and publish the kept samples as a new
    Delta version. Returns the manifest. On any failure the staged run folder is removed; the
    staging folder of a run that was killed is removed by the next run on the same `out`."""
    logger = get_run_logger()
    params.validate_all()
    params = params.pinned()  # a Delta source's version: the one this run loads, on every worker
    run_id = artifacts.check_run_id(run_id) if run_id is not None else new_run_id()
    out = Path(params.out).expanduser().resolve()
    staging, final = artifacts.staging_path(out, run_id), out / run_id
    if final.exists():
        raise BadInputError(f"run folder {final} already exists; choose another run id")
    run_preflight(params, load_checkpoint=False)  # the scheduler answers, the estimate fits in memory
    lock = artifacts.lock_staging(out, run_id, {"flow_run_id": flow_run.get_id(), "pid": os.getpid()})
    for stale, owner in artifacts.remove_stale_staging(out).items():
        logger.warning("removed the staging folder of run %s, which died before it finished", stale)
        mark_crashed(owner.get("flow_run_id"), stale, logger)
    shutil.rmtree(staging, ignore_errors=True)  # ours by the lock: left by an earlier attempt of this run id
    staging.mkdir(parents=True)
    timings: dict[str, float] = {}
    progress = RunProgress.create(run_id)

    def timed(stage, started):
        timings[stage] = round(time.perf_counter() - started, 3)
        logger.info("stage %s finished in %.1f s", stage, timings[stage])

    try:
        ds = load_dataset(params.dataset, params.data_root)
        if params.dask_address:
            workers_ready(params, ds, staging)
        target = params.target_uri()
        first_share = round_ratios(params.prune_ratio, params.rounds, ds.n)[0] if params.rounds > 1 else params.prune_ratio
        with run_cluster(params.dask_address, params.workers, params.gpu) as cluster:  # no stage after selection uses it
            first = prune_round(params.model_copy(update={"prune_ratio": first_share}), staging, out,
                                progress.in_round(1, params.rounds), timed, cluster)
            if params.rounds > 1:
                rounds = later_rounds(params, artifacts.selection_path(staging), staging / "rounds", out, progress,
                                      timed, cluster, first_round=first)
        model, scores, selection, cache = first["model"], first["scores"], first["selection"], first["cache"]
        if params.rounds > 1:
            selection = compose_rounds(params, staging, rounds, final)
            logger.info("%d rounds pruned %d of %d samples, objective ‖Σ s_i‖ = %.6g with round 1's vectors",
                        params.rounds, selection["n_pruned"], ds.n, selection["objective"])
        influence_args = params.influence_args()

        t = time.perf_counter()
        try:
            pictures = draw_figures(params.dataset, params.data_root, str(artifacts.scores_path(staging)),
                                    str(artifacts.selection_path(staging)), str(staging), selection["objective"])
        except Exception as exc:  # a picture is never a reason to lose a run
            logger.warning("could not draw the run's pictures: %s", exc)
            pictures = {}
        timed("figures", t)

        t = time.perf_counter()
        provenance = {"run_id": run_id, "run_dir": str(final), "source": {"name": ds.name, "fingerprint": ds.fingerprint,
                      "n": ds.n}, "model": params.model, "checkpoint_sha256": model["checkpoint_sha256"],
                      "method": selection["method"], "solver": selection["solver"],
                      "prune_ratio": selection["prune_ratio"], "epsilon": selection["epsilon"],
                      "n_pruned": selection["n_pruned"], "n_kept": selection["n_kept"],
                      "objective": selection["objective"], "arguments": params.as_json()}
        version = commit_dataset_version(target, params.dataset, params.data_root,
                                         str(artifacts.selection_path(staging)), provenance)
        timed("materialise", t)
        progress.update("publish", 1, 1, f"{version['uri']}@{version['version']}")

        manifest = {
            "run_id": run_id, "run_dir": str(final), "dataset": dataset_summary(ds),
            "model": {"name": params.model, **{k: v for k, v in model.items() if k not in ("name", "args")}},
            "checkpoint_sha256": model["checkpoint_sha256"], "arguments": params.as_json(),
            "influence": {"scope": influence_args.scope, "hessian": influence_args.hessian,
                          "damping": scores["inverse"]["damping"], "damping_requested": influence_args.damping,
                          "projection": ({"dim": influence_args.projection_dim, "kind": influence_args.projection_kind,
                                          "seed": influence_args.projection_seed}
                                         if influence_args.projection_dim else None),
                          "solve": scores["inverse"],
                          "storage_dtype": influence_args.storage_dtype, "block_size": influence_args.block_size,
                          "vector_dim": scores["p"], "cache": str(cache)},
            "selection": selection, "version": {"uri": version["uri"], "version": version["version"]},
            "figures": {name: str(final / file) for name, file in pictures.items()},
            "timings": timings, "software": software_versions(),
        }
        manifest["model"]["checkpoint"] = str(artifacts.checkpoint_path(final))
        if model.get("forgetting"):
            manifest["model"]["forgetting"] = str(artifacts.forgetting_path(final))
        artifacts.save_manifest(manifest, staging)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        artifacts.release_staging(out, run_id, lock)
    emit_version_event(version["uri"], version["version"], run_id, version["n_kept"])
    publish_artifacts(manifest, class_balance(params.dataset, params.data_root, str(artifacts.selection_path(final))))
    logger.info("run folder %s; version %s@%d", final, version["uri"], version["version"])
    return manifest
