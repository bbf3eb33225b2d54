"""Mislabel detection: how likely each sample's given label is wrong, from the scoring run's own
class probabilities p_i (n, C), by confident learning (Northcutt, Jiang & Chuang, JAIR 2021).

  * `mislabel` = max_{j≠y} p_j − p_y: confident learning's normalized margin, negated so that
    higher is more suspect; in [−1, 1], above 0 where the model prefers another class.
  * `likely_label` = argmax_{j≠y} p_j: the class the model gives the sample instead.
  * `mislabelled`: confident learning's threshold rule, on the sample's likely label: p_y below
    t_y and p_j at or above t_j for j = `likely_label`, where t_c is the mean p_c over the samples
    labelled c (the class's average self-confidence). Clean data flag a few samples this way
    (the model's own confusions); each wrong label adds one with high probability.

The probabilities are in-sample (the model trained on these samples): a short recipe does not
memorise wrong labels, and out-of-sample probabilities would need one more training per fold
(benchmarks/results/robustness-pilot.md compares both).
"""

from __future__ import annotations

import numpy as np

RULE = ("confident learning's threshold rule: the given label's probability below its class's mean "
        "self-confidence and the most probable other class's at or above its own")


def mislabel_scores(probs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(`mislabel` (n,) float64, `likely_label` (n,) int64) of probabilities (n, C) and given
    labels (n,); ties between other classes go to the lowest class."""
    p = np.asarray(probs, np.float64)
    rows = np.arange(len(y))
    given = p[rows, y]
    others = p.copy()
    others[rows, y] = -np.inf
    likely = others.argmax(1)
    return others[rows, likely] - given, likely.astype(np.int64)


def class_thresholds(y: np.ndarray, confidence: np.ndarray, n_classes: int) -> np.ndarray:
    """t_c, the mean of `confidence` (p_y, (n,)) over the samples labelled c, (n_classes,); +inf
    for a class no sample is labelled with (nothing can look like one of it)."""
    counts = np.bincount(y, minlength=n_classes)
    sums = np.bincount(y, weights=confidence, minlength=n_classes)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.inf)


def looks_mislabelled(y: np.ndarray, loss: np.ndarray, mislabel: np.ndarray, likely: np.ndarray,
                      n_classes: int | None = None) -> np.ndarray:
    """(n,) bool by confident learning's threshold rule (`RULE`), from a scores table's columns:
    p_y = exp(−loss), the likely label's p = mislabel + p_y."""
    n_classes = int(max(y.max(initial=-1), likely.max(initial=-1)) + 1) if n_classes is None else n_classes
    given = np.exp(-np.asarray(loss, np.float64))
    other = np.asarray(mislabel, np.float64) + given
    t = class_thresholds(y, given, n_classes)
    return (given < t[y]) & (other >= t[likely])


def removed_first(mislabelled: np.ndarray, mislabel: np.ndarray, budget: int) -> np.ndarray:
    """The samples a selection removes before any other, (n,) bool: those that look mislabelled,
    the most suspect first (highest `mislabel`, ties by index) while `budget` lasts."""
    flagged = np.flatnonzero(mislabelled)
    order = flagged[np.lexsort((flagged, -np.asarray(mislabel, np.float64)[flagged]))]
    first = np.zeros(len(mislabelled), bool)
    first[order[:max(0, budget)]] = True
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
