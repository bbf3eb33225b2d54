"""Selection benchmark: n = 1,000,000 vectors of p = 256 (float32), prune ratio 0.4. The
default solver's time and objective beside random and the influence-score ranking (smallest
‖s_i‖ first). Vectors: seeded Gaussian directions with heavy-tailed (exponential) norms and a
shared drift, the shape real influence vectors have. Writes benchmarks/results/selection.json."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from pruning_core.selection import SelectionArgs, select


def instance(n: int, p: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    V = rng.standard_normal((n, p), dtype=np.float32)
    V *= rng.exponential(size=(n, 1)).astype(np.float32)
    V += 0.05 * rng.standard_normal(p).astype(np.float32)
    return V


def main() -> int:
    n, p, ratio = int(os.environ.get("SELECTION_N", 1_000_000)), 256, 0.4
    V = instance(n, p)
    rows = []
    for method in ("influence", "random", "influence-score"):
        started = time.perf_counter()
        result = select(V, SelectionArgs(method=method, prune_ratio=ratio))
        rows.append({"method": method, "objective": result.objective, "seconds": time.perf_counter() - started,
                     "n_pruned": int(result.pruned.sum()), **{k: v for k, v in result.info.items()
                                                             if k in ("swaps", "path_objective")}})
    out = {"benchmark": "selection", "command": "python benchmarks/selection.py", "n": n, "p": p, "ratio": ratio,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()}, "results": rows}
    path = Path(__file__).parent / "results" / "selection.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"n = {n}, p = {p}, prune ratio {ratio}  ({out['date']})")
    print(f"{'method':18} {'‖Σ s_i‖':>12} {'seconds':>9}  vs influence")
    for row in rows:
        print(f"{row['method']:18} {row['objective']:12.5g} {row['seconds']:9.2f}  "
              f"{row['objective'] / rows[0]['objective']:8.1f}x")
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
