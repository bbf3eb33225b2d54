"""The greedy solver against the SCIP reference on n = 2,000, p = 64, prune ratio 0.4: SCIP
warm-started with the greedy set, and SCIP alone, each with a 60 s limit. Writes
benchmarks/results/selection_reference.json."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from pruning_core.selection import SelectionArgs, objective, select, solve_scip


def main() -> int:
    rng = np.random.default_rng(0)
    V = rng.normal(size=(2000, 64)) * rng.exponential(size=(2000, 1)) + 0.05 * rng.normal(size=64)
    args = SelectionArgs(prune_ratio=0.4, solver="scip", time_limit=60)
    started = time.perf_counter()
    greedy = select(V, SelectionArgs(prune_ratio=0.4))
    t_greedy = time.perf_counter() - started
    rows = [{"solver": "greedy", "objective": greedy.objective, "seconds": t_greedy}]
    for name, warm in (("scip, warm-started", greedy.pruned), ("scip alone", None)):
        started = time.perf_counter()
        pruned, info = solve_scip(V, args, warm)
        rows.append({"solver": name, "objective": objective(V, pruned), "seconds": time.perf_counter() - started,
                     "status": info["status"], "bound": info["bound"]})
    best = min(r["objective"] for r in rows[1:])
    out = {"benchmark": "selection_reference", "command": "python -m benchmarks.selection_reference",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.platform(),
           "n": 2000, "p": 64, "ratio": 0.4, "results": rows, "greedy_over_reference_best": greedy.objective / best}
    path = Path(__file__).parent / "results" / "selection_reference.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    for r in rows:
        print(f"{r['solver']:20} objective {r['objective']:10.5g}  {r['seconds']:7.2f} s  "
              f"{r.get('status', '')} {r.get('bound', '')}")
    print(f"greedy / reference best: {out['greedy_over_reference_best']:.4f}  ->  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
