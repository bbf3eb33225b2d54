"""Selection: which samples to remove, given their influence vectors s_i (n, p).

Size-constrained (DESIGN.md): given m, find R with |R| = m minimising ‖Σ_{i∈R} s_i‖₂.
Generalization-guaranteed: given ε, the largest R with ‖Σ_{i∈R} s_i‖₂ ≤ ε.
Both are NP-hard; the solvers here are heuristics that report the objective reached.

Solver `greedy`: a pool greedy path then swap local search.
  * Path: candidates stream in ascending ‖s_i‖ into a pool of K; each step adds the pool member
    minimising the exact ‖S + s_i‖² (S the running sum), then refills its slot. Every step
    re-scores against the updated S, so it never overshoots the way adding many candidates
    scored against one stale S does.
  * Swaps: exchange i ∈ R with j ∉ R when ‖S − s_i + s_j‖ < ‖S‖, pairs scored exactly among
    the k most promising on each side, one swap per round until none improves.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import numpy as np

from .baselines import ORDER_METHODS, removal_order
from .errors import BadInputError

METHODS = ("influence", *ORDER_METHODS)
SOLVERS = ("greedy",)


@dataclass
class SelectionArgs:
    """Exactly one of `prune_ratio` (size-constrained) and `epsilon` (guaranteed)."""

    method: str = "influence"
    prune_ratio: float | None = None  # fraction of samples to remove, in (0, 1)
    epsilon: float | None = None  # bound on ‖Σ_{i∈R} s_i‖₂, > 0
    solver: str = "greedy"
    seed: int = 0  # for `random` and tie-free reproducibility
    pool_size: int = 256  # K of the greedy path
    swap_candidates: int = 64  # k per side of the swap search
    swap_rounds: int = 500  # at most this many swaps

    def __post_init__(self):
        if self.method not in METHODS:
            raise BadInputError(f"--method {self.method!r} is not known; valid: {', '.join(METHODS)}")
        if self.solver not in SOLVERS:
            raise BadInputError(f"--solver {self.solver!r} is not known; valid: {', '.join(SOLVERS)}")
        if (self.prune_ratio is None) == (self.epsilon is None):
            raise BadInputError("give exactly one of --prune-ratio and --epsilon")
        if self.prune_ratio is not None and not (0 < self.prune_ratio < 1):
            raise BadInputError(f"--prune-ratio {self.prune_ratio} must lie strictly between 0 and 1")
        if self.epsilon is not None and not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise BadInputError(f"--epsilon {self.epsilon} must be a positive finite number")
        if self.pool_size < 1 or self.swap_candidates < 1 or self.swap_rounds < 0:
            raise BadInputError("pool size and swap candidates must be ≥ 1, swap rounds ≥ 0")

    def n_prune(self, n: int) -> int:
        return int(round(self.prune_ratio * n))


@dataclass
class Selection:
    pruned: np.ndarray  # (n,) bool, True = removed
    objective: float  # ‖Σ_{pruned} s_i‖₂ recomputed from the vectors
    info: dict = field(default_factory=dict)


def removal_sum(vectors: np.ndarray, pruned: np.ndarray) -> np.ndarray:
    """Σ_{i∈R} s_i in float64, (p,): the predicted parameter change."""
    return vectors[pruned].sum(axis=0, dtype=np.float64) if pruned.any() else np.zeros(vectors.shape[1])


def objective(vectors: np.ndarray, pruned: np.ndarray) -> float:
    """‖Σ_{i∈R} s_i‖₂."""
    return float(np.linalg.norm(removal_sum(vectors, pruned)))


def greedy_path(vectors: np.ndarray, steps: int, pool_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `steps` samples of the pool greedy path, and ‖S_k‖ after each, (steps,) each."""
    n = len(vectors)
    norms2 = np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64)
    stream = np.argsort(norms2, kind="stable")  # ascending ‖s_i‖, ties by index
    K = min(pool_size, n)
    pool = stream[:K].copy()
    P = vectors[pool].astype(np.float64)  # (K, p)
    Pn = norms2[pool].copy()
    nxt = K
    S = np.zeros(vectors.shape[1])
    order = np.empty(steps, dtype=np.int64)
    path = np.empty(steps)
    for t in range(steps):
        k = int(np.argmin(2.0 * (P @ S) + Pn))  # ‖S + s‖² − ‖S‖² for each pool member
        order[t] = pool[k]
        S += P[k]
        path[t] = math.sqrt(float(S @ S))
        if nxt < n:
            pool[k] = stream[nxt]
            P[k] = vectors[pool[k]]
            Pn[k] = norms2[pool[k]]
            nxt += 1
        else:
            Pn[k] = np.inf
            P[k] = 0.0
    return order, path


def swap_refine(vectors: np.ndarray, pruned: np.ndarray, candidates: int, rounds: int) -> tuple[np.ndarray, int]:
    """Best-improvement 1-swap local search; returns the new mask and the number of swaps."""
    pruned = pruned.copy()
    norms2 = np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64)
    S = removal_sum(vectors, pruned)
    swaps = 0
    inside_all, outside_all = np.flatnonzero(pruned), np.flatnonzero(~pruned)
    if len(inside_all) == 0 or len(outside_all) == 0:
        return pruned, 0
    for _ in range(rounds):
        d = (vectors @ S.astype(vectors.dtype)).astype(np.float64)  # s_i · S
        gain_out = -2.0 * d + norms2  # ‖S − s_i‖² − ‖S‖²
        gain_in = 2.0 * d + norms2  # ‖S + s_j‖² − ‖S‖²
        inside, outside = np.flatnonzero(pruned), np.flatnonzero(~pruned)
        ins = inside[np.argsort(gain_out[inside], kind="stable")[:candidates]]
        outs = outside[np.argsort(gain_in[outside], kind="stable")[:candidates]]
        cross = vectors[ins].astype(np.float64) @ vectors[outs].astype(np.float64).T
        delta = gain_out[ins][:, None] + gain_in[outs][None, :] - 2.0 * cross
        a, b = np.unravel_index(int(np.argmin(delta)), delta.shape)
        if not delta[a, b] < -1e-12 * max(float(S @ S), 1e-300):
            break
        i, j = ins[a], outs[b]
        pruned[i], pruned[j] = False, True
        S += vectors[j].astype(np.float64) - vectors[i].astype(np.float64)
        swaps += 1
    return pruned, swaps


def _mask(n: int, rows) -> np.ndarray:
    m = np.zeros(n, dtype=bool)
    m[rows] = True
    return m


def _largest_prefix_within(vectors: np.ndarray, order: np.ndarray, path: np.ndarray, epsilon: float) -> np.ndarray:
    """The longest prefix of `order` whose sum has norm ≤ ε, checked against the recomputed
    objective so rounding can never let ε be exceeded."""
    within = np.flatnonzero(path <= epsilon)
    k = int(within[-1]) + 1 if len(within) else 0
    while k > 0 and objective(vectors, _mask(len(vectors), order[:k])) > epsilon:
        k = int(within[within < k - 1][-1]) + 1 if (within < k - 1).any() else 0
    return _mask(len(vectors), order[:k])


def select(vectors: np.ndarray, args: SelectionArgs, columns: dict[str, np.ndarray] | None = None) -> Selection:
    """Run the method and mode of `args` over vectors (n, p); baselines read their score
    columns (`label`, `el2n`, `grand`, `forgetting`, `embedding`) from `columns`."""
    n = len(vectors)
    started = time.perf_counter()
    info: dict = {"method": args.method, "solver": args.solver if args.method == "influence" else None}
    if args.method != "influence":
        columns = {"label": np.zeros(n, np.int64), **(columns or {})}
        order = removal_order(args.method, columns, vectors, args.seed,
                              args.n_prune(n) if args.prune_ratio is not None else None)
        if args.prune_ratio is not None:
            pruned = _mask(n, order[:args.n_prune(n)])
        else:
            path = np.linalg.norm(np.cumsum(vectors[order], axis=0, dtype=np.float64), axis=1)
            pruned = _largest_prefix_within(vectors, order, path, args.epsilon)
    elif args.prune_ratio is not None:
        m = args.n_prune(n)
        order, path = greedy_path(vectors, m, args.pool_size)
        info["path_objective"] = float(path[-1]) if m else 0.0
        pruned, info["swaps"] = swap_refine(vectors, _mask(n, order), args.swap_candidates, args.swap_rounds)
    else:
        order, path = greedy_path(vectors, n, args.pool_size)
        pruned = _largest_prefix_within(vectors, order, path, args.epsilon)
    info["seconds"] = time.perf_counter() - started
    result = Selection(pruned, objective(vectors, pruned), info)
    result.info["n_pruned"] = int(pruned.sum())
    return result


def select_size_constrained_bruteforce(vectors: np.ndarray, m: int) -> Selection:
    """Reference: enumerate every R of size m (small n only)."""
    n = len(vectors)
    best, best_rows = np.inf, ()
    for rows in itertools.combinations(range(n), m):
        value = float(np.linalg.norm(vectors[list(rows)].sum(axis=0)))
        if value < best:
            best, best_rows = value, rows
    return Selection(_mask(n, list(best_rows)), best, {"solver": "bruteforce"})


def generalization_bound(objective_value: float, n_pruned: int, n: int) -> dict:
    """The order term of Yang et al. (2023), Theorem 1: the test-risk gap of the pruned model is
    O(ε_T/n + m/n²) with ε_T bounding ‖Σ_{i∈R} I_param(z_i)‖ where I_param = −H⁻¹∇ℓ, so
    ε_T = n·‖Σ s_i‖ here and the term is ‖Σ s_i‖ + m/n². The paper states no constants: the
    figure is a scale to compare against, not a certified bound."""
    return {"form": "O(eps/n + m/n^2), eps = n*||sum_R s_i|| (Yang et al. 2023, Thm. 1; constants unstated)",
            "order_term": float(objective_value + n_pruned / n**2)}
