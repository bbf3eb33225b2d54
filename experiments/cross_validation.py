"""Cross-validated comparison at one prune ratio: is a margin of a tenth of a point real, or the
draw of one 10,000-sample test set?

Fashion-MNIST's 60,000 training images are cut into 6 folds of 10,000 consecutive rows. For each
fold k asked for, the product itself runs end to end on the other 50,000 rows with fold k as the
test set: `dataset-prune evaluate --dataset npz:<fold k> --ratios R --methods … --seeds …` (its
own scoring run, selections, retrainings from scratch, full-data references; the official test
set is never read). The folds' test sets are disjoint, so together they measure every method on
up to 60,000 held-out samples instead of 10,000.

A `--variant LABEL=ARGS` is the influence method with other options (e.g. `smallest=--candidates
smallest`): after a fold's evaluation, `dataset-prune evaluate --from-run <its scoring run> --methods
influence ARGS` under --out/fold<k>/LABEL (sharing the fold's retrain cache, so the full-data runs
are not trained again), reported as method LABEL beside the others.

Each fold's evaluation folder is kept under --out/fold<k>/ and a rerun reuses it (a finished
evaluation holding the ratio, methods and seeds asked for is read back; another ratio or method
is evaluated from the same scoring run; an interrupted one resumes from its retrain cache, with the scoring
run it made). The report gives per fold and pooled: mean accuracy per method, and the product's
margin over each method with its 95 % interval from a paired bootstrap over seeds and held-out
samples within every fold (evaluation.paired_interval with by="fold").

Run:  .venv/bin/python -m experiments.cross_validation --out runs/cross-validation --folds 0,1,2,3,4
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from experiments.validation_split import write_holdout
from pruning_core.evaluation import machine, paired_differences, paired_interval

ROOT = Path(__file__).resolve().parents[1]

FOLD_ROWS = 10000


def write_fold(out: Path, k: int) -> Path:
    """Fold k's npz: every training row but [10,000·k, 10,000·(k+1)), which become its test set."""
    return write_holdout(out / f"fashion-mnist-fold{k}.npz", k * FOLD_ROWS, (k + 1) * FOLD_ROWS)


def covers(evaluation: Path, methods: str, ns: argparse.Namespace) -> bool:
    """Whether a finished evaluation holds `methods` at --ratio with every seed of --seeds."""
    used = json.loads((evaluation / "evaluation.json").read_text())["arguments"]
    return (float(ns.ratio) in used["ratios"] and set(methods.split(",")) <= set(used["methods"])
            and {int(s) for s in ns.seeds.split(",")} <= set(used["seeds"]))


def evaluate(out: Path, k: int, folder: Path, methods: str, ns: argparse.Namespace, extra: list[str],
             what: str) -> Path:
    """The evaluation folder under `folder` of `methods` on fold k, made by the product's command
    (with `extra` options) unless a finished one is there."""
    done = [p.parent for p in sorted(folder.glob("eval-*/evaluation.parquet")) if covers(p.parent, methods, ns)]
    if done:
        return done[-1]
    command = [str(Path(sys.executable).parent / "dataset-prune"), "evaluate", "--dataset",
               f"npz:{write_fold(out, k)}", "--model", "cnn", "--epochs", str(ns.epochs), "--ratios", ns.ratio,
               "--methods", methods, "--seeds", ns.seeds, "--gap-samples", "0", "--out", str(folder),
               "--target", str(folder / "table"), *extra]
    print(f"{what}: {shlex.join(command)}", flush=True)
    subprocess.run(command, cwd=ROOT, check=True)
    return max((p.parent for p in folder.glob("eval-*/evaluation.parquet")), key=lambda p: p.stat().st_mtime)


def evaluate_fold(out: Path, k: int, ns: argparse.Namespace) -> Path:
    """The evaluation folder of fold k."""
    folder = out / f"fold{k}"
    scored = [p.parent for p in folder.glob("2*/manifest.json")]
    # an interrupted fold: the same scoring run, so the selections and the retrain cache match
    extra = ["--from-run", str(max(scored, key=lambda p: p.stat().st_mtime))] if scored else []
    return evaluate(out, k, folder, ns.methods, ns, extra, f"fold {k}")


def fold_scoring_run(fold: Path) -> str:
    """The scoring run of the fold's own evaluation."""
    return json.loads(sorted(fold.glob("eval-*/evaluation.json"))[-1].read_text())["scores_from"]


def variant_folder(fold: Path, label: str) -> Path:
    """fold/label, sharing the fold's retrain cache (the full-data runs are not trained again)."""
    folder = fold / label
    folder.mkdir(exist_ok=True)
    if not (folder / ".cache").exists():
        (folder / ".cache").symlink_to(Path("..") / ".cache")
    return folder


def evaluate_variant(out: Path, k: int, label: str, extra: str, ns: argparse.Namespace) -> Path:
    """The evaluation folder of the influence method with `extra` options on fold k (its scoring
    run and retrain cache those of the fold's own evaluation)."""
    fold = out / f"fold{k}"
    return evaluate(out, k, variant_folder(fold, label), "influence", ns,
                    ["--from-run", fold_scoring_run(fold), *shlex.split(extra)], f"fold {k}, {label}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/cross-validation")
    parser.add_argument("--folds", default="0,1,2,3,4,5", help="which of the 6 folds to run")
    parser.add_argument("--ratio", default="0.4")
    parser.add_argument("--methods", default="influence,influence-score,grand",
                        help="the first is compared with each of the others (unless --first)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=4, help="the evaluation's recipe: 4")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=ARGS",
                        help="the influence method with other evaluate options, e.g. 'smallest=--candidates smallest'")
    parser.add_argument("--first", help="the method or variant label compared with each of the others "
                        "(default: the first of --methods)")
    ns = parser.parse_args(argv)
    variants = dict(v.split("=", 1) for v in ns.variant)
    methods, ratio = ns.methods.split(","), float(ns.ratio)
    if ns.first and ns.first not in methods + list(variants):
        parser.error(f"--first {ns.first!r} is neither in --methods nor a --variant label")
    out = Path(ns.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    folds = [int(k) for k in ns.folds.split(",")]
    started = time.perf_counter()
    records, folders = [], {}
    for k in folds:
        folders[k] = evaluate_fold(out, k, ns)
        rows = pq.read_table(folders[k] / "evaluation.parquet").to_pylist()
        records += [{**r, "fold": k} for r in rows if r["method"] in methods and abs(r["prune_ratio"] - ratio) < 1e-9]
        for label, extra in variants.items():
            rows = pq.read_table(evaluate_variant(out, k, label, extra, ns) / "evaluation.parquet").to_pylist()
            records += [{**r, "fold": k, "method": label} for r in rows
                        if r["method"] == "influence" and abs(r["prune_ratio"] - ratio) < 1e-9]
    methods += list(variants)
    first = ns.first or methods[0]
    others = [m for m in methods if m != first]

    def acc(method, fold=None):
        a = [r["test_accuracy"] for r in records if r["method"] == method and fold in (None, r["fold"])]
        return 100 * float(np.mean(a))

    lines = [f"# Cross-validated comparison at {ratio:g} pruned: {len(folds)} folds of Fashion-MNIST's training set",
             "", f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · {machine()} · "
             f"{time.perf_counter() - started:.0f} s", "",
             f"Command: `.venv/bin/python -m experiments.cross_validation {shlex.join(argv)}`", "",
             f"Fold k holds out training rows {FOLD_ROWS}·k to {FOLD_ROWS}·(k+1) − 1 as its test set; the product "
             "scores, prunes and retrains on the other 50,000 (`dataset-prune evaluate`, the evaluation's recipe, "
             f"{ns.epochs} epochs, seeds {ns.seeds}); the official test set is not used."
             + "".join(f" `{label}`: the influence method with `{extra}`." for label, extra in variants.items())
             + " Held-out accuracy %, mean over seeds:", "",
             "| fold | " + " | ".join(methods) + " | " + " | ".join(f"{first} − {m}" for m in others) + " |",
             "|---:|" + "---:|" * (len(methods) + len(others))]
    for k in folds:
        diffs = [paired_differences([r for r in records if r["fold"] == k], first, m, ratio) for m in others]
        lines.append(f"| {k} | " + " | ".join(f"{acc(m, k):.2f}" for m in methods) + " | "
                     + " | ".join(f"{100 * d.mean():+.2f}" for d in diffs) + " |")
    lines.append("| **all** | " + " | ".join(f"**{acc(m):.2f}**" for m in methods) + " | "
                 + " | ".join(f"**{100 * paired_differences(records, first, m, ratio, by='fold').mean():+.2f}**"
                              for m in others) + " |")
    held = sum(int(r["n_test"]) for r in records if r["method"] == first and r["seed"] == records[0]["seed"])
    lines += ["", f"Pooled over the {len(folds)} folds ({held:,} held-out samples), {first} minus each method: mean "
              "difference in points and its 95 % interval from a paired bootstrap over seeds and held-out samples "
              "within every fold:", "", "| versus | margin | 95 % interval | resolved |", "|---|---:|---|---|"]
    pooled = {}
    for m in others:
        d = paired_differences(records, first, m, ratio, by="fold")
        lo, hi = paired_interval(records, first, m, ratio, by="fold")
        pooled[m] = {"margin": float(d.mean()), "interval": [lo, hi], "pairs": len(d)}
        lines.append(f"| {m} | {100 * d.mean():+.2f} | [{100 * lo:+.2f}, {100 * hi:+.2f}] | "
                     f"{'yes' if lo > 0 or hi < 0 else 'no'} |")
    lines += ["", "Evaluation folders: " + ", ".join(f"fold {k}: `{folders[k]}`" for k in folds)]
    text = "\n".join(lines) + "\n"
    (out / f"report-{ratio:g}.md").write_text(text)
    (out / f"pooled-{ratio:g}.json").write_text(json.dumps({"ratio": ratio, "folds": folds, "methods": methods,
                                                 "pooled": pooled}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
