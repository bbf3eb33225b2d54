"""Exploration on the validation split: does pruning in two rounds, re-scoring in between, pick
better removals at 40 % than one round? The exploration that led to `--rounds` (run, evaluate):
`evaluate --rounds 2` makes the same two-round set on the same rows and reproduces its result on
the validation split to the digit (benchmarks/results/rounds.md).

One scoring model ranks every sample once. After its easiest samples are gone, a model trained on
what is left sees another landscape: samples that looked hard beside the removed ones may now be
redundant. Two rounds (iterative pruning, as in the lottery-ticket and data-diet lines of work):

  round 1   `dataset-prune run` on the split (rows 0–49,999; validation rows 50,000–59,999 are
            never trained on nor scored) at --first-ratio with the product's defaults;
  round 2   the rows round 1 keeps become a dataset of their own, scored afresh by
            `dataset-prune run` (a new scoring model trained on them alone) and pruned with the
            product's defaults at the ratio that brings the total to --ratio.

Compared with the product's one-round default at --ratio from round 1's scores (`dataset-prune
select`), and with the two best score baselines of the main table (influence-score, grand) from the
same scores. Every variant is retrained from scratch with the evaluation's recipe on its kept rows
and measured on the validation rows; paired differences use evaluation.paired_interval.

Run:  .venv/bin/python benchmarks/iterative_scoring.py --out runs/iterative
"""

from __future__ import annotations

import argparse
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

import validation_split as vs

from pruning_core.data import load_dataset
from pruning_core.evaluation import paired_differences, paired_interval

CLI = str(Path(sys.executable).parent / "dataset-prune")


def scored(out: Path, name: str, dataset: str, ratio: float) -> Path:
    """The run folder of `dataset-prune run` on `dataset` (made once, under out/name)."""
    runs = out / name
    if runs.exists() and any(runs.glob("2*/scores.parquet")):
        return vs.latest_run(runs)
    return vs.score(out, dataset, ratio, name, f"table-{name}")


def kept_dataset(out: Path, split: Path, selection: Path) -> Path:
    """An npz of the split's rows `selection` keeps, with the same validation rows as its test set."""
    path = out / "round2.npz"
    if not path.exists():
        ds = load_dataset(f"npz:{split}")
        t = pq.read_table(selection).to_pydict()
        keep = np.array(t["sample_id"])[~np.array(t["pruned"])]
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, x=ds.x[keep], y=ds.y[keep], x_test=ds.x_test, y_test=ds.y_test)
        os.replace(tmp, path)
    return path


def select(scores: Path, ratio: float, out: Path, *options: str) -> Path:
    if not out.exists():
        subprocess.run([CLI, "select", "--scores", str(scores), "--prune-ratio", f"{ratio:g}", *options,
                        "--out", str(out)], cwd=vs.ROOT, check=True)
    return out


def fold_jobs(out: Path, held: tuple[int, int], ratio: float, first: float, seeds: list[int], fold) -> tuple[list, str]:
    """Score both rounds and select every variant for one held-out block; the retraining jobs and
    a line naming the runs."""
    out.mkdir(parents=True, exist_ok=True)
    split = (vs.write_split(out, 50000) if held == (50000, 60000)
             else vs.write_holdout(out / f"holdout-{held[0]}.npz", *held))
    run1 = scored(out, "round1", f"npz:{split}", first)
    round2 = kept_dataset(out, split, run1 / "selection.parquet")
    second = 1 - (1 - ratio) / (1 - first)
    run2 = scored(out, "round2", f"npz:{round2}", second)
    sel = out / "selections"
    sel.mkdir(exist_ok=True)
    scores = run1 / "scores.parquet"
    variants = {  # name → (dataset, selection)
        "one-round": (f"npz:{split}", select(scores, ratio, sel / "one-round.parquet")),
        "two-round": (f"npz:{round2}", run2 / "selection.parquet"),
        "influence-score": (f"npz:{split}", select(scores, ratio, sel / "influence-score.parquet",
                                                   "--method", "influence-score")),
        "grand": (f"npz:{split}", select(scores, ratio, sel / "grand.parquet", "--method", "grand")),
    }
    (out / "cache").mkdir(exist_ok=True)
    jobs = [(dataset, str(path), seed, 4, {"variant": name, "prune_ratio": ratio, "fold": fold}, str(out / "cache"))
            for name, (dataset, path) in variants.items() for seed in seeds]
    return jobs, f"rows {held[0]}–{held[1] - 1} held out: round 1 {run1}, round 2 {run2} (pruned {second:.4g})"


def main() -> int:
    command = f".venv/bin/python benchmarks/{Path(sys.argv[0]).name} {shlex.join(sys.argv[1:])}"
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/iterative")
    parser.add_argument("--ratio", type=float, default=0.4, help="total share pruned")
    parser.add_argument("--first-ratio", type=float, default=0.2, help="share pruned by round 1")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--folds", default="validation",
                        help="'validation' (rows 50000–59999 held out) or fold numbers K, e.g. 0,1,2,3,4: "
                        "rows 10000·K to 10000·(K+1) − 1 held out, under --out/foldK (cross_validation.py's folds)")
    parser.add_argument("--report", default="iterative-0.4.md")
    ns = parser.parse_args()
    out = Path(ns.out).resolve()
    seeds = [int(s) for s in ns.seeds.split(",")]
    folds = [None] if ns.folds == "validation" else [int(k) for k in ns.folds.split(",")]
    jobs, runs = [], []
    for k in folds:
        held = (50000, 60000) if k is None else (10000 * k, 10000 * (k + 1))
        fold_out = out if k is None else out / f"fold{k}"
        more, line = fold_jobs(fold_out, held, ns.ratio, ns.first_ratio, seeds, k)
        jobs += more
        runs.append(line)
    started, records = time.perf_counter(), []
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        for i, record in enumerate(pool.imap_unordered(vs._retrain, jobs), 1):
            records.append({**record, "method": record["variant"]})
            print(f"{i}/{len(jobs)} fold {record['fold']} {record['variant']} seed {record['seed']}: "
                  f"{100 * record['test_accuracy']:.2f} % ({record['train_seconds']:.0f} s)", flush=True)
    names = ["one-round", "two-round", "influence-score", "grand"]
    lines = [f"# Two rounds of pruning at {ns.ratio:g}, re-scoring in between: held-out Fashion-MNIST training rows",
             "", f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · {platform.node()} · {os.cpu_count()} CPUs · "
             f"{time.perf_counter() - started:.0f} s of retraining · "
             f"{sum(r['reused'] for r in records)} of {len(records)} runs reused", "",
             f"Command: `{command}`", "", *[f"- {line}" for line in runs], "",
             "Each block of 10,000 held-out rows is never trained on nor scored (the official test set is not "
             f"used); `cnn`, the evaluation's recipe (4 epochs), seeds {ns.seeds}. Held-out accuracy %, mean over seeds:",
             "", "| held out | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for k in folds:
        row = []
        for name in names:
            acc = [100 * r["test_accuracy"] for r in records if r["variant"] == name and r["fold"] == k]
            row.append(f"{np.mean(acc):.2f}")
        lines.append(f"| {'rows 50000–59999' if k is None else f'fold {k}'} | " + " | ".join(row) + " |")
    by = "fold" if len(folds) > 1 else None
    lines += ["", "`two-round` against each, paired by seed (and fold): mean difference in points and its 95 % "
              "interval over seeds and held-out samples (evaluation.paired_interval):", "",
              "| versus | margin | 95 % interval |", "|---|---:|---|"]
    for name in names:
        if name != "two-round":
            d = paired_differences(records, "two-round", name, ns.ratio, by=by)
            lo, hi = paired_interval(records, "two-round", name, ns.ratio, by=by)
            lines.append(f"| {name} | {100 * d.mean():+.2f} | [{100 * lo:+.2f}, {100 * hi:+.2f}] |")
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / ns.report).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
