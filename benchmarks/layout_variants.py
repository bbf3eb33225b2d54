"""Exploration on the validation split (benchmarks/validation_split.py): layouts of the difficulty
coverage and candidate orders that are *not* product options, to see whether any of them beats
the product's default at a ratio. It wraps validation_split.py, replacing the library's
`coverage_strata` and candidate stream for the variants below (only in this process; the product
is unchanged). Extra variant syntax, on top of validation_split.py's:

  uniform/K        K equal-width EL2N strata instead of CCS's 50
  uniform~α        the kept budget spread over the strata ∝ size^α (α = 0: CCS's even spread,
                   α = 1: proportional, as stratified random)
  uniform+class    the strata laid out within each class (every class pruned by the same share)
  dense[#k]        candidates fed densest first: ascending distance to the k-th nearest neighbour
                   (default 10) of the same class in the scoring model's embedding
  el2n, forgetting the score baselines; random (seed 0)

Run:  .venv/bin/python benchmarks/layout_variants.py --out runs/candidate-order --from-run RUN \\
        --ratios 0.4 --seeds 0,1,2,3,4 --variants uniform,uniform/100,dense,... --report layout-0.4.md
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import validation_split as vs

import pruning_core.selection as selection
from pruning_core import artifacts, baselines
from pruning_core.selection import SelectionArgs

LAYOUT: dict = {}  # the variant being selected: strata, alpha, per_class, dense


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


def layout(score, n_prune, strata=50, hard_fraction=None):
    k, alpha, cut = LAYOUT.get("strata", 50), LAYOUT.get("alpha", 0.0), hard_fraction or 0.0
    if not LAYOUT.get("per_class"):
        return spread(score, n_prune, k, cut, alpha)
    y = LAYOUT["labels"]
    label, quotas = np.empty(len(score), np.int64), []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        lab, q = spread(score[members], int(round(n_prune / len(score) * len(members))), k, cut, alpha)
        label[members] = lab + len(quotas)
        quotas.extend(q)
    return label, np.asarray(quotas)


def density(scores_path: Path, k: int) -> np.ndarray:
    import pyarrow.parquet as pq
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


_row_keys = selection.row_keys


def row_keys(vectors, salt):
    if salt.endswith(":candidates") and "dense" in LAYOUT:
        return LAYOUT["dense"]
    return _row_keys(vectors, salt)


_selection_args = vs.selection_args


def scoring_run() -> Path:
    """The scored split's run folder (the variants that read its embedding or labels need --from-run)."""
    if "--from-run" not in sys.argv:
        raise SystemExit("dense and +class variants read the scoring run: pass --from-run RUN")
    return Path(sys.argv[sys.argv.index("--from-run") + 1])


def selection_args(variant: str, ratio: float, seed: int) -> SelectionArgs:
    LAYOUT.clear()
    if variant in ("el2n", "forgetting", "random"):
        return SelectionArgs(method=variant, prune_ratio=ratio, seed=seed)
    if variant == "influence-score" or variant.startswith("ccs"):
        return _selection_args(variant, ratio, seed)
    if variant.startswith("dense"):
        _, _, k = variant.partition("#")
        LAYOUT["dense"] = density(artifacts.scores_path(scoring_run()), int(k or 10))
        return _selection_args("uniform", ratio, seed)
    m = re.fullmatch(r"(\w+(?:@[\d.]+)?)(?:/(\d+))?(\+class)?(?:~(-?[\d.]+))?", variant)
    if not m:
        raise SystemExit(f"unknown variant {variant!r}")
    base, k, per_class, alpha = m.groups()
    if not (k or per_class or alpha):
        return _selection_args(variant, ratio, seed)
    LAYOUT.update(strata=int(k or 50), per_class=bool(per_class), alpha=float(alpha or 0))
    if per_class:
        import pyarrow.parquet as pq
        LAYOUT["labels"] = pq.read_table(artifacts.scores_path(scoring_run()), columns=["label"]).column("label").to_numpy()
    return _selection_args(base if "@" in base else base + "@0", ratio, seed)


if __name__ == "__main__":
    selection.coverage_strata = layout
    selection.row_keys = row_keys
    vs.selection_args = selection_args
    sys.exit(vs.main())
