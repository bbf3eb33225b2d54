"""What each method removes, against the influence method, in finished evaluations: the share of
the influence set's removals each method also removes and the Jaccard index, per prune ratio
(the table and plot an evaluation's report now has, for evaluation folders written before it).

Run:  .venv/bin/python benchmarks/removal_overlap.py runs/eval-A runs/eval-B \
          --report benchmarks/results/removal-overlap-0.4.md --plot benchmarks/results/removal-overlap-0.4.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pruning_core import evaluation  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("evaluations", nargs="+", type=Path, help="finished evaluation folders (runs/eval-…)")
    parser.add_argument("--report", type=Path, required=True, help="Markdown table to write")
    parser.add_argument("--plot", type=Path, help="PNG of the first evaluation's overlaps")
    ns = parser.parse_args(argv)
    lines = [f"# What each method removes, against influence ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
             "Command: `.venv/bin/python benchmarks/removal_overlap.py " + " ".join(sys.argv[1:]) + "`", "",
             "Share of the influence method's removals each method also removes (a random set of the same size "
             "shares about the prune ratio) and the Jaccard index of the two sets; a method that draws per seed "
             "by its seed-0 draw.", ""]
    for k, folder in enumerate(ns.evaluations):
        summary = json.loads((folder / "evaluation.json").read_text())
        overlaps = evaluation.removal_overlaps(evaluation.finished_selections(folder))
        if not overlaps:
            parser.error(f"{folder}: no influence selection beside another method's under selections/")
        rounds = summary["arguments"].get("rounds") or 1
        lines += [f"## {folder.name}", "", f"Scores from `{summary['scores_from']}`; influence in {rounds} round(s); "
                  f"seeds {summary['arguments']['seeds']}.", ""] + evaluation.overlap_table(overlaps) + [""]
        if ns.plot and k == 0:
            evaluation.draw_overlaps(overlaps, ns.plot)
    ns.report.write_text("\n".join(lines))
    print(ns.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
