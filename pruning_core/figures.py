"""Pictures of a run's selection: what was pruned per class, by difficulty and by influence, and
examples of pruned and kept samples. The evaluation's plots share `save_figure`."""

import base64
import re
from pathlib import Path

import numpy as np

CLASS_NAMES = {
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}
BAR_CLASSES = 20  # up to this many classes get a bar each; more are drawn as the sorted kept share
EXAMPLE_CLASSES = 10  # rows of the examples grid (the first classes where there are more)
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


def draw_examples(path: Path, x: np.ndarray, labels: np.ndarray, pruned: np.ndarray, names: list[str],
                  per_side: int = 6, seed: int = 0) -> str | None:
    """examples.png: for each class (the first EXAMPLE_CLASSES), `per_side` pruned samples on the
    left and `per_side` kept ones on the right, drawn at random (seeded) from each; None when the
    samples are not images."""
    if displayable(x[:1]) is None:
        return None
    plt = pyplot()
    rng = np.random.default_rng(seed)
    classes = list(range(min(len(names), EXAMPLE_CLASSES)))
    fig, axes = plt.subplots(len(classes), 2 * per_side + 1, figsize=(1.0 * (2 * per_side + 1), 1.05 * len(classes)),
                             squeeze=False, gridspec_kw={"width_ratios": [1] * per_side + [0.3] + [1] * per_side})
    for row, c in enumerate(classes):
        for side, mask in ((0, pruned), (1, ~pruned)):
            members = np.flatnonzero((labels == c) & mask)
            chosen = np.sort(rng.choice(members, size=min(per_side, members.size), replace=False))
            images = displayable(x[chosen]) if chosen.size else None
            for k in range(per_side):
                ax = axes[row, k + side * (per_side + 1)]
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_color(PRUNED if side == 0 else KEPT)
                    spine.set_linewidth(2)
                if images is not None and k < len(images):
                    ax.imshow(images[k], cmap="gray" if images.ndim == 3 else None, vmin=0, vmax=1)
                elif k == 0:
                    ax.text(0.5, 0.5, "none", ha="center", va="center", fontsize=8, transform=ax.transAxes)
                else:
                    ax.set_visible(False)
        axes[row, per_side].axis("off")
        axes[row, 0].set_ylabel(names[c], rotation=0, ha="right", va="center", fontsize=8)
    more = f" (the first {len(classes)} of {len(names)} classes)" if len(names) > len(classes) else ""
    fig.suptitle(f"Random pruned and kept samples per class{more}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    for first, text, color in ((0, f"pruned ({pruned.sum():,})", PRUNED), (per_side + 1, f"kept ({(~pruned).sum():,})", KEPT)):
        left, right = axes[0, first].get_position(), axes[0, first + per_side - 1].get_position()
        fig.text((left.x0 + right.x1) / 2, left.y1 + 0.005, text, color=color, ha="center", va="bottom")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return str(path)


def draw_run(folder: Path, ds, scores: Path, selection: Path, objective: float | None = None) -> dict[str, str]:
    """A run's pictures in `folder`: selection.png and, where the samples are images, examples.png.
    Returns {picture: file name}. The scores, the selection and the dataset list the same samples
    in the same order, as a run writes them."""
    from . import artifacts

    sample_id, pruned = artifacts.load_selection(selection)
    if not np.array_equal(sample_id, ds.sample_id):
        raise ValueError(f"{selection} does not list the samples of {ds.name} in order")
    table, _, _ = artifacts.load_scores(scores, with_vectors=False)
    if not np.array_equal(artifacts.column_array(table, "sample_id"), sample_id):
        raise ValueError(f"{scores} and {selection} do not list the same samples in the same order")
    el2n, norms = artifacts.column_array(table, "el2n"), artifacts.influence_norms(scores)
    names = class_names(ds.origin.get("source", ds.name), ds.n_classes)
    draw_selection(Path(folder) / "selection.png", ds.y, pruned, el2n, norms, names, objective)
    drawn = {"selection": "selection.png"}
    if draw_examples(Path(folder) / "examples.png", ds.x, ds.y, pruned, names):
        drawn["examples"] = "examples.png"
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
