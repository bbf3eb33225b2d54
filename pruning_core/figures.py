"""Pictures of a run's selection: what was pruned per class, by difficulty and by influence, and
examples of pruned and kept samples. The evaluation's plots share `save_figure`."""

import base64
import re
from pathlib import Path

import numpy as np

from . import artifacts

CLASS_NAMES = {
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}
BAR_CLASSES = 20  # up to this many classes get a bar each; more are drawn as the sorted kept share
EXAMPLE_CLASSES = 10  # rows of the examples grid (the most and the least pruned classes where there are more)
MISLABELLED_SHOWN = 32  # samples in mislabelled.png, the most suspect first
KEPT, PRUNED = "tab:blue", "tab:orange"
INLINE_LIMIT = 1 << 20  # bytes: a larger picture is named by its path in a Prefect artifact, not carried


def class_names(source: str, n_classes: int) -> list[str]:
    """Readable names of the named datasets' classes; the class numbers otherwise."""
    names = CLASS_NAMES.get(source)
    return list(names) if names and len(names) == n_classes else [str(c) for c in range(n_classes)]


def save_figure(fig, axes, path: Path) -> str:
    """Grid and legend on every panel given, then the PNG."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only: no display here or on workers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_selection(path: Path, labels: np.ndarray, pruned: np.ndarray, el2n: np.ndarray, norms: np.ndarray,
                   names: list[str], objective: float | None = None) -> str:
    """selection.png: kept and pruned samples per class; the trained model's EL2N of both (what
    difficulty was removed); each sample's ‖s_i‖₂ for both, with the objective ‖Σ_pruned s_i‖₂ beside
    Σ_pruned ‖s_i‖₂ (how much of the removed samples' influence cancels)."""
    plt = pyplot()
    fig, (per_class, difficulty, influence) = plt.subplots(1, 3, figsize=(17, 5.2))
    kept = ~pruned
    counts = np.stack([np.bincount(labels[m], minlength=len(names)) for m in (kept, pruned)])
    share = 100 * counts[0] / np.maximum(counts.sum(axis=0), 1)
    if len(names) <= BAR_CLASSES:
        rows = np.arange(len(names))
        per_class.barh(rows, counts[0], color=KEPT, label=f"kept ({kept.sum():,})")
        per_class.barh(rows, counts[1], left=counts[0], color=PRUNED, label=f"pruned ({pruned.sum():,})")
        for row, total, pct in zip(rows, counts.sum(axis=0), share):
            per_class.text(total, row, f" {pct:.0f} % kept", va="center", fontsize=8)
        per_class.set_yticks(rows, names, fontsize=8)
        per_class.set_ylim(len(names) - 0.5, -2.2)  # the first class on top, room above it for the legend
        per_class.set_xlim(0, 1.25 * counts.sum(axis=0).max())
        per_class.set_xlabel("samples")
    else:
        order = np.argsort(share)
        per_class.plot(np.arange(len(names)), share[order], color=KEPT,
                       label=f"kept share ({kept.sum():,} kept, {pruned.sum():,} pruned)")
        per_class.set_xlabel(f"class, sorted by kept share ({len(names)} classes)")
        per_class.set_ylabel("kept (% of the class)")
    per_class.set_title("Kept and pruned per class")

    bins = np.linspace(0.0, max(float(el2n.max()), 1e-12), 50)
    for mask, color, label in ((kept, KEPT, "kept"), (pruned, PRUNED, "pruned")):
        difficulty.hist(el2n[mask], bins=bins, histtype="step", lw=1.5, color=color, label=label)
    difficulty.set_yscale("log")
    difficulty.set_xlabel("EL2N of the trained model, ‖softmax − one-hot‖₂ (0 = easy)")
    difficulty.set_ylabel("samples (log scale)")
    difficulty.set_title("Difficulty of what was pruned and kept")

    positive = norms[norms > 0]
    low, high = (float(positive.min()), float(positive.max())) if positive.size else (1e-12, 1.0)
    bins = np.geomspace(low, max(high, low * 1.01), 50)
    for mask, color, label in ((kept, KEPT, "kept"), (pruned, PRUNED, "pruned")):
        influence.hist(np.clip(norms[mask], low, None), bins=bins, histtype="step", lw=1.5, color=color, label=label)
    influence.set_xscale("log")
    influence.set_xlabel("‖s_i‖₂, predicted parameter change of removing sample i alone")
    influence.set_ylabel("samples")
    title = "Influence of what was pruned and kept"
    if objective is not None:
        title += f"\n‖Σ_pruned s_i‖₂ = {objective:.3g}, Σ_pruned ‖s_i‖₂ = {norms[pruned].sum():.3g}"
    influence.set_title(title, fontsize=10)
    return save_figure(fig, (per_class, difficulty, influence), path)


def displayable(x: np.ndarray) -> np.ndarray | None:
    """Images as (n, H, W) or (n, H, W, 3) floats in [0, 1] from (n, C, H, W) with C 1 or 3
    (uint8 as it is, floats scaled by their range); None for samples that are not images."""
    if x.ndim != 4 or x.shape[1] not in (1, 3) or min(x.shape[2:]) < 4:
        return None
    images = x.astype(np.float32)
    if x.dtype == np.uint8:
        images /= 255.0
    else:
        low, high = float(images.min()), float(images.max())
        images = (images - low) / (high - low) if high > low else np.zeros_like(images)
    return images[:, 0] if x.shape[1] == 1 else images.transpose(0, 2, 3, 1)


def example_classes(labels: np.ndarray, pruned: np.ndarray, n_classes: int, rows: int = EXAMPLE_CLASSES) -> list[int]:
    """The classes the examples grid shows: all of them where they fit in `rows`, else the `rows`
    // 2 most pruned and the rest least pruned (by the share of the class kept), most pruned first:
    where the selection differs most between classes, which is what the grid is looked at for."""
    if n_classes <= rows:
        return list(range(n_classes))
    total = np.bincount(labels, minlength=n_classes)
    share = np.bincount(labels[~pruned], minlength=n_classes) / np.maximum(total, 1)
    order = [int(c) for c in np.argsort(share, kind="stable") if total[c]]
    most = rows // 2
    return order[:most] + order[max(most, len(order) - (rows - most)):]


def draw_examples(path: Path, x: np.ndarray, labels: np.ndarray, pruned: np.ndarray, names: list[str],
                  per_side: int = 6, seed: int = 0) -> str | None:
    """examples.png: for each class (`example_classes`), `per_side` pruned samples on the left and
    `per_side` kept ones on the right, drawn at random (seeded) from each, framed in the colour of
    their side; None when the samples are not images. One mosaic, one image on the figure."""
    if displayable(x[:1]) is None:
        return None
    from matplotlib.colors import to_rgb

    plt = pyplot()
    rng = np.random.default_rng(seed)
    classes = example_classes(labels, pruned, len(names))
    h, w = x.shape[2:]
    frame, pad = max(1, h // 14), max(2, h // 7)
    tile_h, tile_w = h + 2 * frame + pad, w + 2 * frame + pad
    gap = 2 * tile_w // 3  # between the pruned and the kept block
    mosaic = np.ones((len(classes) * tile_h + pad, 2 * per_side * tile_w + gap + pad, 3), dtype=np.float32)
    empty = []
    for row, c in enumerate(classes):
        for side, mask in ((0, pruned), (1, ~pruned)):
            members = np.flatnonzero((labels == c) & mask)
            chosen = np.sort(rng.choice(members, size=min(per_side, members.size), replace=False))
            left = pad + side * (per_side * tile_w + gap)
            if not chosen.size:
                empty.append((left + tile_w / 2, pad + row * tile_h + tile_h / 2))
                continue
            images = displayable(x[chosen])
            if images.ndim == 3:
                images = np.repeat(images[..., None], 3, axis=3)
            for k, image in enumerate(images):
                top, x0 = pad + row * tile_h, left + k * tile_w
                mosaic[top:top + h + 2 * frame, x0:x0 + w + 2 * frame] = to_rgb(PRUNED if side == 0 else KEPT)
                mosaic[top + frame:top + frame + h, x0 + frame:x0 + frame + w] = image
    fig, ax = plt.subplots(figsize=(1.0 * (2 * per_side + 1), 1.05 * len(classes) + 0.6))
    ax.imshow(mosaic, interpolation="nearest")
    for cx, cy in empty:
        ax.text(cx, cy, "none", ha="center", va="center", fontsize=8)
    subset = len(names) > len(classes)
    kept_share = [100 * float(np.mean(~pruned[labels == c])) for c in classes]
    ax.set_yticks([pad + row * tile_h + (h + 2 * frame) / 2 for row in range(len(classes))],
                  [f"{names[c]} ({share:.0f} % kept)" if subset else names[c] for c, share in zip(classes, kept_share)],
                  fontsize=8)
    ax.set_xticks([pad + per_side * tile_w / 2, pad + per_side * tile_w + gap + per_side * tile_w / 2],
                  [f"pruned ({pruned.sum():,})", f"kept ({(~pruned).sum():,})"])
    ax.xaxis.tick_top()
    for tick, color in zip(ax.xaxis.get_major_ticks(), (PRUNED, KEPT)):
        tick.label2.set_color(color)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    most = EXAMPLE_CLASSES // 2
    more = (f"\n(the {most} most and {len(classes) - most} least pruned of {len(names)} classes)" if subset else "")
    ax.set_title(f"Random pruned and kept samples per class{more}", fontsize=10, pad=24)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def draw_mislabelled(path: Path, x: np.ndarray, labels: np.ndarray, mislabel: np.ndarray, likely: np.ndarray,
                     flagged: np.ndarray, names: list[str], pruned: np.ndarray | None = None,
                     count: int = MISLABELLED_SHOWN, columns: int = 8) -> str | None:
    """mislabelled.png: the `count` samples that look most mislabelled (highest `mislabel`, ties
    by index), each under its given label and the label the model gives it instead (`likely`),
    framed in the colour of its side of the selection where `pruned` is given; None when the
    samples are not images. The title counts those flagged by the rule (`flagged`, (n,) bool)."""
    if displayable(x[:1]) is None:
        return None
    from matplotlib.colors import to_rgb

    plt = pyplot()
    shown = np.lexsort((np.arange(len(mislabel)), -np.asarray(mislabel, np.float64)))[:count]
    rows = -(-len(shown) // columns)
    h, w = x.shape[2:]
    frame = max(1, h // 14)
    images = displayable(x[shown])
    if images.ndim == 3:
        images = np.repeat(images[..., None], 3, axis=3)
    fig, axes = plt.subplots(rows, columns, figsize=(1.45 * columns, 1.75 * rows + 0.6), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i, image in zip(axes.ravel(), shown, images):
        tile = np.ones((h + 2 * frame, w + 2 * frame, 3), np.float32)
        if pruned is not None:
            tile[:] = to_rgb(PRUNED if pruned[i] else KEPT)
        tile[frame:frame + h, frame:frame + w] = image
        ax.imshow(tile, interpolation="nearest")
        ax.set_title(f"{names[labels[i]][:12]}\n→ {names[likely[i]][:12]}", fontsize=7)
    side = "; frame: pruned (orange) or kept (blue)" if pruned is not None else ""
    fig.suptitle(f"The {len(shown)} samples that look most mislabelled: given label → the model's "
                 f"({int(np.sum(flagged)):,} of {len(labels):,} flagged{side})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def draw_run(folder: Path, ds, scores: Path, selection: Path, objective: float | None = None) -> dict[str, str]:
    """A run's pictures in `folder`: selection.png and, where the samples are images, examples.png
    and mislabelled.png (for scores that rate each label: `mislabel`). Returns {picture: file
    name}. The scores, the selection and the dataset list the same samples in the same order, as
    a run writes them."""
    sample_id, pruned = artifacts.load_selection(selection)
    if not np.array_equal(sample_id, ds.sample_id):
        raise ValueError(f"{selection} does not list the samples of {ds.name} in order")
    table, _, _ = artifacts.load_scores(scores, with_vectors=False)
    if not np.array_equal(artifacts.column_array(table, "sample_id"), sample_id):
        raise ValueError(f"{scores} and {selection} do not list the same samples in the same order")
    el2n, norms = artifacts.column_array(table, "el2n"), artifacts.influence_norms(scores)
    names = ds.origin.get("classes") or class_names(ds.origin.get("source", ds.name), ds.n_classes)
    draw_selection(Path(folder) / "selection.png", ds.y, pruned, el2n, norms, names, objective)
    drawn = {"selection": "selection.png"}
    if draw_examples(Path(folder) / "examples.png", ds.x, ds.y, pruned, names):
        drawn["examples"] = "examples.png"
    if "mislabelled" in table.column_names and draw_mislabelled(
            Path(folder) / "mislabelled.png", ds.x, ds.y, *(artifacts.column_array(table, c) for c in (
                "mislabel", "likely_label", "mislabelled")), names, pruned):
        drawn["mislabelled"] = "mislabelled.png"
    return drawn


def inline_images(markdown: str, folder: Path, limit: int = INLINE_LIMIT) -> str:
    """`markdown` with each image link to a PNG (relative to `folder`) carrying the picture itself
    as a data: URI, so that the Prefect UI, which cannot read the run's files, shows it. A missing
    picture, or one above `limit` bytes, keeps a link to its absolute path."""
    def inline(match: re.Match) -> str:
        alt, path = match.group(1), Path(folder) / match.group(2)
        if path.suffix.lower() == ".png" and path.is_file() and path.stat().st_size <= limit:
            return f"![{alt}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"
        return f"![{alt}]({path})"

    return re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", inline, markdown)
