"""The `evaluate-pruning` flow: wiring only. One scoring run through the product's own
pipeline (or an existing run folder), then every method × ratio selected by the same
selection task, every selection retrained from scratch per seed as Dask tasks beside the
full-data references and the generalization-gap check; `evaluation.parquet`, PNG plots and
`report.md` are written to the evaluation folder and published as Prefect artifacts."""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import replace
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect_dask import DaskTaskRunner

from pruning_core import artifacts, corruption, evaluation, figures
from pruning_core.corruption import corrupts
from pruning_core.data import load_dataset
from pruning_core.refs import SelectionResult
from pruning_core.selection import EXTREME_FROM, hard_cut_formula, round_ratios
from tasks.evaluate import corrupt_training_set, generalization_gap, retrain
from tasks.progress import RunProgress
from tasks.select import compose_selections, select_samples

from .cluster import run_cluster
from .parameters import EvaluateParameters, RunParameters, scoring_recipe
from .preflight import check_train_model, gpu_preflight
from .prune import dataset_of, gpu_resources, later_rounds, new_run_id, prune_dataset, remove_dead_runs, workers_ready


class Done:
    """A selection made before the retraining sub-flow (`influence_before`), standing in
    for the future of one made inside it."""

    def __init__(self, selection: SelectionResult):
        self.selection = selection

    def result(self) -> SelectionResult:
        return self.selection


def uniform_draws(params: EvaluateParameters, method: str, ratio: float) -> bool:
    """Whether a selection draws at random per seed: the influence method's seeded candidate order
    does (in one round; in rounds, each round selects once, with the run's seed)."""
    if method == "influence" and params.rounds > 1:
        return False
    return params.selection_args_for(method, ratio, 0).candidates == "uniform"


def rounds_parameters(params: EvaluateParameters, ratio: float) -> RunParameters:
    """The run parameters of the influence method's later rounds at `ratio`: they score with the
    scoring run's recipe (--from-run's epochs) and select for the evaluation's training budget, as
    round 1 does."""
    update = {"prune_ratio": ratio, "checkpoint": None}
    if params.from_run is not None:
        scoring = scoring_recipe(Path(params.from_run)).epochs
        if scoring != params.train_args().epochs:
            update["epochs"] = scoring
    if params.train_budget() != 1:
        update["train_epochs"] = params.retrain_args().epochs
    return params.run_parameters().model_copy(update=update)


def influence_before(params: EvaluateParameters, scores: str, folder: Path, out: Path,
                     cluster) -> dict[str, SelectionResult]:
    """The influence method's selections that are made before the retraining sub-flow, on the
    evaluation's Dask scheduler (`cluster()`, `flows.cluster.run_cluster`), and not as tasks in it:
    `--rounds K` (`flows.prune.later_rounds`: round 1 selects R/K over the scoring run's scores, each
    later round trains a fresh model on the samples still kept, scores and selects its share there;
    the rounds composed over every sample), and the bucketed solver, which maps its buckets over
    that scheduler's workers (as a task on one of them it would wait for a worker it holds)."""
    logger = get_run_logger()
    args = params.eval_args()
    made, n = {}, load_dataset(params.dataset, params.data_root).n
    for job in evaluation.selection_jobs(replace(args, methods=("influence",)), draws=lambda m, r: False):
        ratio, path = job["ratio"], folder / "selections" / f"{job['name']}.parquet"
        if params.rounds == 1:
            made[job["name"]] = select_samples(scores, params.selection_args_for("influence", ratio, 0), str(path),
                                               cluster())
            continue
        here = folder / "rounds" / job["name"]
        first = artifacts.selection_path(here / "round-1")
        first.parent.mkdir(parents=True)
        select_samples(scores, params.selection_args_for("influence", round_ratios(ratio, params.rounds, n)[0], 0),
                       str(first), cluster())
        rounds = later_rounds(rounds_parameters(params, ratio), first, here, out, RunProgress(None),
                              lambda stage, started: logger.info("%s: %s finished in %.1f s", job["name"], stage,
                                                                 time.perf_counter() - started), cluster)
        made[job["name"]] = compose_selections(scores, [r.selection_path for r in rounds], str(path), ratio)
        logger.info("%s in %d rounds: pruned %s", job["name"], params.rounds,
                    made[job["name"]].summary["pruned_per_round"])
    return made


@flow(name="evaluation-runs")
def evaluation_runs(params: EvaluateParameters, scores: str, checkpoint: str, folder: str, cache: str,
                    made: dict[str, SelectionResult] | None = None) -> dict:
    """Selections, retrainings and gap checks, fanned out on the Dask task runner. Each finished
    retraining is recorded in `cache` as it completes, so a rerun does not train it again. `made`:
    selections already written to folder/selections (name → result), not selected again."""
    selections = submit_selections(params, scores, folder, made or {})
    retrainings = submit_retrainings(params, selections, cache)
    gap_futures = submit_gap_checks(params, checkpoint)
    records, reused = retrained_records(retrainings)
    gaps = [g for f in gap_futures for g in f.result()]
    return {"records": records, "reused": reused, "cache": cache, "gaps": gaps,
            "selections": {name: {"path": path, **future.result().summary, "method": job["method"],
                                  "prune_ratio": job["ratio"], "draw_seed": job["seed"]}
                           for name, (job, future, path) in selections.items()}}


def submit_selections(params: EvaluateParameters, scores: str, folder: str,
                      made: dict[str, SelectionResult]) -> dict[str, tuple]:
    """Every method × ratio (× seed, for a random draw) selected over `scores` into
    folder/selections: {name: (job, future or `Done`, path)}; those in `made` are not selected again."""
    selections = {}
    for job in evaluation.selection_jobs(params.eval_args(), draws=functools.partial(uniform_draws, params)):
        sel_args = params.selection_args_for(job["method"], job["ratio"], job["seed"] or 0)
        path = str(Path(folder) / "selections" / f"{job['name']}.parquet")
        selections[job["name"]] = (job, Done(made[job["name"]]) if job["name"] in made
                                   else select_samples.submit(scores, sel_args, path), path)
    return selections


def submit_retrainings(params: EvaluateParameters, selections: dict[str, tuple], cache: str) -> list[tuple]:
    """A retraining per seed on the full data and on every selection (a random draw: with its own
    seed only), the longest first, each after its selection, with the retrainings' recipe (`train_model`
    where given): [(labels, (future, path) or None, future)]."""
    args = params.eval_args()
    base = params.retrain_args()
    runs = []
    for seed in args.seeds:  # the longest runs first
        runs.append((None, {"method": evaluation.FULL, "prune_ratio": 0.0, "selection": "full", "selection_seed": None,
                            "objective": None, "train_model": base.model}, seed))
    for job, future, path in sorted(selections.values(), key=lambda v: v[0]["ratio"]):
        for seed in args.seeds:
            if job["seed"] is not None and job["seed"] != seed:
                continue  # a random draw per seed, trained with that seed
            runs.append(((future, path), {"method": job["method"], "prune_ratio": job["ratio"],
                                          "selection": job["name"], "selection_seed": job["seed"],
                                          "train_model": base.model}, seed))
    futures = []
    for sel, labels, seed in runs:
        wait = [sel[0]] if sel and not isinstance(sel[0], Done) else []
        with gpu_resources(params):  # the retrainings on the GPU workers, the selections wherever
            futures.append((labels, sel, retrain.submit(dataset_of(params), sel[1] if sel else None,
                                                        replace(base, seed=seed), args.evaluations_per_epoch, labels,
                                                        cache, wait_for=wait)))
    return futures


def submit_gap_checks(params: EvaluateParameters, checkpoint: str) -> list:
    """The generalization-gap checks (`--gap-samples`): the linear problem, and the scoring
    model's head on a network."""
    args = params.eval_args()
    if not args.gap_samples:
        return []
    return [generalization_gap.submit(kind, dataset_of(params), args.gap_samples, args.gap_points,
                                      args.gap_weight_decay, checkpoint if kind == "head" else None, params.model)
            for kind in (("linear", "head") if params.model != "linear" else ("linear",))]


def retrained_records(futures: list[tuple]) -> tuple[list[dict], int]:
    """The retrainings' records in submission order, each with its selection's objective, logged
    as each finishes (x of N), and how many of them an earlier evaluation had recorded."""
    logger = get_run_logger()
    records, reused = [None] * len(futures), 0
    position = {future: i for i, (_, _, future) in enumerate(futures)}
    for done, future in enumerate(as_completed(list(position)), 1):
        i = position[future]
        labels, sel, _ = futures[i]
        record = future.result()
        if sel:
            record["objective"] = sel[0].result().objective
        records[i] = record
        earlier = record.pop("reused", False)
        reused += earlier
        logger.info("retrained %d of %d: %s seed %d → test accuracy %.4f in %.1f s%s", done, len(futures),
                    labels["selection"], record["seed"], record["test_accuracy"], record["train_seconds"],
                    " (recorded by an earlier run, reused)" if earlier else "")
    if reused:
        logger.info("%d of %d retrainings reused, recorded by earlier evaluations", reused, len(futures))
    return records, reused


def influence_selection(params: EvaluateParameters, removed_first: dict[float, dict] | None = None) -> str:
    """How the influence method chose its sets, in words, for the report. `removed_first`: per
    ratio, the selection's `mislabelled_first` record where it removed what looks mislabelled first."""
    if params.rounds > 1:
        shares = "; ".join(f"{', '.join(f'{100 * q:.3g} %' for q in round_ratios(r, params.rounds))} at ratio {r:g}"
                           for r in params.ratios)
        return (f"in {params.rounds} rounds (`--rounds {params.rounds}`), each removing an equal share of the samples "
                f"(of those still kept: {shares}) with the run's defaults for its own ratio; every round after the "
                "first is scored by a fresh model trained with the recipe on the samples still kept")
    chosen = {r: params.selection_args_for("influence", r, 0) for r in params.ratios}
    if all(sel.coverage == "none" for sel in chosen.values()):
        return "over the whole dataset (`--coverage none`)"
    words = {"smallest": "smallest ‖s_i‖ first", "uniform": "in a seeded uniform order (each stratum's removals "
             "a near-uniform draw, one per training seed)",
             "easiest": "lowest EL2N first (each stratum's easiest go)"}
    by_order = {}
    for r, sel in chosen.items():
        by_order.setdefault(sel.candidates, []).append(f"{r:g}")
    orders = "; ".join(f"{words[c]}" + (f" at ratio {', '.join(rs)}" if len(by_order) > 1 else "")
                       for c, rs in by_order.items())
    cuts = [(r, sel.coverage_cut()) for r, sel in chosen.items() if sel.coverage == "difficulty"]
    cut_words = ", ".join(f"{100 * b:g} % at ratio {r:g}" for r, b in cuts)
    budget = params.train_budget()
    if params.hard_cut is not None:
        source = f"`--hard-cut {params.hard_cut:g}`"
    else:
        source = f"the schedule {hard_cut_formula(budget, any(r >= EXTREME_FROM for r, _ in cuts))}" + (
            "" if budget == 1 else f", retraining {budget:g}× the scoring run's epochs")
    if params.swap_rounds:
        swaps = f"at most {params.swap_rounds} swap rounds after the greedy path (`--swap-rounds {params.swap_rounds}`)"
    elif params.swap_rounds is None:
        swaps = "the greedy path kept as the answer (no swap search)"
    else:
        swaps = "the greedy path kept as the answer (no swap search: `--swap-rounds 0`)"
    first = ""
    if removed_first:
        counts = "; ".join(f"{f['removed_first']:,} of {f['flagged']:,} at ratio {r:g}"
                           for r, f in sorted(removed_first.items()))
        first = (f"the samples that look mislabelled to the scoring model removed first, the most suspect first, "
                 f"within the budget and counted in the hardest share ({counts}: `--mislabel-first`), ")
    return (f"under per-difficulty-stratum removal quotas (`--coverage difficulty`) with the hardest share cut first "
            f"({cut_words}: {source}), the solver's candidates fed {orders} (`--candidates {params.candidates}`), "
            + first + swaps)


@flow(name="evaluate-pruning")
def evaluate_pruning(params: EvaluateParameters, run_id: str | None = None, command: str | None = None) -> dict:
    """Retrain on pruned versions and write the evidence. Returns the summary (report path,
    plots, targets). On any failure the staged evaluation folder is removed."""
    params.validate_all()
    check_train_model(params)
    params = params.pinned()  # a Delta source's version: the one this run loads, on every worker
    run_id = run_id or "eval-" + new_run_id()
    out = Path(params.out).expanduser().resolve()
    artifacts.new_run_folder(out, run_id)
    started = time.perf_counter()
    given, params = params, corrupted_parameters(params, out)
    scored, scored_here = scoring_run(params, out)
    scores, checkpoint = str(artifacts.scores_path(scored)), str(artifacts.checkpoint_path(scored))
    with artifacts.staged_folder(out, run_id, {"flow_run_id": flow_run.get_id(), "pid": os.getpid()}) as staging:
        remove_dead_runs(out)  # a killed evaluation's staging folder
        # the scoring run just asked the workers, unless the retrainings train another model
        if params.dask_address and (not scored_here or params.train_model is not None):
            workers_ready(params, load_dataset(params.dataset, params.data_root), staging, (scores, checkpoint),
                          params.retrain_args().model)
        cache = out / ".cache" / "retrain"
        cache.mkdir(parents=True, exist_ok=True)
        with run_cluster(params.dask_address, params.workers, params.gpu) as cluster:
            made = (influence_before(params, scores, staging, out, cluster)
                    if (params.rounds > 1 or params.solver == "bucketed") and "influence" in params.methods else None)
            results = evaluation_runs.with_options(task_runner=DaskTaskRunner(address=cluster()))(
                params, scores, checkpoint, str(staging), str(cache), made)
        summary = write_evaluation(params, results, run_id, staging, out / run_id, scored, command, started,
                                   arguments=given.as_json())
    publish_evaluation(summary)
    return summary


def corrupted_parameters(params: EvaluateParameters, out: Path) -> EvaluateParameters:
    """`params` on the training set that --label-noise and --imbalance make of the dataset
    (`corrupt_training_set`, a Delta table under <out>/.cache/corrupted, which every later stage and
    worker reads), or as they are where they ask for neither."""
    if not corrupts(params.label_noise, params.imbalance):
        return params
    made = corrupt_training_set(dataset_of(params), params.label_noise, params.imbalance, params.seed,
                                str(out / ".cache" / "corrupted"))
    get_run_logger().info("training set: %s (%s)", corruption.describe(made), made["dataset"])
    return params.model_copy(update={"dataset": made["dataset"], "data_root": None})


def scoring_run(params: EvaluateParameters, out: Path) -> tuple[Path, bool]:
    """The run folder whose scores and model the evaluation retrains from, and whether it was made
    now: `--from-run`, wherever it was made (a run folder may be copied or moved); else the scoring
    run an earlier evaluation on `out` made with the same parameters and data (`scoring_record`),
    so that an interrupted evaluation, or one run in parts, does not score again and retrains the
    same selections; else a new scoring run, recorded for the next."""
    if params.from_run:
        gpu_preflight(params)  # else the scoring run's preflight checks the GPU workers
        scored = Path(params.from_run).resolve()
        get_run_logger().info("reusing scores and model of %s", scored)
        return scored, False
    record = scoring_record(params, out)
    earlier = Path(json.loads(record.read_text())["run_dir"]) if record.is_file() else None
    if earlier is not None and artifacts.run_finished(earlier):
        gpu_preflight(params)
        get_run_logger().info("reusing scores and model of %s, made by an earlier evaluation with the same "
                              "arguments", earlier)
        return earlier, False
    scored = Path(prune_dataset(params.run_parameters())["run_dir"])
    artifacts.write_json(record, {"run_dir": str(scored)})
    return scored, True


PLACEMENT = ("shards", "workers", "dask_address", "out")  # where a run computes, not what: results do not depend on it


def scoring_record(params: EvaluateParameters, out: Path) -> Path:
    """Where an evaluation without --from-run records its scoring run: `<out>/.cache/evaluate/`,
    keyed by what determines that run (its parameters but those of `PLACEMENT`, the data's
    fingerprint, the checkpoint's digest)."""
    arguments = {k: v for k, v in params.run_parameters().as_json().items() if k not in PLACEMENT}
    key = artifacts.arguments_key({"arguments": arguments,
                                   "data": load_dataset(params.dataset, params.data_root).fingerprint,
                                   "checkpoint": params.checkpoint and artifacts.file_sha256(params.checkpoint)})
    return out / ".cache" / "evaluate" / f"scoring-{key}.json"


def write_evaluation(params: EvaluateParameters, results: dict, run_id: str, staging: Path, final: Path,
                     scored: Path, command: str | None, started: float, arguments: dict | None = None) -> dict:
    """The evaluation's files in `staging` (evaluation.parquet, generalization_gap.parquet, plots,
    report.md, evaluation.json), their paths named as they lie in `final`; returns the summary
    written to evaluation.json. `started`: the evaluation's start (`time.perf_counter()`);
    `arguments`: the parameters as given (default: `params`'). A corrupted training set
    (`corruption.corruption_of`) adds what the methods did with it, and its record."""
    args, recipe = params.eval_args(), params.retrain_args()
    records = evaluation.add_convergence(results["records"], args.target_drop)
    summary = evaluation.summarise(records)
    goal = evaluation.targets(summary, records, drop=args.target_drop)
    overlaps = evaluation.removal_overlaps(list(results["selections"].values()))
    models = None if params.train_model is None else f"scored with {params.model}, retrained {recipe.model}"
    plots = evaluation.draw_plots(summary, records, results["gaps"], staging / "plots",
                                  goal["comparisons"] + goal["other_comparisons"], overlaps,
                                  target_drop=args.target_drop, models=models)
    plots = {k: str(final / Path(v).relative_to(staging)) for k, v in plots.items()}
    ds = load_dataset(params.dataset, params.data_root)
    context = {"dataset": ds.name, "model": params.model if models is None else f"{params.model} → {recipe.model}",
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": evaluation.machine(),
               "run_dir": str(final), "scores_from": str(scored), "models": models,
               "recipe": json.dumps({k: v for k, v in vars(recipe).items() if k != "seed"}),
               "command": command, "influence_selection": influence_selection(params, {
                   sel["prune_ratio"]: sel["solver_info"]["mislabelled_first"] for sel in results["selections"].values()
                   if sel["method"] == "influence" and "mislabelled_first" in sel.get("solver_info", {})})}
    corrupted = corruption.corruption_of(params.dataset)
    robust = None if corrupted is None else corruption.robustness(corrupted, ds, list(results["selections"].values()),
                                                                    records)
    names = ds.origin.get("classes") or figures.class_names(ds.origin.get("source", ds.name), ds.n_classes)
    report = evaluation.report_markdown(summary, records, results["gaps"], goal, plots, context, relative_to=final,
                                        overlaps=overlaps,
                                        sections=[corruption.robustness_markdown(robust, names)] if robust else [])
    artifacts.save_parquet(evaluation.evaluation_table(records), staging / "evaluation.parquet")
    if results["gaps"]:
        import pyarrow as pa

        artifacts.save_parquet(pa.Table.from_pylist(results["gaps"]), staging / "generalization_gap.parquet")
    (staging / "report.md").write_text(report)
    out_summary = {"run_id": run_id, "run_dir": str(final), "report": str(final / "report.md"), "plots": plots,
                   "scores_from": str(scored), "targets": goal, "summary": summary,
                   "gap": results["gaps"], "overlaps": overlaps, "seconds": time.perf_counter() - started,
                   "models": {"scored": params.model, "retrained": recipe.model},
                   "retrainings": {"total": len(records), "reused": results["reused"],
                                   "cache": results["cache"]},
                   "arguments": arguments or params.as_json()}
    if corrupted is not None:
        out_summary.update(corruption=corrupted, robustness=robust["rows"])
    artifacts.write_json(staging / "evaluation.json", out_summary)
    return out_summary


def publish_evaluation(summary: dict) -> None:
    """The finished evaluation's report (its plots inline) and its table as Prefect artifacts."""
    final = Path(summary["run_dir"])
    create_markdown_artifact(figures.inline_images(Path(summary["report"]).read_text(), final),
                             key="pruning-evaluation", description=f"evaluation {summary['run_id']}")
    create_table_artifact([{k: v for k, v in s.items()} for s in summary["summary"]], key="pruning-evaluation-table",
                          description="mean ± std over seeds per method and prune ratio")
    get_run_logger().info("evaluation folder %s; report %s", final, Path(summary["report"]))
