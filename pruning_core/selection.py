"""Selection: which samples to remove, given their influence vectors s_i (n, p).

Size-constrained (Yang et al., ICLR 2023): given m, find R with |R| = m minimising ‖Σ_{i∈R} s_i‖₂.
Generalization-guaranteed: given ε, the largest R with ‖Σ_{i∈R} s_i‖₂ ≤ ε.
Both are NP-hard; the solvers here are heuristics that report the objective reached.

Solver `greedy`: a pool greedy path then swap local search.
  * Path: candidates stream into a pool of K (`--candidates`: ascending ‖s_i‖, a seeded uniform
    order, or ascending EL2N); each step adds the pool member minimising the exact ‖S + s_i‖²
    (S the running sum), then refills its slot. Every step re-scores against the updated S, so
    it never overshoots the way adding many candidates scored against one stale S does.
  * Swaps: exchange i ∈ R with j ∉ R when ‖S − s_i + s_j‖ < ‖S‖, pairs scored exactly among
    the k most promising on each side, one swap per round until none improves (within a class
    or difficulty stratum where counts are fixed). `--swap-rounds 0` keeps the path as it is:
    the default under difficulty strata and for the `easiest` order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import artifacts
from .baselines import ORDER_METHODS, coverage_strata, removal_order
from .errors import BadInputError
from .mislabel import removed_first

METHODS = ("influence", *ORDER_METHODS)
SOLVERS = ("greedy", "scip", "bucketed")
COVERAGE = ("none", "difficulty")
CANDIDATES = ("smallest", "uniform", "easiest")
MAX_SWAP_ROUNDS = 100_000  # also the bound of the run/evaluate form (flows/parameters.py)
MAX_ROUNDS = 10  # pruning rounds of one run (each trains and scores a model): the form's bound too
SWAP_ROUNDS = 500  # rounds of the swap search where `default_swap_rounds` runs one
SMALLEST_FROM = 0.7  # prune ratio from which `auto` feeds the smallest ‖s_i‖ first (`resolve_candidates`)
EXTREME_FROM = 0.9  # prune ratio from which the budget is extreme (keep ≤ 10 %): `hard_cut_for`, `resolve_candidates`
MISLABEL_FIRST_FROM = 0.05  # share flagged from which the default removes what looks mislabelled first


def round_ratios(total: float, rounds: int, n: int | None = None) -> list[float]:
    """The prune ratio of each of `rounds` rounds that together remove `total` of the samples:
    every round removes total/rounds of the original set, so round j (from 0) prunes
    (total/rounds) / (1 − j·total/rounds) of the samples still kept. One round: [total]. Given the
    set's size `n`, the ratios give whole counts that add up to exactly the one-round count
    round(total·n) (the rounds' shares differ by at most one sample)."""
    if n is None:
        step = total / rounds
        return [step / (1 - j * step) for j in range(rounds)]
    m = int(round(total * n))
    if m < rounds:
        raise BadInputError(f"`rounds` {rounds}: `prune_ratio` {total:g} of {n} samples removes {m}, fewer than one "
                            "per round; give fewer rounds")
    counts = [round(m * (j + 1) / rounds) - round(m * j / rounds) for j in range(rounds)]
    return [c / (n - sum(counts[:j])) for j, c in enumerate(counts)]


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
    swap_rounds: int | None = None  # at most this many rounds of swaps (None: `default_swap_rounds`; 0: the path)
    restarts: int | None = None  # extra random-start local searches (None: 8 when n ≤ 5,000, else 0)
    class_balanced: bool = False  # prune every class in proportion to its size
    coverage: str = "none"  # "difficulty": per-stratum removal quotas over EL2N (CCS's layout), see `select`
    candidates: str = "smallest"  # the greedy path's feed: ascending ‖s_i‖, seeded uniform, or ascending EL2N
    hard_cut: float | None = None  # under coverage: share of the hardest samples removed first (None: hard_cut_for)
    mislabel_first: bool | None = False  # under coverage: what looks mislabelled goes first (None: if enough do)
    train_budget: float = 1.0  # epochs the pruned set will be trained for ÷ the scoring run's (shifts hard_cut_for)
    time_limit: float = 60.0  # seconds, for the `scip` reference solver
    buckets: int = 8  # for the `bucketed` solver

    def __post_init__(self):
        if self.method not in METHODS:
            raise BadInputError(f"`method` {self.method!r} is not known; valid: {', '.join(METHODS)}")
        if self.solver not in SOLVERS:
            raise BadInputError(f"`solver` {self.solver!r} is not known; valid: {', '.join(SOLVERS)}")
        if not (self.time_limit > 0 and math.isfinite(self.time_limit)):
            raise BadInputError(f"`time_limit` {self.time_limit:g} must be a positive number of seconds")
        if self.solver != "greedy" and self.method != "influence":
            raise BadInputError(f"`solver` {self.solver} applies to `method` influence ({self.method} ranks or draws "
                                "its removals; it has no solver)")
        if (self.prune_ratio is None) == (self.epsilon is None):
            raise BadInputError("give exactly one of `prune_ratio` and `epsilon`")
        if self.prune_ratio is not None and not (0 < self.prune_ratio < 1):
            raise BadInputError(f"`prune_ratio` {self.prune_ratio} must lie strictly between 0 and 1")
        if self.epsilon is not None and not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise BadInputError(f"`epsilon` {self.epsilon} must be a positive finite number")
        if self.coverage not in COVERAGE:
            raise BadInputError(f"`coverage` {self.coverage!r} is not known; valid: {', '.join(COVERAGE)}")
        if self.candidates not in CANDIDATES:
            raise BadInputError(f"`candidates` {self.candidates!r} is not known; valid: {', '.join(CANDIDATES)}")
        if self.solver == "bucketed" and (self.epsilon is not None or self.class_balanced or self.coverage != "none"):
            # before the candidate order, which `auto` may have chosen for the coverage
            raise BadInputError("`solver` bucketed solves `prune_ratio` without `class_balanced` or `coverage`")
        if self.candidates != "smallest" and (self.method != "influence" or self.solver == "bucketed"
                                              or self.epsilon is not None):
            raise BadInputError(f"`candidates` {self.candidates} applies to `method` influence with `prune_ratio` "
                                "(greedy or scip solver)")
        if self.coverage != "none" and (self.epsilon is not None or self.class_balanced or self.method != "influence"):
            raise BadInputError("`coverage` difficulty applies to `method` influence with `prune_ratio`, "
                                "without `class_balanced`")
        if self.mislabel_first is not False and (self.method != "influence" or self.coverage != "difficulty"):
            raise BadInputError("`mislabel_first` applies to `method` influence under `coverage` difficulty "
                                "(`prune_ratio`, greedy or scip solver)")
        if self.hard_cut is not None and not (0 <= self.hard_cut < 1):
            raise BadInputError(f"`hard_cut` {self.hard_cut} must lie in [0, 1)")
        if self.hard_cut is not None and self.coverage == "none" and self.method != "ccs":
            raise BadInputError("`hard_cut` applies to `coverage` difficulty and `method` ccs")
        if self.hard_cut is not None and self.prune_ratio is not None and self.hard_cut > self.prune_ratio:
            raise BadInputError(f"`hard_cut` {self.hard_cut:g} cuts more than `prune_ratio` {self.prune_ratio:g} "
                                f"removes; give at most {self.prune_ratio:g} (all of the removals the hardest)")
        if not (self.train_budget > 0 and math.isfinite(self.train_budget)):
            raise BadInputError(f"the training budget {self.train_budget} (`train_epochs` ÷ the scoring run's epochs) "
                                "must be a positive finite number")
        if self.class_balanced and self.epsilon is not None:
            raise BadInputError("`class_balanced` applies to `prune_ratio`, not `epsilon`")
        if self.seed < 0:
            raise BadInputError(f"`seed` {self.seed} must be ≥ 0")
        if self.pool_size < 1 or self.swap_candidates < 1:
            raise BadInputError("pool size and swap candidates must be ≥ 1")
        if self.swap_rounds is not None:
            if self.swap_rounds < 0:
                raise BadInputError(f"`swap_rounds` {self.swap_rounds} must be ≥ 0 (0: the greedy path is the answer)")
            if self.swap_rounds > MAX_SWAP_ROUNDS:
                raise BadInputError(f"`swap_rounds` {self.swap_rounds} must be ≤ {MAX_SWAP_ROUNDS} (each round "
                                    "scores every sample; the search stops earlier when a round finds no improving "
                                    "swap)")
            if self.method != "influence":
                raise BadInputError("`swap_rounds` applies to `method` influence")

    def n_prune(self, n: int) -> int:
        return int(round(self.prune_ratio * n))

    def rounds(self) -> int:
        """Rounds of the swap search: --swap-rounds as given, else `default_swap_rounds`."""
        return self.swap_rounds if self.swap_rounds is not None else default_swap_rounds(self)

    def coverage_cut(self) -> float:
        """β the difficulty coverage cuts first: --hard-cut as given, else the schedule."""
        return self.hard_cut if self.hard_cut is not None else hard_cut_for(self.prune_ratio, self.train_budget)

    def removes_mislabelled_first(self, columns: dict[str, np.ndarray]) -> bool:
        """Whether this selection removes the samples that look mislabelled first: as
        `mislabel_first` says; None (the default) where at least MISLABEL_FIRST_FROM of the samples
        look mislabelled (the column `mislabelled`, which scores written before it lack): below it
        the flagged are mostly the model's own confusions, whose removal costs accuracy
        (benchmarks/results/robustness-pilot.md)."""
        if self.mislabel_first is None:
            return "mislabelled" in columns and float(np.mean(columns["mislabelled"])) >= MISLABEL_FIRST_FROM
        if self.mislabel_first and "mislabelled" not in columns:
            raise BadInputError("`mislabel_first` needs the score column 'mislabelled', which these scores lack "
                                "(written before it existed); score again, or select without it")
        return self.mislabel_first


def default_swap_rounds(args: SelectionArgs) -> int:
    """0 (the greedy path is the answer) under difficulty coverage and for the `easiest` order,
    else SWAP_ROUNDS. Under the strata the swaps trade removals for others of the same stratum
    that cancel better: a lower ‖Σ_R s_i‖, not a better pruned set; held out, the path beat them
    (benchmarks/results/cross-validation-0.6.md, cross-validation-0.4.md)."""
    return 0 if args.coverage == "difficulty" or args.candidates == "easiest" else SWAP_ROUNDS


def hard_cut_for(prune_ratio: float, train_budget: float = 1.0) -> float:
    """β of the influence method's difficulty coverage, the share of the hardest (highest-EL2N)
    samples removed before the strata share out the rest: β = max(0, (r − 0.5 − s·log2 b) / 2).

    r is the prune ratio, b the train_budget (the pruned set's training epochs ÷ the scoring run's,
    taken as ½ below ½), s = 0.1 for b ≥ 1 and 0.2 below. With the scoring run's own
    recipe: none up to 50 % pruned, then half of every further removal. A longer recipe learns
    from more of the hard, often mislabelled tail, so the cut comes later; a shorter one, sooner.
    Chosen on a held-out validation split against CCS's schedule and every other β measured
    (benchmarks/results/hard-cut.md; the budget's shift: recipe-8.md, recipe-2.md).

    From EXTREME_FROM pruned (keep 10 % or less) the cut is all of every removal past half,
    β = max(0, r − 0.5 − s·log2 b): a set that small learns from the easier half and its strata
    spread it evenly; the half-cut left the strata so much of the hard tail that the default fell
    4.8 to 19 points below random, this cut ties random (benchmarks/results/extreme-budget.md; the
    budget's shift there is carried over, not measured)."""
    b, slope = _budget_terms(train_budget)
    share = 1.0 if prune_ratio >= EXTREME_FROM else 0.5  # of every removal past the (shifted) half
    return round(max(0.0, share * (prune_ratio - 0.5 - slope * math.log2(b))), 6)


def _budget_terms(train_budget: float) -> tuple[float, float]:
    """The budget hard_cut_for uses (below ½ taken as ½) and its slope per doubling."""
    b = max(0.5, train_budget)
    return b, (0.1 if b >= 1 else 0.2)


def hard_cut_formula(train_budget: float = 1.0, extreme: bool = False) -> str:
    """hard_cut_for's line at this budget, in words (for reports); with `extreme`, also its line
    from EXTREME_FROM on."""
    shifted = "r − 0.5"
    if train_budget != 1:
        b, slope = _budget_terms(train_budget)
        shifted = f"r − 0.5 − {slope:g}·log2 {b:g}"
    return f"({shifted}) / 2" + (f", {shifted} from {EXTREME_FROM:g}" if extreme else "")


# --- the selection policy: what the options left on `auto` or empty resolve to -----------------
# One place for the run, the evaluation and `select` (the flow parameters call these).


def resolve_coverage(coverage: str, method: str, prune_ratio: float | None, solver: str, class_balanced: bool) -> str:
    """`auto` → `difficulty` where it applies (the product's default), else `none`."""
    if coverage != "auto":
        return coverage
    applies = method == "influence" and prune_ratio is not None and solver != "bucketed" and not class_balanced
    return "difficulty" if applies else "none"


def resolve_candidates(args: SelectionArgs) -> str:
    """The influence method's `auto` candidate order: under difficulty coverage below
    SMALLEST_FROM pruned, `easiest` where the strata cut no hardest share (`args.coverage_cut()`
    = 0) and `uniform` where they do; `smallest` up to EXTREME_FROM, `uniform` from there on;
    `smallest` without coverage. Each won held out where it applies
    (benchmarks/results/cross-validation-0.4.md, candidate-order.md, extreme-budget.md)."""
    if args.coverage == "difficulty" and args.prune_ratio >= EXTREME_FROM:
        return "uniform"
    if args.coverage != "difficulty" or args.prune_ratio >= SMALLEST_FROM:
        return "smallest"
    return "easiest" if args.coverage_cut() == 0 else "uniform"


def resolve_mislabel_first(mislabel_first: bool | None, method: str, coverage: str) -> bool | None:
    """Not given → None where it applies (the influence method under difficulty coverage: decided
    by the share of samples flagged, `SelectionArgs.removes_mislabelled_first`), else off."""
    if mislabel_first is not None:
        return mislabel_first
    return None if method == "influence" and coverage == "difficulty" else False


def selection_args(method: str, prune_ratio: float | None, epsilon: float | None, solver: str, seed: int,
                   class_balanced: bool, coverage: str, candidates: str, hard_cut: float | None = None,
                   train_budget: float = 1.0, mislabel_first: bool | None = None, **extra) -> SelectionArgs:
    """SelectionArgs with `auto` coverage and candidate order resolved (the order applies to the
    influence method only), the removal of what looks mislabelled first (`resolve_mislabel_first`)
    and the training budget kept where it shifts something (the hard-cut schedule of the influence
    method under difficulty coverage, no --hard-cut given): one place for the run, the evaluation
    and `select`."""
    coverage = resolve_coverage(coverage, method, prune_ratio, solver, class_balanced)
    shifts = method == "influence" and coverage == "difficulty" and hard_cut is None
    args = SelectionArgs(method=method, prune_ratio=prune_ratio, epsilon=epsilon, solver=solver, seed=seed,
                         class_balanced=class_balanced, coverage=coverage,
                         candidates="smallest" if candidates == "auto" else candidates,
                         hard_cut=hard_cut, train_budget=train_budget if shifts else 1.0,
                         mislabel_first=resolve_mislabel_first(mislabel_first, method, coverage), **extra)
    if candidates == "auto" and method == "influence":  # an order given for another method was refused above
        return dataclasses.replace(args, candidates=resolve_candidates(args))
    return args


def check_train_epochs(train_epochs: int | None, selection: SelectionArgs) -> None:
    """--train-epochs refused, in one line, where it would change nothing."""
    if train_epochs is None:
        return
    if train_epochs < 1:
        raise BadInputError(f"`train_epochs` {train_epochs} must be at least 1")
    if selection.method != "influence" or selection.coverage != "difficulty":
        raise BadInputError("`train_epochs` shifts the hard cut of `method` influence under difficulty coverage "
                            "(`prune_ratio`); it does not apply here")
    if selection.hard_cut is not None:
        raise BadInputError("`train_epochs` shifts the hard-cut schedule; with `hard_cut` given there is none to shift")


def train_budget(train_epochs: int | None, scoring_epochs: int, model: str) -> float:
    """The pruned set's training epochs ÷ the scoring run's (SelectionArgs.train_budget); 1 when
    not given and for `linear`, which trains to the optimum."""
    return 1.0 if train_epochs is None or model == "linear" else train_epochs / scoring_epochs


def check_train_epochs_model(train_epochs: int | None, model: str) -> None:
    """--train-epochs given for a `linear` scoring run, which has no epochs to shift by."""
    if train_epochs is not None and model == "linear":
        raise BadInputError("`train_epochs` shifts the hard cut by a network's training budget; `model` linear "
                            "trains to its optimum, without epochs")


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


def greedy_path(vectors: np.ndarray, steps: int, pool_size: int, labels: np.ndarray | None = None,
                quotas: np.ndarray | None = None, start: np.ndarray | None = None,
                exclude: np.ndarray | None = None, stream: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first `steps` samples of the pool greedy path, and ‖S_k‖ after each, (steps,) each.
    The pool is fed in the order `stream` (default: ascending ‖s_i‖, ties by index). Without
    `quotas`, no step depends on `steps`: a shorter path is a prefix of a longer one.
    With `quotas` (removals allowed per class), a class that reaches its quota leaves the
    stream: its pool members are dropped and never picked again."""
    n = len(vectors)
    norms2 = np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64)
    if stream is None:
        stream = np.argsort(norms2, kind="stable")
    if quotas is not None:
        return _greedy_path_quotas(vectors, norms2, stream, steps, pool_size, labels, quotas.copy())
    K = min(pool_size, n)
    half = max(1, K // 2)
    refresh = max(8 * K, 2048)
    taken = np.zeros(n, bool) if exclude is None else exclude.copy()  # `start`: S of samples already chosen
    S = np.zeros(vectors.shape[1]) if start is None else start.astype(np.float64).copy()
    S32 = np.zeros(vectors.shape[1], dtype=vectors.dtype)
    order = np.empty(steps, dtype=np.int64)
    path = np.empty(steps)
    norm2 = float(S @ S)
    n_taken = int(taken.sum())
    # two candidate queues feed the pool: ascending ‖s_i‖ (cheap to add when S is small) and,
    # refreshed every `refresh` steps, the best exact one-step gain against the current S
    # (what reduces a large S); slot j refills from queue source[j]
    queues = [stream, stream[::-1][:0]]
    pointers = [0, 0]
    pool = np.full(K, -1)
    source = np.zeros(K, dtype=np.int64)
    P = np.zeros((K, vectors.shape[1]))
    Pn = np.full(K, np.inf)
    scores = np.empty(K)

    def refill(j):
        q = source[j]
        queue = queues[q]
        while pointers[q] < len(queue) and (taken[queue[pointers[q]]] or in_pool[queue[pointers[q]]]):
            pointers[q] += 1
        if pointers[q] < len(queue):
            pool[j] = queue[pointers[q]]
            in_pool[pool[j]] = True
            P[j] = vectors[pool[j]]
            Pn[j] = norms2[pool[j]]
            pointers[q] += 1
        else:
            pool[j], Pn[j] = -1, np.inf
            P[j] = 0.0

    in_pool = np.zeros(n, bool)
    source[:] = 0
    for j in range(K):
        refill(j)
    for t in range(steps):
        if t and t % refresh == 0 and K > 1:
            S32[:] = S
            key = norms2 + 2.0 * (vectors @ S32).astype(np.float64)
            key[taken] = np.inf
            top = min(refresh + K, n - t - n_taken)
            best = np.argpartition(key, top - 1)[:top] if top < n else np.arange(n)
            best = best[np.lexsort((best, key[best]))]
            queues[1], pointers[1] = best[~taken[best]], 0
            for j in range(half, K):  # the second half of the pool now draws from the new ranking
                if pool[j] >= 0:
                    in_pool[pool[j]] = False
                source[j] = 1
                refill(j)
        np.dot(P, S, out=scores)
        scores *= 2.0
        scores += Pn  # ‖S + s‖² − ‖S‖² for each pool member
        k = int(np.argmin(scores))
        i = pool[k]
        order[t] = i
        taken[i] = True
        in_pool[i] = False
        norm2 += scores[k]
        S += P[k]
        path[t] = math.sqrt(max(norm2, 0.0))
        refill(k)
        if pool[k] < 0 and source[k] == 1:  # the refreshed queue ran dry: fall back to the norm queue
            source[k] = 0
            refill(k)
    return order, path


def _greedy_path_quotas(vectors, norms2, stream, steps, pool_size, labels, quotas):
    """`greedy_path` with per-class removal quotas. The pool is K slots holding its members'
    vectors (float64) and squared norms, refilled in stream order; a pick ties with another only
    at an equal score, and then the one that entered the pool first is taken."""
    n, p = vectors.shape
    K = min(pool_size, n)
    pool = np.full(K, -1)
    entered = np.zeros(K, dtype=np.int64)  # when each member entered the pool: ties go to the earliest
    P = np.zeros((K, p))
    Pn = np.full(K, np.inf)  # an empty slot never wins
    pool_label = np.full(K, -1)
    S = np.zeros(p)
    scores = np.empty(K)
    order, path = np.empty(steps, dtype=np.int64), np.empty(steps)
    nxt, arrivals = 0, 0

    def refill():
        nonlocal nxt, arrivals
        for j in np.flatnonzero(pool < 0):
            while nxt < n and quotas[labels[stream[nxt]]] <= 0:
                nxt += 1
            if nxt == n:
                return
            i = int(stream[nxt])
            nxt += 1
            pool[j], pool_label[j], entered[j], Pn[j] = i, labels[i], arrivals, norms2[i]
            P[j] = vectors[i]
            arrivals += 1

    def empty(slots):
        pool[slots], pool_label[slots], Pn[slots] = -1, -1, np.inf
        P[slots] = 0.0

    refill()
    for t in range(steps):
        np.dot(P, S, out=scores)
        scores *= 2.0
        scores += Pn  # ‖S + s‖² − ‖S‖² for each pool member
        best = np.flatnonzero(scores == scores.min())
        k = int(best[np.argmin(entered[best])]) if len(best) > 1 else int(best[0])
        i = int(pool[k])
        if i < 0:  # every slot empty: the quotas ask for more than the stream holds
            raise ValueError(f"greedy path: no candidate left after {t} of {steps} removals")
        order[t] = i
        S += P[k]
        path[t] = math.sqrt(float(S @ S))
        quotas[labels[i]] -= 1
        empty(np.flatnonzero(pool_label == labels[i]) if quotas[labels[i]] == 0 else k)
        refill()
    return order, path


def class_quotas(labels: np.ndarray, m: int) -> np.ndarray:
    """Removals per class in proportion to class size, summing to m (largest remainders).

    Raises `BadInputError` where a class would lose every sample: class balance was asked for so
    that every class keeps its share, and an emptied class has none."""
    counts = np.bincount(labels)
    exact = m * counts / counts.sum()
    quotas = np.floor(exact).astype(np.int64)
    quotas[np.argsort(-(exact - quotas), kind="stable")[:m - quotas.sum()]] += 1
    emptied = np.flatnonzero((quotas == counts) & (counts > 0))
    if len(emptied):
        c = int(emptied[np.argmin(counts[emptied])])
        more = f" and {len(emptied) - 1} more classes" if len(emptied) > 1 else ""
        raise BadInputError(f"`class_balanced`: removing {m} of {len(labels)} samples in proportion empties class {c} "
                            f"(all its {counts[c]} samples){more}; "
                            "give a smaller `prune_ratio`")
    return quotas


def _top(rows: np.ndarray, values: np.ndarray, k: int) -> np.ndarray:
    """The k rows with the smallest values, in a deterministic order."""
    if len(rows) > k:
        rows = rows[np.argpartition(values[rows], k - 1)[:k]]
    return rows[np.lexsort((rows, values[rows]))]


def swap_refine(vectors: np.ndarray, pruned: np.ndarray, candidates: int, rounds: int,
                labels: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """1-swap local search in rounds. Each round scores every sample against the current sum S,
    keeps the k most promising on each side, then applies improving swaps one at a time,
    re-scoring the candidates exactly after each (never against a stale S). With `labels`,
    only same-class swaps are made, so per-class counts are kept, and the candidates come from
    the classes that have both removed and kept samples (a difficulty stratum removed whole or
    kept whole has no partner: were its samples among the k, no pair would be found)."""
    pruned = pruned.copy()
    norms2 = np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64)
    S = removal_sum(vectors, pruned)
    swaps = 0
    movable = np.ones(len(pruned), bool) if labels is None else \
        np.isin(labels, np.intersect1d(labels[pruned], labels[~pruned]))  # fixed: swaps keep every class's count
    if not (pruned & movable).any() or not (~pruned & movable).any():
        return pruned, 0
    for _ in range(rounds):
        d = (vectors @ S.astype(vectors.dtype)).astype(np.float64)  # s_i · S
        ins = _top(np.flatnonzero(pruned & movable), norms2 - 2.0 * d, candidates)  # ‖S − s_i‖² − ‖S‖²
        outs = _top(np.flatnonzero(~pruned & movable), norms2 + 2.0 * d, candidates)  # ‖S + s_j‖² − ‖S‖²
        Vi, Vo = vectors[ins].astype(np.float64), vectors[outs].astype(np.float64)
        di, do = Vi @ S, Vo @ S
        cross = Vi @ Vo.T
        other_class = labels[ins][:, None] != labels[outs][None, :] if labels is not None else None
        used_i, used_o = np.zeros(len(ins), bool), np.zeros(len(outs), bool)
        applied = 0
        while True:
            delta = (norms2[ins] - 2.0 * di)[:, None] + (norms2[outs] + 2.0 * do)[None, :] - 2.0 * cross
            delta[used_i] = np.inf
            delta[:, used_o] = np.inf
            if other_class is not None:
                delta[other_class] = np.inf
            a, b = np.unravel_index(int(np.argmin(delta)), delta.shape)
            if not delta[a, b] < -1e-12 * max(float(S @ S), 1e-300):
                break
            step = Vo[b] - Vi[a]
            S += step
            di += Vi @ step
            do += Vo @ step
            pruned[ins[a]], pruned[outs[b]] = False, True
            used_i[a] = used_o[b] = True
            applied += 1
        swaps += applied
        if applied == 0:
            break
    return pruned, swaps


def row_keys(vectors: np.ndarray, salt: str) -> np.ndarray:
    """A seeded hash of each row's values, (n,) uint64: a random order that does not depend on
    the order of the rows (equal rows tie)."""
    key = salt.encode()
    return np.array([int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8, key=key).digest(), "little")
                     for row in np.ascontiguousarray(vectors)], dtype=np.uint64)


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


def first_stratum_layout(layout, first: np.ndarray):
    """`layout` with the samples `first` ((n,) bool) as one more stratum, the last, removed whole,
    and the others laid out by `layout` for the removals left; the samples removed first count
    towards the hardest share β·n (they are among the hardest), which the others make up."""
    def laid_out(score: np.ndarray, n_prune: int, hard_fraction: float | None = None):
        n, k = len(score), int(first.sum())
        rest = np.flatnonzero(~first)
        if hard_fraction is not None:  # whole samples: β·n of all, less those removed first, of the rest
            hard_fraction = (max(0, int(hard_fraction * n) - k) + 0.5) / max(len(rest), 1)
        label = np.empty(n, np.int64)
        label[rest], quotas = layout(score[rest], n_prune - k, hard_fraction=hard_fraction)
        label[first] = len(quotas)
        return label, np.append(quotas, k)
    return laid_out


def first_in_stream(vectors: np.ndarray, args: SelectionArgs, difficulty: np.ndarray, first: np.ndarray,
                    mislabel: np.ndarray) -> np.ndarray:
    """The candidate order with the samples `first` ahead of the rest, the most suspect (highest
    `mislabel`) first: the greedy path removes them before any other, then each step picks what
    keeps ‖S‖ smallest given their sum. The rest keep `candidate_stream`'s order."""
    base = candidate_stream(vectors, args, difficulty)
    if base is None:
        base = np.argsort(np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64), kind="stable")
    ahead = np.flatnonzero(first)
    ahead = ahead[np.lexsort((ahead, -np.asarray(mislabel, np.float64)[ahead]))]
    return np.concatenate([ahead, base[~first[base]]])


def candidate_stream(vectors: np.ndarray, args: SelectionArgs,
                     difficulty: np.ndarray | None = None) -> np.ndarray | None:
    """The order the greedy path's pool is fed in (None: ascending ‖s_i‖, greedy_path's own):
    `uniform` a seeded hash order, `easiest` ascending `difficulty` (EL2N), ties by index."""
    if args.candidates == "uniform":
        return np.argsort(row_keys(vectors, f"{args.seed}:candidates"), kind="stable")
    if args.candidates == "easiest":
        if difficulty is None:
            raise BadInputError("`candidates` easiest needs the score column 'el2n', which these scores lack")
        return np.argsort(np.asarray(difficulty, np.float64), kind="stable")
    return None


def solve_size(vectors: np.ndarray, m: int, args: SelectionArgs, labels=None, quotas=None,
               difficulty: np.ndarray | None = None, longer_path: tuple[np.ndarray, np.ndarray] | None = None,
               stream: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """The greedy solver for |R| = m: pool greedy path, swap search, random restarts; with no
    swap rounds (`args.rounds()` = 0, the default under difficulty coverage and for the `easiest`
    order) the path is the answer. With `easiest` candidates each step then picks, among the K
    easiest samples not yet taken, the one that keeps ‖S‖ smallest, and no swap search or restart
    trades those picks for harder samples that cancel better (held out, the swaps lowered
    ‖Σ_R s_i‖ and cost accuracy: benchmarks/results/cross-validation-0.4.md). `longer_path`:
    (order, ‖S_k‖) of a longer greedy path of the same vectors and arguments, without quotas,
    whose first m steps are this one's (`greedy_path`). `stream`: the candidate order (n,) fed to
    the path in place of `candidate_stream`'s."""
    n = len(vectors)
    info: dict = {}
    if longer_path is not None:
        order, path = longer_path[0][:m], longer_path[1][:m]
    else:
        if stream is None:
            stream = candidate_stream(vectors, args, difficulty)
        order, path = greedy_path(vectors, m, args.pool_size, labels, quotas, stream=stream)
    info["path_objective"] = float(path[-1]) if m else 0.0
    rounds = args.rounds()
    if rounds == 0:  # the path is the answer
        return _mask(n, order), {**info, "swaps": 0, "restarts": 0}
    pruned, info["swaps"] = swap_refine(vectors, _mask(n, order), args.swap_candidates, rounds, labels)
    restarts = args.restarts if args.restarts is not None else (8 if n <= 5000 else 0)
    best = objective(vectors, pruned)
    for restart in range(restarts):  # random starts (class counts kept), then the same local search
        keys = row_keys(vectors, f"{args.seed}:{restart}")  # not of the index: order-free
        start = np.zeros(n, bool)
        if quotas is None:
            start[np.argsort(keys, kind="stable")[:m]] = True
        else:
            for c, q in enumerate(quotas):
                members = np.flatnonzero(labels == c)
                start[members[np.argsort(keys[members], kind="stable")[:q]]] = True
        candidate, _ = swap_refine(vectors, start, args.swap_candidates, rounds, labels)
        value = objective(vectors, candidate)
        if value < best:
            best, pruned = value, candidate
    info["restarts"] = restarts
    return pruned, info


def _solve_bucket(job: tuple) -> np.ndarray:
    vectors, m, args = job
    return solve_size(vectors, m, dataclasses.replace(args, restarts=args.restarts or 0))[0]


def largest_size_within(vectors: np.ndarray, args: SelectionArgs) -> tuple[np.ndarray, list[int]]:
    """The ε mode: binary search over m for the largest size whose size-constrained solution
    stays within ε. The bracket holds f(lo) ≤ ε < f(hi) (f(0) = 0, f(n+1) = ∞ by convention), so
    the answer m* has f(m*) ≤ ε and f(m* + 1) > ε — maximal for the solver — and the probes
    depend on ε only through those comparisons, so m* never shrinks as ε grows. An ε that the
    whole set's ‖Σ s_i‖ stays within answers m* = n without a search (the largest size there is)."""
    n = len(vectors)
    if n and objective(vectors, np.ones(n, bool)) <= args.epsilon:
        return np.ones(n, bool), [n]
    lo, hi = 0, n + 1
    best = np.zeros(n, bool)
    probes = []
    # one greedy path for every probe: without quotas a shorter path is a prefix of a longer one, so
    # each probe's solve is the same as from a path of its own, at the cost of one path
    # (benchmarks/results/epsilon-mode.md)
    path = greedy_path(vectors, n, args.pool_size, stream=candidate_stream(vectors, args))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        mask, _ = solve_size(vectors, mid, args, longer_path=path)
        probes.append(mid)
        if objective(vectors, mask) <= args.epsilon:
            lo, best = mid, mask
        else:
            hi = mid
    return best, probes


def select_bucketed(vectors: np.ndarray, m: int, args: SelectionArgs, map_fn=map) -> tuple[np.ndarray, dict]:
    """Split the samples into seeded random buckets, solve each for its share of m (in
    parallel through `map_fn`, e.g. a Dask client's map), take the union, then run the swap
    search over all samples so the bucket sums can cancel each other."""
    n = len(vectors)
    buckets = max(1, min(args.buckets, n))
    parts = np.array_split(np.random.default_rng(args.seed).permutation(n), buckets)
    sizes = np.array([len(p) for p in parts])
    exact = m * sizes / n
    shares = np.floor(exact).astype(np.int64)
    shares[np.argsort(-(exact - shares), kind="stable")[:m - shares.sum()]] += 1
    started = time.perf_counter()
    masks = list(map_fn(_solve_bucket, [(vectors[np.sort(part)], int(q), args) for part, q in zip(parts, shares)]))
    bucket_seconds = time.perf_counter() - started
    pruned = np.zeros(n, bool)
    for part, mask in zip(parts, masks):
        pruned[np.sort(part)[mask]] = True
    merged = objective(vectors, pruned)
    # repair across buckets: greedily take back the tenth of R that most increases ‖S‖, then
    # greedily add as many from everything not in R, starting from the merged sum
    r = max(1, m // 10) if 0 < m < n else 0
    if r:
        inside = np.flatnonzero(pruned)
        S = removal_sum(vectors, pruned)
        back, _ = greedy_path(-vectors[inside], r, args.pool_size, start=S)  # removing s_i adds −s_i
        pruned[inside[back]] = False
        added, _ = greedy_path(vectors, r, args.pool_size, start=removal_sum(vectors, pruned), exclude=pruned)
        pruned[added] = True
    # the global search looks wider than a single solve: the residual is spread over the buckets
    pruned, swaps = swap_refine(vectors, pruned, 4 * args.swap_candidates, args.rounds())
    return pruned, {"buckets": buckets, "bucket_seconds": bucket_seconds, "merged_objective": merged, "swaps": swaps}


def select(vectors: np.ndarray, args: SelectionArgs, columns: dict[str, np.ndarray] | None = None,
           map_fn=None, *, layout=coverage_strata, stream: np.ndarray | None = None) -> Selection:
    """Run the method and mode of `args` over vectors (n, p); baselines read their score
    columns (`label`, `el2n`, `grand`, `forgetting`, `embedding`) from `columns`.

    Two extension points, for experiments that try what is not an option (experiments/):
    `layout(el2n, n_prune, hard_fraction=β) -> (stratum (n,), removals per stratum)` lays out the
    difficulty coverage (default CCS's, `baselines.coverage_strata`); `stream`, a candidate order
    (n,), feeds the influence method's greedy path of a --prune-ratio in place of `args.candidates`'."""
    n = len(vectors)
    started = time.perf_counter()
    info: dict = {"method": args.method, "solver": args.solver if args.method == "influence" else None}
    columns = {"label": np.zeros(n, np.int64), **(columns or {})}
    labels = columns["label"]
    quotas = class_quotas(labels, args.n_prune(n)) if args.class_balanced else None
    if args.coverage == "difficulty":  # minimise ‖Σ s_i‖ with every difficulty stratum's removals fixed
        if "el2n" not in columns:
            raise BadInputError("`coverage` difficulty needs the score column 'el2n', which these scores lack")
        cut = args.coverage_cut()
        first = None
        if args.removes_mislabelled_first(columns):
            first = removed_first(np.asarray(columns["mislabelled"], bool), columns["mislabel"], args.n_prune(n))
            layout = first_stratum_layout(layout, first)
            if stream is None:  # the path starts from them: the rest is chosen to cancel their sum
                stream = first_in_stream(vectors, args, columns["el2n"], first, columns["mislabel"])
            info["mislabelled_first"] = {"flagged": int(np.sum(columns["mislabelled"])),
                                         "removed_first": int(first.sum())}
        labels, quotas = layout(np.asarray(columns["el2n"], np.float64), args.n_prune(n), hard_fraction=cut)
        hard = quotas[-1] if first is None else quotas[-2]
        info["coverage"] = {"strata": int(len(quotas) - 1 - (first is not None)), "hard_cut": int(hard),
                            "hard_fraction": cut, "train_budget": args.train_budget}
    if args.method != "influence":
        order = removal_order(args.method, columns, vectors, args.seed,
                              args.n_prune(n) if args.prune_ratio is not None else None, args.hard_cut)
        if quotas is not None:
            rank = np.empty(n, np.int64)
            rank[order] = np.arange(n)
            pruned = np.zeros(n, bool)
            for c, q in enumerate(quotas):
                members = np.flatnonzero(labels == c)
                pruned[members[np.argsort(rank[members], kind="stable")[:q]]] = True
        elif args.prune_ratio is not None:
            pruned = _mask(n, order[:args.n_prune(n)])
        else:
            path = np.linalg.norm(np.cumsum(vectors[order], axis=0, dtype=np.float64), axis=1)
            pruned = _largest_prefix_within(vectors, order, path, args.epsilon)
    elif args.solver == "scip":
        check_scip_size(*vectors.shape)
        warm = select(vectors, dataclasses.replace(args, solver="greedy"), columns, layout=layout,
                      stream=stream).pruned  # SCIP's warm start
        pruned, scip_info = solve_scip(vectors, args, warm, labels if quotas is not None else None, quotas)
        info.update(scip_info)
    elif args.solver == "bucketed":
        if args.epsilon is not None or quotas is not None:
            raise BadInputError("`solver` bucketed solves `prune_ratio` without `class_balanced` or `coverage`")
        pruned, bucket_info = select_bucketed(vectors, args.n_prune(n), args, map_fn or map)
        info.update(bucket_info)
    elif args.prune_ratio is not None:
        pruned, solve_info = solve_size(vectors, args.n_prune(n), args, labels if quotas is not None else None, quotas,
                                        columns.get("el2n"), stream=stream)
        info.update(solve_info)
    else:
        pruned, info["probes"] = largest_size_within(vectors, args)
    info["seconds"] = time.perf_counter() - started
    result = Selection(pruned, objective(vectors, pruned), info)
    result.info["n_pruned"] = int(pruned.sum())
    return result


SCIP_MAX_TERMS = 2_000_000  # n × dim of the reference model: built term by term before it is solved


def check_scip_size(n: int, dim: int) -> None:
    """The `scip` reference writes every sample's vector into its model; past `SCIP_MAX_TERMS`
    the building alone outlasts any --time-limit (60,000 × 1,290 is 77 million terms: minutes
    before SCIP starts its clock, gigabytes of model). Refuse such an instance up front."""
    if n * dim > SCIP_MAX_TERMS:
        raise BadInputError(f"`solver` scip is the exact reference for small instances: {n} samples × {dim} "
                            f"dimensions is {n * dim:,} model terms, above its {SCIP_MAX_TERMS:,}; use `solver` "
                            "greedy (or bucketed), or score fewer samples or a smaller `projection_dim`")


def solve_scip(vectors: np.ndarray, args: SelectionArgs, warm: np.ndarray | None, labels=None, quotas=None):
    """Reference solver: the exact MIQCP in SCIP (pyscipopt), with a time limit.

    Size mode: min t s.t. t ≥ Σ_j z_j², z = Σ_i w_i s_i, Σ w = m, w ∈ {0, 1}.
    ε mode:    max Σ w  s.t. Σ_j z_j² ≤ ε².
    Warm-started with the greedy solution; reports SCIP's best objective and its bound.
    SCIP's feasibility and optimality tolerances are absolute (~1e-6 to 1e-9), while real influence
    vectors are ~1e-4 and ‖z‖² ~1e-8: the model is solved on V / max|V| (and ε / max|V|), where those
    tolerances mean what they say, and the bound is scaled back.
    """
    import pyscipopt

    n, p = vectors.shape
    V = vectors.astype(np.float64)
    scale = float(np.abs(V).max()) if V.size else 0.0
    scale = scale if scale > 0.0 and math.isfinite(scale) else 1.0
    V = V / scale
    model = pyscipopt.Model()
    model.hideOutput()
    model.setParam("limits/time", args.time_limit)
    model.setParam("randomization/randomseedshift", args.seed)
    w = [model.addVar(vtype="B", name=f"w{i}") for i in range(n)]
    z = [model.addVar(lb=None, name=f"z{j}") for j in range(p)]
    for j in range(p):
        model.addCons(z[j] == pyscipopt.quicksum(float(V[i, j]) * w[i] for i in range(n) if V[i, j] != 0.0))
    squares = pyscipopt.quicksum(z[j] * z[j] for j in range(p))
    if args.prune_ratio is not None:
        t = model.addVar(lb=0.0, name="t")
        model.addCons(t >= squares)
        model.addCons(pyscipopt.quicksum(w) == args.n_prune(n))
        if quotas is not None:
            for c, q in enumerate(quotas):
                model.addCons(pyscipopt.quicksum(w[i] for i in np.flatnonzero(labels == c)) == int(q))
        model.setObjective(t, "minimize")
    else:
        model.addCons(squares <= (args.epsilon / scale) ** 2)
        model.setObjective(pyscipopt.quicksum(w), "maximize")
    if warm is not None:
        solution = model.createSol()
        for i in range(n):
            model.setSolVal(solution, w[i], float(warm[i]))
        sums = V[warm].sum(0)
        for j in range(p):
            model.setSolVal(solution, z[j], float(sums[j]))
        if args.prune_ratio is not None:
            model.setSolVal(solution, t, float(sums @ sums))
        model.addSol(solution, free=True)
    model.optimize()
    best = model.getBestSol()
    pruned = np.array([model.getSolVal(best, w[i]) > 0.5 for i in range(n)])
    bound = model.getDualbound()
    info = {"status": model.getStatus(), "scip_seconds": model.getSolvingTime(),
            "bound": (math.sqrt(max(bound, 0.0)) * scale if args.prune_ratio is not None else bound),
            "gap": model.getGap()}
    return pruned, info


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


def selection_stage(scores: Path, args: SelectionArgs, out: Path, map_fn=None, progress=None, *,
                    columns: dict[str, np.ndarray] | None = None, layout=coverage_strata,
                    stream: np.ndarray | None = None) -> dict:
    """Select over stored vectors; write selection.parquet; return the manifest's `selection`.
    `progress(done, total, note)`, if given, is called as each of the 3 phases (read, solve,
    write) finishes. `columns` replace the stored score columns of the same name; they, `layout`
    and `stream` (`select`'s) let an experiment try another difficulty score, layout or order."""
    progress = progress or (lambda done, total, note="": None)
    table, vectors, _ = artifacts.load_scores(scores)
    progress(1, 3, f"read {len(vectors)} vectors")
    started = time.perf_counter()
    stored = {name: artifacts.column_array(table, name) for name in table.column_names
              if name in ("label", "el2n", "grand", "forgetting", "embedding", "mislabel", "mislabelled")}
    result = select(vectors, args, {**stored, **(columns or {})}, map_fn, layout=layout, stream=stream)
    progress(2, 3, f"solved ({args.method}{'/' + args.solver if args.method == 'influence' else ''})")
    n = len(vectors)
    if result.pruned.all():  # a version without samples is never what was meant: refuse before writing
        given = f"`epsilon` {args.epsilon:g}" if args.epsilon is not None else f"`prune_ratio` {args.prune_ratio:g}"
        raise BadInputError(f"{given} removes all {n} samples (‖Σ s_i‖ of the whole set = {result.objective:.4g}), "
                            "so nothing would be kept; give a smaller value")
    summary = {"method": args.method, "solver": result.info.get("solver"), "prune_ratio": args.prune_ratio,
               "epsilon": args.epsilon, "n": n, "n_pruned": int(result.pruned.sum()),
               "n_kept": int(n - result.pruned.sum()), "objective": result.objective,
               "bound": generalization_bound(result.objective, int(result.pruned.sum()), n),
               "seconds": time.perf_counter() - started,
               "solver_info": {k: v for k, v in result.info.items() if k not in ("method", "solver", "seconds")}}
    paths = artifacts.column_array(table, "path") if "path" in table.column_names else None
    artifacts.save_parquet(artifacts.selection_table(table.column("sample_id").to_numpy(), result.pruned, summary,
                                                     paths), out)
    progress(3, 3, f"wrote {summary['n_pruned']} pruned of {n}")
    return summary
