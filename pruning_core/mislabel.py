"""Mislabel detection: how likely each sample's given label is wrong, from the scoring run's own
class probabilities p_i (n, C), by confident learning (Northcutt, Jiang & Chuang, JAIR 2021).

  * `mislabel` = 1 − p_y: the self-confidence, negated; higher is more suspect.
  * `likely_label` = argmax_{j≠y} p_j, the class the model gives the sample instead, and
    `likely_probability`, its p_j.
  * `mislabelled`: the k samples with the highest `mislabel`, where k is the number confident
    learning's threshold rule finds (`threshold_count`): confident learning estimates how many
    labels are wrong, the self-confidence ranks which (cleanlab's `low_self_confidence` filter).

The self-confidence ranked flipped labels best, and the rule's count taken in its order held more
of them than the rule's own set, on a validation half of a noisy training set
(benchmarks/results/robustness-pilot.md). The probabilities are in-sample: a short recipe does not
memorise wrong labels; a model trained until it fits them finds few.
"""

from __future__ import annotations

import numpy as np

COLUMNS = ("mislabel", "likely_label", "likely_probability")  # per sample, as `mislabel_scores` gives them
RULE = ("confident learning: as many as its threshold rule finds (the label's probability below its class's mean "
        "self-confidence, another class's at or above that class's own), the least self-confident first")


def mislabel_scores(probs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(`mislabel` 1 − p_y, `likely_label` argmax_{j≠y} p_j (int64), `likely_probability` that
    p_j), each (n,), of probabilities (n, C) and given labels (n,); ties between other classes go
    to the lowest class."""
    p = np.asarray(probs, np.float64)
    rows = np.arange(len(y))
    others = p.copy()
    others[rows, y] = -np.inf
    likely = others.argmax(1)
    return 1.0 - p[rows, y], likely.astype(np.int64), others[rows, likely]


def class_thresholds(y: np.ndarray, confidence: np.ndarray, n_classes: int) -> np.ndarray:
    """t_c, the mean of `confidence` (p_y, (n,)) over the samples labelled c, (n_classes,); +inf
    for a class no sample is labelled with (nothing can look like one of it)."""
    counts = np.bincount(y, minlength=n_classes)
    sums = np.bincount(y, weights=confidence, minlength=n_classes)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.inf)


def threshold_rule(y: np.ndarray, mislabel: np.ndarray, likely: np.ndarray, likely_probability: np.ndarray,
                   n_classes: int | None = None) -> np.ndarray:
    """Confident learning's threshold rule, (n,) bool: p_y below t_y and the likely label's p_j at
    or above t_j (`class_thresholds`), from a scores table's columns (p_y = 1 − `mislabel`)."""
    n_classes = int(max(y.max(initial=-1), likely.max(initial=-1)) + 1) if n_classes is None else n_classes
    given = 1.0 - np.asarray(mislabel, np.float64)
    t = class_thresholds(y, given, n_classes)
    return (given < t[y]) & (np.asarray(likely_probability, np.float64) >= t[likely])


def looks_mislabelled(y: np.ndarray, mislabel: np.ndarray, likely: np.ndarray, likely_probability: np.ndarray,
                      n_classes: int | None = None) -> np.ndarray:
    """(n,) bool: the `threshold_rule`'s count of samples, the highest `mislabel` first (ties by
    index)."""
    k = int(threshold_rule(y, mislabel, likely, likely_probability, n_classes).sum())
    flagged = np.zeros(len(y), bool)
    flagged[most_suspect_first(mislabel)[:k]] = True
    return flagged


def most_suspect_first(mislabel: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """`rows` (default: all) ordered by descending `mislabel`, ties by index."""
    rows = np.arange(len(mislabel)) if rows is None else np.asarray(rows)
    return rows[np.lexsort((rows, -np.asarray(mislabel, np.float64)[rows]))]


def removed_first(mislabelled: np.ndarray, mislabel: np.ndarray, budget: int) -> np.ndarray:
    """The samples a selection removes before any other, (n,) bool: those that look mislabelled,
    the most suspect first (highest `mislabel`, ties by index) while `budget` lasts."""
    first = np.zeros(len(mislabelled), bool)
    first[most_suspect_first(mislabel, np.flatnonzero(mislabelled))[:max(0, budget)]] = True
    return first


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `score` ranking the `positive` samples (n,) bool above the
    rest: the chance that a random positive scores above a random negative, ties counting half."""
    score = np.asarray(score, np.float64)
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return float("nan")
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    rank = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # average rank of tied values, from 1
    return float((rank[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
