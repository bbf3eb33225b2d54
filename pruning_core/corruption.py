"""Messy training sets built from real ones, for evaluating pruning where it is hard: symmetric
label noise and a long-tailed class imbalance, each drawn from a seed derived from the run's,
applied to the training split only (the test split stays the source's, clean and balanced).

  * Label noise (`flip_labels`): each label is flipped with probability `rate` to a class drawn
    uniformly from the other C − 1 (symmetric noise, as in Northcutt et al. 2021).
  * Long tail (`long_tail_counts`): class c keeps n_max·ratio^(c/(C−1)) of its samples, at least
    one and at most all of them (the exponential profile of Cao et al. 2019), as a seeded uniform
    draw from each class.

The tail is drawn first, on the true labels, and the noise on what it keeps. The corrupted set
is stored as a Delta table whose commit records the settings and every flipped sample's id
(`corrupted_source_stage`), so that every process, and later evaluations, read the same rows.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path

import numpy as np

from . import artifacts
from .data import Dataset, DatasetSpec, load_dataset, parse_dataset_spec
from .errors import BadInputError, DatasetError

CORRUPTION_KEY = "corruption"  # the provenance entry of a corrupted table's commit


def check_settings(label_noise: float, imbalance: float) -> None:
    """A noise rate in [0, 1) and an imbalance ratio in (0, 1], else one line naming the field."""
    if not (0 <= label_noise < 1):
        raise BadInputError(f"`label_noise` {label_noise:g} must lie in [0, 1): the probability that a training "
                            "label is flipped")
    if not (0 < imbalance <= 1):
        raise BadInputError(f"`imbalance` {imbalance:g} must lie in (0, 1]: the smallest class's size over the "
                            "largest's (1: none)")


def corrupts(label_noise: float, imbalance: float) -> bool:
    """Whether these settings change the training set at all."""
    return label_noise > 0 or imbalance < 1


def derived_rng(seed: int, what: str) -> np.random.Generator:
    """The generator of one corruption (`what`: "label-noise", "imbalance"), seeded by (seed, a
    hash of `what`): reproducible by the run's seed, and drawing apart from training's stream."""
    return np.random.default_rng([seed, zlib.crc32(what.encode())])


def flip_labels(y: np.ndarray, n_classes: int, rate: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels (n,) with each flipped with probability `rate` to a uniformly drawn other class,
    flipped (n,) bool). The number flipped is Binomial(n, rate); a label never flips to itself."""
    rng = derived_rng(seed, "label-noise")
    flipped = rng.random(len(y)) < rate
    shift = rng.integers(1, n_classes, size=len(y))  # 1 … C−1 classes on: every other class equally likely
    noisy = np.where(flipped, (y + shift) % n_classes, y).astype(np.int64)
    return noisy, flipped


def long_tail_counts(counts: np.ndarray, ratio: float) -> np.ndarray:
    """Samples each class keeps, (C,): n_max·ratio^(c/(C−1)) rounded, at least one (a class is
    never emptied) and at most the class's own count; an empty class stays empty."""
    counts = np.asarray(counts, np.int64)
    C = len(counts)
    target = np.rint(counts.max() * ratio ** (np.arange(C) / max(C - 1, 1))).astype(np.int64)
    return np.where(counts > 0, np.clip(target, 1, counts), 0)


def long_tail_rows(y: np.ndarray, n_classes: int, ratio: float, seed: int) -> np.ndarray:
    """The rows a long tail keeps, ascending: per class a seeded uniform draw of its
    `long_tail_counts`."""
    rng = derived_rng(seed, "imbalance")
    keep = long_tail_counts(np.bincount(y, minlength=n_classes), ratio)
    rows = [rng.choice(np.flatnonzero(y == c), size=keep[c], replace=False) for c in range(n_classes)]
    return np.sort(np.concatenate(rows)).astype(np.int64)


def corrupt(ds: Dataset, label_noise: float, imbalance: float, seed: int) -> tuple[Dataset, dict]:
    """`ds` with its training split cut to a long tail and its labels flipped, and the record of
    what was done: the settings, the class counts kept and the ids of the flipped samples."""
    check_settings(label_noise, imbalance)
    rows = long_tail_rows(ds.y, ds.n_classes, imbalance, seed) if imbalance < 1 else np.arange(ds.n)
    kept = ds.subset(rows)
    y, flipped = flip_labels(kept.y, ds.n_classes, label_noise, seed) if label_noise > 0 else \
        (kept.y, np.zeros(kept.n, bool))
    out = Dataset(ds.name, kept.x, y, kept.sample_id, ds.x_test, ds.y_test, ds.n_classes, dict(ds.origin), kept.paths)
    record = {"label_noise": label_noise, "imbalance": imbalance, "seed": seed, "source": ds.name,
              "source_fingerprint": ds.fingerprint, "n_source": ds.n, "n": out.n,
              "class_counts": np.bincount(kept.y, minlength=ds.n_classes).tolist(),
              "n_flipped": int(flipped.sum()), "flipped": out.sample_id[flipped].tolist()}
    return out, record


def table_name(spec: DatasetSpec, label_noise: float, imbalance: float, seed: int, key: str) -> str:
    """The corrupted table's folder name: the source's short name, the settings and a key."""
    parts = [spec.short_name] + ([f"noise{label_noise:g}"] if label_noise > 0 else []) + \
        ([f"tail{imbalance:g}"] if imbalance < 1 else []) + [f"seed{seed}", key[:8]]
    return "-".join(parts)


def corrupted_source_stage(dataset: str, data_root: str | None, label_noise: float, imbalance: float, seed: int,
                           folder: Path) -> dict:
    """Write `dataset` corrupted (`corrupt`) as a Delta table in `folder`, named by the source's
    content and the settings, and return {"dataset": its `delta:URI@0` spec, **the record}. A
    table already there for the same source and settings is reused; a new one is written beside
    it and renamed into place whole, so a reader never finds half of it."""
    from .versions import commit_version, provenance_at  # deltalake is needed only here

    ds = load_dataset(dataset, data_root)
    key = artifacts.arguments_key({"source": ds.fingerprint, "label_noise": label_noise, "imbalance": imbalance,
                                   "seed": seed})
    path = Path(folder) / table_name(parse_dataset_spec(dataset), label_noise, imbalance, seed, key)
    if not path.exists():
        corrupted, record = corrupt(ds, label_noise, imbalance, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = artifacts.fresh_path(path.parent, f".{path.name}.", ".tmp", folder=True)
        try:
            commit_version(str(tmp), corrupted, np.ones(corrupted.n, bool), {CORRUPTION_KEY: record})
            try:
                os.rename(tmp, path)
            except OSError:  # another evaluation wrote the same table first: it holds the same rows
                if not path.exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    record = provenance_at(str(path), 0).get(CORRUPTION_KEY)
    if record is None:
        raise DatasetError(f"{path}: not a corrupted training set (no {CORRUPTION_KEY!r} in its provenance)")
    return {"dataset": f"delta:{path}@0", **record}


def corruption_of(dataset: str) -> dict | None:
    """The record (`corrupt`) of a corrupted training set named as `delta:URI@V`, from its
    commit's provenance; None for any other dataset."""
    spec = parse_dataset_spec(dataset)
    if spec.kind != "delta" or spec.options:
        return None
    from .versions import provenance_at

    version = spec.version if spec.version is not None else 0
    record = provenance_at(spec.path, version).get(CORRUPTION_KEY)
    return json.loads(json.dumps(record)) if record is not None else None


# --- what an evaluation's selections and retrainings did on a corrupted training set --------


def robustness(record: dict, ds: Dataset, selections: list[dict], records: list[dict]) -> dict:
    """Per (method, prune ratio), for the report: the share of the flipped labels the method
    removed (mean over its draws; None without flips), the fewest samples any class kept
    (by given label, over its draws; the full data's counts for ratio 0) and the classes a draw
    emptied, and the mean over seeds of the test accuracy and the worst class's test accuracy
    (with the class that was worst most often). `selections`: {path, method, prune_ratio} each;
    `records`: retrainings with `test_correct` (`evaluation.pack_correct`)."""
    from .artifacts import load_selection
    from .evaluation import FULL, unpack_correct

    flipped = np.isin(ds.sample_id, np.asarray(record["flipped"], np.int64))
    cells: dict[tuple, dict] = {}

    def cell(method, ratio):
        return cells.setdefault((method, float(ratio)), {"method": method, "prune_ratio": float(ratio), "removed": [],
                                                         "fewest_kept": None, "emptied": set(), "accuracy": [],
                                                         "worst": [], "worst_class": []})

    full = cell(FULL, 0.0)
    full["fewest_kept"] = int(np.bincount(ds.y, minlength=ds.n_classes).min())
    for sel in selections:
        sample_id, pruned = load_selection(sel["path"])
        if not np.array_equal(sample_id, ds.sample_id):
            raise ValueError(f"{sel['path']} does not list the samples of {ds.name} in order")
        c = cell(sel["method"], sel["prune_ratio"])
        if flipped.any():
            c["removed"].append(float(pruned[flipped].mean()))
        kept = np.bincount(ds.y[~pruned], minlength=ds.n_classes)
        c["fewest_kept"] = int(kept.min()) if c["fewest_kept"] is None else min(c["fewest_kept"], int(kept.min()))
        c["emptied"].update(int(k) for k in np.flatnonzero(kept == 0))
    for r in records:
        if not r.get("test_correct"):
            continue
        correct = unpack_correct(r["test_correct"], r["n_test"])
        per_class = np.array([correct[ds.y_test == k].mean() if (ds.y_test == k).any() else np.nan
                              for k in range(ds.n_classes)])
        c = cell(r["method"], r["prune_ratio"])
        c["accuracy"].append(float(correct.mean()))
        c["worst"].append(float(np.nanmin(per_class)))
        c["worst_class"].append(int(np.nanargmin(per_class)))
    rows = []
    for c in sorted(cells.values(), key=lambda c: (c["prune_ratio"], c["method"] != FULL, c["method"])):
        rows.append({"method": c["method"], "prune_ratio": c["prune_ratio"],
                     "flipped_removed": float(np.mean(c["removed"])) if c["removed"] else None,
                     "fewest_kept": c["fewest_kept"], "emptied": sorted(c["emptied"]),
                     "accuracy": float(np.mean(c["accuracy"])) if c["accuracy"] else None,
                     "worst_class_accuracy": float(np.mean(c["worst"])) if c["worst"] else None,
                     "worst_class": max(set(c["worst_class"]), key=c["worst_class"].count) if c["worst_class"]
                     else None, "seeds": len(c["accuracy"])})
    return {"setting": {k: v for k, v in record.items() if k != "flipped"}, "rows": rows}


def describe(setting: dict) -> str:
    """A corruption's settings in words, for reports."""
    parts = []
    if setting["imbalance"] < 1:
        counts = setting["class_counts"]
        parts.append(f"cut to a long tail (imbalance {setting['imbalance']:g}: class sizes {max(counts):,} down to "
                     f"{min(counts):,}, {setting['n']:,} of {setting['n_source']:,} samples kept)")
    if setting["label_noise"] > 0:
        parts.append(f"{100 * setting['label_noise']:g} % symmetric label noise ({setting['n_flipped']:,} of "
                     f"{setting['n']:,} training labels flipped to another class)")
    return (f"{setting['source']}, " + " and ".join(parts) + f", drawn with seed {setting['seed']}; the test set is "
            "the source's, clean and balanced")


def robustness_markdown(summary: dict, class_names: list[str]) -> str:
    """The report's section on a corrupted training set (`robustness`)."""
    setting = summary["setting"]
    pct = lambda x: "–" if x is None else f"{100 * x:.2f}"  # noqa: E731
    lines = ["## Messy training data", "", f"The training set: {describe(setting)}.", "",
             "| prune ratio | method | flipped labels removed (%) | accuracy (%) | worst-class accuracy (%) | "
             "fewest kept in a class | classes emptied |", "|---:|---|---:|---:|---:|---:|---|"]
    for r in summary["rows"]:
        worst = pct(r["worst_class_accuracy"]) + (f" ({class_names[r['worst_class']]})" if r["worst_class"]
                                                  is not None else "")
        emptied = ", ".join(class_names[k] for k in r["emptied"]) or "none"
        lines.append(f"| {r['prune_ratio']:g} | {r['method']} | {pct(r['flipped_removed'])} | {pct(r['accuracy'])} "
                     f"| {worst} | {r['fewest_kept']} | {emptied} |")
    lines += ["", "Accuracies are means over the training seeds; a method drawn per seed counts each draw. The "
              "flipped samples' ids are in evaluation.json, under corruption."]
    return "\n".join(lines) + "\n"
