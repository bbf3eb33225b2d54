"""The hard cut against the training budget, as a picture: validation accuracy against β at 40 %,
60 % and 80 % pruned, one line per retraining length, the rule's β starred (or marked where it
falls between two measured β). Read from the committed tables of the validation-split experiments
(benchmarks/results/hard-cut.md: 4 epochs, 5 seeds; recipe-8.md: 8 and 16 epochs, 3 seeds;
recipe-2.md: 2 and 3 epochs, 5 seeds, 3 at 40 %), with the product's candidate order at each
ratio (`uniform` below 70 %, `smallest` from 70 %), random dotted where it was run.

Run:  .venv/bin/python -m experiments.plot_budget   → benchmarks/results/hard-cut-budget.png
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from pruning_core.baselines import ccs_hard_fraction
from pruning_core.selection import hard_cut_for

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ROW = re.compile(r"^\| (0\.\d+) \| (uniform|smallest|random)(?:@([\d.]+))? \| ([\d.]+) ± ([\d.]+) \|", re.M)


def sweeps() -> tuple[dict, dict]:
    """(epochs, ratio) → [(β, mean %, std)] in the product's candidate order, and (epochs, ratio) →
    random's mean %, from the tables."""
    found: dict[tuple[int, float], dict[float, tuple[float, float]]] = {}
    random: dict[tuple[int, float], float] = {}
    sections = [(4, part) for part in (RESULTS / "hard-cut.md").read_text().split("\n## ")]
    for name in ("recipe-8.md", "recipe-2.md"):
        for part in (RESULTS / name).read_text().split("\n## ")[1:]:
            epochs = re.match(r"A (?:longer|shorter) recipe \((\d+) epochs\)", part)
            sections.append((int(epochs.group(1)), part))
    for epochs, text in sections:
        for ratio, order, beta, mean, std in ROW.findall(text.split("Each variant against")[0]):
            r = float(ratio)
            if order == "random":
                random[(epochs, r)] = float(mean)
                continue
            if order != ("uniform" if r < 0.7 else "smallest"):
                continue
            b = float(beta) if beta else ccs_hard_fraction(r)  # no @β: validation_split's default, CCS's
            found.setdefault((epochs, r), {})[b] = (float(mean), float(std))
    return {k: sorted((b, m, s) for b, (m, s) in v.items()) for k, v in found.items()}, random


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data, random = sweeps()
    colours = {2: "#d62728", 3: "#9467bd", 4: "#1f77b4", 8: "#ff7f0e", 16: "#2ca02c"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for ax, ratio in zip(axes, (0.4, 0.6, 0.8)):
        for epochs in sorted(colours):
            points = data.get((epochs, ratio))
            if not points:
                continue
            beta, mean, std = (list(x) for x in zip(*points))
            colour = colours[epochs]
            ax.errorbar([100 * b for b in beta], mean, yerr=std, marker="o", capsize=3, color=colour,
                        label=f"retrained {epochs} epochs (budget {epochs / 4:g}×)")
            rule = hard_cut_for(ratio, epochs / 4)
            ax.plot(100 * rule, float(np.interp(rule, beta, mean)), marker="*", ms=16, color=colour, mec="black",
                    ls="")
            if (epochs, ratio) in random:
                ax.axhline(random[(epochs, ratio)], color=colour, ls=":", lw=1)
        ax.plot([], [], marker="*", ms=12, color="white", mec="black", ls="",
                label="the rule's β (on the line between measured β)")
        ax.plot([], [], color="grey", ls=":", label="random, same budget")
        ax.set_xlabel("β: hardest share cut first (% of the training set)")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title(f"{100 * ratio:g} % pruned")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Fashion-MNIST, cnn, 4-epoch scores; mean ± std over seeds. Rule: β = (r − 0.5 − c·log2 budget) / 2, "
                 "c = 0.1 for budget ≥ 1, 0.2 below (budget ≥ ½)", fontsize=10)
    fig.tight_layout()
    out = RESULTS / "hard-cut-budget.png"
    fig.savefig(out, dpi=120)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
