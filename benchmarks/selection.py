"""Selection benchmark: n = 1,000,000 vectors of p = 256 (float32), prune ratio 0.4. The
paper's solver (no strata) and the product's default on real scores (the same path under EL2N
difficulty strata, the easiest first) beside random and the influence-score ranking (smallest
‖s_i‖ first). Vectors: seeded Gaussian directions with heavy-tailed (exponential) norms and a
shared drift, the shape real influence vectors have; EL2N grows with the norm, with noise, as a
sample's gradient does. Writes benchmarks/results/selection.json."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from flows.parameters import selection_args
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
    # the default for scores that carry EL2N: the path under difficulty strata (per-stratum quotas)
    norms = np.linalg.norm(V, axis=1)
    el2n = np.clip(norms / norms.max() * np.sqrt(2) * np.random.default_rng(1).lognormal(0, 0.5, n), 0, np.sqrt(2))
    args = selection_args("influence", ratio, None, "greedy", 0, False, "auto", "auto", None, train_budget=1.0)
    started = time.perf_counter()
    result = select(V, args, {"el2n": el2n})
    rows.append({"method": f"influence (difficulty strata, {args.candidates} first: the default)",
                 "objective": result.objective, "seconds": time.perf_counter() - started,
                 "n_pruned": int(result.pruned.sum())})
    # bucketed: 8 buckets solved on a 2-worker LocalCluster, then a global swap search
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1") as cluster, Client(cluster) as client:
        started = time.perf_counter()
        result = select(V, SelectionArgs(prune_ratio=ratio, solver="bucketed", buckets=8),
                        map_fn=lambda f, jobs: client.gather(client.map(f, jobs, pure=False)))
        rows.append({"method": "influence (bucketed, 2 workers)", "objective": result.objective,
                     "seconds": time.perf_counter() - started, "n_pruned": int(result.pruned.sum()),
                     **{k: v for k, v in result.info.items() if k in ("swaps", "buckets", "merged_objective")}})
    out = {"benchmark": "selection", "command": "python -m benchmarks.selection", "n": n, "p": p, "ratio": ratio,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()}, "results": rows}
    path = Path(__file__).parent / "results" / "selection.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"n = {n}, p = {p}, prune ratio {ratio}  ({out['date']})")
    print(f"{'method':32} {'‖Σ s_i‖':>12} {'seconds':>9}  objective vs influence")
    for row in rows:
        print(f"{row['method']:32} {row['objective']:12.5g} {row['seconds']:9.2f}  "
              f"{row['objective'] / rows[0]['objective']:10.4g}x")
    print(f"bucketed speed-up: {rows[0]['seconds'] / rows[-1]['seconds']:.2f}x")
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
