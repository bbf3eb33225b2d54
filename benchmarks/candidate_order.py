"""Design experiment, on a held-out validation split: which removal set inside each difficulty
stratum retrains best — the paper's min-norm path fed smallest ‖s_i‖ first (`smallest`), the
same min-norm path fed in a seeded uniform order (`uniform`), or CCS's uniform draw (`ccs`)?

The test set is not used. Fashion-MNIST's 60,000 training images are split: the first 50,000
train (and are scored and pruned), the last 10,000 are the validation set the retrained models
are measured on. Steps:

  1. writes the split as an npz dataset under --out;
  2. scores it with the product itself: `dataset-prune run --dataset npz:… --model cnn`
     (skipped with --from-run);
  3. selects per ratio × variant with the product's selection (coverage difficulty for the
     influence variants; CCS draws one set per seed, as in the evaluation);
  4. retrains every (ratio, variant, seed) from scratch with the evaluation's recipe, two
     processes at a time, each finished run recorded in --out/cache (a rerun resumes);
  5. prints and writes a Markdown table: validation accuracy mean ± std and per seed.

Run:  .venv/bin/python benchmarks/candidate_order.py --out runs/candidate-order
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pruning_core import artifacts  # noqa: E402
from pruning_core.data import load_dataset  # noqa: E402
from pruning_core.evaluation import retrain_stage  # noqa: E402
from pruning_core.pipeline import selection_stage  # noqa: E402
from pruning_core.selection import SelectionArgs  # noqa: E402
from pruning_core.training import TrainArgs  # noqa: E402

VARIANTS = ("smallest", "uniform", "ccs")


def write_split(out: Path, n_train: int) -> Path:
    path = out / "fashion-mnist-validation-split.npz"
    if not path.exists():
        ds = load_dataset("fashion-mnist")
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, x=ds.x[:n_train], y=ds.y[:n_train], x_test=ds.x[n_train:], y_test=ds.y[n_train:])
        os.replace(tmp, path)
    return path


def score(out: Path, dataset: str) -> Path:
    runs = out / "runs"
    subprocess.run([str(Path(sys.executable).parent / "dataset-prune"), "run", "--dataset", dataset, "--model", "cnn",
                    "--prune-ratio", "0.4", "--out", str(runs), "--target", str(out / "table"), "--no-progress"],
                   cwd=ROOT, check=True)
    return max(runs.glob("2*/"), key=lambda p: p.stat().st_mtime)


def _retrain(job):
    dataset, selection, seed, labels, cache = job
    return retrain_stage(dataset, None, selection, TrainArgs(model="cnn", seed=seed), 4, labels, threads=1, cache=cache)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/candidate-order")
    parser.add_argument("--from-run", help="a run folder of the split already scored")
    parser.add_argument("--ratios", default="0.6,0.4,0.8")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="seeds at the first ratio")
    parser.add_argument("--other-seeds", default="0,1,2", help="seeds at the other ratios")
    parser.add_argument("--train", type=int, default=50000, help="training rows; the rest validate")
    ns = parser.parse_args()
    out = Path(ns.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    dataset = f"npz:{write_split(out, ns.train)}"
    run = Path(ns.from_run).resolve() if ns.from_run else score(out, dataset)
    scores = artifacts.scores_path(run)
    ratios = [float(r) for r in ns.ratios.split(",")]
    jobs, objectives = [], {}  # objectives: (variant, ratio) → each set's ‖Σ_R s_i‖
    for k, ratio in enumerate(ratios):
        seeds = [int(s) for s in (ns.seeds if k == 0 else ns.other_seeds).split(",")]
        for variant in VARIANTS:
            for seed in seeds:
                sel_seed = seed if variant == "ccs" else 0
                path = out / "selections" / f"{variant}-r{ratio:g}-s{sel_seed}.parquet"
                if not path.exists():
                    args = SelectionArgs(method="ccs", prune_ratio=ratio, seed=sel_seed) if variant == "ccs" else \
                        SelectionArgs(prune_ratio=ratio, coverage="difficulty", candidates=variant)
                    path.parent.mkdir(exist_ok=True)
                    selection_stage(scores, args, path)
                meta = json.loads(pq.read_schema(path).metadata[b"dataset_pruning"])
                objectives.setdefault((variant, ratio), []).append(meta["objective"])
                labels = {"variant": variant, "prune_ratio": ratio}
                jobs.append((dataset, str(path), seed, labels, str(out / "cache")))
    (out / "cache").mkdir(exist_ok=True)
    started = time.perf_counter()
    records = []
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        for i, record in enumerate(pool.imap_unordered(_retrain, jobs), 1):
            records.append(record)
            print(f"{i}/{len(jobs)} {record['variant']} r{record['prune_ratio']:g} seed {record['seed']}: "
                  f"{100 * record['test_accuracy']:.2f} % ({record['train_seconds']:.0f} s)", flush=True)
    lines = ["# Candidate order inside the difficulty strata: a validation-split experiment", "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · {platform.node()} · {os.cpu_count()} CPUs · "
             f"{time.perf_counter() - started:.0f} s of retraining · "
             f"{sum(r['reused'] for r in records)} of {len(records)} runs reused from {out / 'cache'}", "",
             f"Command: `.venv/bin/python benchmarks/candidate_order.py {' '.join(sys.argv[1:])}`", "",
             f"Fashion-MNIST training rows 0–{ns.train - 1} train, rows {ns.train}–59999 validate (the test set is "
             "not used); `cnn`, the evaluation's recipe (4 epochs). Validation accuracy %:", "",
             "| prune ratio | variant | mean ± std | per seed |", "|---:|---|---:|---|"]
    for ratio in ratios:
        for variant in VARIANTS:
            rs = sorted((r for r in records if r["variant"] == variant and r["prune_ratio"] == ratio),
                        key=lambda r: r["seed"])
            acc = np.array([100 * r["test_accuracy"] for r in rs])
            lines.append(f"| {ratio:g} | {variant} | {acc.mean():.2f} ± {acc.std(ddof=1) if len(acc) > 1 else 0:.2f} | "
                         + " / ".join(f"{a:.2f}" for a in acc) + " |")
    lines += ["", "Objective ‖Σ_R s_i‖ of the removed set (ccs: mean over its per-seed draws):", "",
              "| prune ratio | " + " | ".join(VARIANTS) + " |", "|---:|" + "---:|" * len(VARIANTS)]
    for ratio in ratios:
        lines.append(f"| {ratio:g} | " + " | ".join(f"{np.mean(objectives[(v, ratio)]):.4g}" for v in VARIANTS) + " |")
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
