"""Benchmark of the exact strategy's H⁻¹ for full vectors, side by side in one process:
inverting from the Cholesky factor (what `hessians.solve_exact` does for B = I) against solving
the factor against the identity (what it did before), on the Hessian of `linear` on Fashion-MNIST
pixels (p = 7,850; the cnn's final layer, p = 1,290, takes well under a second either way and is
timed in benchmarks/pipeline.py), with the inverse stage's one intra-op thread and with torch's
default. Prints a table and writes benchmarks/results/exact_inverse.json (machine, date, command).

Run:  .venv/bin/python -m benchmarks.exact_inverse
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from pruning_core import influence
from pruning_core.data import as_float, load_dataset
from pruning_core.training import fit_linear

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "exact_inverse.json"
COMMAND = ".venv/bin/python -m benchmarks.exact_inverse"
SHIFT = 1e-2


def hessian_of_linear(n: int) -> torch.Tensor:
    """H_data + λI of `linear` fitted on the first n Fashion-MNIST training images (p = 7,850)."""
    ds = load_dataset("fashion-mnist")
    X = as_float(ds.x[:n], np.float64).reshape(n, -1)
    model, _ = fit_linear(X, ds.y[:n], ds.n_classes, SHIFT, device="cpu")
    W, b = influence.last_layer_weights(model)
    curv = influence.last_layer_curvature(X, influence.softmax_probs(X, W, b), 1024)
    return curv.dense() + SHIFT * torch.eye(curv.p, dtype=torch.float64)


def compare(H: torch.Tensor, threads: int) -> dict:
    torch.set_num_threads(threads)
    L = torch.linalg.cholesky(H)
    eye = torch.eye(H.shape[0], dtype=torch.float64)
    started = time.perf_counter()
    solved = torch.cholesky_solve(eye, L)
    t_solve = time.perf_counter() - started
    started = time.perf_counter()
    inverse = torch.cholesky_inverse(L)
    t_inverse = time.perf_counter() - started
    return {"threads": threads, "solve_against_identity_s": t_solve, "inverse_from_factor_s": t_inverse,
            "speedup": t_solve / t_inverse,
            "max_relative_difference": float((solved - inverse).abs().max() / solved.abs().max()),
            "asymmetry_solve": float((solved - solved.T).abs().max() / solved.abs().max()),
            "asymmetry_inverse": float((inverse - inverse.T).abs().max() / inverse.abs().max())}


def main() -> None:
    default_threads = torch.get_num_threads()
    H = hessian_of_linear(2000)
    rows = [{"case": "linear on pixels, 2,000 samples", "p": H.shape[0], **compare(H, threads)}
            for threads in sorted({1, default_threads})]
    result = {"benchmark": "exact H⁻¹ for full vectors: from the Cholesky factor vs solving against I",
              "command": COMMAND, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpu_count": default_threads, "torch": torch.__version__},
              "rows": rows}
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'case':38} {'p':>6} {'threads':>7} {'solve I s':>10} {'factor s':>9} {'speedup':>8}")
    for r in rows:
        print(f"{r['case']:38} {r['p']:6d} {r['threads']:7d} {r['solve_against_identity_s']:10.2f} "
              f"{r['inverse_from_factor_s']:9.2f} {r['speedup']:7.2f}x")
    print(f"written: {RESULT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
