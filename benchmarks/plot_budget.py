"""The hard cut against the training budget, as a picture: validation accuracy against β at 60 %
and 80 % pruned, one line per retraining length, the rule's β starred. Read from the committed
tables of the validation-split experiments (benchmarks/results/hard-cut.md: 4 epochs, 5 seeds;
recipe-8.md: 8 and 16 epochs, 3 seeds), with the product's candidate order at each ratio
(`uniform` below 70 %, `smallest` from 70 %).

Run:  .venv/bin/python benchmarks/plot_budget.py   → benchmarks/results/recipe-8.png
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pruning_core.baselines import ccs_hard_fraction  # noqa: E402
from pruning_core.selection import hard_cut_for  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ROW = re.compile(r"^\| (0\.\d+) \| (uniform|smallest)(?:@([\d.]+))? \| ([\d.]+) ± ([\d.]+) \|", re.M)


def sweeps() -> dict[tuple[int, float], list[tuple[float, float, float]]]:
    """(epochs, ratio) → [(β, mean %, std)] in the product's candidate order, from the tables."""
    found: dict[tuple[int, float], dict[float, tuple[float, float]]] = {}
    sections = [(4, part) for part in (RESULTS / "hard-cut.md").read_text().split("\n## ")]
    for part in (RESULTS / "recipe-8.md").read_text().split("\n## ")[1:]:
        epochs = re.match(r"A longer recipe \((\d+) epochs\)", part)
        sections.append((int(epochs.group(1)), part))
    for epochs, text in sections:
        for ratio, order, beta, mean, std in ROW.findall(text.split("Each variant against")[0]):
            r = float(ratio)
            if order != ("uniform" if r < 0.7 else "smallest"):
                continue
            b = float(beta) if beta else ccs_hard_fraction(r)  # no @β: validation_split's default, CCS's
            found.setdefault((epochs, r), {})[b] = (float(mean), float(std))
    return {k: sorted((b, m, s) for b, (m, s) in v.items()) for k, v in found.items()}


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = sweeps()
    colours = {4: "#1f77b4", 8: "#ff7f0e", 16: "#2ca02c"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, ratio in zip(axes, (0.6, 0.8)):
        for epochs in (4, 8, 16):
            points = data.get((epochs, ratio))
            if not points:
                continue
            beta, mean, std = (list(x) for x in zip(*points))
            colour = colours[epochs]
            ax.errorbar([100 * b for b in beta], mean, yerr=std, marker="o", capsize=3, color=colour,
                        label=f"retrained {epochs} epochs (budget {epochs // 4}×)")
            rule = hard_cut_for(ratio, epochs / 4)
            if rule in beta:
                ax.plot(100 * rule, mean[beta.index(rule)], marker="*", ms=16, color=colour, mec="black", ls="")
        ax.plot([], [], marker="*", ms=12, color="white", mec="black", ls="", label="the rule's β")
        ax.set_xlabel("β: hardest share cut first (% of the training set)")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title(f"{100 * ratio:g} % pruned")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Fashion-MNIST, cnn, 4-epoch scores; mean ± std over seeds. "
                 "Rule: β = (r − 0.5 − 0.1·log2 budget) / 2", fontsize=10)
    fig.tight_layout()
    out = RESULTS / "recipe-8.png"
    fig.savefig(out, dpi=120)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
