"""Design experiments on a held-out validation split: which selection retrains best? Used to
choose the influence method's defaults — the candidate order inside the difficulty strata
(benchmarks/results/candidate-order.md) and the hardest share cut first (hard-cut.md) — without
ever looking at the test set.

Fashion-MNIST's 60,000 training images are split: the first 50,000 train (and are scored and
pruned), the last 10,000 are the validation set the retrained models are measured on. Steps:

  1. writes the split as an npz dataset under --out;
  2. scores it with the product itself: `dataset-prune run --dataset npz:… --model cnn`
     (skipped with --from-run);
  3. selects per ratio × variant with the product's selection. A variant is
       smallest | uniform [@β]  the influence method under difficulty coverage, candidates fed
                                smallest ‖s_i‖ first or in a seeded uniform order, cutting the
                                hardest share β first (default: CCS's schedule, 0 below 70 %)
       ccs [@β]                 CCS, one random draw per seed, as in the evaluation
       influence-score          the score baseline (prune smallest ‖s_i‖ first)
       random                   a uniform random draw, one per seed
  4. retrains every (ratio, variant, seed) from scratch with the evaluation's recipe (--epochs), two
     processes at a time, each finished run recorded in --out/cache (a rerun resumes);
  5. prints and writes a Markdown table: validation accuracy mean ± std and per seed, and each
     variant's paired difference from the first with its 95 % interval over seeds and
     validation samples.

Run:  .venv/bin/python -m experiments.validation_split --out runs/candidate-order
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pruning_core import artifacts
from pruning_core.baselines import ccs_hard_fraction
from pruning_core.data import load_dataset
from pruning_core.evaluation import paired_differences, paired_interval, retrain_stage
from pruning_core.recipe import TrainArgs
from pruning_core.selection import SelectionArgs, selection_stage

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = ("smallest", "uniform", "ccs")  # the candidate-order experiment


def selection_args(variant: str, ratio: float, seed: int) -> SelectionArgs:
    """The SelectionArgs of a variant `NAME[@β]` (module docstring)."""
    name, _, beta = variant.partition("@")
    cut = float(beta) if beta else ccs_hard_fraction(ratio)
    if name == "ccs":
        return SelectionArgs(method="ccs", prune_ratio=ratio, seed=seed, hard_cut=float(beta) if beta else None)
    if name in ("influence-score", "random"):
        return SelectionArgs(method=name, prune_ratio=ratio, seed=seed)
    if name not in ("smallest", "uniform"):
        raise SystemExit(f"unknown variant {variant!r}: smallest|uniform|ccs[@β], influence-score or random")
    return SelectionArgs(prune_ratio=ratio, coverage="difficulty", candidates=name, hard_cut=cut)


def select_variant(run: Path, variant: str, ratio: float, seed: int, out: Path) -> None:
    """Write the selection of `variant` at `ratio` (seed `seed`) over the scoring run `run` to `out`."""
    selection_stage(artifacts.scores_path(run), selection_args(variant, ratio, seed), out)


def write_holdout(path: Path, start: int, stop: int | None = None) -> Path:
    """An npz of Fashion-MNIST's training rows with rows [start, stop) held out as its test set
    (written once, atomically; the official test set is not in it)."""
    if not path.exists():
        ds = load_dataset("fashion-mnist")
        held = np.zeros(ds.n, bool)
        held[start:stop] = True
        if not held.any():
            raise SystemExit(f"rows {start}–{stop} are past Fashion-MNIST's {ds.n} training rows")
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, x=ds.x[~held], y=ds.y[~held], x_test=ds.x[held], y_test=ds.y[held])
        os.replace(tmp, path)
    return path


def write_split(out: Path, n_train: int) -> Path:
    return write_holdout(out / "fashion-mnist-validation-split.npz", n_train)


def latest_run(runs: Path) -> Path:
    """The newest run folder under `runs`."""
    return max(runs.glob("2*/"), key=lambda p: p.stat().st_mtime)


def score(out: Path, dataset: str, ratio: float = 0.4, name: str = "runs", table: str = "table") -> Path:
    """Score `dataset` with the product (`dataset-prune run`, pruning `ratio`) into out/name; its run folder."""
    runs = out / name
    subprocess.run([str(Path(sys.executable).parent / "dataset-prune"), "run", "--dataset", dataset, "--model", "cnn",
                    "--prune-ratio", f"{ratio:g}", "--out", str(runs), "--target", str(out / table), "--no-progress"],
                   cwd=ROOT, check=True)
    return latest_run(runs)


def retrain(job) -> dict:
    """The evaluation's record of one retraining job (dataset, selection, seed, epochs, labels, cache)."""
    dataset, selection, seed, epochs, labels, cache = job
    return retrain_stage(dataset, None, selection, TrainArgs(model="cnn", seed=seed, epochs=epochs), 4, labels,
                         threads=1, cache=cache)


def main(argv: list[str] | None = None, command: str | None = None, select=select_variant, retrain=retrain,
         doc: str | None = None) -> int:
    """`argv` as on the command line (default sys.argv[1:]); `command`, the one the report names
    (default the experiment's that was started); `select(run, variant, ratio, seed, out)` writes a
    variant's selection and `retrain(job)` retrains one (module-level, so a spawned process finds
    it): the experiments built on this one pass their own; `doc`, the --help text."""
    argv = sys.argv[1:] if argv is None else argv
    command = command or f".venv/bin/python -m experiments.{Path(sys.argv[0]).stem} {shlex.join(argv)}"
    parser = argparse.ArgumentParser(description=(doc or __doc__).split("\n")[0])
    parser.add_argument("--out", default="runs/candidate-order")
    parser.add_argument("--from-run", help="a run folder of the split already scored")
    parser.add_argument("--ratios", default="0.6,0.4,0.8")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="seeds at the first ratio")
    parser.add_argument("--other-seeds", default="0,1,2", help="seeds at the other ratios")
    parser.add_argument("--epochs", type=int, default=4, help="retraining epochs (the evaluation's recipe: 4)")
    parser.add_argument("--train", type=int, default=50000, help="training rows; the rest validate")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, e.g. uniform,uniform@0.05,ccs")
    parser.add_argument("--title", default="Candidate order inside the difficulty strata")
    parser.add_argument("--report", default="report.md", help="file name of the table, under --out")
    ns = parser.parse_args(argv)
    variants = ns.variants.split(",")
    out = Path(ns.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    dataset = f"npz:{write_split(out, ns.train)}"
    run = Path(ns.from_run).resolve() if ns.from_run else score(out, dataset)
    ratios = [float(r) for r in ns.ratios.split(",")]
    jobs, objectives = [], {}  # objectives: (variant, ratio) → each set's ‖Σ_R s_i‖
    for k, ratio in enumerate(ratios):
        seeds = [int(s) for s in (ns.seeds if k == 0 else ns.other_seeds).split(",")]
        for variant in variants:
            for seed in seeds:
                sel_seed = seed if variant.startswith(("ccs", "random")) else 0
                path = out / "selections" / f"{variant}-r{ratio:g}-s{sel_seed}.parquet"
                if not path.exists():
                    path.parent.mkdir(exist_ok=True)
                    select(run, variant, ratio, sel_seed, path)
                meta = json.loads(pq.read_schema(path).metadata[b"dataset_pruning"])
                objectives.setdefault((variant, ratio), []).append(meta["objective"])
                labels = {"variant": variant, "prune_ratio": ratio}
                jobs.append((dataset, str(path), seed, ns.epochs, labels, str(out / "cache")))
    (out / "cache").mkdir(exist_ok=True)
    started = time.perf_counter()
    records = []
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        for i, record in enumerate(pool.imap_unordered(retrain, jobs), 1):
            records.append(record)
            print(f"{i}/{len(jobs)} {record['variant']} r{record['prune_ratio']:g} seed {record['seed']}: "
                  f"{100 * record['test_accuracy']:.2f} % ({record['train_seconds']:.0f} s)", flush=True)
    lines = [f"# {ns.title}: a validation-split experiment", "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · {platform.node()} · {os.cpu_count()} CPUs · "
             f"{time.perf_counter() - started:.0f} s of retraining · "
             f"{sum(r['reused'] for r in records)} of {len(records)} runs reused from {out / 'cache'}", "",
             f"Command: `{command}`", "",
             f"Fashion-MNIST training rows 0–{ns.train - 1} train, rows {ns.train}–59999 validate (the test set is "
             "not used); `cnn`, " + ("the evaluation's recipe (4 epochs)" if ns.epochs == 4 else
                                          f"the evaluation's recipe trained {ns.epochs} epochs instead of 4")
             + ". Validation accuracy %:", "",
             "| prune ratio | variant | mean ± std | per seed |", "|---:|---|---:|---|"]
    for ratio in ratios:
        for variant in variants:
            rs = sorted((r for r in records if r["variant"] == variant and r["prune_ratio"] == ratio),
                        key=lambda r: r["seed"])
            acc = np.array([100 * r["test_accuracy"] for r in rs])
            lines.append(f"| {ratio:g} | {variant} | {acc.mean():.2f} ± {acc.std(ddof=1) if len(acc) > 1 else 0:.2f} | "
                         + " / ".join(f"{a:.2f}" for a in acc) + " |")
    first = variants[0]
    lines += ["", f"Each variant against `{first}`, paired by seed: mean difference in points and its 95 % interval "
              "over seeds and validation samples (evaluation.paired_interval):", "",
              "| prune ratio | variant | − " + first + " | 95 % interval |", "|---:|---|---:|---|"]
    for ratio in ratios:
        runs = [{**r, "method": r["variant"]} for r in records if r["prune_ratio"] == ratio]
        for variant in variants[1:]:
            diffs = paired_differences(runs, variant, first, ratio)
            interval = paired_interval(runs, variant, first, ratio)
            lines.append(f"| {ratio:g} | {variant} | {100 * diffs.mean():+.2f} | "
                         + ("–" if interval is None else f"[{100 * interval[0]:+.2f}, {100 * interval[1]:+.2f}]")
                         + " |")
    lines += ["", "Objective ‖Σ_R s_i‖ of the removed set (ccs: mean over its per-seed draws):", "",
              "| prune ratio | " + " | ".join(variants) + " |", "|---:|" + "---:|" * len(variants)]
    for ratio in ratios:
        lines.append(f"| {ratio:g} | " + " | ".join(f"{np.mean(objectives[(v, ratio)]):.4g}" for v in variants) + " |")
    text = "\n".join(lines) + "\n"
    (out / ns.report).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
