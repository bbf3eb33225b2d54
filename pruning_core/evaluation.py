"""Evidence: retrain on pruned subsets, measure accuracy and convergence, and check the
paper's generalization-gap theory. Imports numpy/torch/pyarrow (matplotlib only to draw).

  * `retrain_stage` trains the recipe from scratch on the kept rows of one selection and
    returns a record with a test-accuracy curve (training time excludes the evaluations).
  * `add_convergence` sets each record's target (its seed's full-data accuracy minus
    `target_drop`) and the time/epoch at which the run first reaches it.
  * `gap_check` is the paper's theory experiment on a convex problem (`linear` on pixels, or
    the cnn's final layer on frozen features): for a range of ε, the predicted parameter change
    ‖Σ_{R(ε)} s_i‖, the change measured by refitting without R(ε), the test-loss change and the
    bound Lip·‖Σ s_i‖, Lip = √2·mean‖φ̃‖ over the test set (‖∇_θ ℓ‖ ≤ ‖p − e_y‖‖φ̃‖ ≤ √2‖φ̃‖
    for any θ, so |ΔL_test| ≤ Lip·‖Δθ‖ holds exactly for the measured change).
  * `summarise`, `draw_plots` and `report_markdown` turn records into the table, PNGs and report.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from . import artifacts, hessians, influence
from .data import Dataset, as_float, load_dataset
from .errors import BadInputError
from .figures import pyplot, save_figure
from .recipe import EvalArgs, TrainArgs
from .selection import SelectionArgs, largest_size_within
from .training import fit_linear, train

FULL = "full"  # the method name of full-data reference runs
TARGET_RATIO = 0.4  # the prune ratio of the paper's headline, where the report's targets are read
TARGET_TIME = 0.6  # the time-to-target target: at most this share of the full run's training time


def selection_jobs(args: EvalArgs, draws: Callable[[str, float], bool] | None = None) -> list[dict]:
    """One selection per (method, ratio); a selection that draws at random (`random`, `ccs`, and
    whatever `draws(method, ratio)` says does) is drawn once per seed, with that seed, so the
    table measures the method and not one of its draws."""
    jobs = []
    for method in args.methods:
        for ratio in args.ratios:
            seeded = method in ("random", "ccs") or (draws is not None and draws(method, ratio))
            for seed in (args.seeds if seeded else (None,)):
                name = f"{method}-r{ratio:g}" + (f"-s{seed}" if seed is not None else "")
                jobs.append({"name": name, "method": method, "ratio": ratio, "seed": seed})
    return jobs


# recipe fields added after format 2, at their defaults
LATER_FIELDS = {"augment": False, "precision": "auto", "low_res_epochs": 0, "test_flips": False}


def retrain_key(ds: Dataset, rows: np.ndarray, train_args: TrainArgs, evaluations_per_epoch: int) -> str:
    """Names one retraining by what determines it: the data's content, the kept sample ids, the
    recipe (seed included) and the evaluation schedule. A recipe field added later is left out
    at its default (`LATER_FIELDS`), so that the records made before it existed are found."""
    kept = hashlib.sha256(np.ascontiguousarray(ds.sample_id[rows]).tobytes()).hexdigest()
    recipe = {k: v for k, v in asdict(train_args).items() if k not in LATER_FIELDS or v != LATER_FIELDS[k]}
    return artifacts.arguments_key({"format": 2, "data": ds.fingerprint, "kept": kept, "recipe": recipe,
                                    "evaluations_per_epoch": evaluations_per_epoch})


def retrain_stage(dataset: str, data_root: str | None, selection: str | None, train_args: TrainArgs,
                  evaluations_per_epoch: int, labels: dict, threads: int | None = 1,
                  cache: str | Path | None = None) -> dict:
    """Train from scratch on the rows a selection keeps (all rows when `selection` is None).

    With `cache`, each finished record is written there (atomically) under `retrain_key`, and a
    retraining already recorded is not run again: an interrupted evaluation resumes where it
    stopped, and evaluations sharing runs (the full-data references, the same selection) share them.
    """
    from .pipeline import release_memory, torch_threads

    with torch_threads(threads):
        ds = load_dataset(dataset, data_root)
        rows = np.arange(ds.n)
        if selection is not None:
            sample_id, pruned = artifacts.load_selection(selection)
            rows = np.flatnonzero(np.isin(ds.sample_id, sample_id[~pruned]))
        saved = None
        if cache is not None:
            saved = Path(cache) / f"{retrain_key(ds, rows, train_args, evaluations_per_epoch)}.json"
            if saved.exists():
                return {**json.loads(saved.read_text()), **labels, "seed": train_args.seed, "reused": True}
        result = train(ds.subset(rows), train_args, evaluations_per_epoch=evaluations_per_epoch)
    seen = int(result.curve[-1]["samples_seen"]) if result.curve else int(len(rows)) * train_args.epochs
    record = {**labels, "seed": train_args.seed, "n_kept": int(len(rows)), "test_accuracy": result.test_accuracy,
              "train_accuracy": result.train_accuracy, "train_seconds": result.seconds, "samples_seen": seen,
              "curve": result.curve, "n_test": int(len(result.test_correct)),
              "test_correct": pack_correct(result.test_correct)}
    del result
    release_memory()
    if saved is not None:
        artifacts.write_json(saved, record)
    return {**record, "reused": False}


def pack_correct(correct: np.ndarray) -> str:
    """Which test samples a run classified right, (n_test,) bool, as base64 of the packed bits:
    what a comparison needs to resample the test set (about 1.7 kB per run for 10,000 samples)."""
    return base64.b64encode(np.packbits(np.asarray(correct, bool)).tobytes()).decode("ascii")


def unpack_correct(packed: str | bytes, n_test: int) -> np.ndarray:
    """The inverse of pack_correct; also takes the raw bytes `evaluation.parquet` stores, so rows
    read back from it compare as the flow's records do."""
    raw = bytes(packed) if isinstance(packed, (bytes, bytearray, memoryview)) else base64.b64decode(packed)
    return np.unpackbits(np.frombuffer(raw, np.uint8), count=n_test).astype(bool)


def add_convergence(records: list[dict], target_drop: float) -> list[dict]:
    """Target = the same seed's full-data final accuracy − target_drop; time_to_target is the
    training time at the first curve point at or above it (None if never), and time_ratio its
    share of the same seed's full-data training time."""
    full = {r["seed"]: r for r in records if r["method"] == FULL}
    for r in records:
        ref = full.get(r["seed"])
        if ref is None:
            raise BadInputError(f"no full-data run for seed {r['seed']}")
        r["target_accuracy"] = ref["test_accuracy"] - target_drop
        hit = next((c for c in r["curve"] if c["test_accuracy"] >= r["target_accuracy"] - 1e-12), None)
        r["time_to_target"] = hit["train_seconds"] if hit else None
        r["epoch_to_target"] = hit["epoch"] if hit else None
        r["time_ratio"] = hit["train_seconds"] / ref["train_seconds"] if hit else None
        r["samples_ratio"] = hit["samples_seen"] / ref["samples_seen"] if hit else None
        r["accuracy_drop"] = ref["test_accuracy"] - r["test_accuracy"]
    return records


def _mean_std(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if not len(v):
        return (math.nan, math.nan)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarise(records: list[dict]) -> list[dict]:
    """Mean ± std over seeds per (method, ratio), full data first."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r["prune_ratio"]), []).append(r)
    rows = []
    for (method, ratio), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0] != FULL, kv[0][0])):
        acc, acc_sd = _mean_std(r["test_accuracy"] for r in rs)
        sec, sec_sd = _mean_std(r["train_seconds"] for r in rs)
        ratio_t, _ = _mean_std(r["time_ratio"] for r in rs)
        ratio_s, _ = _mean_std(r.get("samples_ratio") for r in rs)
        rows.append({"method": method, "prune_ratio": ratio, "seeds": len(rs), "accuracy": acc, "accuracy_std": acc_sd,
                     "train_seconds": sec, "train_seconds_std": sec_sd, "time_to_target_ratio": ratio_t,
                     "samples_to_target_ratio": ratio_s,
                     "reached_target": sum(r["time_to_target"] is not None for r in rs),
                     "n_kept": int(np.mean([r["n_kept"] for r in rs]))})
    return rows


def _paired_runs(records: list[dict], method: str, other: str, ratio: float,
                 by: str | None = None) -> list[tuple[dict, dict]]:
    """(run of `method`, run of `other`) at `ratio` for every training seed both ran, by seed
    (and by `record[by]` where runs of several test sets are mixed: cross-validation folds)."""
    runs = {(r.get(by) if by else None, r["method"], r["seed"]): r for r in records
            if abs(r["prune_ratio"] - ratio) < 1e-9}
    order = sorted(runs, key=lambda k: (repr(k[0]), k[1], k[2]))  # one test set: by method and seed
    return [(runs[(g, method, seed)], runs[(g, other, seed)]) for g, m, seed in order
            if m == method and (g, other, seed) in runs]


def paired_differences(records: list[dict], method: str, other: str, ratio: float, by: str | None = None) -> np.ndarray:
    """Test accuracy of `method` minus `other` at `ratio`, per training seed both ran."""
    return np.array([a["test_accuracy"] - b["test_accuracy"]
                     for a, b in _paired_runs(records, method, other, ratio, by)], dtype=np.float64)


def paired_interval(records: list[dict], method: str, other: str, ratio: float, level: float = 0.95,
                    resamples: int = 2000, seed: int = 0, by: str | None = None) -> tuple[float, float] | None:
    """Percentile interval for accuracy(method) − accuracy(other) at `ratio`, mean over the
    training seeds both ran, from a paired bootstrap over both sources of noise: the seeds, and
    the test samples (one resample of the test set shared by both methods and every seed, as the
    real test set is). The seeds' standard error alone treats the test set as the population;
    on 10,000 test samples, two runs that disagree on 5 % of them differ by ±0.2 points from the
    test draw alone. With one paired seed the interval is over the test samples alone (seed
    noise not included: `interval_over` says so). None without per-sample results.

    With `by`, the records come from several test sets told apart by `record[by]` (the folds of
    a cross-validation): each is resampled on its own, seeds and samples, and the difference is
    the mean over all their test samples together."""
    pairs = _paired_runs(records, method, other, ratio, by)
    if not pairs or any(not a.get("test_correct") or not b.get("test_correct") for a, b in pairs):
        return None
    groups: dict = {}
    for a, b in pairs:
        groups.setdefault(a.get(by) if by else None, []).append((a, b))
    Ds = [np.stack([unpack_correct(a["test_correct"], int(a["n_test"])).astype(np.int8) -
                    unpack_correct(b["test_correct"], int(a["n_test"])).astype(np.int8) for a, b in group])
          for group in groups.values()]  # each (S, n_test) of one test set
    total = sum(D.shape[1] for D in Ds)
    rng = np.random.default_rng(seed)
    stats = []
    for start in range(0, resamples, 100):
        k, stat = min(100, resamples - start), 0.0
        for D in Ds:
            n_test = D.shape[1]
            by_seed = D[rng.integers(len(D), size=(k, len(D)))].mean(axis=1)  # (k, n_test) over resampled seeds
            weights = rng.multinomial(n_test, np.full(n_test, 1 / n_test), size=k)  # resampled test samples
            stat = stat + (by_seed * weights).sum(axis=1)
        stats.append(stat / total)
    lo, hi = np.quantile(np.concatenate(stats), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def interval_over(paired_seeds: int) -> str:
    """What a paired_interval is taken over, in words, for the report and the plot."""
    return "seeds and test samples" if paired_seeds > 1 else "test samples (one seed: seed noise not included)"


def targets(summary: list[dict], records: list[dict], ratio: float = TARGET_RATIO,
            drop: float = EvalArgs.target_drop) -> dict:
    """The issue's targets: drop at `ratio` ≤ drop, time to target ≤ TARGET_TIME × full, influence ≥
    random at every ratio and above every other method at ratios ≥ `ratio` (`comparisons`).
    Influence against the other methods below `ratio` is no target but is measured the same way,
    for reading (`other_comparisons`, `met` None). `target_drop` carries `drop` to the report."""
    by = {(s["method"], s["prune_ratio"]): s for s in summary}
    full = by.get((FULL, 0.0))
    out: dict = {"ratio": ratio, "target_drop": drop}
    inf_at = by.get(("influence", ratio))
    if full and inf_at:
        out["accuracy_drop"] = full["accuracy"] - inf_at["accuracy"]
        out["accuracy_drop_met"] = out["accuracy_drop"] <= drop + 1e-12
        out["time_to_target_ratio"] = inf_at["time_to_target_ratio"]
        out["samples_to_target_ratio"] = inf_at.get("samples_to_target_ratio")
        out["time_met"] = inf_at["reached_target"] == inf_at["seeds"] and inf_at["time_to_target_ratio"] <= TARGET_TIME
    comparisons, others = [], []
    for s in summary:
        if s["method"] != "influence":
            continue
        for other in summary:
            if other["prune_ratio"] != s["prune_ratio"] or other["method"] in ("influence", FULL):
                continue
            needed = other["method"] == "random" or s["prune_ratio"] >= ratio - 1e-9
            diffs = paired_differences(records, "influence", other["method"], s["prune_ratio"])
            interval = paired_interval(records, "influence", other["method"], s["prune_ratio"])
            (comparisons if needed else others).append({
                "prune_ratio": s["prune_ratio"], "versus": other["method"],
                "margin": s["accuracy"] - other["accuracy"], "paired_seeds": len(diffs),
                "margin_se": float(np.std(diffs, ddof=1) / math.sqrt(len(diffs))) if len(diffs) > 1 else math.nan,
                "interval": list(interval) if interval else None,
                "resolved": None if interval is None else bool(interval[0] > 0 or interval[1] < 0),
                "met": None if not needed else s["accuracy"] > other["accuracy"] or (
                    other["method"] == "random" and s["accuracy"] >= other["accuracy"])})
    out["comparisons"], out["other_comparisons"] = comparisons, others
    out["all_comparisons_met"] = all(c["met"] for c in comparisons)
    return out


# --- the generalization-gap check ------------------------------------------------------------
GAP_PARAMETERS = 8192  # most parameters of the linear gap problem: its dense Hessian is p² float64 (0.5 GiB)


def _pixels(x: np.ndarray, n_classes: int) -> tuple[np.ndarray, int]:
    """Images (n, C, H, W) as float64 rows, 2x2-average-pooled until the linear problem has at
    most GAP_PARAMETERS parameters ((C·H·W + 1) per class): Fashion-MNIST's 7,850 as they are,
    CIFAR-10's 30,730 pooled once to 7,690 (unpooled, its Hessian and factor need tens of GiB:
    benchmarks/results/gap-memory.md). Returns the rows and how many times they were pooled."""
    x, times = as_float(x, np.float64), 0
    while x.ndim == 4 and (x[0].size + 1) * n_classes > GAP_PARAMETERS and min(x.shape[2:]) >= 2:
        n, c, h, w = x.shape
        x = x[:, :, :h // 2 * 2, :w // 2 * 2].reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))
        times += 1
    return x.reshape(len(x), -1), times


def _head_problem(kind: str, ds: Dataset, rows: np.ndarray, checkpoint: str | None, model_name: str | None):
    """(X train (k, d) float64, X test, description): pixels for `linear` (pooled where they are
    many: `_pixels`), φ(x) of a trained network for `head` (its final layer refit on frozen
    features)."""
    if kind == "linear":
        (X, times), (X_test, _) = _pixels(ds.x[rows], ds.n_classes), _pixels(ds.x_test, ds.n_classes)
        side = 2 ** times
        return X, X_test, "linear on pixels" if not times else f"linear on {side}x{side}-pooled pixels"
    if checkpoint is None or model_name is None:
        raise BadInputError("the head gap check needs a trained network checkpoint")
    from .training import load_model

    model = load_model(checkpoint, model_name, ds, device="cpu")
    phi = influence.last_layer_inputs(model, ds.x[rows], 1024, "cpu").astype(np.float64)
    phi_test = influence.last_layer_inputs(model, ds.x_test, 1024, "cpu").astype(np.float64)
    return phi, phi_test, f"{model_name} final layer on frozen features"


def _flat(model) -> np.ndarray:
    W, b = influence.last_layer_weights(model)
    return np.concatenate([W.ravel(), b])  # contract order: fc.weight row-major, then fc.bias


def _mean_loss(model, X: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        logits = model(torch.from_numpy(np.array(X)))  # a copy: X may be a read-only view
        return float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(np.array(y))))


def gap_check(kind: str, ds: Dataset, samples: int, points: int, weight_decay: float, seed: int = 0,
              checkpoint: str | None = None, model_name: str | None = None) -> list[dict]:
    """For ε over a range, R(ε) = the largest set the solver finds with ‖Σ_R s_i‖ ≤ ε; refit
    without R (the paper's θ̂_{−R}: zero weights, the same 1/n) and compare."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(ds.n, min(samples, ds.n), replace=False))
    X, X_test, what = _head_problem(kind, ds, rows, checkpoint, model_name)
    y, n = ds.y[rows], len(rows)
    model, _ = fit_linear(X, y, ds.n_classes, weight_decay, device="cpu")
    W, b = influence.last_layer_weights(model)
    probs = influence.softmax_probs(X, W, b)
    curvature = influence.last_layer_curvature(X, probs, 1024)
    # s_i = (1/n) H⁻¹ ∇ℓ_i by one solve against the n gradients (n ≤ p on pixels: cheaper than H⁻¹)
    gradients = influence.last_layer_gradients(X, probs, y) / n
    vectors = hessians.solve_exact(curvature, gradients, weight_decay)[0].numpy()
    theta = _flat(model)
    base_loss = _mean_loss(model, X_test, ds.y_test)
    lipschitz = math.sqrt(2) * float(np.sqrt((X_test ** 2).sum(1) + 1).mean())
    # ε from the size-constrained objective at ratios 2 %..60 %, so R(ε) spans small to large sets
    from .selection import solve_size

    cheap = SelectionArgs(prune_ratio=0.5, restarts=0, swap_rounds=50)
    eps = []
    for r in np.linspace(0.02, 0.6, points):
        pruned, _ = solve_size(vectors, int(round(r * n)), cheap)
        eps.append(float(np.linalg.norm(vectors[pruned].sum(0))))
    out = []
    for e in sorted(set(eps)):
        pruned, _ = largest_size_within(vectors, replace(cheap, prune_ratio=None, epsilon=e))
        predicted = vectors[pruned].sum(0)
        refit, info = fit_linear(X, y, ds.n_classes, weight_decay, weights=(~pruned).astype(np.float64), init=model,
                                 device="cpu")
        measured = _flat(refit) - theta
        loss_gap = _mean_loss(refit, X_test, ds.y_test) - base_loss
        norms = np.linalg.norm(predicted), np.linalg.norm(measured)
        out.append({"kind": kind, "problem": what, "n": n, "epsilon": e, "n_pruned": int(pruned.sum()),
                    "predicted_norm": float(norms[0]), "measured_norm": float(norms[1]),
                    "cosine": float(predicted @ measured / max(norms[0] * norms[1], 1e-300)),
                    "test_loss_gap": loss_gap, "bound": lipschitz * float(np.linalg.norm(predicted)),
                    "bound_measured": lipschitz * float(np.linalg.norm(measured)), "lipschitz": lipschitz,
                    "weight_decay": weight_decay})
    return out


def pearson(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.corrcoef(a, b)[0, 1]) if len(a) > 1 and a.std() > 0 and b.std() > 0 else math.nan


# --- plots and report --------------------------------------------------------------------------
_COLOURS = {"influence": "#d62728", "random": "#7f7f7f", "el2n": "#1f77b4", "influence-score": "#9467bd",
            "forgetting": "#2ca02c", "ccs": "#ff7f0e", "grand": "#17becf", "herding": "#8c564b",
            "kcenter": "#e377c2", "moderate": "#bcbd22", "mislabel": "#393b79", FULL: "#000000"}


GAIN_FLOOR = -3.0  # points below the reference: the gain panel stops here, so tenths of a point stay visible


def zoom_gains(ax, gains: list[tuple[float, str, float]], floor: float = GAIN_FLOOR) -> list[str]:
    """Where a method falls more than |floor| points below the panel's reference (random, or the
    full data; a score ranking that keeps only hard samples loses tens of points at a high prune
    ratio: docs/results.md#every-baseline), the gain panel's scale would flatten every other
    difference to a line at 0: stop the axis at `floor` and name what falls below, per prune
    ratio, at the bottom. Returns those labels (none: the axis is left as drawn)."""
    below: dict[float, list[str]] = {}
    for x, method, gain in gains:
        if gain < floor:
            below.setdefault(x, []).append(f"{method} {gain:+.1f}")
    if not below:
        return []
    top = max([g for _, _, g in gains if g >= floor] + [0.0])
    ax.set_ylim(floor, top + 0.25 * (top - floor) + 0.3)
    labels = []
    for x, names in sorted(below.items()):
        text = "below:\n" + "\n".join(names)
        ax.annotate(text, xy=(x, floor), xytext=(0, 4), textcoords="offset points", ha="center", va="bottom",
                    fontsize=7, arrowprops=None, bbox={"boxstyle": "round", "fc": "white", "ec": "0.7", "alpha": 0.9})
        ax.plot([x], [floor], marker="v", ms=9, color="0.3", clip_on=False, zorder=5)
        labels.append(text)
    return labels


def removal_overlaps(selections: list[dict], reference: str = "influence") -> list[dict]:
    """For each prune ratio: which share of the `reference` method's removals each other method
    also removes, and the Jaccard index of the two removal sets. `selections`: {path, method,
    prune_ratio, draw_seed} of files listing the same samples in the same order; a method that
    draws per seed is represented by its draw with the lowest seed."""
    first = {}
    for s in sorted(selections, key=lambda s: (s["prune_ratio"], s["method"], s.get("draw_seed") or 0)):
        first.setdefault((s["prune_ratio"], s["method"]), s["path"])
    rows = []
    for (ratio, method), path in first.items():
        if method == reference or (ratio, reference) not in first:
            continue
        _, mine = artifacts.load_selection(first[ratio, reference])
        _, theirs = artifacts.load_selection(path)
        both = int((mine & theirs).sum())
        rows.append({"prune_ratio": ratio, "method": method, "removed": int(theirs.sum()),
                     "also_removed": both / max(int(mine.sum()), 1),
                     "jaccard": both / max(int((mine | theirs).sum()), 1)})
    return rows


def _panels_per_ratio(plt, items: list[dict], row_height: float):
    """One panel per prune ratio of `items`, tall enough for the most items any ratio has:
    (figure, axes, [(axis, ratio, that ratio's items)])."""
    ratios = sorted({i["prune_ratio"] for i in items})
    rows = max(sum(i["prune_ratio"] == r for i in items) for r in ratios)
    size = (max(7.0, 3.6 * len(ratios) + 1), max(3.6, row_height * rows + 2.4))
    fig, axes = plt.subplots(1, len(ratios), figsize=size, squeeze=False)
    return fig, axes[0], [(ax, r, [i for i in items if i["prune_ratio"] == r]) for ax, r in zip(axes[0], ratios)]


def overlap_table(overlaps: list[dict]) -> list[str]:
    """The Markdown table of `removal_overlaps`."""
    return (["| prune ratio | method | removed | also removed | Jaccard |", "|---:|---|---:|---:|---:|"]
            + [f"| {o['prune_ratio']:g} | {o['method']} | {o['removed']} | {100 * o['also_removed']:.1f} % | "
               f"{o['jaccard']:.3f} |" for o in overlaps])


def draw_overlaps(overlaps: list[dict], path: Path) -> str:
    """removal_overlap.png: one panel per prune ratio, the share of influence's removals each
    method removes too (`removal_overlaps`), beside the share a random set would have."""
    fig, axes, panels = _panels_per_ratio(pyplot(), overlaps, row_height=0.45)
    for ax, ratio, os_ in panels:
        shares = [100 * o["also_removed"] for o in os_]
        ax.barh(range(len(os_)), shares, color=[_COLOURS.get(o["method"], "#333333") for o in os_])
        for y, share in enumerate(shares):
            ax.annotate(f"{share:.1f}", (share, y), textcoords="offset points", xytext=(3, 0), va="center", fontsize=8)
        ax.axvline(100 * ratio, color="black", ls="--", lw=1, label=f"a random set: {100 * ratio:g}%")
        ax.set_yticks(range(len(os_)), [o["method"] for o in os_])
        ax.invert_yaxis()
        ax.set_xlim(0, 115)
        ax.set_xlabel("of influence's removals, also removed (%)")
        ax.set_title(f"{100 * ratio:g}% pruned")
    fig.suptitle("How much of what this product removes each method removes too\n"
                 "(a method that draws per seed: its first draw)", fontsize=10)
    return save_figure(fig, axes, path)


def draw_plots(summary: list[dict], records: list[dict], gaps: list[dict], out: Path,
               comparisons: list[dict] | None = None, overlaps: list[dict] | None = None,
               target_drop: float = EvalArgs.target_drop, models: str | None = None) -> dict[str, str]:
    """accuracy_vs_ratio.png, accuracy_vs_time.png, generalization_gap.png, for the comparisons
    that carry an interval (`targets`' and the others) comparisons.png, and for `removal_overlaps`
    removal_overlap.png under `out`. The target line sits `target_drop` below the full data's
    accuracy, as `add_convergence` sets each run's target. `models` ("scored with X, retrained Y")
    goes under the titles of the plots of retrained runs, where another architecture retrained."""
    plt = pyplot()
    below = "" if models is None else f"\n({models})"

    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    full = next((s for s in summary if s["method"] == FULL), None)

    fig, (ax, delta) = plt.subplots(1, 2, figsize=(14, 5.2))
    # the right panel: each method against random selection, or against the full data where
    # random was not evaluated (a blank panel otherwise)
    reference = {s["prune_ratio"]: s["accuracy"] for s in summary if s["method"] == "random"}
    against = "random"
    if not reference and full:
        reference = {s["prune_ratio"]: full["accuracy"] for s in summary if s["method"] != FULL}
        against = FULL
    if full:
        ax.axhline(100 * full["accuracy"], color="black", lw=1, label=f"full data ({100 * full['accuracy']:.2f}%)")
        ax.axhspan(100 * (full["accuracy"] - full["accuracy_std"]), 100 * (full["accuracy"] + full["accuracy_std"]),
                   color="black", alpha=0.08)
        ax.axhline(100 * (full["accuracy"] - target_drop), color="black", lw=1, ls=":",
                   label=f"full − {_points(target_drop)} points")
    gains = []
    for method in dict.fromkeys(s["method"] for s in summary if s["method"] != FULL):
        rows = sorted((s for s in summary if s["method"] == method), key=lambda s: s["prune_ratio"])
        x = [100 * s["prune_ratio"] for s in rows]
        ax.errorbar(x, [100 * s["accuracy"] for s in rows], yerr=[100 * s["accuracy_std"] for s in rows],
                    marker="o", capsize=3, lw=2.2 if method == "influence" else 1.2, color=_COLOURS.get(method),
                    label=method + (" (this product)" if method == "influence" else ""))
        if method != against:
            shared = [s for s in rows if s["prune_ratio"] in reference]
            mine = [(100 * s["prune_ratio"], method, 100 * (s["accuracy"] - reference[s["prune_ratio"]]))
                    for s in shared]
            gains += mine
            delta.errorbar([x for x, _, _ in mine], [g for _, _, g in mine],
                           yerr=[100 * s["accuracy_std"] for s in shared], marker="o", capsize=3,
                           lw=2.2 if method == "influence" else 1.2, color=_COLOURS.get(method), label=method)
    if reference:
        delta.axhline(0, color=_COLOURS[against], lw=1.5, label="random" if against == "random" else "full data")
        # the product's own line always stays in view
        floor = min([GAIN_FLOOR] + [math.floor(g) - 1 for _, m, g in gains if m == "influence"])
        clipped = zoom_gains(delta, gains, floor)
        name = "random's" if against == "random" else "the full data's"
        delta.set_xlabel("prune ratio (% of training samples removed)")
        delta.set_ylabel(f"test accuracy − {name} (points)")
        delta.set_title(("Gain over random selection" if against == "random" else
                         "Difference from the full data (random was not evaluated)")
                        + "\n(error bars: the method's std over seeds"
                        + (f"; below {floor:g} points: named at the bottom)" if clipped else ")"))
    else:
        delta.set_visible(False)
    ax.set_xlabel("prune ratio (% of training samples removed)")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title("Test accuracy after retraining on the pruned set" + below)
    paths["accuracy_vs_ratio"] = save_figure(fig, (ax, delta), out / "accuracy_vs_ratio.png")

    fig, ax = plt.subplots(figsize=(7.5, 5))
    seed0 = min(r["seed"] for r in records)
    evaluated = sorted({r["prune_ratio"] for r in records})
    ratio = TARGET_RATIO if TARGET_RATIO in evaluated else evaluated[-1]
    for r in records:
        if r["seed"] != seed0 or r["prune_ratio"] not in (0.0, ratio) or not r["curve"]:
            continue
        if r.get("selection_seed") not in (None, seed0):  # methods drawn per seed: seed0's draw
            continue
        ax.plot([c["train_seconds"] for c in r["curve"]], [100 * c["test_accuracy"] for c in r["curve"]],
                marker=".", color=_COLOURS.get(r["method"]), lw=2.2 if r["method"] in ("influence", FULL) else 1.2,
                label=r["method"] if r["method"] == FULL else f"{r['method']} ({100 * ratio:g}% pruned)")
        if r["method"] == FULL:
            ax.axhline(100 * r["target_accuracy"], color="black", ls=":", lw=1,
                       label=f"target: full − {_points(target_drop)} points")
            ax.axvline(TARGET_TIME * r["train_seconds"], color="black", ls="--", lw=1,
                       label=f"{TARGET_TIME:g} × full training time")
    ax.set_xlabel("training time (s, evaluations excluded)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Convergence, seed {seed0}" + below)
    lo = min([100 * c["test_accuracy"] for r in records for c in r["curve"][len(r["curve"]) // 2:]] or [0])
    ax.set_ylim(max(lo - 2, 0), None)
    paths["accuracy_vs_time"] = save_figure(fig, (ax,), out / "accuracy_vs_time.png")

    if gaps:
        kinds = list(dict.fromkeys(g["kind"] for g in gaps))
        fig, axes = plt.subplots(1, 2, figsize=(12, 5))
        for kind, marker in zip(kinds, "os^"):
            gs = [g for g in gaps if g["kind"] == kind]
            predicted, measured = [g["predicted_norm"] for g in gs], [g["measured_norm"] for g in gs]
            axes[0].scatter(predicted, measured, marker=marker,
                            label=f"{gs[0]['problem']} (Pearson {pearson(predicted, measured):.4f})")
            axes[1].plot([g["epsilon"] for g in gs], [g["test_loss_gap"] for g in gs], marker=marker,
                         label=rf"measured $\Delta L_{{test}}$, {kind}")
            axes[1].plot([g["epsilon"] for g in gs], [g["bound"] for g in gs], ls="--", marker=marker,
                         label=rf"bound Lip$\cdot\|\sum_R s_i\|$, {kind}")
        top = max(max(g["predicted_norm"], g["measured_norm"]) for g in gaps)
        axes[0].plot([0, top], [0, top], color="black", lw=1, ls=":", label="measured = predicted")
        axes[0].set_xlabel(r"predicted parameter change $\|\sum_{i\in R} s_i\|$ (parameter units)")
        axes[0].set_ylabel(r"measured parameter change $\|\hat\theta_{-R} - \hat\theta\|$ (parameter units)")
        axes[0].set_title(r"Influence prediction vs refitting without $R(\epsilon)$")
        axes[1].set_xlabel(r"$\epsilon$ (bound on $\|\sum_{i\in R} s_i\|$, parameter units)")
        axes[1].set_ylabel("change in mean test loss (nats)")
        axes[1].set_title("Test-loss gap under the bound")
        axes[1].set_yscale("symlog", linthresh=1e-4)
        paths["generalization_gap"] = save_figure(fig, axes, out / "generalization_gap.png")

    shown = [c for c in comparisons or [] if c.get("interval")]
    if shown:
        from matplotlib.lines import Line2D

        fig, axes, panels = _panels_per_ratio(plt, shown, row_height=0.5)
        for ax, ratio, cs in panels:
            for y, c in enumerate(cs):
                lo, hi = c["interval"]
                colour = _COLOURS.get(c["versus"], "#333333")
                ax.errorbar(100 * c["margin"], y, xerr=[[100 * (c["margin"] - lo)], [100 * (hi - c["margin"])]],
                            fmt="o", capsize=4, color=colour, mfc=colour if c["resolved"] else "white", ms=7)
                ax.annotate(f"{100 * c['margin']:+.2f}", (100 * c["margin"], y), textcoords="offset points",
                            xytext=(0, 7), ha="center", fontsize=8)
            ax.axvline(0, color="black", lw=1)
            ax.set_yticks(range(len(cs)), [c["versus"] for c in cs])
            ax.set_ylim(-1.7, len(cs) - 0.2)  # a free band at the bottom, where the legend goes
            ax.margins(x=0.12)
            ax.set_xlabel("influence − baseline (points)")
            ax.set_title(f"{100 * ratio:g}% pruned")
            ax.grid(alpha=0.3)
        axes[0].legend(handles=[Line2D([], [], marker="o", ls="", color="#333333", label="interval excludes 0"),
                                Line2D([], [], marker="o", ls="", color="#333333", mfc="white",
                                       label="not resolved (includes 0)")], fontsize=8, loc="lower center")
        fig.suptitle("This product's method against each baseline: test-accuracy difference, mean over seeds,\n"
                     f"95 % interval over {interval_over(min(c['paired_seeds'] for c in shown))}" + below,
                     fontsize=10)
        paths["comparisons"] = save_figure(fig, [], out / "comparisons.png")  # grids and the one legend set above

    if overlaps:
        paths["removal_overlap"] = draw_overlaps(overlaps, out / "removal_overlap.png")
    return paths


def targets_line(goal: dict) -> str:
    """The targets at the evaluation's ratio in one line, each with its verdict: what `evaluate`
    prints, so that a missed target is not hidden behind the report."""
    verdict = {True: "met", False: "NOT met"}
    t = goal.get("time_to_target_ratio")
    time = "never" if t is None or math.isnan(t) else f"{t:.2f}×"
    comparisons = "all met" if goal["all_comparisons_met"] else "NOT all met"
    return (f"at prune ratio {goal['ratio']:g}: accuracy drop {100 * goal['accuracy_drop']:.2f} points "
            f"(≤ {_points(goal['target_drop'])}: {verdict[bool(goal['accuracy_drop_met'])]}), "
            f"time to target {time} the full run's (≤ {TARGET_TIME:g}×: {verdict[bool(goal.get('time_met'))]}), "
            f"influence vs others: {comparisons} (see the report)")


def _points(drop: float) -> str:
    """An accuracy difference in percentage points, as the report and plots name it: 0.013 → 1.3."""
    return f"{100 * drop:.4g}"


def _pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def _comparison_line(c: dict) -> str:
    se = c.get("margin_se", math.nan)
    noise = "" if math.isnan(se) else (f" (± {100 * se:.2f} standard error, paired over {c['paired_seeds']} seeds"
                                       + ("; within seed noise" if abs(c["margin"]) < 2 * se else "") + ")")
    if c.get("interval"):
        lo, hi = c["interval"]
        noise += (f"; 95 % interval over {interval_over(c['paired_seeds'])} [{100 * lo:+.2f}, {100 * hi:+.2f}]"
                  + ("" if c["resolved"] else ", not resolved by this test set"))
    verdict = "not a target" if c["met"] is None else "met" if c["met"] else "NOT met"
    return (f"- ratio {c['prune_ratio']:g}: influence − {c['versus']} = {100 * c['margin']:+.2f} points{noise}: "
            f"{verdict}")


def report_markdown(summary: list[dict], records: list[dict], gaps: list[dict], goal: dict, plots: dict[str, str],
                    context: dict, relative_to: Path | None = None, overlaps: list[dict] | None = None,
                    sections: list[str] = ()) -> str:
    """The evaluation's report; `sections`: more Markdown sections, put before the plots."""
    rel = (lambda p: str(Path(p).relative_to(relative_to))) if relative_to else (lambda p: p)
    lines = [f"# Pruning evaluation — {context.get('dataset')} / {context.get('model')}", "",
             "`influence` is this product's method: the removal set minimising the predicted parameter change "
             f"‖Σ_{{i∈R}} s_i‖ (Yang et al. 2023), {context.get('influence_selection', 'as configured')}. "
             "Every run retrains from scratch with the same recipe; the target is the same seed's full-data "
             f"accuracy minus {_points(goal['target_drop'])} points.", ""]
    # influence_selection: said above; models: where another architecture than the scoring one retrained
    for key in ("date", "machine", "command", "run_dir", "scores_from", "models", "recipe"):
        if context.get(key):
            lines.append(f"- **{key.replace('_', ' ')}**: {context[key]}")
    lines += ["", "## Test accuracy (%) and training time (s), mean ± std over seeds", "",
              "| prune ratio | method | kept | accuracy | train s | time to target / full | "
              "samples to target / full | seeds at target |",
              "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        t, n = s["time_to_target_ratio"], s.get("samples_to_target_ratio", math.nan)
        lines.append(f"| {s['prune_ratio']:g} | {'**influence**' if s['method'] == 'influence' else s['method']} | "
                     f"{s['n_kept']} | {_pct(s['accuracy'])} ± {_pct(s['accuracy_std'])} | "
                     f"{s['train_seconds']:.1f} ± {s['train_seconds_std']:.1f} | "
                     f"{'–' if math.isnan(t) else f'{t:.2f}'} | {'–' if math.isnan(n) else f'{n:.2f}'} | "
                     f"{s['reached_target']}/{s['seeds']} |")
    lines += ["", "## Targets", ""]
    if "accuracy_drop" in goal:
        lines.append(f"- accuracy drop at ratio {goal['ratio']:g}: {100 * goal['accuracy_drop']:.2f} points "
                     f"(target ≤ {_points(goal['target_drop'])}): {'met' if goal['accuracy_drop_met'] else 'NOT met'}")
        t, n = goal["time_to_target_ratio"], goal.get("samples_to_target_ratio")
        seen = ("" if n is None or math.isnan(n) else
                f"; by training samples seen, which the machine's load does not change: {n:.2f}×")
        lines.append(f"- time to reach full − {_points(goal['target_drop'])} points at ratio {goal['ratio']:g}: "
                     f"{'never' if t is None or math.isnan(t) else f'{t:.2f}×'} the full run's time{seen} "
                     f"(target: time ≤ {TARGET_TIME:g}× in every seed): {'met' if goal.get('time_met') else 'NOT met'}")
    lines += [_comparison_line(c) for c in goal.get("comparisons", [])]
    if goal.get("other_comparisons"):
        lines += ["", f"Below ratio {goal['ratio']:g} only random is a target; the other methods, measured the same "
                  "way:", ""] + [_comparison_line(c) for c in goal["other_comparisons"]]
    if gaps:
        lines += ["", "## Generalization-gap check (the paper's theory experiment)", "",
                  "| problem | ε | removed | predicted ‖Σ s_i‖ | measured ‖Δθ‖ | cosine | test-loss gap "
                  "| bound Lip·‖Σ s_i‖ |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for g in gaps:
            lines.append(f"| {g['problem']} | {g['epsilon']:.4g} | {g['n_pruned']} of {g['n']} "
                         f"| {g['predicted_norm']:.4g} | {g['measured_norm']:.4g} | {g['cosine']:.4f} "
                         f"| {g['test_loss_gap']:+.3e} | {g['bound']:.3e} |")
        for kind in dict.fromkeys(g["kind"] for g in gaps):
            gs = [g for g in gaps if g["kind"] == kind]
            lines.append("")
            lines.append(f"- {gs[0]['problem']}: Pearson(predicted, measured) = "
                         f"{pearson([g['predicted_norm'] for g in gs], [g['measured_norm'] for g in gs]):.4f}; "
                         f"test-loss gap under the bound at {sum(abs(g['test_loss_gap']) <= g['bound'] for g in gs)}"
                         f"/{len(gs)} ε values (Lip = {gs[0]['lipschitz']:.3g}, λ = {gs[0]['weight_decay']:g})")
    if overlaps:
        lines += ["", "## What each method removes, against influence", "",
                  "Which share of the influence method's removal set each method also removes (a random set of "
                  "the same size shares about the prune ratio), and the Jaccard index of the two sets; a method "
                  "that draws per seed by its first draw.", ""] + overlap_table(overlaps)
    for section in sections:
        lines += ["", section.rstrip("\n")]
    lines += ["", "## Plots", ""]
    for name, path in plots.items():
        lines.append(f"![{name.replace('_', ' ')}]({rel(path)})")
    return "\n".join(lines) + "\n"


def evaluation_table(records: list[dict]):
    """`evaluation.parquet`: one row per training run (`train_model`: the architecture it trained),
    the curve as a list of structs and `test_correct` the packed bits (numpy.packbits, first test
    sample in the highest bit) of which test samples the run classified right (null for runs
    recorded without them)."""
    import pyarrow as pa

    columns = ["method", "prune_ratio", "selection", "selection_seed", "train_model", "seed", "n_kept", "test_accuracy",
               "train_accuracy", "train_seconds", "samples_seen", "target_accuracy", "time_to_target",
               "epoch_to_target", "time_ratio", "samples_ratio", "accuracy_drop", "objective", "n_test"]
    data = {c: [r.get(c) for r in records] for c in columns}
    table = pa.table(data)
    correct = [base64.b64decode(r["test_correct"]) if r.get("test_correct") else None for r in records]
    table = table.append_column("test_correct", pa.array(correct, pa.binary()))
    curve_type = pa.list_(pa.struct([("epoch", pa.float64()), ("samples_seen", pa.int64()),
                                     ("train_seconds", pa.float64()), ("test_accuracy", pa.float64())]))
    return table.append_column("curve", pa.array([r["curve"] for r in records], curve_type))


def machine() -> str:
    """Host, system and CPUs, and what decides a retraining's last digits beside its seed: the
    torch version and the CPU's vector capability (the same seed retrains to the same accuracy
    on the same kind of machine, not across them)."""
    return (f"{platform.node()} · {platform.platform()} · {os.cpu_count()} CPUs · torch {torch.__version__} · "
            f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
