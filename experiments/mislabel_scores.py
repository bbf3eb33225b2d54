"""Which cheap score finds wrong labels best: the scoring run's own in-sample probabilities and
training record, or confident learning's scores from out-of-sample probabilities?

On a scoring run made on a corrupted training set (`dataset-prune evaluate --label-noise RATE`
scores one; its table records which labels were flipped), every sample gets:

- in-sample, from the run's model (what a run has without another training): the loss −log p_y
  (the same order as confident learning's self-confidence 1 − p_y, the product's `mislabel`), the
  normalized margin max_{j≠y} p_j − p_y, the logit margin at the end of training (AUM's margin,
  Pleiss et al. 2020, read once at the end), EL2N, and the forgetting events of the run's
  training;
- out-of-sample (`--folds K`, K more trainings with the run's recipe, each on all folds but one
  and predicting that one): confident learning's self-confidence and normalized margin
  (Northcutt et al. 2021, as cleanlab computes them from cross-validated probabilities).

The samples are split at random (`--split-seed`) into two halves: the score is chosen by its AUROC
against the true flips on the first ("validation"), and the second half reports it. Confident
learning's threshold rule (`pruning_core.mislabel.threshold_rule`) and the product's flag (as many,
the least self-confident first: `looks_mislabelled`) are counted on both kinds of probabilities.
On a clean run (no flips recorded) the flagged shares alone are reported.

Run:  .venv/bin/python -m experiments.mislabel_scores --run RUN --folds 2 --report robustness-scores.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pruning_core import mislabel
from pruning_core.corruption import corruption_of
from pruning_core.data import load_dataset
from pruning_core.evaluation import machine
from pruning_core.recipe import TrainArgs
from pruning_core.training import load_model, predict_logits, train

IN_SAMPLE = ("loss", "normalized margin", "logit margin", "el2n", "forgetting")  # what a run has, to choose from


def probabilities(model, x: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.as_tensor(predict_logits(model, x, 1024)), 1).numpy()


def cross_fitted(ds, args: TrainArgs, folds: int, seed: int) -> np.ndarray:
    """(n, C) probabilities of each sample from a model trained without its fold (K trainings)."""
    fold = np.random.default_rng(seed).permutation(ds.n) % folds
    probs = np.zeros((ds.n, ds.n_classes))
    for k in range(folds):
        started = time.perf_counter()
        model = train(ds.subset(np.flatnonzero(fold != k)), args).model
        probs[fold == k] = probabilities(model, ds.x[fold == k])
        print(f"  fold {k + 1}/{folds} trained and predicted in {time.perf_counter() - started:.0f} s", flush=True)
    return probs


def scores_of(probs: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Higher = more suspect, each (n,)."""
    tiny = np.finfo(np.float64).tiny
    given = np.maximum(probs[np.arange(len(y)), y], tiny)
    _, _, likely_p = mislabel.mislabel_scores(probs, y)
    return {"self-confidence": 1 - given, "loss": -np.log(given), "normalized margin": likely_p - given,
            "logit margin": np.log(np.maximum(likely_p, tiny)) - np.log(given),
            "el2n": np.linalg.norm(probs - np.eye(probs.shape[1])[y], axis=1)}


def flags_of(probs: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Confident learning's threshold rule's own set, and as many ranked by self-confidence (the
    product's `mislabelled`)."""
    columns = (y, *mislabel.mislabel_scores(probs, y), probs.shape[1])
    return {"the rule's set": mislabel.threshold_rule(*columns),
            "the rule's count, least self-confident first": mislabel.looks_mislabelled(*columns)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="a scoring run folder")
    parser.add_argument("--folds", type=int, default=0, help="cross-fitting folds for out-of-sample probabilities")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report", type=Path, help="write the Markdown table here")
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    used = json.loads((ns.run / "manifest.json").read_text())["arguments"]
    ds = load_dataset(used["dataset"], used.get("data_root"))
    record = corruption_of(used["dataset"])
    flipped = np.isin(ds.sample_id, record["flipped"]) if record else np.zeros(ds.n, bool)
    args = TrainArgs(model=used["model"], epochs=used.get("epochs"), lr=used["lr"], batch_size=used["batch_size"],
                     weight_decay=used["weight_decay"], seed=used["seed"])
    inside = probabilities(load_model(str(ns.run / "model.pt"), used["model"], ds, "cpu"), ds.x)
    scores = {k: v for k, v in scores_of(inside, ds.y).items() if k in IN_SAMPLE}
    forgetting = ns.run / "forgetting.npy"
    if forgetting.exists():
        scores["forgetting"] = np.load(forgetting).astype(np.float64)
    flags = {f"{name}, in-sample": f for name, f in flags_of(inside, ds.y).items()}
    if ns.folds > 1:
        outside = cross_fitted(ds, args, ns.folds, ns.split_seed)
        scores.update({f"{k} (out-of-sample)": v for k, v in scores_of(outside, ds.y).items()
                       if k in ("self-confidence", "normalized margin")})
        flags.update({f"{name}, out-of-sample": f for name, f in flags_of(outside, ds.y).items()})
    half = np.random.default_rng(ns.split_seed).permutation(ds.n) < ds.n // 2  # True: the validation half
    lines = [f"Run {ns.run} ({used['dataset']}, {args.model} {args.epochs} epochs, seed {args.seed}); "
             f"{int(flipped.sum())} of {ds.n} labels flipped. {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · "
             f"{machine()}", ""]
    if flipped.any():
        eligible = {k: mislabel.auroc(v[half], flipped[half]) for k, v in scores.items() if k in IN_SAMPLE}
        chosen = max(eligible, key=eligible.get)
        lines += ["| score | AUROC, validation half | AUROC, other half | flipped in the top 40 % (other half) |",
                  "|---|---:|---:|---:|"]
        for name, v in scores.items():
            other = np.flatnonzero(~half)
            top = np.zeros(ds.n, bool)  # by rank, ties by sample order
            top[mislabel.most_suspect_first(v, other)[:int(0.4 * len(other))]] = True
            top = top[other]
            aurocs = [mislabel.auroc(v[part], flipped[part]) for part in (half, ~half)]
            lines.append(f"| {name}{' **(chosen)**' if name == chosen else ''} | {aurocs[0]:.4f} | {aurocs[1]:.4f} "
                         f"| {100 * top[flipped[~half]].mean():.1f} % |")
        lines += ["", "| flagged (all samples) | flagged | precision | recall |", "|---|---:|---:|---:|"]
        for name, f in flags.items():
            lines.append(f"| {name} | {int(f.sum())} ({100 * f.mean():.1f} %) | "
                         f"{100 * flipped[f].mean():.1f} % | {100 * f[flipped].mean():.1f} % |")
    else:
        for name, f in flags.items():
            lines.append(f"- {name}: {int(f.sum())} of {ds.n} flagged "
                         f"({100 * f.mean():.2f} %); per class {np.bincount(ds.y[f], minlength=ds.n_classes).tolist()}")
    text = "\n".join(lines) + "\n"
    print(text)
    if ns.report:
        ns.report.write_text(text)


if __name__ == "__main__":
    main()
