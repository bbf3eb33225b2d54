"""Exploration on the validation split (experiments/validation_split.py): layouts of the difficulty
coverage and candidate orders that are *not* product options, to see whether any of them beats
the product's default at a ratio. It runs validation_split.py with its own selections, passing
the selection's `layout` and `stream` extension points (pruning_core.selection.select) for the
variants below; the product is unchanged. Extra variant syntax, on top of validation_split.py's:

  uniform/K        K equal-width EL2N strata instead of CCS's 50
  uniform~α        the kept budget spread over the strata ∝ size^α (α = 0: CCS's even spread,
                   α = 1: proportional, as stratified random)
  uniform+class    the strata laid out within each class (every class pruned by the same share)
  dense[#k]        candidates fed densest first: ascending distance to the k-th nearest neighbour
                   (default 10) of the same class in the scoring model's embedding
  el2n, forgetting the score baselines; random (seed 0)

Run:  .venv/bin/python -m experiments.layout_variants --out runs/candidate-order --from-run RUN \\
        --ratios 0.4 --seeds 0,1,2,3,4 --variants uniform,uniform/100,dense,... --report layout-0.4.md
"""

from __future__ import annotations

import functools
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from experiments import validation_split as vs
from pruning_core import artifacts, baselines
from pruning_core.selection import SelectionArgs, selection_stage


def spread(score: np.ndarray, n_prune: int, strata: int, hard_fraction: float, alpha: float):
    """CCS's layout with the kept budget ∝ size^α over the strata (water-filled, capped by size)."""
    label, removals = baselines.coverage_strata(score, n_prune, strata, hard_fraction)
    if alpha == 0.0:
        return label, removals
    sizes = np.bincount(label, minlength=strata + 1)[:strata].astype(np.float64)
    budget = int((label < strata).sum()) - (n_prune - int(removals[strata]))
    weight = np.power(np.maximum(sizes, 1.0), alpha) * (sizes > 0)
    lo, hi = 0.0, 1e12
    for _ in range(200):  # the largest λ with Σ min(size, λ·w) ≤ budget
        lam = (lo + hi) / 2
        lo, hi = (lo, lam) if np.minimum(sizes, lam * weight).sum() > budget else (lam, hi)
    kept = np.floor(np.minimum(sizes, lo * weight)).astype(np.int64)
    room = np.flatnonzero(kept < sizes)
    kept[room[np.argsort(-(lo * weight[room] - kept[room]), kind="stable")][:budget - int(kept.sum())]] += 1
    removals = removals.copy()
    removals[:strata] = sizes.astype(np.int64) - kept
    return label, removals


def layout(score, n_prune, hard_fraction=None, *, strata=50, alpha=0.0, labels=None):
    """A variant's difficulty layout (select's `layout`): `strata` strata, the kept budget ∝ size^α,
    laid out within each class of `labels` when given."""
    cut = hard_fraction or 0.0
    if labels is None:
        return spread(score, n_prune, strata, cut, alpha)
    label, quotas = np.empty(len(score), np.int64), []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        lab, q = spread(score[members], int(round(n_prune / len(score) * len(members))), strata, cut, alpha)
        label[members] = lab + len(quotas)
        quotas.extend(q)
    return label, np.asarray(quotas)


def density(scores_path: Path, k: int) -> np.ndarray:
    import torch

    table = pq.read_table(scores_path, columns=["label", "embedding"])
    y = table.column("label").to_numpy()
    E = torch.tensor(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32))
    d = np.empty(len(y))
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        D = torch.cdist(E[rows], E[rows])
        D.fill_diagonal_(float("inf"))
        d[rows] = D.topk(k, largest=False).values[:, -1].numpy()
    return d


def selection_args(run: Path, variant: str, ratio: float, seed: int) -> tuple[SelectionArgs, dict]:
    """A variant's SelectionArgs and the extension points selection_stage takes for it."""
    if variant in ("el2n", "forgetting", "random"):
        return SelectionArgs(method=variant, prune_ratio=ratio, seed=seed), {}
    if variant == "influence-score" or variant.startswith("ccs"):
        return vs.selection_args(variant, ratio, seed), {}
    if variant.startswith("dense"):
        _, _, k = variant.partition("#")
        keys = density(artifacts.scores_path(run), int(k or 10))  # ascending keys are fed first
        return vs.selection_args("uniform", ratio, seed), {"stream": np.argsort(keys, kind="stable")}
    m = re.fullmatch(r"(\w+(?:@[\d.]+)?)(?:/(\d+))?(\+class)?(?:~(-?[\d.]+))?", variant)
    if not m:
        raise SystemExit(f"unknown variant {variant!r}")
    base, k, per_class, alpha = m.groups()
    if not (k or per_class or alpha):
        return vs.selection_args(variant, ratio, seed), {}
    labels = None
    if per_class:
        labels = pq.read_table(artifacts.scores_path(run), columns=["label"]).column("label").to_numpy()
    lay_out = functools.partial(layout, strata=int(k or 50), alpha=float(alpha or 0), labels=labels)
    return vs.selection_args(base if "@" in base else base + "@0", ratio, seed), {"layout": lay_out}


def select_variant(run: Path, variant: str, ratio: float, seed: int, out: Path) -> None:
    args, extension = selection_args(run, variant, ratio, seed)
    selection_stage(artifacts.scores_path(run), args, out, **extension)


if __name__ == "__main__":
    sys.exit(vs.main(select=select_variant, doc=__doc__))
