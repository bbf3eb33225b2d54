"""Score-based baselines: each returns a removal order (the first entry is removed first), so
a prune ratio takes its first m entries and ε takes its longest prefix within ε.

  random           seeded permutation
  el2n             lowest EL2N first: ‖p_i − e_{y_i}‖ of the trained model (Paul et al. 2021)
  grand            lowest gradient norm first: ‖∇_θ ℓ_i‖ over the scope (Paul et al. 2021)
  forgetting       fewest forgetting events first (correct → wrong between epochs; Toneva et al. 2019),
                   ties by EL2N
  influence-score  smallest ‖s_i‖ first: the individual ranking the paper compares against
  herding          per class, the reverse of the herding order on embeddings (Welling 2009)
  kcenter          per class, the reverse of the greedy k-center order on embeddings (Sener & Savarese 2018)
  moderate         per class, farthest from the median distance to the class centroid first (Xia et al. 2023)
  ccs              coverage-centric (Zheng et al. 2023): the hardest β by EL2N first, then stratified
                   over EL2N so kept samples cover every difficulty level
"""

from __future__ import annotations

import numpy as np

from .errors import BadInputError
from .mislabel import most_suspect_first

ORDER_METHODS = ("random", "el2n", "grand", "forgetting", "influence-score", "herding", "kcenter", "moderate", "ccs",
                 "mislabel")
NEEDS = {"el2n": "el2n", "grand": "grand", "forgetting": "forgetting", "herding": "embedding",
         "kcenter": "embedding", "moderate": "embedding", "ccs": "el2n", "mislabel": "mislabel"}


def forgetting_events(correctness: np.ndarray) -> np.ndarray:
    """(n, epochs) bool → (n,) int64: transitions from correct to wrong between epochs; samples
    never classified right count as epochs (as forgotten as possible, Toneva et al.)."""
    events = (correctness[:, :-1] & ~correctness[:, 1:]).sum(1)
    never = ~correctness.any(1)
    return np.where(never, correctness.shape[1], events).astype(np.int64)


def _per_class(labels: np.ndarray, order_within) -> np.ndarray:
    """Interleave per-class removal orders so every prefix removes classes in proportion."""
    keys, rows = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        local = members[order_within(members)]
        keys.append((np.arange(len(local)) + 0.5) / len(local))  # position as a fraction of the class
        rows.append(local)
    keys, rows = np.concatenate(keys), np.concatenate(rows)
    return rows[np.lexsort((rows, keys))]


def herding_order(E: np.ndarray) -> np.ndarray:
    """Indices in herding order: each step picks the point that brings the running mean of the
    picked points closest to the mean of all. (n, d) → (n,)."""
    n = len(E)
    mu = E.mean(0)
    norms = (E * E).sum(1)
    picked = np.zeros(n, bool)
    total = np.zeros(E.shape[1])
    order = np.empty(n, dtype=np.int64)
    for t in range(n):
        target = mu * (t + 1) - total  # want E_j ≈ target: ‖target − E_j‖² = const − 2 E_j·target + ‖E_j‖²
        score = norms - 2.0 * (E @ target)
        score[picked] = np.inf
        j = int(np.argmin(score))
        order[t], picked[j] = j, True
        total += E[j]
    return order


def kcenter_order(E: np.ndarray) -> np.ndarray:
    """Greedy k-center (farthest point first, from the point nearest the mean). (n, d) → (n,)."""
    n = len(E)
    start = int(np.argmin(((E - E.mean(0)) ** 2).sum(1)))
    dist = ((E - E[start]) ** 2).sum(1)
    order = np.empty(n, dtype=np.int64)
    order[0] = start
    dist[start] = -1.0
    for t in range(1, n):
        j = int(np.argmax(dist))
        order[t] = j
        dist = np.minimum(dist, ((E - E[j]) ** 2).sum(1))
        dist[order[:t + 1]] = -1.0
    return order


def ccs_hard_fraction(prune_ratio: float) -> float:
    """β, the share of the hardest samples cut first: CCS's CIFAR-10 schedule (0 up to 50 %
    pruning, 10 % at 70–80 %, 30 % at 90 %)."""
    return 0.3 if prune_ratio >= 0.9 else 0.1 if prune_ratio >= 0.7 else 0.0


def coverage_strata(score: np.ndarray, n_prune: int, strata: int = 50,
                    hard_fraction: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """CCS's budget layout as (stratum (n,), removals per stratum): the hardest β·n samples form
    the last stratum, removed whole; the rest fall in `strata` equal-width bins of `score`, and the
    kept budget is spread evenly over the bins, smallest bins first (a bin smaller than its share
    keeps everything). Easy, crowded bins give up most; every difficulty level keeps samples."""
    n = len(score)
    if hard_fraction is None:
        hard_fraction = ccs_hard_fraction(n_prune / n)
    label = np.empty(n, np.int64)
    hard = np.argsort(-score, kind="stable")[:min(int(hard_fraction * n), n_prune)]
    rest = np.ones(n, bool)
    rest[hard] = False
    label[hard] = strata
    edges = np.linspace(score[rest].min(), score[rest].max(), strata + 1) if rest.any() else np.zeros(strata + 1)
    label[rest] = np.clip(np.searchsorted(edges, score[rest], side="right") - 1, 0, strata - 1)
    sizes = np.bincount(label, minlength=strata + 1)
    kept = np.zeros(strata + 1, np.int64)
    budget = n - n_prune
    filled = [b for b in np.argsort(sizes[:strata], kind="stable") if sizes[b]]
    for i, b in enumerate(filled):
        kept[b] = min(sizes[b], budget // (len(filled) - i))
        budget -= kept[b]
    return label, sizes - kept


def ccs_order(el2n: np.ndarray, n_prune: int, seed: int, strata: int = 50,
              hard_fraction: float | None = None) -> np.ndarray:
    """Coverage-centric selection as a removal order for a budget of n_prune removals: each
    stratum's removals drawn at random, the hardest cut first."""
    label, removals = coverage_strata(el2n, n_prune, strata, hard_fraction)
    rng = np.random.default_rng(seed)
    hard = np.flatnonzero(label == strata)
    dropped, kept = [], []
    for b in range(strata):
        members = rng.permutation(np.flatnonzero(label == b))
        dropped.append(members[:removals[b]])
        kept.append(members[removals[b]:])
    return np.concatenate([hard[np.argsort(-el2n[hard], kind="stable")], rng.permutation(np.concatenate(dropped)),
                           rng.permutation(np.concatenate(kept))]).astype(np.int64)


def removal_order(method: str, columns: dict[str, np.ndarray], vectors: np.ndarray | None, seed: int,
                  n_prune: int | None = None, hard_fraction: float | None = None) -> np.ndarray:
    """The removal order of a baseline; `columns` holds `label` and the score columns;
    `hard_fraction` is CCS's β (None: its CIFAR-10 schedule)."""
    need = NEEDS.get(method)
    if need and need not in columns:
        raise BadInputError(f"`method` {method} needs the score column {need!r}, which these scores lack"
                            + (" (forgetting is recorded only when this run trains the model)"
                               if need == "forgetting" else ""))
    n = len(columns["label"])
    stable = lambda values: np.argsort(values, kind="stable")  # noqa: E731
    if method == "random":
        return np.random.default_rng(seed).permutation(n)
    if method in ("el2n", "grand"):
        return stable(columns[method])
    if method == "forgetting":
        return np.lexsort((columns.get("el2n", np.zeros(n)), columns["forgetting"]))
    if method == "mislabel":  # the mislabel score alone: the least likely label (1 − p_y) first
        return most_suspect_first(columns["mislabel"])
    if method == "influence-score":
        return stable(np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64))
    labels = columns["label"]
    if method == "herding":
        E = columns["embedding"].astype(np.float64)
        return _per_class(labels, lambda rows: herding_order(E[rows])[::-1])
    if method == "kcenter":
        E = columns["embedding"].astype(np.float64)
        return _per_class(labels, lambda rows: kcenter_order(E[rows])[::-1])
    if method == "moderate":
        E = columns["embedding"].astype(np.float64)

        def within(rows):
            d = np.linalg.norm(E[rows] - E[rows].mean(0), axis=1)
            return np.argsort(-np.abs(d - np.median(d)), kind="stable")
        return _per_class(labels, within)
    if method == "ccs":
        if n_prune is None:
            raise BadInputError("`method` ccs needs `prune_ratio` (its strata are laid out for a budget)")
        return ccs_order(columns["el2n"], n_prune, seed, hard_fraction=hard_fraction)
    raise BadInputError(f"`method` {method!r} is not known; valid: influence, {', '.join(ORDER_METHODS)}")
